"""Time plan: the work in every algorithm's paper run on 8 GPUs, phase by phase, and an estimate of how long it takes.

    python benchmarks/time_plan.py                  # counted work and GPU estimate at paper defaults (docs/memory-and-time.md)
    python benchmarks/time_plan.py --measure spo    # one algorithm's tiny default on this CPU: measured vs counted
    python benchmarks/time_plan.py --waste          # the tiny offline dataset's useful-token fraction, and sorted by length

The counting functions below follow the scripts' own batching (common._chunk_plan, the process-score rounds, SPO's
refresh windows, iterate_batches/plan_steps) on each file's PAPER and runtime.cli.RUN_DEFAULTS. Sequences, generate calls,
batch sizes, optimizer steps and checkpoints are exact given the data; token counts need mean lengths, success rates and
process-score rounds, which are data: for the tiny run `--measure` reads them from the run itself and compares every
count with what the run did; for the paper run they are the assumptions below.

FLOPs: 2·N per token forward, 6·N forward and backward, 8·N with activation checkpointing (N: parameters that multiply,
the tied embedding once as the output head; a value network without the head), plus causal attention: 2·L·d·S² per
sequence of S tokens forward (L layers, d = heads·head_dim), and a decoded token at context c costs 4·L·d·c.

Assumptions (ESTIMATES: no GPU has run any of this):
  - MODEL: google/gemma-1.1-7b-it (benchmarks/memory_plan.GEMMA_7B, from its config.json), 8.5B parameters.
  - GSM8K: 7473 train and 1319 test problems (openai/gsm8k, the files in ../shared/data/gsm8k).
  - PROMPT_TOKENS = 100: measured mean GSM8K question of 240 characters at ~4 characters per token (the ratio is a
    guess), plus the template's instruction and chat markup (~35 tokens).
  - RESPONSE_TOKENS = 200: a guess (the gold solutions average ~290 characters, ~100 tokens; an instruct model's chain
    of thought runs longer).
  - SUCCESS: a prompt's number of correct samples out of n is uniform on 0..n (the per-prompt success rate uniform on
    [0, 1]): mean 0.5, a guess.
  - PS_ROUNDS = 2 prefix lengths tried per failed response in DQO's process scores, completions of RESPONSE_TOKENS / 2
    (guesses; `--measure dqo -- --process_rewards` counts a tiny run's own rounds).
  - DECODE_STEPS: every generate call decodes max_new_tokens steps: one sample that does not stop keeps the whole call
    going. An upper bound and a guess; --measure prints the tiny run's ratio.
  - DECODE_STEPS_PER_S (HF generate, 7B in bf16, one H100, KV cache), by sequences per call: 1: 30, 8: 28, 32: 25,
    64: 22. A GUESS, bracketed by published figures: the bandwidth bound is 3.35 TB/s / 17 GB of weights = 197 steps/s
    (H100 SXM: 3.35 TB/s, 989.5 TFLOPS bf16 dense; quoted in Baseten's "Unlocking the full power of NVIDIA H100 GPUs
    for ML inference with TensorRT"); TensorRT-LLM v0.5 reached 111 steps/s at batch 1 and 3,679 tokens/s (57 steps/s)
    at batch 64 on GPT-J 6B on an A100 (NVIDIA, TensorRT-LLM "H100 vs A100" blog). HF generate's per-step Python and
    kernel-launch overhead keeps it well below an optimized engine and nearly flat in the batch size at these sizes.
  - PEAK_FLOPS = 989.5e12 per H100 (bf16 dense, the same source); MFU = 0.35 for training and scoring under FSDP2 (a
    guess).
  - CHECKPOINT: 12 bytes per trained parameter (fp32 master weights and AdamW's two fp32 moments), + SPO's bf16 rollout
    policy (2 bytes per parameter).

Corrections, each a term of `count` (TERMS) and each an estimate; `--before` prints the plan without them:
  - recompute: configs/fsdp.yaml's `fsdp_activation_checkpointing` (read from the file) recomputes each layer's forward
    in backward, and token_logprobs recomputes its head chunks: 8·N FLOPs per trained token instead of 6·N.
  - padding: every training micro-batch pads to its longest row (iterate_batches draws rows at random; scoring sorts rows
    by length and generation decodes max_new_tokens anyway, so neither is charged). The body and attention run on the
    padded length, the output head only on real tokens (token_logprobs). A micro-batch of B rows pads to E[max of B
    lengths], from GSM8K's train file (../shared/data/gsm8k/train.jsonl, or SHARED_DATA): per problem, TEMPLATE_TOKENS +
    question characters / CHARS_PER_TOKEN for the prompt, and the response as long as its gold solution relative to the
    mean solution, scaled to RESPONSE_TOKENS and capped at max_new_tokens (every sample of a prompt as long as its gold
    solution: the samples' own spread would add padding). No tokenizer of the 7B model is available offline, so lengths
    are characters scaled; the factor is a ratio and barely depends on the scale (pure characters give 1.64 at B = 8, the
    scaled lengths 1.62). Without the file, PAD_FACTOR (the same computation, stored) is used. For a tiny `--measure`
    run the factor comes from its own offline rows (the tiny tokenizer's lengths), and the table shows the measured
    padded tokens beside it.
  - io: checkpoints, model saves and model loading at a stated disk bandwidth (DISK_WRITE_GB_PER_S and
    DISK_READ_GB_PER_S, guesses between one local NVMe drive, ~3 GB/s, and a network file system, 0.5-1 GB/s per
    client; `benchmarks/gpu_check.py` measures the write rate). A checkpoint is written by all ranks at the node's
    write bandwidth, then read back and CRC-32-hashed by rank 0 alone at the read bandwidth
    (runtime.checkpoint.save_checkpoint today), the others waiting. Its size counts the value network as stored (its
    backbone keeps the embedding: 12 bytes x 8.5B each; the plan before left the embedding out). Models are saved in
    bf16, 2 bytes per parameter (runtime.checkpoint.save_model saves in the load dtype; the plan before counted 4), by
    rank 0: the policy at every evaluation (each epoch end and the end), the value network once. Loading: the bf16
    model read once per node at the read bandwidth (the other processes hit the page cache; host-side upcasting and
    sharding not counted).
  - cadence: checkpoints every `--save_every_minutes` minutes of the training loop (training, SPO rollouts,
    evaluations): the Args' paper value where an Args has the field, else SAVE_EVERY_MINUTES (60, its paper default),
    with the step cadence off. The plan before counted the step cadence (--save_every 50: DQO's 205 GB 58 times);
    `before_after` shows it beside as "checkpoints by --save_every instead".
"""

import argparse
import functools
import importlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import runtime.cli  # noqa: E402
import runtime.memory  # noqa: E402
import dqo  # noqa: E402  (its process scores: PS_CHUNK rows per cached chunk)
from memory_plan import GEMMA_7B  # noqa: E402

ALGOS = ("rs", "dpo", "kto", "dro", "dqo", "spo")
WORLD = 8
GSM8K = dict(n_train=7473, n_test=1319)
PROMPT_TOKENS, RESPONSE_TOKENS, PS_ROUNDS = 100, 200, 2
DECODE_STEPS_PER_S = {1: 30, 8: 28, 32: 25, 64: 22}  # guess, see the header
PEAK_FLOPS, MFU = 989.5e12, 0.35
# The corrections (header), each an estimate
TERMS = ("recompute", "padding", "io")  # count's terms; none of them: the plan before these corrections
FSDP_CONFIG = os.path.join(ROOT, "configs", "fsdp.yaml")  # the paper launch's config: its activation checkpointing
DATA = os.environ.get("SHARED_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
TEMPLATE_TOKENS, CHARS_PER_TOKEN = 35, 4  # guesses, as PROMPT_TOKENS above
# E[longest of B rows] / mean row, GSM8K train lengths (header): `gsm8k_lengths` + `pad_factor`, stored for a checkout
# without ../shared/data (tests/test_time_plan.py checks it against the file)
PAD_FACTOR = {4: 1.415, 8: 1.616, 16: 1.802}
DISK_WRITE_GB_PER_S, DISK_READ_GB_PER_S = 2.0, 2.0  # a node's disk: GUESSES (header)
SAVE_EVERY_MINUTES = 60  # the paper cadence of --save_every_minutes while no Args has the field (header)
SAVE_EVERY_STEPS = 50  # the step cadence the plan before counted (--save_every's default then)
MODEL_BYTES_PER_PARAM, CHECKPOINT_BYTES_PER_PARAM = 2, 12  # bf16 saves; fp32 weights and two fp32 Adam moments
VARIANTS = [(a, a.upper(), {}) for a in ALGOS] + [("dqo", "DQO --process_rewards", {"process_rewards": True})]
PHASES = ("reference evaluation", "offline dataset", "process scores", "SPO rollouts", "training", "evaluations",
          "value traces")  # the last: DRO's and DQO's printout after training, measured only (not counted)


# ---------------------------------------------------------------------------------------------------------------------
# Counting: the same batching as the scripts
# ---------------------------------------------------------------------------------------------------------------------
def model_shape(config: dict) -> dict:
    """N (parameters that multiply: the tied embedding once, as the head), the value network's (no head), the head's,
    the width, L, d."""
    n, _ = runtime.memory.param_count(config)
    head = config["vocab_size"] * config["hidden_size"]
    return dict(n=n, n_value=n - head, head=head, hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                d_attn=config["num_attention_heads"] * config["head_dim"])


def fwd_flops(tokens_per_seq: float, seqs: float, n: float, shape: dict, factor: int = 2) -> float:
    """FLOPs of `seqs` sequences of `tokens_per_seq` tokens through a network of `n` parameters: factor 2 forward,
    6 forward and backward; causal attention 2·L·d·S² per sequence forward, scaled the same way."""
    return seqs * (factor * n * tokens_per_seq + factor * shape["layers"] * shape["d_attn"] * tokens_per_seq**2)


def train_flops(seqs: float, real: float, padded: float, n: float, head: float, shape: dict, factor: int) -> float:
    """`fwd_flops` of sequences of `real` tokens padded to `padded`: the body (n − head parameters) and attention run on
    every padded position, the output head (`head` parameters) only on real tokens, as token_logprobs projects them.
    factor 2: forward; 6: forward and backward; 8: with the forward recomputed in backward (activation checkpointing)."""
    return seqs * (factor * ((n - head) * padded + head * real) + factor * shape["layers"] * shape["d_attn"] * padded**2)


def activation_checkpointing(path: str = FSDP_CONFIG) -> bool:
    """Whether the launch config recomputes activations (fsdp_activation_checkpointing)."""
    with open(path) as f:
        return bool(yaml.safe_load(f)["fsdp_config"].get("fsdp_activation_checkpointing", False))


def pad_factor(lengths: list[float], rows: int) -> float:
    """E[longest of `rows` rows drawn at random from `lengths`] / mean length: a micro-batch's padded positions per real
    token. Exact for draws with replacement: the k-th shortest of n is the longest with probability
    (k/n)^rows − ((k−1)/n)^rows."""
    xs, n = sorted(lengths), len(lengths)
    longest = sum(x * ((k / n) ** rows - ((k - 1) / n) ** rows) for k, x in enumerate(xs, 1))
    return longest / (sum(xs) / n)


@functools.lru_cache(maxsize=8)
def gsm8k_lengths(max_new_tokens: int, path: str | None = None) -> tuple[float, ...] | None:
    """Estimated tokens of each GSM8K train problem's row (header): prompt TEMPLATE_TOKENS + question characters /
    CHARS_PER_TOKEN, response its gold solution's length relative to the mean, times RESPONSE_TOKENS, at most
    max_new_tokens. None without the file."""
    path = path or os.path.join(DATA, "gsm8k", "train.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    mean_solution = sum(len(r["answer"]) for r in rows) / len(rows)
    return tuple(TEMPLATE_TOKENS + len(r["question"]) / CHARS_PER_TOKEN
                 + min(max_new_tokens, RESPONSE_TOKENS * len(r["answer"]) / mean_solution) for r in rows)


def io_phase(written: float = 0.0, read: float = 0.0, label: str = "") -> dict:
    """A phase of disk traffic only: bytes written at DISK_WRITE_GB_PER_S, then read at DISK_READ_GB_PER_S."""
    return dict(sequences=0, scored=0.0, gen_flops=0.0, score_flops=0.0, train_flops=0.0, flops=0.0, written=written,
                read=read, io_seconds=written / 1e9 / DISK_WRITE_GB_PER_S + read / 1e9 / DISK_READ_GB_PER_S, label=label)


def gen_work(calls: list[int] | Counter, prompt: float, response: float, max_new_tokens: int, shape: dict) -> dict:
    """Generate calls of `calls[i]` sequences, mean prompt and response lengths: sequences, tokens generated (response
    tokens, the stop included), decode positions if every call runs max_new_tokens steps, FLOPs of prefill and decode."""
    calls = calls if isinstance(calls, Counter) else Counter(calls)  # {sequences in a call: number of such calls}
    seqs = sum(b * n for b, n in calls.items())
    L, d = shape["layers"], shape["d_attn"]
    flops = seqs * (2 * shape["n"] * (prompt + response) + 2 * L * d * prompt**2
                    + 4 * L * d * (prompt * response + response**2 / 2))
    return dict(sequences=seqs, calls=sum(calls.values()), batch=max(calls, default=0), generated=seqs * response,
                positions=seqs * max_new_tokens, gen_flops=flops, score_flops=0.0, train_flops=0.0, scored=0.0)


def eval_calls(n_test: int, d: dict, pass_n: int = 0, pass_problems: int | None = None) -> list[int]:
    """`common.evaluate`: greedy, eval_seeds sampled passes, optionally pass@k (pass_n samples per problem)."""
    calls = [len(c) for c in common._chunk_plan(n_test, 1, d["gen_batch_size"])] * (1 + d["eval_seeds"])
    if pass_n:
        m = min(pass_problems or n_test, n_test)
        calls += [len(c) * pass_n for c in common._chunk_plan(m, pass_n, d["gen_batch_size"])]
    return calls


def process_score_calls(rounds: list[list[int]], ps_samples: int, gen_batch_size: int) -> list[int]:
    """`dqo.score_segments` over PS_CHUNK-row chunks: `rounds[c]` lists, for each failed row of chunk c, how many
    prefix lengths it tried. Each round takes the chunk's still-pending rows × ps_samples in calls of gen_batch_size."""
    calls = []
    for chunk in rounds:
        for r in range(max(chunk, default=0)):
            n = sum(k > r for k in chunk) * ps_samples
            calls += [min(gen_batch_size, n - s) for s in range(0, n, gen_batch_size)]
    return calls


def spo_rollout_calls(total_steps: int, d: dict, world: int, batched: bool = True) -> Counter:
    """spo.py's online rollouts, all processes: at each refresh, the online slots of interval × grad_accum micro-batches
    in calls of gen_batch_size (batched); or one call per micro-batch (the earlier design, for comparison)."""
    online = len(importlib.import_module("spo").online_slots(d["per_device_batch_size"], d["online_fraction"]))
    if not online:
        return Counter()
    if not batched:
        return Counter({online: total_steps * d["grad_accum"] * world})
    per_window = d["model_update_interval"] * d["grad_accum"] * online
    one = Counter(min(d["gen_batch_size"], per_window - s) for s in range(0, per_window, d["gen_batch_size"]))
    return Counter({b: n * math.ceil(total_steps / d["model_update_interval"]) * world for b, n in one.items()})


def train_plan(n_rows: int, d: dict, world: int) -> tuple[int, int, int]:
    """(optimizer steps, epochs, steps per epoch) as `common.plan_steps` makes them."""
    per_step = d["per_device_batch_size"] * world * d["grad_accum"]
    steps_per_epoch = n_rows // per_step
    epochs = d["epochs"] or math.ceil(d["max_steps"] / steps_per_epoch)
    return min(steps_per_epoch * epochs, d["max_steps"] or steps_per_epoch * epochs), epochs, steps_per_epoch


def count(algo: str, d: dict, data: dict, shape: dict, world: int, terms: tuple = TERMS) -> dict:
    """Every phase's work for `algo` with settings `d` (its Args after defaults, as a dict) and `data`: n_train, n_test,
    prompt and response (mean tokens), train_rows (examples it trains on: DPO pairs), ps_rounds (per PS_CHUNK chunk,
    per failed row) and ps_prompt/ps_response (mean tokens) for DQO, and `lengths` (tokens of each row, for the padding;
    without them PAD_FACTOR). `terms`: the corrections counted (TERMS; none: the plan before them). Returns
    {phase: work, "totals": ...}."""
    module = importlib.import_module(algo)
    P, R, mnt = data["prompt"], data["response"], d["max_new_tokens"]
    pass_kw = dict(pass_n=module.PASS_EVAL["pass_n"], pass_problems=d.get("pass_eval_problems")) if algo == "spo" else {}
    out = {"reference evaluation": gen_work(eval_calls(data["n_test"], d, **pass_kw), P, R, mnt, shape)}
    off = gen_work([len(c) * d["n_samples"] for c in common._chunk_plan(data["n_train"], d["n_samples"], d["gen_batch_size"])],
                   P, R, mnt, shape)
    off.update(scored=off["sequences"] * (P + R), score_flops=fwd_flops(P + R, off["sequences"], shape["n"], shape))
    out["offline dataset"] = off  # one reference forward gives the reference's and the sampler's log-probs
    if algo == "dqo" and d["process_rewards"]:
        out["process scores"] = gen_work(process_score_calls(data["ps_rounds"], d["ps_samples"], d["gen_batch_size"]),
                                         data["ps_prompt"], data["ps_response"], mnt, shape)
    steps, epochs, steps_per_epoch = train_plan(data["train_rows"], d, world)
    if algo == "spo":
        roll = gen_work(spo_rollout_calls(steps, d, world), P, R, mnt, shape)
        roll.update(scored=roll["sequences"] * (P + R), score_flops=fwd_flops(P + R, roll["sequences"], shape["n"], shape))
        out["SPO rollouts"] = roll  # with the reference's log-probs of each rollout
        before = gen_work(spo_rollout_calls(steps, d, world, False), P, R, mnt, shape)
        before.update(scored=roll["scored"], score_flops=roll["score_flops"])
        out["SPO rollouts, one call per micro-batch (before)"] = before
    rows = d["per_device_batch_size"] * (2 if algo == "dpo" else 1)  # rows per micro-batch (DPO: both of each pair)
    seqs = steps * rows * world * d["grad_accum"]
    recompute = "recompute" in terms and bool(d.get("activation_checkpointing") or d.get("gradient_checkpointing"))
    factor = 8 if recompute else 6
    pad = 1.0
    if "padding" in terms:
        pad = pad_factor(data["lengths"], rows) if data.get("lengths") else PAD_FACTOR[rows]
    S = P + R
    T = pad * S  # a micro-batch's padded length: E[its longest row]
    train = dict(sequences=seqs, trained={"policy": seqs * S}, padded=seqs * T, pad_factor=pad, flops_per_param=factor,
                 scored=0.0, gen_flops=0.0, score_flops=0.0, train_flops=train_flops(seqs, S, T, shape["n"], shape["head"],
                                                                                     shape, factor))
    if algo in ("dro", "dqo"):
        train["trained"]["value"] = seqs * S
        train["train_flops"] += train_flops(seqs, S, T, shape["n_value"], 0, shape, factor)
    if algo == "kto":  # z0: the policy and the reference on one mismatched pair per row, no gradient
        train.update(scored=2 * seqs * S, score_flops=2 * train_flops(seqs, S, T, shape["n"], shape["head"], shape, 2))
    out["training"] = train
    n_evals = min(epochs - 1, max(0, (steps - 1) // steps_per_epoch)) + 1  # each epoch end before the last step, final
    final, inter = (gen_work(eval_calls(data["n_test"], d, **kw), P, R, mnt, shape) for kw in (pass_kw, {}))
    out["evaluations"] = {k: final[k] + (n_evals - 1) * inter[k] for k in final}
    out["evaluations"]["batch"] = max(final["batch"], inter["batch"])
    for p in out.values():
        p["flops"] = p["gen_flops"] + p["score_flops"] + p["train_flops"]
    rollout_policy = 2 * shape["n"] if algo == "spo" and d["online_fraction"] else 0  # SPO's bf16 copy, in checkpoints
    by_steps = steps // d["save_every"] if d["save_every"] else 0
    if "io" not in terms:  # the plan before: the step cadence (50 then), the value network without its embedding, models
        trained = shape["n"] + (shape["n_value"] if algo in ("dro", "dqo") else 0)  # at 4 bytes per parameter
        ckpt_bytes = CHECKPOINT_BYTES_PER_PARAM * trained + rollout_policy
        before = steps // (d["save_every"] or SAVE_EVERY_STEPS)
        out["totals"] = dict(steps=steps, epochs=epochs, evaluations=n_evals, checkpoints=before, cadence="steps",
                             checkpoint_gb=before * ckpt_bytes / 1e9, models_gb=n_evals * 4 * trained / 1e9)
        return out
    value = shape["n"] + shape["hidden"] + 1 if algo in ("dro", "dqo") else 0  # as stored: the backbone and a scalar head
    ckpt_bytes = CHECKPOINT_BYTES_PER_PARAM * (shape["n"] + value) + rollout_policy
    minutes = d.get("save_every_minutes")
    # both cadences run (a save resets the clock): whichever saves more often sets the count, an estimate
    loop = sum(phase_hours(out[p], mnt, world) for p in ("training", "SPO rollouts", "evaluations") if p in out)
    by_time = int(loop * 60 // minutes) if minutes else 0  # over the training loop's estimated hours
    ckpts, cadence = (by_time, f"every {minutes:g} min") if by_time > by_steps else \
        (by_steps, f"every {d['save_every']} steps")
    if not ckpts:  # neither cadence comes due: the loop is shorter than --save_every_minutes, and --save_every is 0
        cadence = f"none: training ends before {minutes:g} min" if minutes else "none"
    model_bytes = MODEL_BYTES_PER_PARAM * (n_evals * shape["n"] + value)  # the policy at every evaluation, V once
    out["model loading"] = io_phase(read=MODEL_BYTES_PER_PARAM * shape["n"], label="model loading (bf16, once per node)")
    out["checkpoints"] = io_phase(ckpts * ckpt_bytes, ckpts * ckpt_bytes,
                                  f"checkpoints: {ckpts:,} x {ckpt_bytes / 1e9:,.0f} GB, {cadence}, written and verified")
    out["model saves"] = io_phase(model_bytes, label=f"model saves: {n_evals} policy{' + value' if value else ''}, bf16")
    out["totals"] = dict(steps=steps, epochs=epochs, evaluations=n_evals, checkpoints=ckpts, cadence=cadence,
                         checkpoint_gb=ckpts * ckpt_bytes / 1e9, models_gb=model_bytes / 1e9)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The paper run, estimated on 8 GPUs
# ---------------------------------------------------------------------------------------------------------------------
def paper_args(algo: str, world: int = WORLD) -> dict:
    """The Args of `algo` as `python ALGO.py --model google/gemma-1.1-7b-it` resolves them on `world` processes."""
    module = importlib.import_module(algo)
    d = {k: f.default for k, f in module.Args.__dataclass_fields__.items()}
    d.update({**runtime.cli.RUN_DEFAULTS["paper"], **module.PAPER})
    d["max_new_tokens"] = common.TASK_MAX_NEW_TOKENS[d["task"]]
    d["grad_accum"] = d["global_batch_size"] // (d["per_device_batch_size"] * world)
    d["activation_checkpointing"] = activation_checkpointing()
    if d.get("save_every_minutes") is None:  # no Args has the field yet (header)
        d["save_every_minutes"] = SAVE_EVERY_MINUTES
    return d


def paper_data(algo: str, d: dict) -> dict:
    """The assumed GSM8K data (header): success per prompt uniform on 0..n correct samples."""
    n, rows = d["n_samples"], GSM8K["n_train"] * d["n_samples"]
    pairs = sum(min(d.get("max_pairs_per_prompt") or 0, c * (n - c)) for c in range(n + 1)) / (n + 1) * GSM8K["n_train"]
    chunks = math.ceil(rows / dqo.PS_CHUNK)
    return dict(GSM8K, prompt=PROMPT_TOKENS, response=RESPONSE_TOKENS, ps_prompt=PROMPT_TOKENS + RESPONSE_TOKENS / 2,
                ps_response=RESPONSE_TOKENS / 2, ps_rounds=[[PS_ROUNDS] * (dqo.PS_CHUNK // 2)] * chunks,
                train_rows={"rs": rows // 2, "dpo": int(pairs)}.get(algo, rows),
                lengths=gsm8k_lengths(d["max_new_tokens"]))


def decode_steps_per_s(batch: int) -> float:
    """DECODE_STEPS_PER_S, linear between the guessed points."""
    keys = sorted(DECODE_STEPS_PER_S)
    for a, b in zip(keys, keys[1:]):
        if batch <= b:
            w = min(max((batch - a) / (b - a), 0), 1)
            return DECODE_STEPS_PER_S[a] + (DECODE_STEPS_PER_S[b] - DECODE_STEPS_PER_S[a]) * w
    return DECODE_STEPS_PER_S[keys[-1]]


def phase_hours(p: dict, max_new_tokens: int, world: int) -> float:
    """Generate calls: each process runs its share, max_new_tokens decode steps each at DECODE_STEPS_PER_S; scoring and
    training FLOPs at MFU of PEAK_FLOPS on every GPU; disk traffic (`io_phase`) at the disk's bandwidth."""
    seconds = math.ceil(p.get("calls", 0) / world) * max_new_tokens / decode_steps_per_s(p.get("batch", 1))
    return (seconds + p.get("io_seconds", 0.0) + (p["score_flops"] + p["train_flops"]) / (world * PEAK_FLOPS * MFU)) / 3600


def total_hours(plan: dict, max_new_tokens: int, world: int) -> float:
    """The estimated hours of every phase of a `count` (the SPO comparison row "(before)" left out)."""
    return sum(phase_hours(p, max_new_tokens, world) for name, p in plan.items()
               if name != "totals" and "(before)" not in name)


def human(x: float) -> str:
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= v:
            return f"{x / v:.3g}{unit}"
    return f"{x:.3g}"


def paper_plan(algo: str, extra: dict | None = None, world: int = WORLD, terms: tuple = TERMS) -> tuple[dict, dict]:
    """(settings, `count`) of an algorithm's paper run."""
    d = dict(paper_args(algo, world), **(extra or {}))
    return d, count(algo, d, paper_data(algo, d), model_shape(GEMMA_7B), world, terms)


def paper_table(world: int = WORLD, terms: tuple = TERMS) -> str:
    """docs/memory-and-time.md's time plan: work per phase and the estimated hours, then steps, checkpoints and totals."""
    lines = ["| algorithm | phase | sequences | generate calls × batch | tokens generated | tokens scored | tokens trained "
             "| PFLOPs | est. hours |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    totals = ["| algorithm | optimizer steps | epochs | evaluations | checkpoints | GB written: checkpoints + models | "
              "est. total on 8 × H100 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for algo, label, extra in VARIANTS:
        d, plan = paper_plan(algo, extra, world, terms)
        for name, p in plan.items():
            if name == "totals":
                continue
            h = phase_hours(p, d["max_new_tokens"], world)
            if "io_seconds" in p:
                lines.append(f"| {label} | {p['label']} | - | - | - | - | - | - | {h:,.1f} |")
                continue
            calls = f"{human(p['calls'])} × {p['batch']}" if p.get("calls") else "-"
            trained = ", ".join(f"{k} {human(v)}" for k, v in p.get("trained", {}).items()) or "-"
            if p.get("pad_factor", 1.0) != 1.0:
                trained += f" (padded x{p['pad_factor']:.2f})"
            if name == "training" and "recompute" in terms:
                trained += f", {p['flops_per_param']}·N"
            lines.append(f"| {label} | {name} | {human(p['sequences'])} | {calls} | "
                         f"{human(p['generated']) if p.get('generated') else '-'} | "
                         f"{human(p['scored']) if p['scored'] else '-'} | {trained} | {p['flops'] / 1e15:,.0f} | {h:,.1f} |")
        t, hours = plan["totals"], total_hours(plan, d["max_new_tokens"], world)
        ckpts = f"{t['checkpoints']:,}" + (f" ({t['cadence']})" if "io" in terms else "")
        totals.append(f"| {label} | {t['steps']:,} | {t['epochs']} | {t['evaluations']} | {ckpts} | "
                      f"{t['checkpoint_gb']:,.0f} + {t['models_gb']:,.0f} | {hours:,.0f} h ({hours / 24:,.1f} days) |")
    return "\n".join(lines) + "\n\n" + "\n".join(totals)


def before_after(world: int = WORLD) -> str:
    """Each algorithm's estimated total with the corrections added one at a time, and the step cadence's I/O beside."""
    steps = [("before: 6·N, unpadded, no I/O", ()), ("+ recompute", ("recompute",)),
             ("+ padding", ("recompute", "padding")), ("+ I/O: after", TERMS)]
    lines = ["| algorithm | " + " | ".join(s for s, _ in steps) + " | after, checkpoints by --save_every instead |",
             "| --- |" + " ---: |" * (len(steps) + 1)]
    for algo, label, extra in VARIANTS + [("dqo", "DQO --gen_batch_size 32 (the earlier paper size: calls with empty slots)",
                                           {"gen_batch_size": 32})]:
        cells = []
        for _, terms in steps:
            d, plan = paper_plan(algo, extra, world, terms)
            cells.append(f"{total_hours(plan, d['max_new_tokens'], world):,.1f} h")
        d, plan = paper_plan(algo, dict(extra, save_every_minutes=0, save_every=SAVE_EVERY_STEPS), world)
        t = plan["totals"]
        cells.append(f"{total_hours(plan, d['max_new_tokens'], world):,.1f} h ({t['checkpoints']:,} x "
                     f"{t['checkpoint_gb'] / max(1, t['checkpoints']):,.0f} GB, {t['cadence']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Measured: the tiny default on this CPU, phase by phase, against the same counting functions
# ---------------------------------------------------------------------------------------------------------------------
PHASE_OF = {"evaluate_reference": "reference evaluation", "build_offline_dataset": "offline dataset",
            "build_process_scores": "process scores", "pending_rollouts": "SPO rollouts", "evaluate_run": "evaluations",
            "value_traces": "value traces"}


def measure(algo: str, argv: list[str]) -> dict:
    """Runs `algo`'s main() here with `argv`, recording per phase its wall time and every generate call (sequences,
    response tokens, decode steps: the longest response in the call), the rows the training loop collates, and the
    data the counting functions need. Returns {"measured": ..., "counted": ..., "data": ...}."""
    module = importlib.import_module(algo)
    rec = {p: dict(seconds=0.0, sequences=0, calls=0, batch=0, generated=0, positions=0, prompt=0) for p in PHASES}
    rec["training"].update(trained=0, padded=0)
    state = {"phase": None, "captured": {}}

    def in_phase(name, fn):
        def wrapped(*a, **k):
            if state["phase"] is not None:  # nested (evaluate_reference calls evaluate_run): the outer phase counts
                return fn(*a, **k)
            state["phase"], t = PHASE_OF[name], time.perf_counter()
            try:
                out = fn(*a, **k)
            finally:
                rec[state["phase"]]["seconds"] += time.perf_counter() - t
                state["phase"] = None
            state["captured"].setdefault(name, out)
            return out
        return wrapped

    for name in PHASE_OF:
        if hasattr(module, name):
            setattr(module, name, in_phase(name, getattr(module, name)))
    generate = common.generate_batch

    def generate_counted(model, tokenizer, prompts, **kw):
        outs = generate(model, tokenizer, prompts, **kw)
        r = rec[state["phase"] or "training"]
        lengths = [len(o["response_ids"]) for o in outs]
        r.update(sequences=r["sequences"] + len(outs), calls=r["calls"] + 1, batch=max(r["batch"], len(outs)),
                 generated=r["generated"] + sum(lengths), positions=r["positions"] + len(outs) * max(lengths),
                 prompt=r["prompt"] + sum(map(len, prompts)))
        return outs
    common.generate_batch = generate_counted
    collate = module.collate

    def collate_counted(rows, *a, **k):
        batch = collate(rows, *a, **k)
        if state["phase"] is None:
            rec["training"]["trained"] += int(batch["attention_mask"].sum())
            rec["training"]["padded"] += batch["attention_mask"].numel()
            rec["training"]["sequences"] += len(rows)
        return batch
    module.collate = collate_counted
    tasks, plan = {}, {}
    load_task, fit_to_data = module.load_task, module.fit_to_data
    module.load_task = lambda task, split, *a, **k: tasks.setdefault(split, load_task(task, split, *a, **k))

    def plan_captured(n_examples, args, accelerator):
        plan.update(n_examples=n_examples, args=args)
        return fit_to_data(n_examples, args, accelerator)
    module.fit_to_data = plan_captured
    sys.argv = [f"{algo}.py", *argv]
    t0 = time.perf_counter()
    module.main()
    total = time.perf_counter() - t0
    rec["training"]["seconds"] = total - sum(rec[p]["seconds"] for p in PHASES if p != "training")  # includes setup
    rows = state["captured"]["build_offline_dataset"]
    data = dict(n_train=len(tasks["train"]), n_test=len(tasks["test"]), train_rows=plan["n_examples"],
                prompt=sum(len(r["prompt_ids"]) for r in rows) / len(rows),
                response=sum(len(r["response_ids"]) for r in rows) / len(rows),
                lengths=[len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows])
    if "build_process_scores" in state["captured"]:
        rounds = [(len(s["segment_ends"]) - s["correct_segments"]) if s["correct_segments"] else len(s["segment_ends"]) - 1
                  for r, s in zip(rows, state["captured"]["build_process_scores"]) if r["reward"] != 1.0]
        failed = [i for i, r in enumerate(rows) if r["reward"] != 1.0]
        data["ps_rounds"] = [[k for i, k in zip(failed, rounds) if i // dqo.PS_CHUNK == c]
                             for c in range(math.ceil(len(rows) / dqo.PS_CHUNK))]
        ps = rec["process scores"]
        data.update(ps_prompt=ps["prompt"] / max(1, ps["sequences"]), ps_response=ps["generated"] / max(1, ps["sequences"]))
    d = {k: getattr(plan["args"], k) for k in plan["args"].__dataclass_fields__}
    counted = count(algo, d, data, _tiny_shape(d), 1)
    return dict(measured=rec, counted=counted, data=data, total_seconds=total)


def _tiny_shape(d: dict) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(common.TINY_SHIPPED).to_dict()
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    return model_shape(config)


def measured_table(algo: str, result: dict) -> str:
    lines = [f"{algo.upper()} tiny default on this CPU ({result['total_seconds']:.0f} s in all): measured / counted",
             "| phase | seconds | sequences | generate calls | largest call | tokens generated | decode positions "
             "(measured; counted if every call ran max_new_tokens) | useful fraction | tokens trained | padded |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for phase in PHASES:
        m, c = result["measured"][phase], result["counted"].get(phase)
        if c is None and not m["sequences"] and phase != "training":
            continue
        c = c or {}
        frac = f"{m['generated'] / m['positions']:.2f}" if m["positions"] else "-"
        trained = f"{m['trained']:,} / {c.get('trained', {}).get('policy', 0):,.0f}" if phase == "training" else "-"
        padded = f"{m['padded']:,} / {c.get('padded', 0):,.0f}" if phase == "training" else "-"
        lines.append(f"| {phase} | {m['seconds']:.1f} | {m['sequences']:,} / {c.get('sequences', 0):,} | {m['calls']:,} / "
                     f"{c.get('calls', 0):,} | {m['batch']} / {c.get('batch', 0)} | {m['generated']:,} / "
                     f"{c.get('generated', 0):,.0f} | {m['positions']:,} / {c.get('positions', 0):,} | {frac} | {trained} | "
                     f"{padded} |")
    t = result["counted"]["totals"]
    lines.append(f"counted: {t['steps']} optimizer steps, {t['epochs']} epochs, {t['evaluations']} evaluations, "
                 f"{t['checkpoints']} checkpoints")
    return "\n".join(lines)


def waste_report(argv: list[str]) -> str:
    """The tiny default's offline-dataset generation (1000 arith prompts x 8 samples, calls of 256, seed 1): the useful
    fraction (response tokens up to each sequence's stop / batch x decode steps of each call) and its time, then the
    same with the prompts sorted by length (chunks of similar prompts), and how many samples that changes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(common.TINY_SHIPPED)
    tokenizer = AutoTokenizer.from_pretrained(common.TINY_SHIPPED)
    problems = common.load_task("arith", "train", None, int(argv[0]) if argv else 1000)
    prompts = [common.encode_prompt(tokenizer, p["question"], "arith") for p in problems]
    answers = [p["answer"] for p in problems]
    calls = []
    generate = common.generate_batch

    def generate_counted(model, tokenizer, prompts, **kw):
        outs = generate(model, tokenizer, prompts, **kw)
        lengths = [len(o["response_ids"]) for o in outs]
        calls.append((sum(lengths), len(outs) * max(lengths), len(outs) * (max(map(len, prompts)) - min(map(len, prompts)))))
        return outs
    common.generate_batch = generate_counted
    run = dict(n=8, temperature=0.9, top_p=0.9, top_k=16, max_new_tokens=64, gen_batch_size=256, seed=1)
    out, samples = [], {}
    for name, order in (("as built (prompt order)", list(range(len(prompts)))),
                        ("sorted by prompt length", sorted(range(len(prompts)), key=lambda i: len(prompts[i])))):
        calls.clear()
        t = time.perf_counter()
        rows = common.rollout(model, tokenizer, [prompts[i] for i in order], [answers[i] for i in order], "arith", **run)
        seconds = time.perf_counter() - t
        samples[name] = {order[r["prompt_idx"]]: [] for r in rows}
        for r in rows:
            samples[name][order[r["prompt_idx"]]].append(r["response_ids"])
        useful, positions, pad = (sum(c[k] for c in calls) for k in range(3))
        out.append(f"{name}: {len(calls)} generate calls, {useful:,} response tokens / {positions:,} decode positions = "
                   f"{useful / positions:.3f} useful; prompt padding {pad:,} positions; {seconds:.1f} s")
    a, b = samples.values()
    changed = sum(sorted(a[i]) != sorted(b[i]) for i in a)
    out.append(f"sorting changes the samples of {changed} of {len(a)} prompts: a sample depends on its call's composition "
               "(one seed per call, one random draw per row of the batch)")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", choices=ALGOS, help="run this algorithm's tiny default here and compare")
    parser.add_argument("--json", help="with --measure: write measured, counted and data here")
    parser.add_argument("--waste", action="store_true", help="the tiny offline dataset's useful-token fraction")
    parser.add_argument("--before", action="store_true", help="the paper plan without the corrections (header)")
    opts, rest = parser.parse_known_args()
    if opts.measure:
        out = rest or ["--output_dir", tempfile.mkdtemp(prefix=f"time_plan_{opts.measure}_"), "--report_to", ""]
        result = measure(opts.measure, [a for a in out if a != "--"])
        print(measured_table(opts.measure, result))
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump(result, f, default=float)
    elif opts.waste:
        print(waste_report(rest))
    elif opts.before:
        print(paper_table(terms=()))
    else:
        print(paper_table())
        print()
        print(before_after())


if __name__ == "__main__":
    main()
