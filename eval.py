# Evaluation protocol of DQO https://arxiv.org/abs/2410.09302 (greedy; T=0.7, top_p=0.9, top_k=16) and pass@k
"""Evaluate a policy: greedy accuracy, sampled accuracy as mean ± std over seeds, and unbiased pass@k; or show the
value trace of a trained value model (DQO paper, Table 4) as text and as an HTML page.

    python eval.py                                          # the embedded tiny reference on arith
    python eval.py --model runs/dqo/model --task arith
    python eval.py --model google/gemma-1.1-7b-it --task gsm8k --precision bf16
    python eval.py --model PATH --task math --test_file ../shared/data/math500/test.jsonl
    python eval.py --model PATH --pass_n 20 --pass_k 1,10 --pass_temperature 0.4 --pass_top_p 0.95 --pass_top_k 0  # SPO
    python eval.py --value_model runs/dqo/value_model --task arith  # value trace; the policy: runs/dqo/model

Writes a JSON result (`--output`, default `<model dir or cache>/eval-<task>.json`) and prints a table. With
--value_model (a value_model/ folder DRO or DQO saved): prints the trace and its statistics, and writes value_trace.html
beside the folder.
"""

import html
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from common import (
    EVAL_SAMPLING,
    TASK_MAX_NEW_TOKENS,
    ValueModel,
    arith_first_wrong,
    collate,
    encode_prompt,
    evaluate,
    format_results,
    load_model_and_tokenizer,
    load_task,
    rollout,
    segment_ends,
)
from runtime.cli import (
    ArgumentError,
    arg,
    at_least,
    between,
    describe_run,
    one_line_errors,
    parse_args,
    positive,
    probe_writable,
    validate_args,
)
from runtime.files import write_json_atomic
from runtime.launch import setup_accelerator
from runtime.memory import read_model_config


@dataclass
class Args:
    model: str = arg("tiny", "hub id or local save_pretrained dir (a run's model/: its task and precision, unless given); "
                          "`tiny` = the embedded reference")
    task: str | None = arg(None, "arith (embedded), gsm8k, math or aime24 (default: arith with --model tiny, else gsm8k)")
    test_file: str | None = arg(None, "local JSONL with the hub dataset's fields, instead of the hub test split")
    n_test: int | None = arg(None, "number of test problems (default: all; arith: 1000)")
    seeds: int = arg(5, "sampled-accuracy seeds (mean ± std; 0: greedy only)")
    seed: int = arg(1, "first seed, as in the training scripts")
    pass_n: int = arg(16, "samples per problem for pass@k (0: skip)")
    pass_k: str = arg("1,4,16", "comma-separated k for pass@k (each ≤ pass_n)")
    pass_temperature: float = arg(0.7, "pass@k sampling temperature (DQO protocol 0.7; SPO reports 0.4)")
    pass_top_p: float = arg(0.9, "pass@k sampling top_p (DQO 0.9; SPO 0.95)")
    pass_top_k: int = arg(16, "pass@k sampling top_k (DQO 16; 0 = off)")
    pass_problems: int | None = arg(None, "pass@k on the first N test problems only (default: all)")
    max_new_tokens: int | None = arg(None, "generation length (default per task: arith 64, gsm8k 512, math 1024, aime24 2048)")
    gen_batch_size: int = arg(256, "sequences per generate call")
    precision: str | None = arg(None, "fp32 or bf16 (default: the launch's mixed_precision; else tiny fp32, others bf16)")
    dist_timeout: int = arg(43200, "seconds a process waits at a collective (12 h: sampling the offline dataset has none)")
    cache_dir: str = arg(".cache", "where file digests are cached, and the result for a hub model goes (see --output)")
    output: str = arg("", "JSON result path (default: beside the model, or in cache_dir for hub ids)")
    report_to: str = arg("", "accelerate tracker (none by default)")
    output_dir: str = arg("runs/eval", "tracker directory")
    value_model: str | None = arg(None, "a value_model/ folder DRO or DQO saved: show its value trace (the policy: --model, "
                                        "or the model/ folder beside it; task and precision: the run's, unless given)")
    trace_problems: int = arg(50, "value trace: sampled responses to the first N test problems for its statistics")
    trace_samples: int = arg(4, "value trace: responses sampled per problem")


# eval.py's own flags; the ones it shares with the training scripts have their rules (runtime.cli.SHARED_RULES)
RULES = dict(seeds=at_least(0), pass_n=at_least(0), pass_temperature=positive(), pass_top_p=between(0, 1, lo_open=True),
             pass_top_k=at_least(0), pass_problems=at_least(1, unset_ok=True), trace_problems=at_least(1),
             trace_samples=at_least(1),
             pass_k=(lambda v: all(k.strip().isdigit() for k in v.split(",") if k.strip()), "comma-separated whole numbers"))


def resolve(args) -> None:
    """Fill what the flags leave open: with --value_model (or a run's model/ folder) the run's own policy, task and
    precision, unless given (the folder must be a value model); the task and generation length by the model, as the
    training scripts do."""
    run_dir = None  # a training run's folder: its model/ (or model_epochN/) or value_model/ was given
    if args.value_model:
        if not os.path.isfile(os.path.join(args.value_model, "value_head.safetensors")):
            raise ArgumentError(f"--value_model {args.value_model}: no value_head.safetensors (a value_model/ folder that "
                                "dro.py or dqo.py saved is expected)")
        run_dir = os.path.dirname(os.path.abspath(args.value_model))
        if args.model == "tiny" and os.path.isdir(os.path.join(run_dir, "model")):
            args.model = os.path.join(run_dir, "model")
    elif os.path.isdir(args.model):
        run_dir = os.path.dirname(os.path.abspath(args.model.rstrip("/")))
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "run.json")):
        with open(os.path.join(run_dir, "run.json")) as f:
            run = json.load(f)
        args.task = args.task or run["args"].get("task")
        if args.precision is None and not os.environ.get("ACCELERATE_MIXED_PRECISION"):
            # the precision it trained and was evaluated in: under bf16 an fp32 model's greedy answers drift from the
            # run's own evaluation (measured: 1 of 32 on the tiny default), and a bf16 read of an fp32 value head rounds
            # V to 1/256 near 1, coarser than the drops the trace measures
            args.precision = run.get("precision")
    args.task = args.task or ("arith" if args.model == "tiny" else "gsm8k")
    args.max_new_tokens = args.max_new_tokens or TASK_MAX_NEW_TOKENS.get(args.task)


def value_auc(drop: np.ndarray, wrong: np.ndarray, response: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple:
    """P(drop at a first-wrong-step segment > drop at a correct-step segment), ties counting half (the Mann-Whitney AUC),
    and its bootstrap standard error over responses: the segments of one response are drawn together, since they share
    its value function reads. drop (float), wrong (bool), response (int, 0..R−1): (N,) per segment."""
    levels, level = np.unique(drop, return_inverse=True)  # equal drops share a level: a tie counts half

    def auc(copies: np.ndarray) -> float:  # copies: (N,) how often each segment is drawn
        n_wrong = np.bincount(level, copies * wrong, len(levels))  # (L,)
        n_ok = np.bincount(level, copies * ~wrong, len(levels))  # (L,)
        ok_below = np.cumsum(n_ok) - n_ok  # (L,) correct-step segments with a smaller drop
        pairs = n_wrong.sum() * n_ok.sum()
        return float((n_wrong * (ok_below + 0.5 * n_ok)).sum() / pairs) if pairs else math.nan

    rng, n = np.random.default_rng(seed), int(response.max()) + 1
    boot = [auc(rng.multinomial(n, np.full(n, 1 / n))[response]) for _ in range(n_boot)]
    return auc(np.ones(len(drop))), float(np.nanstd(boot, ddof=1))  # nan: a resample without one of the two kinds


@torch.no_grad()
def value_traces(policy, value_model, tokenizer, problems: list[dict], task: str, seed: int, max_new_tokens: int,
                 gen_batch_size: int, accelerator=None, n_correct: int = 1, n_incorrect: int = 1, n_problems: int = 32,
                 n_per: int = 4) -> dict:
    """The DQO paper's value trace (Table 4). Sample `n_per` responses per problem for the first `n_problems` (the
    paper's evaluation sampling, `gen_batch_size` sequences per generate call; `policy` and `value_model` prepared or
    not), split each into segments and read V at each segment end (the state after its last token; for
    the last segment, before its stop token). Returns {"traces": the first `n_correct` correct and `n_incorrect`
    incorrect ones, "stats", "n_responses", "n_segments"}. On arith each segment is marked against the verifier's first
    wrong step, and stats, over all sampled responses, gives the mean change of V across correct steps and across the
    first wrong step, and the AUC with which the drop −dV ranks first-wrong-step segments above correct-step ones, with
    its bootstrap standard error over responses (`value_auc`); n_segments counts the segments of each kind."""
    problems = problems[:n_problems]
    prompts = [encode_prompt(tokenizer, p["question"], task) for p in problems]
    rows = rollout(policy, tokenizer, prompts, [p["answer"] for p in problems], task, n=n_per, seed=seed,
                   max_new_tokens=max_new_tokens, gen_batch_size=gen_batch_size, accelerator=accelerator,
                   desc="value trace", **EVAL_SAMPLING)
    was_training = value_model.training
    value_model.eval()
    device = next(value_model.parameters()).device
    traces = []
    for s in range(0, len(rows), gen_batch_size):
        chunk = rows[s : s + gen_batch_size]
        batch = collate(chunk, tokenizer.pad_token_id)
        values = value_model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()  # (B, T)
        for i, r in enumerate(chunk):
            p, n, ends = len(r["prompt_ids"]), len(r["response_ids"]), segment_ends(tokenizer, r["response_ids"])
            wrong = arith_first_wrong(r) if task == "arith" else None
            segs, a = [], 0
            for j, e in enumerate(ends):
                text = tokenizer.decode(r["response_ids"][a:e], skip_special_tokens=True)
                status = "" if task != "arith" else "ok" if wrong is None or j < wrong else "WRONG" if j == wrong else "-"
                segs.append({"text": text, "value": values[i, p + min(e, n - 1)].item(), "status": status})
                a = e
            traces.append({"question": problems[r["prompt_idx"]]["question"], "reward": r["reward"],
                           "value_start": values[i, p].item(), "segments": segs, "first_wrong": wrong})
    value_model.train(was_training)
    stats, counts = {}, {}
    if task == "arith":
        dv, status, response = [], [], []  # per segment of every response: the change of V, its status, its response
        for i, t in enumerate(traces):
            prev = t["value_start"]
            for sg in t["segments"]:
                dv.append(sg["value"] - prev)
                status.append(sg["status"])
                response.append(i)
                prev = sg["value"]
        dv, status, response = np.array(dv), np.array(status), np.array(response)
        counts = {k: int((status == k).sum()) for k in ("ok", "WRONG")}
        stats = {f"mean dV at {k} segments": float(dv[status == k].mean()) for k in ("ok", "WRONG") if counts[k]}
        if counts["ok"] and counts["WRONG"]:  # the drop −dV at first wrong steps against correct steps
            keep = np.isin(status, ("ok", "WRONG"))
            auc, se = value_auc(-dv[keep], status[keep] == "WRONG", response[keep], seed=seed)
            stats["AUC of -dV, first wrong vs correct steps"], stats["AUC bootstrap SE"] = auc, se
    picked = [t for t in traces if t["reward"] == 1.0][:n_correct] + [t for t in traces if t["reward"] != 1.0][:n_incorrect]
    return {"traces": picked, "stats": stats, "n_responses": len(traces), "n_segments": counts}


def format_value_traces(out: dict) -> str:
    """Plain text: per response, V at the start and at each segment end, the segment's status, and the segment."""
    lines = ["value trace: learned V at each segment end (DQO paper, Table 4)"]
    for t in out["traces"]:
        lines += ["", f"{'correct' if t['reward'] == 1.0 else 'incorrect'} response to: {t['question']}",
                  f"  {'V':>7}  {'step':<6} segment", f"  {t['value_start']:>7.3f}  {'':<6} (start)"]
        lines += [f"  {sg['value']:>7.3f}  {sg['status']:<6} {sg['text'].strip()!r}" for sg in t["segments"]]
    if out["stats"]:
        # dV is a signed change; the AUC a probability in [0, 1]
        segments = ", ".join(f"{n} {k}" for k, n in out.get("n_segments", {}).items())
        lines += ["", f"over {out['n_responses']} sampled responses ({segments} segments): "
                  + ", ".join(f"{k} {v:.3f}" if k.startswith("AUC") else f"{k} {v:+.3f}" for k, v in out["stats"].items())]
    return "\n".join(lines)


def value_trace_html(out: dict) -> str:
    """A small HTML page: each segment coloured by V at its end on a fixed scale, red at V ≤ 0 (certain failure) to
    green at V ≥ 1 (certain success with the 1/0 reward), so pages of different runs compare; V is printed after it."""
    parts = ["<html><head><meta charset='utf-8'><title>DQO value trace</title></head><body style='font-family:sans-serif'>",
             "<h2>DQO value trace</h2><p>Each segment is coloured by the learned V at its end: red V ≤ 0, green V ≥ 1.</p>"]
    for t in out["traces"]:
        spans = []
        for sg in t["segments"]:
            x = min(1.0, max(0.0, sg["value"]))
            colour = f"rgb({int(255 * (1 - x))},{int(200 * x + 55)},110)"
            note = f" {sg['status']}" if sg["status"] else ""
            spans.append(f"<span style='background:{colour}'>{html.escape(sg['text'].rstrip())}</span>"
                         f"<small>  V = {sg['value']:.3f}{note}</small>\n\n")
        parts.append(f"<h3>{'correct' if t['reward'] == 1.0 else 'incorrect'} (V at start {t['value_start']:.3f})</h3>"
                     f"<p>{html.escape(t['question'])}</p><pre style='font-size:14px'>{''.join(spans)}</pre>")
    return "\n".join(parts + ["</body></html>"])


def show_value_trace(args, model, tokenizer, problems, accelerator) -> None:
    """Print the value trace of --value_model (two correct and two incorrect responses) with its statistics over
    --trace_samples responses to each of the first --trace_problems problems, and write value_trace.html and .json
    beside the folder."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    value_model = accelerator.prepare(ValueModel.from_pretrained(args.value_model, dtype=dtype))
    out = value_traces(model, value_model, tokenizer, problems, args.task, args.seed, args.max_new_tokens,
                       args.gen_batch_size, accelerator, n_correct=2, n_incorrect=2, n_problems=args.trace_problems,
                       n_per=args.trace_samples)
    accelerator.print(format_value_traces(out))
    path = os.path.join(os.path.dirname(os.path.abspath(args.value_model)), "value_trace")
    if accelerator.is_main_process:
        with open(f"{path}.html", "w") as f:
            f.write(value_trace_html(out))
        write_json_atomic(f"{path}.json", out)  # the statistics, for benchmarks/compare.py
        print(f"wrote {path}.html and {path}.json")


def main():
    # as runtime.launch.start, less what only training needs (the output folder's claim, the memory plan, run.json)
    args = parse_args(Args)
    sys.excepthook = one_line_errors  # bad data found once it runs: one `error:` line, not a traceback
    resolve(args)
    validate_args(args, RULES)
    ks = tuple(int(k) for k in args.pass_k.split(",") if k.strip()) if args.pass_n else ()
    if any(not 1 <= k <= args.pass_n for k in ks):
        raise ArgumentError(f"--pass_k {args.pass_k}: every k must be in [1, --pass_n {args.pass_n}]")
    probe_writable(args)
    describe_run(args)
    read_model_config(args.model)  # a model whose config cannot be read (no network, a wrong hub id): one error line
    accelerator, _ = setup_accelerator(args, "eval")
    model, tokenizer = load_model_and_tokenizer(args.model, accelerator, trainable=False)
    model = accelerator.prepare(model)
    problems = load_task(args.task, "test", args.test_file, args.n_test)
    if args.value_model:
        show_value_trace(args, model, tokenizer, problems, accelerator)
        return accelerator.end_training()
    sampling = dict(temperature=args.pass_temperature, top_p=args.pass_top_p, top_k=args.pass_top_k)
    out = evaluate(model, tokenizer, problems, args.task, accelerator, args.max_new_tokens, args.gen_batch_size,
                   sampled_seeds=args.seeds, pass_k=ks, pass_n=args.pass_n, pass_sampling=sampling,
                   pass_problems=args.pass_problems, seed=args.seed)
    out.update(model=args.model, task=args.task, pass_sampling=sampling if args.pass_n else None)
    accelerator.print(format_results({os.path.basename(args.model.rstrip("/")) or args.model: out}))
    if args.seeds:
        accelerator.print(f"sampled accuracy: {out['sampled']:.4f} ± {out['sampled_std']:.4f} over {args.seeds} seeds")
    path = args.output or os.path.join(args.model if os.path.isdir(args.model) else args.cache_dir, f"eval-{args.task}.json")
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json_atomic(path, out)
        print(f"wrote {path}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
