"""Peak GPU memory of every step of each algorithm's paper run, traced at full size on CPU with fake tensors.

    python benchmarks/memory_trace.py                # all six algorithms: about 4 minutes on 2 cores
    python benchmarks/memory_trace.py dqo spo        # some of them
    python benchmarks/memory_trace.py --all_micro_batches   # every micro-batch of each optimizer step (slower)

What runs: google/gemma-1.1-7b-it's architecture (built from its config numbers, `GEMMA_7B`; no download) as tensors
that carry shapes and dtypes but no data (torch FakeTensorMode), on rank 0 of a fake process group of `WORLD` (torch's
`fake` backend: collectives return at once). Each network is sharded by accelerate's own FSDP2 code
(`fsdp2_apply_ac`, `fsdp2_prepare_model`) with the plugin that `accelerate launch --config_file configs/fsdp.yaml` builds
from that file (transformer-layer wrap, activation checkpointing, reshard after forward) and the MixedPrecisionPolicy
the scripts pass (bf16 parameters, fp32 reduction; trainable weights upcast to fp32 master weights). torch's
FSDPMemTracker counts every byte allocated on the device, by category, and reports the peak of each step.

The project's own code runs wherever it can under fake tensors: `common.token_logprobs` / `token_logprob_variants`,
`common.ValueModel`, `common.collate`, `common.score_rows` (its token budget), `runtime.sharding.unsharded`,
`common.frozen_copy`, `spo.RolloutPolicy.maybe_refresh`, `kto.mismatched_pairs`, and each file's loss function, then
backward and gradient clipping. What is replaced, and why:
  - generation: `model.generate` stops when every row has finished, which reads the sampled tokens. `decode` below is
    its prefill plus decode steps with the model's own KV cache (transformers' DynamicCache), every row running all
    `max_new_tokens` (the worst case). The cache only grows, so the peak is at the last steps: the steps between the
    first `DECODE_STEPS` and the last `DECODE_STEPS` extend the cache to its length directly (one cat per layer, as a
    decode step makes) instead of running the model 500 times;
  - reads of tensor values (the count of `nonzero`, `.item()`, `.tolist()`): answered with worst-case constants,
    every token of every row real (`WorstCaseReads`);
  - AdamW steps each parameter's local shard (`DTensor._local_tensor`) with foreach=True, as it runs on CUDA over the
    DTensor parameters: under fake tensors the tracker keeps the DTensor path's temporaries alive (115 GB for 8.5 GB of
    moments);
  - the gradient accumulation loop is written out: backward each micro-batch (1/grad_accum of the loss), which under
    FSDP2 reduce-scatters every micro-batch (accelerate's sync_each_batch, as the scripts set it), then one clip and
    optimizer step; TRACED_MICRO_BATCHES of them (see there), the optimizer's moments made before the trace;
  - the frozen copies and the value network are built as the scripts' copies end up (frozen_copy: bf16, eval, no
    gradients; ValueModel from a backbone, as ValueModel.from_pretrained assembles it): fake modules cannot be
    deep-copied or moved;
  - not traced, added from a formula (named in the output): saving, which gathers one parameter at a time in fp32
    before copying it to host memory (`SAVE`: the largest parameter over the resident state).

What the trace cannot see: the CUDA context, NCCL's buffers, the caching allocator's fragmentation and kernels'
workspaces (cuBLAS, flash attention). `MARGIN_GB` of the 80 GB is left for them; a first GPU run should compare
`torch.cuda.max_memory_allocated` with this trace.

Prints `<algo> <step> peak_gb <x>` and the tracker's breakdown per step, writes benchmarks/results/memory_trace.json,
and ends with `fits 80 GB: yes|no` (every step within 80 - MARGIN_GB). The JSON carries the `fingerprint` of what it was
traced from (this file, configs/fsdp.yaml, the resolved paper settings and `traced_code`, the project code the trace
runs): tests/test_memory_plan.py fails, naming this command, when any of them changed and the trace was not run again.
What is copied rather than run (the micro-batch, `decode`) is checked against the scripts' own code on real tensors at
a tiny size by tests/test_memory_trace.py.
"""

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import runtime.checkpoint  # noqa: E402
import runtime.sharding  # noqa: E402
import runtime.cli  # noqa: E402
import runtime.files  # noqa: E402

GEMMA_7B = dict(model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=16, head_dim=256, tie_word_embeddings=True)  # its config.json
WORLD = 8  # configs/fsdp.yaml's num_processes
GPU_GB, MARGIN_GB = 80, 8
PROMPT_TOKENS = 320  # the longest GSM8K question (985 characters, 183 words) with the prompt template and chat markup
ALGOS = ("rs", "dpo", "kto", "dro", "dqo", "spo")
DECODE_STEPS = 2  # decode steps run through the model at each end of the generation
# Micro-batches traced per optimizer step. Under FSDP2 with a reduce-scatter every micro-batch, the second micro-batch
# is the first with sharded gradients already accumulated, and every later one repeats its allocations exactly; the
# step's optimizer update follows the last traced one. `--all_micro_batches` traces the paper's number instead
# (4 for DRO and DQO, about 2 minutes more each)
TRACED_MICRO_BATCHES = 2
RESULTS = os.path.join(ROOT, "benchmarks", "results", "memory_trace.json")
GB = 1e9


# ---------------------------------------------------------------------------------------------------------------------
# The launch: configs/fsdp.yaml as accelerate reads it, on rank 0 of a fake world
# ---------------------------------------------------------------------------------------------------------------------
def fsdp_env(config_file: str = os.path.join(ROOT, "configs", "fsdp.yaml")) -> dict:
    """The FSDP_* environment `accelerate launch --config_file` sets from the file's fsdp_config."""
    with open(config_file) as f:
        cfg = yaml.safe_load(f)
    return {"ACCELERATE_USE_FSDP": "true", **{"FSDP_" + k.removeprefix("fsdp_").upper(): str(v).lower()
                                                if isinstance(v, bool) else str(v) for k, v in cfg["fsdp_config"].items()}}


def launch(world: int = WORLD):
    """The accelerator stand-in (`stand_in`) on the CPU, with rank 0 of a fake process group of `world` (started once)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return stand_in(torch.device("cpu"))


def stand_in(device: torch.device):
    """An accelerator stand-in with what accelerate's FSDP2 preparation reads: the plugin built from configs/fsdp.yaml's
    environment with the scripts' MixedPrecisionPolicy, bf16 mixed precision, `device` and a 1-D mesh over the started
    process group (made before fake tensors exist). benchmarks/gpu_check.py uses it on a real group of one."""
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    env = fsdp_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        plugin = FullyShardedDataParallelPlugin(mixed_precision_policy=MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    # is_main_process False: accelerate's logger needs its own state, and logging is all that rank 0 does differently
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="bf16", is_main_process=False,
                           device=device, torch_device_mesh=mesh,
                           parallelism_config=SimpleNamespace(fsdp_dim_names=("dp_shard",)))


def prepare(acc, model):
    """accelerate's FSDP2 preparation (Accelerator._prepare_fsdp2): activation checkpointing, then fully_shard."""
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model

    if acc.state.fsdp_plugin.activation_checkpointing:
        model = fsdp2_apply_ac(acc, model)
    return fsdp2_prepare_model(acc, model)


class LocalAdamW:
    """torch's AdamW (foreach, as on CUDA) on the local shards of a sharded model's parameters; see the docstring."""

    def __init__(self, model, lr: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW([p._local_tensor for p in self.params], lr=lr, weight_decay=0.0, foreach=True)

    def clip_grad_norm_(self, max_norm: float):
        """accelerator.clip_grad_norm_ (torch's, foreach as on CUDA) on the local shards: the same memory, less the
        all-reduce of one scalar; the tracker keeps the DTensor path's temporaries alive, as in `step`."""
        for p, local in zip(self.params, self.opt.param_groups[0]["params"]):
            local.grad = p.grad._local_tensor
        torch.nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], max_norm, foreach=True)

    def step(self):
        for p, local in zip(self.params, self.opt.param_groups[0]["params"]):
            local.grad = p.grad._local_tensor
        self.opt.step()

    def init_state(self):
        """The moments exist from the first step on: made by one step on zero gradients, before the trace."""
        for local in self.opt.param_groups[0]["params"]:
            local.grad = torch.zeros_like(local)
        self.opt.step()
        for local in self.opt.param_groups[0]["params"]:
            local.grad = None

    def zero_grad(self):
        for p, local in zip(self.params, self.opt.param_groups[0]["params"]):
            p.grad = local.grad = None


# ---------------------------------------------------------------------------------------------------------------------
# Tracing under fake tensors
# ---------------------------------------------------------------------------------------------------------------------
def _worst_case_reads_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    def all_indices(x):
        grids = torch.meshgrid(*[torch.arange(n, device=x.device) for n in x.shape], indexing="ij")
        return [g.reshape(-1) for g in grids]  # per dimension, the index of every element

    class WorstCaseReads(TorchDispatchMode):
        """Answers what fake tensors cannot: `nonzero` as if every element were nonzero (every token of every row real),
        a scalar read as 1, `allclose` as true."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.nonzero.default:
                return torch.stack(all_indices(args[0]), dim=1)  # (numel, ndim), as nonzero gives
            if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
                # a boolean mask selects through nonzero inside the op: every element selected
                idx = [j for i in args[1] for j in ((i,) if i is None or i.dtype != torch.bool else all_indices(i))]
                return func(args[0], idx)
            if func is torch.ops.aten.allclose.default:  # token_logprobs' check of its head against the model's logits
                return True
            if func is torch.ops.aten._local_scalar_dense.default:
                return True if args[0].dtype == torch.bool else 1
            return func(*args, **(kwargs or {}))

    return WorstCaseReads()


@contextmanager
def fake_reads():
    """WorstCaseReads, and `.tolist()` of a fake tensor as zeros of its shape (score_rows stores its log-probs so)."""
    from torch._subclasses.fake_tensor import FakeTensor

    tolist = torch.Tensor.tolist
    torch.Tensor.tolist = lambda t: np.zeros(t.shape).tolist() if isinstance(t, FakeTensor) else tolist(t)
    try:
        with _worst_case_reads_mode():
            yield
    finally:
        torch.Tensor.tolist = tolist


def make_tracker(trained: list, optimizers: list, frozen: list):
    """FSDPMemTracker over every trained network (their FSDP modules, sharded and unsharded parameters and gradients,
    all-gather and reduce-scatter buffers), every optimizer's states, and the frozen copies (counted as Buffer)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType

    class Tracker(FSDPMemTracker):
        def __init__(self):
            super().__init__(trained[0])
            self._root_mod = torch.nn.ModuleList(trained)

        def _fsdp_state_pre_forward(self, fsdp_mod, orig):
            inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)
            if not any(fsdp_mod is m for m in trained):
                return inner

            def again(*args, **kwargs):  # a root's module stats are per call (one call, one iteration); the peak stays
                if not self._mod_tracker.is_bw:
                    self.memory_tracking.pop(fsdp_mod, None)
                return inner(*args, **kwargs)

            return again

        def _instrument_fsdp_module(self):
            super()._instrument_fsdp_module()
            for m in frozen:
                for t in [*m.parameters(), *m.buffers()]:
                    self._update_and_maybe_create_winfos(t, _FSDPRefType.BUFFER)

        def _update_peak_stats(self, peak_state):
            # Only the device's peak is read (`snapshot`). torch also updates a peak per active module, in a pass over
            # every tracked module at every operator: two thirds of a full-size trace's time, for numbers never read.
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

        def _instrument_optimizer(self):
            handles = []
            for o in optimizers:
                self._optm = o.opt
                super()._instrument_optimizer()
                handles += self._optimizer_hook_handles
            self._optimizer_hook_handles = tuple(handles)

    return Tracker()


def begin_step(tracker) -> None:
    """Starts a step's peak at the memory in use now (as entering the tracker does)."""
    tracker._peak_mem_snap = tracker.get_tracker_snapshot()
    tracker._peak_mem = {dev: snap["Total"] for dev, snap in tracker._peak_mem_snap.items()}


def snapshot(tracker, kind: str = "peak") -> dict:
    """{category: bytes} on the device, categories without bytes left out, and "Total"."""
    (snap,) = tracker.get_tracker_snapshot(kind).values()
    return {getattr(k, "value", k): v for k, v in snap.items() if v}


# ---------------------------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------------------------
def decode(model, rows: int, prompt_tokens: int, max_new_tokens: int, sampling: dict, vocab: int) -> None:
    """`generate_batch`'s generation without its data-dependent control flow: prefill, then decode steps with the
    model's KV cache, every row running `max_new_tokens` steps; the middle steps only extend the cache (docstring)."""
    from transformers import DynamicCache

    ids = torch.randint(0, vocab, (rows, prompt_tokens))  # (B, P)
    attn = torch.ones(rows, prompt_tokens, dtype=torch.long)
    cache = DynamicCache(config=common.unwrap_causal_lm(model).config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for t in range(max_new_tokens - 1):
            if DECODE_STEPS <= t < max_new_tokens - 1 - DECODE_STEPS:
                if t == DECODE_STEPS:  # the cache grows by one token a step, up to the last DECODE_STEPS steps
                    n = max_new_tokens - 1 - 2 * DECODE_STEPS
                    for layer in cache.layers:  # (B, heads, tokens, head_dim) each
                        k, v = layer.keys, layer.values
                        layer.keys = torch.cat([k, k.new_zeros(*k.shape[:2], n, k.shape[-1])], 2)
                        layer.values = torch.cat([v, v.new_zeros(*v.shape[:2], n, v.shape[-1])], 2)
                        del k, v
                    attn = torch.cat([attn, attn.new_ones(rows, n)], 1)
                continue
            logits = out.logits[:, -1].float()  # (B, V), as generate's logits processors take them
            if sampling.get("temperature", 0) > 0:
                probs = common.warp_logits(logits, **sampling).softmax(-1)
                nxt = torch.multinomial(probs, 1)  # (B, 1)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            attn = torch.cat([attn, attn.new_ones(rows, 1)], 1)
            out = model(input_ids=nxt, attention_mask=attn, past_key_values=cache, use_cache=True, logits_to_keep=1)
    del out, cache


def rows_of(n: int, prompt_tokens: int, response_tokens: int, vocab: int) -> list[dict]:
    """`n` offline rows of full length, with every field an algorithm's batch reads."""
    return [dict(prompt_ids=[1] * prompt_tokens, response_ids=[2] * response_tokens, ref_logps=[0.0] * response_tokens,
                 behavior_logps=[0.0] * response_tokens, rewards=[0.0] * response_tokens, reward=float(i % 2),
                 q0=0.0, answer="0", prompt_idx=i) for i in range(n)]


def micro_batch(algo: str, module, args, nets: dict, batch_rows: list[dict], grad_accum: int) -> None:
    """One micro-batch's forward and backward, as the file's training loop computes it (its `# ALGO LOGIC: loss`)."""
    pad = 0
    fields = {"dqo": (("ref_logps", "behavior_logps", "rewards"), ()), "dro": (("ref_logps",), ("reward",)),
              "kto": (("ref_logps",), ("reward",)), "spo": (("ref_logps",), ("q0", "reward")), "dpo": (("ref_logps",), ()),
              "rs": ((), ())}[algo]
    if algo == "dpo":
        batch_rows = [r for pair in zip(batch_rows[0::2], batch_rows[1::2]) for r in pair]
    batch = common.collate(batch_rows, pad, *fields)
    model, ids, attn, mask = nets["policy"], batch["input_ids"], batch["attention_mask"], batch["mask"]
    policy_logps = common.token_logprobs(model, ids, attn)  # (B, T)
    if algo == "rs":
        loss, _ = module.rs_loss(policy_logps, mask)
    elif algo == "dpo":
        loss, _ = module.dpo_loss(policy_logps, batch["ref_logps"], mask, args.beta)
    elif algo == "kto":
        kl = common.collate(module.mismatched_pairs(batch_rows), pad)
        with torch.no_grad(), common.reference_mode(nets["ref"]):
            kl_ref = (common.token_logprobs(nets["ref"], kl["input_ids"], kl["attention_mask"]) * kl["mask"]).sum(-1)
        with torch.no_grad():
            kl_policy = (common.token_logprobs(model, kl["input_ids"], kl["attention_mask"]) * kl["mask"]).sum(-1)
        loss, _ = module.kto_loss(policy_logps, batch["ref_logps"], torch.cat([kl_policy] * WORLD),
                                  torch.cat([kl_ref] * WORLD), batch["reward"] == 1.0, mask, args.beta, 1.0,
                                  args.undesirable_weight)
    elif algo == "spo":
        loss, _ = module.spo_loss(policy_logps, batch["ref_logps"], batch["q0"], batch["reward"] - 1, mask, args.beta,
                                  args.loss_type)
    else:
        values = nets["value"](ids, attn)  # (B, T)
        if algo == "dro":
            loss, _ = module.dro_loss(policy_logps, batch["ref_logps"], module.prompt_values(values, mask), batch["reward"],
                                      mask, args.beta)
        else:
            loss, _ = module.dqo_loss(policy_logps, batch["ref_logps"], batch["behavior_logps"], values, batch["rewards"],
                                      mask, args.beta, args.lam, args.is_clip or None, not args.no_is_policy,
                                      not args.no_is_value)
    (loss / grad_accum).backward()  # accelerator.backward: FSDP2 reduce-scatters each micro-batch (sync_each_batch)


def paper_settings(algo: str, world: int = WORLD, overrides: dict | None = None) -> dict:
    """The algorithm's paper defaults: micro-batch, generation batch, accumulation steps, sampling and lengths;
    `overrides` (flags) replace some."""
    module = importlib.import_module(algo)
    d = {**runtime.cli.RUN_DEFAULTS["paper"], **module.PAPER, **(overrides or {})}
    args = module.Args()
    for k, v in d.items():
        setattr(args, k, v)
    args.max_new_tokens = common.TASK_MAX_NEW_TOKENS[d["task"]]
    per = d["per_device_batch_size"]
    grad_accum = d["global_batch_size"] // (per * world)
    assert grad_accum * per * world == d["global_batch_size"], (algo, "the global batch is not whole micro-batches")
    online = len(module.online_slots(per, args.online_fraction)) if algo == "spo" else 0
    return dict(module=module, args=args, per_device_batch_size=per, gen_batch_size=d["gen_batch_size"], grad_accum=grad_accum,
                n_samples=d["n_samples"], max_new_tokens=args.max_new_tokens, online_rows=online)


def trace(algo: str, config: dict = GEMMA_7B, world: int = WORLD, per_device_batch_size: int | None = None,
          gen_batch_size: int | None = None, grad_accum: int | None = None, prompt_tokens: int = PROMPT_TOKENS,
          max_new_tokens: int | None = None, steps: tuple = ("train", "generate", "score", "rollout", "refresh", "save"),
          acc=None, traced_micro_batches: int = TRACED_MICRO_BATCHES, overrides: dict | None = None) -> dict:
    """Peak bytes on rank 0 of each step of `algo`'s run (by default its paper settings, `overrides` replacing some
    flags) with the sharding of configs/fsdp.yaml, in "steps": {step: {"peak": bytes, "start": bytes in use as it
    began, "breakdown": {category: bytes} at the peak, "added": {term: bytes}}}, and "first_micro_batch": {"start",
    "peak", "end": {category: bytes}} of the first micro-batch of "train" (tests/test_memory_trace.py compares it with
    each script's own loop). Steps:
    "train" (grad_accum micro-batches and the optimizer steps), "generate" (a generate call of gen_batch_size rows),
    "score" (score_rows on one offline chunk), "save" (formula), and SPO's "rollout" (its frozen rollout policy
    generating a micro-batch's fresh rollouts, scored by the frozen reference) and "refresh" (the rollout policy copied
    from the gathered policy). Training state (optimizer moments) is resident in every step after "train"."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    s = paper_settings(algo, world, overrides)
    module, args = s["module"], s["args"]
    per = per_device_batch_size or s["per_device_batch_size"]
    gen = gen_batch_size or s["gen_batch_size"]
    accum = grad_accum or s["grad_accum"]
    new = max_new_tokens or s["max_new_tokens"]
    acc = acc or launch(world)
    cfg = AutoConfig.for_model(**config)
    vocab = config["vocab_size"]
    out = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        # Under fake tensors a module can be built but not deep-copied or moved (torch refuses to swap a parameter the
        # fake mode's memo holds a weak reference to), so each copy the scripts make from the loaded model is built as
        # that copy ends up: frozen_copy's (bf16, eval, no gradients) and ValueModel's (the backbone and a zero head, as
        # ValueModel.from_pretrained assembles it)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)  # Gemma's stored dtype, on the CPU
        nets = {}

        def frozen_copy():
            return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().requires_grad_(False)

        if algo == "kto" or (algo == "spo" and s["online_rows"]):
            nets["ref"] = frozen_copy()
        if algo == "spo" and s["online_rows"]:
            rollout_policy = module.RolloutPolicy.__new__(module.RolloutPolicy)
            rollout_policy.model, rollout_policy.interval, rollout_policy.version = frozen_copy(), 1, 0
        if algo in ("dro", "dqo"):
            backbone = AutoModel.from_config(cfg, dtype=torch.bfloat16)
            nets["value"] = prepare(acc, common.ValueModel(backbone, copy_backbone=False))
        nets["policy"] = model = prepare(acc, model)
        trained = [model] + ([nets["value"]] if "value" in nets else [])
        optimizers = [LocalAdamW(model, args.lr)] + ([LocalAdamW(nets["value"], args.value_lr)] if "value" in nets else [])
        frozen = [nets["ref"]] if "ref" in nets else []
        frozen += [rollout_policy.model] if algo == "spo" and s["online_rows"] else []
        for o in optimizers:
            o.init_state()
        tracker = nets["tracker"] = make_tracker(trained, optimizers, frozen)
        for m in trained:
            m.train()

        def step(name, fn):
            if name not in steps:
                return
            t0 = time.time()
            begin_step(tracker)
            start = snapshot(tracker, "current")["Total"]
            with fake_reads():
                fn()
            peak = snapshot(tracker)
            out[name] = {"peak": peak["Total"], "start": start, "breakdown": peak, "added": {}, "seconds": time.time() - t0}

        first = {}  # the first micro-batch of "train": {category: bytes} in use before it, at its peak and after it

        def train():
            rows = rows_of(per * (2 if algo == "dpo" else 1), prompt_tokens, new, vocab)
            first["start"] = snapshot(tracker, "current")
            for i in range(min(accum, traced_micro_batches)):
                micro_batch(algo, module, args, nets, rows, accum)
                if i == 0:  # the step begins with it, so the step's peak so far is its own
                    first.update(peak=snapshot(tracker), end=snapshot(tracker, "current"))
            for o in optimizers:
                o.clip_grad_norm_(args.max_grad_norm)
            for o in optimizers:
                o.step()
            for o in optimizers:
                o.zero_grad()

        sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

        def generate():  # an evaluation or offline-dataset call: the policy gathered in bf16 (`unsharded`)
            with runtime.sharding.unsharded(model) as policy, common.reference_mode(policy):
                decode(policy, gen, prompt_tokens, new, sampling, vocab)

        def score():  # the offline dataset's chunk: max(1, gen // n) prompts x n samples, under `unsharded`
            chunk = rows_of(max(1, gen // s["n_samples"]) * s["n_samples"], prompt_tokens, new, vocab)
            with runtime.sharding.unsharded(model) as policy, common.reference_mode(policy):
                common.score_rows(policy, chunk, 0, warp=sampling)

        def rollout():  # spo.pending_rollouts: the frozen rollout policy generates a call of gen_batch_size rows (a
            # refresh window's rollouts, in such calls); the frozen reference scores a micro-batch's online rows
            fresh = rows_of(s["online_rows"], prompt_tokens, new, vocab)
            decode(rollout_policy.model, gen, prompt_tokens, new, dict(temperature=args.rollout_max_temperature,
                                                                       top_p=args.rollout_top_p, top_k=0), vocab)
            with common.reference_mode(nets["ref"]):
                common.score_rows(nets["ref"], fresh, 0)

        def refresh():
            rollout_policy.maybe_refresh(model, 0)

        # one tracker context for all steps: leaving it puts FSDP's forward hooks back as single-module hooks, which
        # breaks the group accelerate makes of the tied embedding, head and final norm
        with tracker:
            step("train", train)
            step("generate", generate)
            step("score", score)
            if algo == "spo" and s["online_rows"]:
                step("rollout", rollout)
                step("refresh", refresh)
            (resident,) = tracker.get_tracker_snapshot("current").values()
        if "save" in steps:
            # saving (runtime.checkpoint.save_model: accelerate's get_state_dict) gathers one parameter at a time in fp32 and
            # copies it to host memory: not traced (on CPU host and device are one), the largest parameter added to the
            # resident state
            largest = max(p.numel() for m in trained for p in m.parameters()) * 4
            base = sum(v for k, v in resident.items() if k != "Total")
            out["save"] = {"peak": base + largest, "breakdown": {getattr(k, "value", k): v for k, v in resident.items() if v},
                           "added": {"largest parameter gathered in fp32 (not traced)": largest}, "seconds": 0.0}
    return {"algo": algo, "world": world, "per_device_batch_size": per, "gen_batch_size": gen, "grad_accum": accum,
            "traced_micro_batches": min(accum, traced_micro_batches),
            "prompt_tokens": prompt_tokens, "max_new_tokens": new, "online_rows": s["online_rows"], "steps": out,
            "first_micro_batch": first}


# ---------------------------------------------------------------------------------------------------------------------
# What a trace came from: the stored results are checked against the code and settings that would trace them now
# ---------------------------------------------------------------------------------------------------------------------
REGENERATE = "python benchmarks/memory_trace.py"  # traces all six algorithms and writes RESULTS
NOT_TRACED = ("main", "report", "table", "fingerprint", "stale")  # this file's functions that trace nothing


def _names(code) -> set[str]:
    """The global and attribute names read by a code object and by the code nested in it (functions, comprehensions)."""
    names = {n for n in code.co_names if not n.startswith("__")}  # not a module's __doc__ or __name__
    for c in code.co_consts:
        if isinstance(c, type(code)):
            names |= _names(c)
    return names


def _plain(value) -> bool:
    """Data whose canonical JSON is the same in every process: None, numbers, strings and containers of them."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _codes(obj) -> list:
    """The code objects of a function (decorators unwrapped) or of every method, property and nested function of a class."""
    if isinstance(obj, type):
        members = [m.__func__ if isinstance(m, staticmethod | classmethod) else m for m in vars(obj).values()]
        members += [f for m in vars(obj).values() if isinstance(m, property) for f in (m.fget, m.fset) if f]
        return [c for m in members if callable(m) and not isinstance(m, type) for c in _codes(m)]
    obj = inspect.unwrap(obj)
    return [obj.__code__] if hasattr(obj, "__code__") else []


def traced_code() -> dict[str, str]:
    """{name: source} of the project code a trace runs: the functions and classes (whole, methods included) of common.py,
    the algorithm files and the project modules they import (runtime/, ...), found by name from this file's tracing
    functions and then from each one found, and the module-level constants they read (chunk sizes, PAPER, ...). Found
    by name, so it over-approximates (a name defined in several files counts in each); an algorithm file's `main` is
    not reached (the trace copies its micro-batch instead: tests/test_memory_trace.py runs the scripts' own against it).
    Paths under the repository are written relative to it, so the text is the same in every checkout."""
    modules = {m.__name__: m for m in map(importlib.import_module, ("common", *ALGOS))}
    todo = list(modules.values())
    while todo:  # the project modules they import, by module object or by the module of what they import
        for v in list(vars(todo.pop()).values()):
            name = v.__name__ if inspect.ismodule(v) else getattr(v, "__module__", None)
            m = sys.modules.get(name) if isinstance(name, str) else None
            if m and name not in modules and os.path.abspath(getattr(m, "__file__", None) or "/").startswith(ROOT + os.sep):
                modules[name] = m
                todo.append(m)
    here = [v for k, v in globals().items() if k not in NOT_TRACED and (inspect.isfunction(v) or inspect.isclass(v))
            and v.__module__ == __name__]
    names = set().union(*(_names(c) for v in here for c in _codes(v)))
    found, seen = {}, set()
    while names - seen:
        name = min(names - seen)
        seen.add(name)
        for mod_name, m in modules.items():
            v = vars(m).get(name)
            if (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ in modules:
                key = f"{v.__module__}.{v.__qualname__}"
                if key not in found:
                    found[key] = inspect.getsource(v)
                    names = names.union(*(_names(c) for c in _codes(v)))
                    names |= {b.__name__ for b in getattr(v, "__mro__", ())[1:] if b.__module__ in modules}  # bases
            elif v is not None and not inspect.ismodule(v) and not callable(v) and _plain(v):
                found[f"{mod_name}.{name}"] = json.dumps(v, sort_keys=True, default=sorted).replace(ROOT, "<repo>")
    return dict(sorted(found.items()))


def fingerprint() -> dict:
    """sha256 of what the stored trace depends on besides torch, transformers and accelerate: this file, configs/fsdp.yaml
    (the launch it follows), each algorithm's resolved paper settings, and `traced_code`. {"sha256": all of it,
    "parts": {name: sha256 of that part}}; `stale` compares the parts."""
    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    files = {}
    for f in ("benchmarks/memory_trace.py", "configs/fsdp.yaml"):
        with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
            files[f] = fh.read()
    settings = {}
    for algo in ALGOS:
        s = paper_settings(algo)
        settings[algo] = {**{k: v for k, v in s.items() if k not in ("module", "args")}, "args": dataclasses.asdict(s["args"])}
    parts = {**{f: sha(t) for f, t in files.items()}, "paper settings": sha(json.dumps(settings, sort_keys=True, default=str)),
             **{k: sha(v) for k, v in traced_code().items()}}
    return {"sha256": sha(json.dumps(parts, sort_keys=True)), "parts": parts}


def stale(path: str = RESULTS) -> str | None:
    """Why the trace stored at `path` is not what this code and these settings trace (None: it is)."""
    with open(path) as f:
        stored = json.load(f).get("fingerprint") or {"sha256": None, "parts": {}}
    now = fingerprint()
    if stored["sha256"] == now["sha256"]:
        return None
    changed = sorted(k for k in now["parts"].keys() | stored["parts"].keys() if now["parts"].get(k) != stored["parts"].get(k))
    what = (", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            if stored["parts"] else "it has no fingerprint")
    return (f"{os.path.relpath(path, ROOT)} was traced from other code or settings ({what}): run `{REGENERATE}` "
            "(about 4 minutes on 2 cores) and commit the JSON it writes, and the table it prints into docs/memory-and-time.md")


def report(result: dict) -> list[str]:
    lines = []
    for name, st in result["steps"].items():
        lines.append(f"{result['algo']} {name} peak_gb {st['peak'] / GB:.2f}")
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in st["breakdown"].items() if k != "Total")
        added = ", ".join(f"{k} {v / GB:.2f}" for k, v in st["added"].items())
        lines.append(f"    {parts}" + (f"; added: {added}" if added else "") + f" ({st['seconds']:.0f} s)")
    return lines


TABLE_STEPS = ("train", "generate", "score", "rollout", "refresh", "save")


def table(results: dict) -> str:
    """docs/memory-and-time.md's table: per algorithm, its paper batch sizes and the traced peak GB per GPU of each step."""
    lines = ["| algorithm | micro-batch per GPU x accumulation | generate batch | " + " | ".join(
                 ("SPO " + s if s in ("rollout", "refresh") else s) for s in TABLE_STEPS) + " | peak of 80 GB |",
             "| --- " * (4 + len(TABLE_STEPS)) + "|"]
    for algo in ALGOS:
        if algo not in results:
            continue
        r = results[algo]
        gb = {s: st["peak"] / GB for s, st in r["steps"].items()}
        unit = " pairs" if algo == "dpo" else ""
        cells = [f"{gb[s]:.1f} GB" if s in gb else "-" for s in TABLE_STEPS]
        lines.append(f"| {algo.upper()} | {r['per_device_batch_size']}{unit} x {r['grad_accum']} | {r['gen_batch_size']} | "
                     + " | ".join(cells) + f" | {max(gb.values()) / GPU_GB:.0%} |")
    return "\n".join(lines)


def main(algos=ALGOS, traced_micro_batches: int = TRACED_MICRO_BATCHES):
    t0 = time.time()
    traced_from = fingerprint()  # before tracing: the code this process runs, whatever changes on disk meanwhile
    acc = launch(WORLD)
    results = {}
    for algo in algos:
        results[algo] = trace(algo, acc=acc, traced_micro_batches=traced_micro_batches)
        print("\n".join(report(results[algo])), flush=True)
    fits = all(st["peak"] <= (GPU_GB - MARGIN_GB) * GB for r in results.values() for st in r["steps"].values())
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    if set(algos) == set(ALGOS):
        import accelerate
        import transformers

        runtime.files.write_json_atomic(RESULTS, {"model": "google/gemma-1.1-7b-it", "config": GEMMA_7B, "world": WORLD,
                                           "gpu_gb": GPU_GB, "margin_gb": MARGIN_GB, "results": results,
                                           "seconds": time.time() - t0, "fingerprint": traced_from,
                                           "versions": {m.__name__: m.__version__ for m in (torch, transformers, accelerate)}})
    print(table(results))
    print(f"traced in {time.time() - t0:.0f} s")
    print(f"fits {GPU_GB} GB: {'yes' if fits else 'no'}")


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(tuple(names) or ALGOS, 10**6 if "--all_micro_batches" in sys.argv else TRACED_MICRO_BATCHES)
