"""Peak memory and time of per-token log-probs with gradients at Gemma's 256k vocabulary, on CPU.

    python benchmarks/logprob_memory.py                 # 8 processes (2 rounds x 4 variants); about 11 GB free memory
    python benchmarks/logprob_memory.py --rounds 1 --variants floor token_logprobs --skip_head_matmuls   # minutes

Bytes do not depend on speed: one round of the variants wanted gives the peaks (--rounds and --reps add time samples).
Where bf16 matmuls have no native kernel (AVX2 CPUs: no avx512_bf16 or AMX), those with the vocabulary as their inner
dimension (the head's backward) are so slow that one step of naive, before or floor can take the better part of an hour.
--skip_head_matmuls: every matmul with an operand of V rows or columns (the output projection, forward, recomputed
and backward) returns zeros of its output's shape and dtype instead of computing it (`HeadMatmulsZeroed`): the same
tensors are allocated and written, so resident, and a step takes seconds; what it leaves out is the kernels' own
scratch memory, and every time printed is then meaningless.

The model is a random GemmaForCausalLM in bf16 with Gemma's vocabulary (V = 256000, tied embeddings) and a small
body (1 layer, hidden 256), so that the log-probs, not the body, dominate; batch B = 4 sequences of T = 512 tokens.
Each variant computes (B, T) log-probs, then `.sum().backward()` into the model's weights (their gradients included):
    naive        the common trainer pattern: the model's logits, `.float().log_softmax(-1).gather(...)`
    before       common.token_logprobs before the chunked head: the model's (B, T, V) logits, then checkpointed chunks of
                 4096 // B positions, each upcast to fp32 for logsumexp
    floor        the backbone's hidden states, then lm_head and an fp32 logsumexp on 256-token chunks under
                 activation checkpointing, written inline: the least memory this computation needs
    token_logprobs   common.token_logprobs now
Each variant runs in a fresh process (one warm-up step, then `--reps` timed steps), `--rounds` times, the variants
interleaved. Peak memory is the process's peak resident set size during the first timed step (VmHWM, reset through
/proc/self/clear_refs) minus its resident size just before it, with glibc returning freed memory at once
(MALLOC_MMAP_THRESHOLD_, malloc_trim). Printed: the median over rounds, and for time also the range.
"""

import argparse
import contextlib
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402

CONFIG = dict(vocab_size=256000, hidden_size=256, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=1, head_dim=64)
B, T, FLOOR_CHUNK, BEFORE_CHUNK = 4, 512, 256, 4096


def _fp32_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def naive(model, ids, attn):
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, T, V)
    return logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def before(model, ids, attn):
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, T, V)
    step, out = max(1, BEFORE_CHUNK // B), []
    for s in range(0, T - 1, step):
        e = min(s + step, T - 1)
        out.append(torch.utils.checkpoint.checkpoint(_fp32_logprobs, logits[:, s:e], ids[:, s + 1 : e + 1],
                                                     use_reentrant=False))
    return torch.cat(out, dim=1)


def floor(model, ids, attn):
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, T, H)
    h, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
    weight = model.lm_head.weight

    def chunk(h, t):
        return _fp32_logprobs(torch.nn.functional.linear(h, weight), t)

    return torch.cat([torch.utils.checkpoint.checkpoint(chunk, h[s : s + FLOOR_CHUNK], targets[s : s + FLOOR_CHUNK],
                                                        use_reentrant=False) for s in range(0, len(h), FLOOR_CHUNK)])


def token_logprobs(model, ids, attn):
    return common.token_logprobs(model, ids, attn)


VARIANTS = {"naive": naive, "before": before, "floor": floor, "token_logprobs": token_logprobs}


class HeadMatmulsZeroed(TorchDispatchMode):
    """mm and addmm with an operand of V rows or columns return zeros of their output's shape and dtype, uncomputed
    (freshly allocated and written, as a kernel's output is); `calls` counts them. Other ops run as they are."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        mats = {torch.ops.aten.mm.default: args[:2], torch.ops.aten.addmm.default: args[1:3]}.get(func)
        if mats and CONFIG["vocab_size"] in (*mats[0].shape, *mats[1].shape):
            self.calls += 1
            return torch.zeros(mats[0].shape[0], mats[1].shape[1], dtype=mats[0].dtype, device=mats[0].device)
        return func(*args, **(kwargs or {}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)[1])


def child(name: str, reps: int, skip_head_matmuls: bool = False) -> dict:
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(**CONFIG)).to(torch.bfloat16).train()
    ids = torch.randint(0, CONFIG["vocab_size"], (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    libc = ctypes.CDLL("libc.so.6")

    mode = HeadMatmulsZeroed() if skip_head_matmuls else None

    def step():
        with mode or contextlib.nullcontext():  # CPU autograd runs backward on this thread: under the mode too
            VARIANTS[name](model, ids, attn).sum().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: one-time allocations and kernel setup
    times, peak = [], None
    for r in range(reps):
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        base = _status_kib("VmRSS")
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if r == 0:
            peak = (_status_kib("VmHWM") - base) * 1024
    return {"peak_bytes": peak, "time_s": statistics.median(times), "head_matmuls_zeroed": mode.calls if mode else 0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, variants interleaved")
    parser.add_argument("--reps", type=int, default=1, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="the variants to run (floor is always run: the ratios are to it)")
    parser.add_argument("--skip_head_matmuls", action="store_true",
                        help="the head's matmuls return zeros, uncomputed: the same peaks in seconds (times meaningless)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.reps, args.skip_head_matmuls)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers leave the resident set at once
    runs = {name: [] for name in VARIANTS if name in args.variants or name == "floor"}
    for _ in range(args.rounds):
        for name in runs:
            skip = ["--skip_head_matmuls"] if args.skip_head_matmuls else []
            out = subprocess.run([sys.executable, __file__, "--child", name, "--reps", str(args.reps), *skip], env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    peak = {n: statistics.median(r["peak_bytes"] for r in rs) for n, rs in runs.items()}
    secs = {n: [r["time_s"] for r in rs] for n, rs in runs.items()}
    print(f"GemmaForCausalLM {CONFIG}, bf16, B={B}, T={T}; torch {torch.__version__}, {torch.get_num_threads()} threads;"
          f" {args.rounds} rounds x {args.reps} steps" + ("; the head's matmuls zeroed, uncomputed: times meaningless"
                                                          if args.skip_head_matmuls else ""))
    base = "before" if "before" in runs else "floor"
    print(f"| variant | peak extra memory | vs floor | time per step (s), median (range) | vs {base} |\n"
          "| --- | --- | --- | --- | --- |")
    for n in runs:
        t = statistics.median(secs[n])
        print(f"| {n} | {peak[n] / 1e9:.2f} GB | {peak[n] / peak['floor']:.2f}x | {t:.2f} ({min(secs[n]):.2f}-"
              f"{max(secs[n]):.2f}) | {t / statistics.median(secs[base]):.2f}x |")


if __name__ == "__main__":
    main()
