"""Test-only launcher: run an algorithm script under accelerate's own FSDP path on CPU (gloo) processes.

    accelerate launch --config_file configs/fsdp.yaml --num_processes 2 tests/fsdp_cpu_shim.py dqo.py ARGS

`accelerate launch` reads the config and sets the FSDP environment of each process exactly as on a GPU node (the config's
mixed_precision included); the script then builds its Accelerator, FSDP plugin and mixed-precision policy from that
environment (runtime.launch.setup_accelerator) and `accelerator.prepare` wraps the models with accelerate's own FSDP2
code. What accelerate cannot do on CPU, and this shim changes after `Accelerator.__init__`: AcceleratorState sets
distributed_type FSDP only for GPU-like devices; the shim sets it, with the plugin the script built (or one from the
environment), on the gloo CPU state, in PartialState's shared state too, since every later AcceleratorState() copies
that one over.
Not covered here: NCCL, CUDA kernels and the CUDA caching allocator, `fsdp_cpu_ram_efficient_loading` (off in
configs/fsdp.yaml).

With SHIM_GRAD_MEMORY=PATH, the first micro-batches (`accelerator.accumulate` blocks) of the first prepared FSDP2 model
run under torch's FSDPMemTracker (a tensor-level tracker: every storage allocated, by category); one JSON line per
micro-batch goes to PATH.<rank>: whether it was the step's last, and the bytes alive at its end per category ("Sharded
Grad", "Unsharded Grad", ...) and at its peak, and each trained network's precision. The process ends after them.
"""

import contextlib
import json
import os
import runpy
import sys

import accelerate
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__


def _init_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    fsdp = {"distributed_type": DistributedType.FSDP}
    # Both shared dicts: AcceleratorState() (built again e.g. by every AcceleratedOptimizer) copies PartialState's over its own
    PartialState._shared_state.update(fsdp)
    plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()  # the script's, else from accelerate launch's env
    if plugin.mixed_precision_policy is None and self.mixed_precision != "no":
        plugin.set_mixed_precision(self.mixed_precision)  # what accelerate does with a GPU state
    AcceleratorState._shared_state.update(fsdp, fsdp_plugin=plugin)


accelerate.Accelerator.__init__ = _init_fsdp_on_cpu

if os.environ.get("SHIM_RANK1_GRAD_SCALE"):
    # A planted bug for the equivalence tests: rank 1's loss, hence every gradient it contributes to the reduction, is
    # scaled (0.5: a half gradient on one rank, as a wrong token scale or a dropped micro-batch there would give).
    _backward, _scale = accelerate.Accelerator.backward, float(os.environ["SHIM_RANK1_GRAD_SCALE"])

    def _backward_scaled(self, loss, **kwargs):
        return _backward(self, loss * _scale if self.process_index == 1 else loss, **kwargs)

    accelerate.Accelerator.backward = _backward_scaled

if os.environ.get("SHIM_GRAD_MEMORY"):
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import FSDPModule

    _prepare, _accumulate, _tracked = accelerate.Accelerator.prepare, accelerate.Accelerator.accumulate, {}

    def _prepare_and_remember(self, *objs, **kwargs):
        out = _prepare(self, *objs, **kwargs)
        prepared = out if isinstance(out, tuple | list) else (out,)
        models = [m for m in prepared if isinstance(m, FSDPModule)]
        optims = [o for o in prepared if isinstance(o, torch.optim.Optimizer)]
        if models and optims and not _tracked:
            _tracked["model"], _tracked["optimizer"] = models[0], optims[0].optimizer  # the policy and its AdamW
        elif models:
            _tracked.setdefault("others", []).extend(models)  # e.g. the value model: its gradients count as "Temp"
        return out

    @contextlib.contextmanager
    def _accumulate_tracked(self, *models):
        """The first SHIM_GRAD_MEMORY_BLOCKS (default 4) micro-batches of the tracked model run inside one tracker
        session (FSDPMemTracker cannot be entered twice on one model), its statistics reset at each micro-batch; then
        the process ends. SHIM_NO_SYNC_EACH_BATCH=1 turns accelerate's sync_each_batch off first: the configuration
        before setup_accelerator set it, which kept unsharded gradients between micro-batches."""
        if os.environ.get("SHIM_NO_SYNC_EACH_BATCH") == "1":
            self.gradient_state.plugin_kwargs["sync_each_batch"] = False
        with _accumulate(self, *models):
            blocks = int(os.environ.get("SHIM_GRAD_MEMORY_BLOCKS", "4"))
            if _tracked.get("model") not in models or _tracked.setdefault("blocks", 0) >= blocks:
                yield
                return
            if "tracker" not in _tracked:
                _tracked["tracker"] = FSDPMemTracker(_tracked["model"], _tracked["optimizer"])
                _tracked["tracker"].__enter__()
            tracker = _tracked["tracker"]
            tracker.reset_mod_stats()  # each micro-batch its own peak
            yield
            units = lambda snap: {k: v for dev in snap.values() for k, v in dev.items()}  # noqa: E731  (one device)
            row = dict(sync=self.sync_gradients, current=units(tracker.get_tracker_snapshot("current")),
                       peak=units(tracker.get_tracker_snapshot("peak")),
                       params=sum(p.numel() for p in _tracked["model"].parameters()),  # DTensors: the full size
                       other_params=sum(p.numel() for m in _tracked.get("others", []) for p in m.parameters()),
                       # each trained network's FSDP2 precision: compute and reduction dtypes, and its master weights'
                       precision=[dict(param=str(m._get_fsdp_state()._mp_policy.param_dtype),
                                       reduce=str(m._get_fsdp_state()._mp_policy.reduce_dtype),
                                       masters=sorted({str(p.dtype) for p in m.parameters()}))
                                  for m in [_tracked["model"], *_tracked.get("others", [])]])
            with open(f"{os.environ['SHIM_GRAD_MEMORY']}.{self.process_index}", "a") as f:
                f.write(json.dumps(row) + "\n")
            _tracked["blocks"] += 1
            if _tracked["blocks"] == blocks:  # measured: stop here. (torch 2.13's FSDPMemTracker does not restore the
                os._exit(0)  # hooks of a module group that shares one FSDP state, as accelerate's root wrap has)

    accelerate.Accelerator.prepare = _prepare_and_remember
    accelerate.Accelerator.accumulate = _accumulate_tracked

sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # the script's own imports (common)
runpy.run_path(sys.argv[0], run_name="__main__")
