"""What the first 10 GPU minutes must answer: one command on one GPU, nothing downloaded.

    python benchmarks/gpu_check.py                           # CUDA: Gemma-1.1-7B's width, heads and vocabulary, 2 layers
    python benchmarks/gpu_check.py --device cpu --layers 1   # the reduced CPU form the suite runs (seconds, ~1 GB)

The model: google/gemma-1.1-7b-it's architecture from its config numbers (benchmarks/memory_trace.GEMMA_7B: hidden 3072,
MLP 24576, 16 heads of 256, 256k tied vocabulary) with --layers decoder layers and random bf16 weights, its logits
made a trained model's size (logprob_bf16.realistic_logits: a standard deviation of 6.5, a row's largest ≈ 30, which
bf16 rounds by up to 0.06; at initialisation a tied Gemma only repeats its input token). DQO's policy and value
network are sharded by accelerate's FSDP2 code on a world of one process, as `accelerate launch --config_file
configs/fsdp.yaml` shards them (memory_trace.prepare: activation checkpointing, bf16 compute over fp32 master weights,
fp32 reductions); AdamW's moments exist before the first step, as in the trace. At DQO's PAPER sizes (micro-batch 8,
generate calls of 32, prompts of memory_trace.PROMPT_TOKENS tokens, 512 new tokens) it prints, each beside its planned
or traced value:
  decode      steps/s of one common.generate_batch call (the offline dataset's sampling), against time_plan's guess
              for 28 layers: measured at --layers, and scaled to 28 layers by the bytes of weights a decode step reads
              (decoding is memory-bound);
  memory      the peak of generate, score (common.score_rows on one offline chunk, as memory_trace scores it) and one
              DQO optimizer step: torch.cuda.max_memory_allocated and max_memory_reserved (the allocator's cache
              emptied before each), against benchmarks/memory_trace.py's fake-tensor trace of the same config, sizes
              and a world of 1 (run beside it in a subprocess): the target is allocated within 5% of the trace;
  step 1      charts/is_weight and rewards/kl of dqo.dqo_loss at the first step, on the rows generate sampled, their
              reference log-probs scored in eval mode under `unsharded` as the offline dataset scores them: 1 and 0
              if the scoring forward and the training forward agree (they are the same weights);
  step time   seconds per optimizer step (--grad_accum micro-batches, the second step) against time_plan's FLOPs
              (8·N with the recompute, the head on real tokens) at its PEAK_FLOPS x MFU;
  checkpoint  the policy's sharded state (fp32 weights, both AdamW moments) written by torch.distributed.checkpoint
              as accelerate's save_state writes FSDP2's SHARDED_STATE_DICT (one thread, files synced), then CRC-32'd
              as runtime.checkpoint.save_checkpoint verifies it: GB/s against time_plan's DISK_WRITE_GB_PER_S and
              DISK_READ_GB_PER_S (the CRC reads from the page cache here: an upper bound on the read).
The CPU form shrinks the model (CPU_CONFIG) and the sizes (CPU_SIZES) and says so; its memory comes from the tracker
memory_trace.py uses (FSDPMemTracker, every byte the run allocates), reserved is n/a, and its times are CPU times, set
beside the GPU plan only so that every line runs. tests/test_gpu_check.py runs it, so it cannot rot.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

# the allocator setting the scripts run with unless the user set one, before CUDA starts: reserved is theirs
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import dqo  # noqa: E402
import runtime.cli  # noqa: E402
import runtime.files  # noqa: E402
import runtime.memory  # noqa: E402
import time_plan  # noqa: E402
from logprob_bf16 import realistic_logits  # noqa: E402
from memory_trace import GEMMA_7B, PROMPT_TOKENS  # noqa: E402
from runtime.sharding import unsharded  # noqa: E402

TARGET = 0.05  # measured allocated within 5% of the trace
CPU_CONFIG = dict(GEMMA_7B, vocab_size=4096, hidden_size=128, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=32)
CPU_SIZES = dict(per_device_batch_size=4, gen_batch_size=8, prompt_tokens=16, max_new_tokens=16, grad_accum=1)
GB = 1e9


def sizes(device: str, grad_accum: int | None) -> dict:
    """DQO's paper sizes on a GPU (the trace's prompt length), CPU_SIZES on a CPU."""
    if device == "cpu":
        out = dict(CPU_SIZES)
    else:
        paper = {**runtime.cli.RUN_DEFAULTS["paper"], **dqo.PAPER}
        out = dict(per_device_batch_size=paper["per_device_batch_size"], gen_batch_size=paper["gen_batch_size"],
                   prompt_tokens=PROMPT_TOKENS, max_new_tokens=common.TASK_MAX_NEW_TOKENS[paper["task"]], grad_accum=4)
    out["grad_accum"] = grad_accum or out["grad_accum"]
    out["n_samples"] = runtime.cli.RUN_DEFAULTS["paper"]["n_samples"]  # memory_trace scores max(1, gen // n) x n rows
    return out


class IdTokenizer:
    """What generate_batch and score_rows read of a tokenizer, for a model of random weights: Gemma's pad and EOS ids,
    no chat template, ids as text."""

    pad_token_id, eos_token_id, chat_template = 0, 1, None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


# ---------------------------------------------------------------------------------------------------------------------
# A world of one process, sharded as configs/fsdp.yaml shards
# ---------------------------------------------------------------------------------------------------------------------
def launch(device: torch.device):
    """A real process group of one (nccl on CUDA, gloo on CPU) and memory_trace's accelerator stand-in on `device`."""
    import memory_trace
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="gpu_check_pg_"), "store"), 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    return memory_trace.stand_in(device)


class Optimizer:
    """AdamW as dqo.py steps it, with its moments made before the first step (a step on zero gradients, as the trace).
    On CUDA torch's own over the sharded (DTensor) parameters, as accelerate runs it; on CPU memory_trace.LocalAdamW
    (the same update on the local shards), whose memory the tracker counts as on a GPU."""

    def __init__(self, model, lr: float, local: bool):
        import memory_trace

        self.model, self.local = model, memory_trace.LocalAdamW(model, lr) if local else None
        self.opt = self.local.opt if local else torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=True)

    def init_state(self):
        if self.local:
            return self.local.init_state()
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def clip(self, max_norm: float):
        if self.local:
            return self.local.clip_grad_norm_(max_norm)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)

    def step(self):
        (self.local or self.opt).step()

    def zero_grad(self):
        self.local.zero_grad() if self.local else self.opt.zero_grad(set_to_none=True)


def build(config: dict, device: torch.device, acc, lr: float, value_lr: float) -> tuple:
    """DQO's policy and value network (bf16 random weights, `realistic_logits`), sharded, with optimizers."""
    import memory_trace
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        backbone = AutoModel.from_config(cfg, dtype=torch.bfloat16)
    realistic_logits(policy)
    # as memory_trace builds it: the value network from a backbone (ValueModel.from_pretrained's assembly), zero head
    value = memory_trace.prepare(acc, common.ValueModel(backbone, copy_backbone=False))
    policy = memory_trace.prepare(acc, policy)
    local = device.type != "cuda"
    opts = Optimizer(policy, lr, local), Optimizer(value, value_lr, local)
    for o in opts:
        o.init_state()
    return policy, value, opts


# ---------------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------------
class Meter:
    """Peak memory and seconds of a phase: CUDA's allocator statistics (its cache emptied first, so that reserved is
    the phase's own), or on CPU the FSDPMemTracker memory_trace.py uses (allocated only)."""

    def __init__(self, device: torch.device, tracker=None):
        self.device, self.tracker = device, tracker

    def __call__(self, fn):
        import memory_trace

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            memory_trace.begin_step(self.tracker)
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if cuda:
            mem = dict(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
        else:
            mem = dict(allocated=memory_trace.snapshot(self.tracker)["Total"], reserved=None)
        return out, dict(mem, seconds=seconds)


def start_trace(config: dict, s: dict) -> subprocess.Popen:
    """memory_trace.trace('dqo') of `config` and sizes `s` on a fake world of 1, in a subprocess: it runs beside the
    measurement (fake tensors on the CPU) and needs its own fake process group."""
    kwargs = dict(config=config, world=1, per_device_batch_size=s["per_device_batch_size"],
                  gen_batch_size=s["gen_batch_size"], grad_accum=s["grad_accum"], prompt_tokens=s["prompt_tokens"],
                  max_new_tokens=s["max_new_tokens"], steps=("train", "generate", "score"))
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks import memory_trace as mt; "
            "print(json.dumps(mt.trace('dqo', **json.loads(sys.argv[2]))))")
    return subprocess.Popen([sys.executable, "-c", code, ROOT, json.dumps(kwargs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_trace(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"memory_trace failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])["steps"]


def decode_plan(config: dict, batch: int) -> tuple[float, float]:
    """(time_plan's decode steps/s at 28 layers, the factor from `config`'s layers to 28): the weights a decode step
    reads, every layer and the head (the tied embedding, read once)."""
    _, layer = runtime.memory.param_count(config)
    head = config["vocab_size"] * config["hidden_size"]
    full = GEMMA_7B["num_hidden_layers"] * layer + head  # the same width with 28 layers
    return time_plan.decode_steps_per_s(batch), (config["num_hidden_layers"] * layer + head) / full


def step_plan(config: dict, rows: int, real: float, padded: float) -> float:
    """time_plan's seconds for one optimizer step on one GPU: `rows` sequences of `real` tokens padded to `padded`,
    through the policy and the value network, 8·N with activation checkpointing (configs/fsdp.yaml), at MFU."""
    shape = time_plan.model_shape(config)
    factor = 8 if time_plan.activation_checkpointing() else 6
    flops = (time_plan.train_flops(rows, real, padded, shape["n"], shape["head"], shape, factor)
             + time_plan.train_flops(rows, real, padded, shape["n_value"], 0, shape, factor))
    return flops / (time_plan.PEAK_FLOPS * time_plan.MFU)


def compare(measured: int, traced: int) -> tuple[float, bool]:
    """(measured / traced, within TARGET)."""
    ratio = measured / traced
    return ratio, abs(ratio - 1) <= TARGET


def dqo_step(policy, value, opts, batches: list[list[dict]], args, device) -> dict:
    """One optimizer step as dqo.py's loop takes it: per micro-batch token_logprobs, the value network, dqo_loss,
    backward of its loss / grad_accum; then clip and step both. Returns the first micro-batch's metrics."""
    first = None
    for rows in batches:
        batch = {k: v.to(device) for k, v in common.collate(rows, IdTokenizer.pad_token_id,
                                                            ("ref_logps", "behavior_logps", "rewards")).items()}
        policy_logps = common.token_logprobs(policy, batch["input_ids"], batch["attention_mask"])  # (B, T)
        values = value(batch["input_ids"], batch["attention_mask"])  # (B, T)
        loss, metrics = dqo.dqo_loss(policy_logps, batch["ref_logps"], batch["behavior_logps"], values, batch["rewards"],
                                     batch["mask"], args.beta, args.lam, args.is_clip or None)
        (loss / len(batches)).backward()  # policy_loss + value_loss: each reaches only its own network
        first = first or metrics
    for o in opts:
        o.clip(args.max_grad_norm)
    for o in opts:
        o.step()
    for o in opts:
        o.zero_grad()
    return first


def checkpoint_rates(policy, opt, folder: str) -> dict:
    """The policy's model and optimizer state written by DCP (one thread, synced), then every file's CRC-32."""
    import torch.distributed.checkpoint as dcp

    state = {"model": policy.state_dict(), "optimizer": opt.opt.state_dict()}
    t0 = time.perf_counter()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, sync_files=True, thread_count=1))
    write = time.perf_counter() - t0
    paths = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names)
    size = sum(os.path.getsize(p) for p in paths)
    t0 = time.perf_counter()
    runtime.files.file_hashes(paths)
    crc = time.perf_counter() - t0
    return dict(bytes=size, write_s=write, crc_s=crc)


# ---------------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Gemma-1.1-7B has 28)")
    parser.add_argument("--grad_accum", type=int, help="micro-batches per optimizer step (GPU default 4, CPU 1)")
    parser.add_argument("--checkpoint_dir", help="where the checkpoint is written and removed (default: a temp dir)")
    parser.add_argument("--json", help="write every number here")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = dict(GEMMA_7B if cuda else CPU_CONFIG, num_hidden_layers=opts.layers)
    s = sizes(device.type, opts.grad_accum)
    args = SimpleNamespace(**{k: f.default for k, f in dqo.Args.__dataclass_fields__.items()})
    for k, v in {**runtime.cli.RUN_DEFAULTS["paper"], **dqo.PAPER}.items():
        setattr(args, k, v)
    t_start = time.perf_counter()
    print(f"gpu_check on {torch.cuda.get_device_name(device) if cuda else 'CPU'}: torch {torch.__version__}, "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}", flush=True)
    if not cuda:
        print("CPU form, REDUCED: a narrow Gemma (" + ", ".join(f"{k} {v}" for k, v in CPU_CONFIG.items()
                                                               if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                        "num_attention_heads", "head_dim"))
              + ") and small sizes; memory by FSDPMemTracker, times are this CPU's against the H100 plan", flush=True)
    print(f"model: Gemma-1.1-7B-shaped, {opts.layers} of 28 layers, vocab {config['vocab_size']}, hidden "
          f"{config['hidden_size']}, {runtime.memory.param_count(config)[0] / 1e9:.3f}B parameters per network, random bf16; "
          f"sizes: " + ", ".join(f"{k} {v}" for k, v in s.items()), flush=True)
    trace = start_trace(config, s)
    acc = launch(device)
    policy, value, opts_ = build(config, device, acc, args.lr, args.value_lr)
    tracker = None
    if not cuda:
        import memory_trace

        tracker = memory_trace.make_tracker([policy, value], [o.local for o in opts_], [])
    tok = IdTokenizer()
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, config["vocab_size"], (s["gen_batch_size"], s["prompt_tokens"]), generator=g).tolist()
    meter = Meter(device, tracker)
    results = {}
    with tracker if tracker is not None else nullcontext():
        with unsharded(policy) as model, common.reference_mode(model):  # warm-up: kernels, cuBLAS handles
            common.generate_batch(model, tok, prompts[:2], max_new_tokens=2, **sampling)

        # generate: one offline-dataset call at the generation batch
        def generate():
            torch.manual_seed(1)
            with unsharded(policy) as model, common.reference_mode(model):
                return common.generate_batch(model, tok, prompts, max_new_tokens=s["max_new_tokens"], **sampling)
        outs, results["generate"] = meter(generate)
        steps = max(len(o["response_ids"]) for o in outs)
        results["generate"].update(decode_steps=steps, mean_response=sum(len(o["response_ids"]) for o in outs) / len(outs))

        # score: the offline chunk memory_trace scores (max(1, gen // n) prompts x n samples), from the sampled rows
        n_rows = max(1, s["gen_batch_size"] // s["n_samples"]) * s["n_samples"]
        rows = [dict(prompt_ids=prompts[i % len(outs)], response_ids=outs[i % len(outs)]["response_ids"])
                for i in range(n_rows)]

        def score():
            with unsharded(policy) as model, common.reference_mode(model):
                common.score_rows(model, rows, tok.pad_token_id, warp=sampling)
        _, results["score"] = meter(score)
        for r in rows:  # as build_offline_dataset stores them; μ = π_ref (--behavior ref); no reward (random text)
            r["ref_logps"] = r.pop("logps")
            r.update(behavior_logps=r["ref_logps"], reward=0.0, rewards=dqo.token_rewards(len(r["response_ids"]), 0.0))

        # train: two optimizer steps; step 1's metrics, memory over both, the second step's time
        per = s["per_device_batch_size"]
        batches = [[rows[(m * per + j) % len(rows)] for j in range(per)] for m in range(s["grad_accum"])]
        policy.train()
        value.train()

        def train():
            t0 = time.perf_counter()
            first = dqo_step(policy, value, opts_, batches, args, device)
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            dqo_step(policy, value, opts_, batches, args, device)
            if cuda:
                torch.cuda.synchronize()
            return first, (t1 - t0, time.perf_counter() - t1)
        (metrics, (step1_s, step2_s)), results["train"] = meter(train)
        results["train"].update(step1_s=step1_s, step2_s=step2_s, metrics=metrics)
    traced = read_trace(trace)

    folder = tempfile.mkdtemp(prefix="gpu_check_ckpt_", dir=opts.checkpoint_dir)
    try:
        results["checkpoint"] = checkpoint_rates(policy, opts_[0], folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    # report: each line beside its plan or trace
    g = results["generate"]
    rate = g["decode_steps"] / g["seconds"]
    planned, factor = decode_plan(config, s["gen_batch_size"])
    print(f"decode: {rate:.1f} steps/s at batch {s['gen_batch_size']} ({g['decode_steps']} steps, mean response "
          f"{g['mean_response']:.0f} tokens, prefill included) at {opts.layers} layers; scaled to 28 layers by weights read: "
          f"{rate * factor:.1f} steps/s | time plan (guess, 28 layers, H100): {planned:.1f} steps/s", flush=True)
    within = []
    for phase in ("generate", "score", "train"):
        r, t = results[phase], traced[phase]["peak"]
        ratio, ok = compare(r["allocated"], t)
        within.append(ok)
        reserved = (f"reserved {r['reserved'] / GB:.2f} GB (+{(r['reserved'] - r['allocated']) / GB:.2f} over allocated)"
                    if r["reserved"] is not None else "reserved n/a on CPU")
        print(f"memory {phase}: allocated {r['allocated'] / GB:.3f} GB | traced {t / GB:.3f} GB | measured/traced "
              f"{ratio:.3f}, within {TARGET:.0%}: {'yes' if ok else 'NO'}; {reserved}", flush=True)
    m = results["train"]["metrics"]
    print(f"step 1: charts/is_weight {m['charts/is_weight']:.6f} | plan 1 (the scoring and training forwards agree); "
          f"rewards/kl {m['rewards/kl']:+.6f} | plan 0", flush=True)
    real = sum(len(r["prompt_ids"]) + len(r["response_ids"]) for b in batches for r in b) / (per * len(batches))
    padded = sum(max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in b) for b in batches) / len(batches)
    plan_s = step_plan(config, per * s["grad_accum"], real, padded)
    tr = results["train"]
    print(f"optimizer step: {tr['step2_s']:.2f} s (step 1: {tr['step1_s']:.2f} s, warm-up included), {s['grad_accum']} "
          f"micro-batch{'es' if s['grad_accum'] > 1 else ''} of {per} | time plan (H100, MFU {time_plan.MFU}): "
          f"{plan_s:.3g} s", flush=True)
    c = results["checkpoint"]
    print(f"checkpoint: {c['bytes'] / GB:.3f} GB written at {c['bytes'] / GB / c['write_s']:.2f} GB/s (DCP, synced), "
          f"CRC-32 at {c['bytes'] / GB / c['crc_s']:.2f} GB/s | time plan (guess): write {time_plan.DISK_WRITE_GB_PER_S} "
          f"GB/s, read {time_plan.DISK_READ_GB_PER_S} GB/s", flush=True)
    print(f"memory within {TARGET:.0%} of the trace: {sum(within)} of {len(within)} phases; gpu_check took "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(device=str(device), config=config, sizes=s, measured=results, traced=traced,
                           decode_rate=rate, decode_rate_28=rate * factor, decode_plan=planned, step_plan_s=plan_s),
                      f, indent=1, default=float)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
