"""Sharding (FSDP2): full parameters to generate from, and a sharded model's consolidated state dict."""

from contextlib import contextmanager

import torch
from accelerate import Accelerator


@contextmanager
def unsharded(model):
    """Yields a module that runs `generate` and no-grad forwards on full parameters with no communication: under FSDP2
    (`fully_shard`, the only sharding supported) the model unsharded once, resharding after forward off inside; else the
    unwrapped module. Collective under FSDP."""
    from accelerate.utils import extract_model_from_parallel
    from torch.distributed.fsdp import FSDPModule

    fsdp2 = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if fsdp2:
        # set_reshard_after_forward has no getter: keep each parameter group's setting (private) to put it back
        states = [m._get_fsdp_state() for m in fsdp2]
        saved = [(s, s._auto_reshard_after_forward, [(g, g.post_forward_mesh_info) for g in s._fsdp_param_groups])
                 for s in states]
        for m in fsdp2:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        # after FSDP's own post-forward hook (registered when the model was sharded)
        hook = model.register_forward_hook(lambda *_: None if torch.is_grad_enabled() else _forget_forward_order(states))
        try:
            yield model
        finally:
            hook.remove()
            _forget_forward_order(states)
            for m in fsdp2:
                m.reshard()
            for s, auto, groups in saved:
                s._auto_reshard_after_forward = auto
                for g, info in groups:
                    g.post_forward_mesh_info = info
    else:
        yield extract_model_from_parallel(model)


def _forget_forward_order(states: list) -> None:
    """Empties FSDP2's record of the forwards since the last backward (private, torch 2.13): only a backward clears
    it, so under `unsharded` (a forward per decoded token) it would grow for the whole phase."""
    for s in states:
        if hasattr(s._comm_ctx, "post_forward_order"):  # made by FSDP's lazy init, at the first forward
            s._comm_ctx.post_forward_order.clear()
        for g in s._fsdp_param_groups:
            g._post_forward_indices.clear()


def full_state_dict(accelerator: Accelerator, model) -> dict:
    """A prepared model's consolidated state dict, each tied weight under its first name only (as save_pretrained
    writes it)."""
    state_dict = accelerator.get_state_dict(model)
    seen, aliases = set(), []  # a gathered tied weight comes back as separate copies under each name
    for name, p in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        aliases += [plain_name(name)] if id(p) in seen else []
        seen.add(id(p))
    return {k: v for k, v in state_dict.items() if k not in aliases}


def plain_name(name: str) -> str:
    """A parameter's name in the plain model: without the activation-checkpointing wrapper's prefix (FSDP2 adds none)."""
    return name.replace("_checkpoint_wrapped_module.", "")

