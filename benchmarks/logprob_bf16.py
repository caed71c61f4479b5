"""Log-probs under bf16, measured on CPU: the per-token and per-response error against fp32 of two output heads,
    bf16 logits   the earlier head (`bf16_chunk_logprobs` below): the output projection in the model's dtype
                  (bf16), its logits upcast afterwards, as the model's own forward computes them
    fp32 logits   `common._chunk_logprobs` now: each chunk's projection on fp32 copies of its hidden states and of the
                  weight, outside autocast, so no logit is rounded to bf16
    head alone    bf16 logits minus fp32 logits: the same bf16 hidden states, so what rounding the logits adds by itself

    python benchmarks/logprob_bf16.py                  # errors, then memory vs the floor: ~6 min on 2 cores
    python benchmarks/logprob_bf16.py --skip_memory    # errors only (--skip_errors: memory only)
    python benchmarks/logprob_bf16.py --skip_errors --rounds 1 --skip_head_matmuls --json benchmarks/results/logprob_bf16.json

Models (each in fp32 and as a bf16 copy of the same weights; bf16 values are exact in fp32):
    tiny        assets/tiny (Llama, vocab 104), arith prompts, responses sampled as the tiny offline dataset samples them
                (temperature 0.9, top-p 0.9, top-k 16, at most 64 tokens: they end at their own stop token)
    wide V      a random GemmaForCausalLM (hidden 256, 2 layers, tied embedding) with V = 32000 or 256000, its logits
                made a trained model's size by `realistic_logits` (a standard deviation of LOGIT_STD: the largest logit
                of a row ≈ 28 at 32k, ≈ 33 at 256k, printed); RESPONSE_TOKENS tokens sampled at temperature 1
Log-probs of the response tokens by `common.token_logprobs` on the bf16 model, against the fp32 model's (fp32 logits
either way: an fp32 model's logits are fp32). Per token: mean and max |Δ| over response tokens. Per response:
|Σ_t Δ_t| over its tokens (DQO's importance weight is exp of such a sum), mean and max over responses; and the mean
signed Δ per token (a bias adds up linearly).

Memory: peak extra memory of log-probs plus backward, in a fresh process, of the floor, token_logprobs now (fp32
logits) and with bf16 logits, measured exactly as benchmarks/logprob_memory.py measures them (its model, B, T and
child process: VmHWM minus VmRSS around one step). The bar: token_logprobs ≤ 1.5x the floor. Bytes do not depend on
speed, so one round gives the peaks. floor and bf16 logits run bf16 matmuls over 256k logits, far too slow where the
CPU has no native bf16 kernel: --skip_head_matmuls (logprob_memory.py's docstring) allocates and writes the
head's matmul outputs without computing them. The time column is one step's (the median over --rounds), on whatever
else shares the cores, and meaningless with --skip_head_matmuls: a label, not a benchmark.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from contextlib import contextmanager

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import logprob_memory  # noqa: E402

LOGIT_STD = 6.5  # the max of 256k such logits is ≈ 4.5 std ≈ 30: a sampled token's logit is near it
RESPONSE_TOKENS, PROMPT_TOKENS, ROWS = 200, 16, 16
WIDE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            head_dim=64)
TINY_SAMPLING = dict(temperature=0.9, top_p=0.9, top_k=16)


def bf16_chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: dict, warps: tuple) -> torch.Tensor:
    """The earlier `common._chunk_logprobs`: the projection in the model's dtype (bf16 logits), upcast after."""
    logits = common._head_logits(hidden, head).float()  # (n, V)
    out = []
    for warp in warps:
        lg = common.warp_logits(logits, **warp) if warp else logits
        out.append(lg.gather(-1, targets[:, None]).squeeze(-1) - lg.logsumexp(-1))  # (n,)
    return torch.stack(out)


@contextmanager
def bf16_logits():
    """common.token_logprobs with the earlier head, inside."""
    now = common._chunk_logprobs
    common._chunk_logprobs = bf16_chunk_logprobs
    try:
        yield
    finally:
        common._chunk_logprobs = now


# ---------------------------------------------------------------------------------------------------------------------
# Models and responses
# ---------------------------------------------------------------------------------------------------------------------
def realistic_logits(model, logit_std: float = LOGIT_STD, shrink: float = 0.01) -> None:
    """Gives a random Gemma (tied embedding, final norm x (1 + w)) logits of a trained model's size, in place. At
    initialisation the input embedding dominates the residual stream, so the tied head scores the input token far
    above the rest (a model that repeats its input); shrunk by `shrink`, the layers' outputs dominate instead, and the
    final norm's weight scales the logits (hidden states of RMS 1 against head rows of std σ: a logit's std is
    σ·sqrt(H)) up to `logit_std`."""
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w.mul_(shrink)
        norm = model.model.norm.weight
        norm.fill_(logit_std / (w.float().std().item() * model.config.hidden_size**0.5) - 1)


def wide_model(vocab: int, seed: int = 0):
    """A random Gemma of WIDE's shape with `vocab` tokens, in fp32, with `realistic_logits`."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=vocab, **WIDE)).eval()
    realistic_logits(model)
    return model


def wide_batch(model, rows: int = ROWS, seed: int = 0):
    """Random prompts of PROMPT_TOKENS, then RESPONSE_TOKENS tokens sampled from the fp32 model at temperature 1 (never
    stopping early): (input_ids, attention_mask, response mask), all (rows, T)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, model.config.vocab_size, (rows, PROMPT_TOKENS), generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        ids = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=RESPONSE_TOKENS, min_new_tokens=RESPONSE_TOKENS,
                             pad_token_id=0)
    mask = torch.zeros_like(ids, dtype=torch.float)
    mask[:, PROMPT_TOKENS:] = 1
    return ids, torch.ones_like(ids), mask


def tiny_batch(model, tokenizer, rows: int = ROWS, seed: int = 0):
    """`rows` arith prompts and one response each, sampled by the fp32 tiny model as its offline dataset is."""
    problems = common.arith_problems("train", rows, seed)
    prompts = [common.encode_prompt(tokenizer, p["question"], "arith") for p in problems]
    torch.manual_seed(seed)
    outs = common.generate_batch(model, tokenizer, prompts, max_new_tokens=64, **TINY_SAMPLING)
    rows = [dict(prompt_ids=p, response_ids=o["response_ids"]) for p, o in zip(prompts, outs)]
    batch = common.collate(rows, tokenizer.pad_token_id)
    return batch["input_ids"], batch["attention_mask"], batch["mask"]


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------
def summary(delta: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-token and per-response statistics of `delta` (B, T) on the response tokens (`mask`)."""
    tok = delta[mask.bool()].abs()
    seq = (delta * mask).sum(1).abs()  # (B,)
    return dict(token_mean=tok.mean().item(), token_max=tok.max().item(), response_mean=seq.mean().item(),
                response_max=seq.max().item(), bias=(delta * mask).sum().item() / mask.sum().item())


def measure(model_fp32, ids, attn, mask) -> dict:
    """The error summaries of both heads and of the head alone, and what the logits were like."""
    model_bf16 = copy.deepcopy(model_fp32).to(torch.bfloat16)
    with torch.no_grad():
        ref = common.token_logprobs(model_fp32, ids, attn)  # (B, T)
        fp32 = common.token_logprobs(model_bf16, ids, attn).float()
        with bf16_logits():
            bf16 = common.token_logprobs(model_bf16, ids, attn).float()
        logits = model_fp32(input_ids=ids[:2], attention_mask=attn[:2]).logits  # (2, T, V): two rows are enough
    target = logits[:, :-1].gather(-1, ids[:2, 1:, None]).squeeze(-1)  # (2, T - 1) each next token's own logit
    m = mask[:2, 1:].bool()
    return {"bf16 logits": summary(bf16 - ref, mask), "fp32 logits": summary(fp32 - ref, mask),
            "head alone": summary(bf16 - fp32, mask),
            "logits": dict(target_mean=target[m].mean().item(), target_max=target[m].abs().max().item(),
                           row_max_mean=logits[:, :-1].amax(-1)[m].mean().item(), tokens=mask.sum(1).mean().item(),
                           ref_logp_mean=ref[mask.bool()].mean().item())}


def errors() -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    tiny = AutoModelForCausalLM.from_pretrained(common.TINY_SHIPPED, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(common.TINY_SHIPPED)
    out["tiny (vocab 104)"] = measure(tiny, *tiny_batch(tiny, tokenizer))
    for vocab in (32000, 256000):
        model = wide_model(vocab)
        out[f"wide (vocab {vocab})"] = measure(model, *wide_batch(model))
        del model
    return out


def error_table(results: dict) -> str:
    lines = ["| model | head | per token: mean abs | max abs | per response: mean abs sum | max abs sum | mean signed "
             "per token |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        for head in ("bf16 logits", "fp32 logits", "head alone"):
            s = r[head]
            lines.append(f"| {name} | {head} | {s['token_mean']:.2e} | {s['token_max']:.2e} | {s['response_mean']:.2e} | "
                         f"{s['response_max']:.2e} | {s['bias']:+.1e} |")
    notes = [f"{name}: {r['logits']['tokens']:.0f} response tokens per row on average; the sampled tokens' logits "
             f"average {r['logits']['target_mean']:.1f} (largest |logit| {r['logits']['target_max']:.1f}), each row's "
             f"largest logit {r['logits']['row_max_mean']:.1f} on average; mean fp32 log-prob "
             f"{r['logits']['ref_logp_mean']:.3f}" for name, r in results.items()]
    return "\n".join(lines + [""] + notes)


# ---------------------------------------------------------------------------------------------------------------------
# Memory: logprob_memory.py's measurement with one more variant
# ---------------------------------------------------------------------------------------------------------------------
def bf16_logits_variant(model, ids, attn):
    with bf16_logits():
        return common.token_logprobs(model, ids, attn)


logprob_memory.VARIANTS["bf16 logits"] = bf16_logits_variant
MEMORY_VARIANTS = ("floor", "token_logprobs", "bf16 logits")
COMPUTED = "token_logprobs, computed"  # with --skip_head_matmuls: the same, its matmuls computed


def memory(rounds: int, parallel: bool = False, skip_head_matmuls: bool = False) -> dict:
    """Each variant's median over `rounds` fresh processes, one at a time or (`parallel`) a round's variants at once:
    the peak memory is each process's own either way, the times then share the cores. With `skip_head_matmuls`,
    token_logprobs (fp32 matmuls: a minute a step) runs computed too, as "token_logprobs, computed": the check that
    zeroing the head's matmuls leaves the peak as it was."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # as logprob_memory.main: freed buffers leave at once
    skip = ["--skip_head_matmuls"] if skip_head_matmuls else []
    jobs = {n: [n, *skip] for n in MEMORY_VARIANTS} | ({COMPUTED: ["token_logprobs"]} if skip_head_matmuls else {})
    runs = {n: [] for n in jobs}
    for _ in range(rounds):
        for group in [list(jobs)] if parallel else [[n] for n in jobs]:
            procs = {n: subprocess.Popen([sys.executable, __file__, "--memory_child", *jobs[n]], env=env,
                                         stdout=subprocess.PIPE, text=True) for n in group}
            for n, proc in procs.items():
                out, _ = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"memory child {n} failed ({proc.returncode})")
                runs[n].append(json.loads(out.strip().splitlines()[-1]))
    return {n: dict(peak_bytes=statistics.median(r["peak_bytes"] for r in rs),
                    time_s=statistics.median(r["time_s"] for r in rs)) for n, rs in runs.items()}


def machine(rounds: int, skip_head_matmuls: bool) -> dict:
    """Where and how the memory run ran: torch, threads, CPU model, native bf16 matmuls or not, rounds, matmuls skipped."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu, rounds=rounds,
                native_bf16=any(f in info.split() for f in ("avx512_bf16", "amx_bf16")), skip_head_matmuls=skip_head_matmuls)


def memory_table(m: dict, run: dict | None = None) -> str:
    where = (f"; torch {run['torch']}, {run['threads']} threads, {run['cpu']} ("
             f"{'native' if run['native_bf16'] else 'no native'} bf16 matmuls), {run['rounds']} round(s)"
             + (f"; the head's matmuls zeroed, uncomputed (--skip_head_matmuls), except in \"{COMPUTED}\": the other "
                "times are meaningless" if run.get("skip_head_matmuls") else "")) if run else ""
    lines = [f"logprob_memory.py's model (GemmaForCausalLM {logprob_memory.CONFIG}, bf16, B={logprob_memory.B}, "
             f"T={logprob_memory.T}){where}", "| variant | peak extra memory | vs floor | time of one step (s), shared CPU |",
             "| --- | ---: | ---: | ---: |"]
    for n, r in m.items():
        lines.append(f"| {n} | {r['peak_bytes'] / 1e9:.3f} GB | {r['peak_bytes'] / m['floor']['peak_bytes']:.2f}x | "
                     f"{r['time_s']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip_memory", action="store_true", help="errors only")
    parser.add_argument("--skip_errors", action="store_true", help="memory only")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per memory variant (median)")
    parser.add_argument("--parallel", action="store_true", help="a round's memory variants at once (times share cores)")
    parser.add_argument("--json", help="write every number here (a part skipped keeps what the file holds of it)")
    parser.add_argument("--skip_head_matmuls", action="store_true", help="memory: logprob_memory.py's flag")
    parser.add_argument("--memory_child", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(logprob_memory.child(args.memory_child, 1, args.skip_head_matmuls)))
        return
    print(f"torch {torch.__version__} on CPU, {torch.get_num_threads()} threads; LOGIT_STD {LOGIT_STD}", flush=True)
    result = {}
    if args.json and os.path.isfile(args.json):  # each part takes minutes: one run may refresh one of them
        with open(args.json) as f:
            result = json.load(f)
    if not args.skip_errors:
        result["errors"] = errors()
        print(error_table(result["errors"]), flush=True)
    if not args.skip_memory:
        result["memory"] = memory(args.rounds, args.parallel, args.skip_head_matmuls)
        result["memory_run"] = machine(args.rounds, args.skip_head_matmuls)
        print()
        print(memory_table(result["memory"], result["memory_run"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
