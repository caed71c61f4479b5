"""The embedded default's comparison: all six algorithms and the DQO paper's ablations, 3 seeds each, on the tiny reference.

    python benchmarks/compare.py                  # every run (finished runs are kept: run it again to resume), then the report
    python benchmarks/compare.py --workers 1      # one run at a time (default 2; each gets cores / workers threads)
    python benchmarks/compare.py --report_only    # only rebuild the table and plot from the finished runs

Each run is the algorithm file itself with its tiny defaults (`python dqo.py --seed 2 ...`), plus --eval_every so that
the plot has points along training; `--seed` changes the offline samples, the data order and the sampled evaluation.
DQO runs are followed by `eval.py --value_model` on 64 test problems × 4 samples (256 responses), which measures how
well the value function localises the first wrong step. Writes under --out (default benchmarks/results):
runs/<name>/seed<k>/ (each run's own folder and log), results.json, results.md (the README's table) and accuracy.png.
An interrupted run resumes from its checkpoint; its log says where it stopped.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
# name: (script, extra flags, evaluate every N optimizer steps: about 3 points along each curve)
RUNS = {
    "RS": ("rs.py", [], 75),
    "DPO": ("dpo.py", [], 45),
    "KTO": ("kto.py", [], 11),
    "DRO": ("dro.py", [], 42),
    "SPO": ("spo.py", [], 84),
    "DQO": ("dqo.py", [], 84),
    # the DQO paper's ablations (Tables 5-7), each against the DQO row above
    "DQO λ=0.95": ("dqo.py", ["--lam", "0.95"], 0),
    "DQO IS on policy loss only": ("dqo.py", ["--no_is_value"], 0),
    "DQO IS on value loss only": ("dqo.py", ["--no_is_policy"], 0),
    "DQO no IS": ("dqo.py", ["--is_clip", "0"], 0),
    "DQO + process rewards": ("dqo.py", ["--process_rewards", "--ps_samples", "4"], 0),
}
MAIN = ["RS", "DPO", "KTO", "DRO", "SPO", "DQO"]
VALUE_STATS = {"auc": "AUC of -dV, first wrong vs correct steps", "dv_wrong": "mean dV at WRONG segments",
               "dv_ok": "mean dV at ok segments"}


def run_dir(out: str, name: str, seed: int) -> str:
    return os.path.join(out, "runs", name.replace(" ", "_").replace("=", ""), f"seed{seed}")


def commands(name: str, seed: int, out: str, cache: str) -> list[list[str]]:
    script, extra, eval_every = RUNS[name]
    d = run_dir(out, name, seed)
    cmd = [sys.executable, os.path.join(ROOT, script), "--seed", str(seed), "--output_dir", d, "--cache_dir", cache,
           "--report_to", "", "--save_every", "25", "--eval_every", str(eval_every), *extra]
    if trained(d):
        cmds = []  # only its value trace is missing
    elif common.checkpoint_path(d):
        cmds = [cmd + ["--resume"]]
    else:
        shutil.rmtree(d, ignore_errors=True)  # interrupted before its first checkpoint: start it again
        cmds = [cmd]
    if script == "dqo.py":  # the value function's localisation of errors, on 256 sampled test responses
        cmds.append([sys.executable, os.path.join(ROOT, "eval.py"), "--model", os.path.join(d, "model"), "--value_model",
                     os.path.join(d, "value_model"), "--task", "arith", "--trace_problems", "64", "--seed", str(seed),
                     "--cache_dir", cache, "--report_to", ""])
    return cmds


def trained(d: str) -> bool:
    return os.path.exists(os.path.join(d, "results.json")) and "final" in json.load(open(os.path.join(d, "results.json")))


def finished(out: str, name: str, seed: int) -> bool:
    d = run_dir(out, name, seed)
    return trained(d) and (RUNS[name][0] != "dqo.py" or os.path.exists(os.path.join(d, "value_trace.json")))


def run_all(args) -> None:
    """Run every unfinished (name, seed), `args.workers` at a time. The first run of a seed samples that seed's offline
    dataset and evaluates the reference into the cache, so no other run of that seed starts until it is done."""
    todo = [(n, s) for s in args.seeds for n in args.names if not finished(args.out, n, s)]
    warm = {s for s in args.seeds if any(finished(args.out, n, s) for n in RUNS)}
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.workers)), TOKENIZERS_PARALLELISM="false")
    bar = tqdm(total=len(todo), desc="comparison runs", unit="run")
    running, failed = {}, []  # (name, seed) -> (Popen, remaining commands, log file, start time)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("comparison stopped (SIGTERM)"))  # so `finally` stops the runs
    try:
        while todo or running:
            for key in [k for k, (p, *_) in running.items() if p.poll() is not None]:
                proc, rest, log, start = running.pop(key)
                if proc.returncode != 0:
                    failed.append(key)
                    bar.write(f"FAILED {key[0]} seed {key[1]} (exit {proc.returncode}): see {log.name}")
                    log.close()
                    continue
                if rest:
                    running[key] = (subprocess.Popen(rest[0], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                                    rest[1:], log, start)
                    continue
                log.close()
                warm.add(key[1])
                bar.update(1)
                bar.write(f"{key[0]} seed {key[1]}: {time.time() - start:.0f} s")
            busy = {s for _, s in running}
            while todo and len(running) < args.workers:
                pick = next((k for k in todo if k[1] in warm or k[1] not in busy), None)
                if pick is None:
                    break
                todo.remove(pick)
                busy.add(pick[1])
                cmds = commands(*pick, args.out, args.cache_dir)
                os.makedirs(os.path.dirname(run_dir(args.out, *pick)), exist_ok=True)
                log = open(run_dir(args.out, *pick) + ".log", "a")
                running[pick] = (subprocess.Popen(cmds[0], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), cmds[1:],
                                 log, time.time())
                bar.set_postfix_str(", ".join(f"{n} s{s}" for n, s in running))
            time.sleep(1)
    finally:  # interrupted: stop the runs too; each resumes from its last checkpoint next time
        for proc, *_ in running.values():
            proc.terminate()
            proc.wait()
    bar.close()
    if failed:
        sys.exit(f"{len(failed)} runs failed: {failed}; run again to retry them")


def mean_std(xs: list) -> str:
    return f"{100 * np.mean(xs):.1f} ± {100 * np.std(xs):.1f}" if xs else "-"


def report(args) -> None:
    """results.json (every run's final and intermediate accuracy, value statistics), results.md and accuracy.png."""
    runs = {}
    for name in RUNS:
        for seed in args.seeds:
            d = run_dir(args.out, name, seed)
            if not finished(args.out, name, seed):
                continue
            res = json.load(open(os.path.join(d, "results.json")))
            curve = sorted((int(k[4:]), v) for k, v in res.items() if k.startswith("step"))
            steps = max(json.loads(line).get("step", 0) for line in open(os.path.join(d, "metrics.jsonl")))
            r = {"reference": res["reference"], "final": res["final"], "total_steps": steps,
                 "curve": [(s, v["greedy"], v.get("sampled")) for s, v in curve]}
            if os.path.exists(os.path.join(d, "value_trace.json")):
                stats = json.load(open(os.path.join(d, "value_trace.json")))
                r["value"] = {k: stats["stats"].get(v) for k, v in VALUE_STATS.items()} | {"n": stats["n_responses"]}
            runs.setdefault(name, {})[seed] = r
    if not runs:
        sys.exit("no finished runs yet")
    refs = {s: r["reference"] for v in runs.values() for s, r in v.items()}
    lines = [f"Tiny reference, `arith` test split (1000 problems); mean ± std over seeds {', '.join(map(str, args.seeds))} "
             "(each seed: its own offline samples, data order and sampled evaluation). Accuracy in %.", "",
             "| method | seeds | greedy | sampled | Δ greedy | value AUC | mean dV at first wrong step |",
             "|---|---|---|---|---|---|---|",
             f"| reference | {len(refs)} | {mean_std([r['greedy'] for r in refs.values()])} | "
             f"{mean_std([r['sampled'] for r in refs.values()])} | | | |"]
    for name, by_seed in runs.items():
        g = [r["final"]["greedy"] for r in by_seed.values()]
        delta = [r["final"]["greedy"] - r["reference"]["greedy"] for r in by_seed.values()]
        vals = [r["value"] for r in by_seed.values() if "value" in r]
        auc = f"{np.mean([v['auc'] for v in vals]):.3f} ± {np.std([v['auc'] for v in vals]):.3f}" if vals else ""
        dv = f"{np.mean([v['dv_wrong'] for v in vals]):+.3f}" if vals else ""
        sampled = mean_std([r["final"]["sampled"] for r in by_seed.values()])
        lines.append(f"| {name} | {len(by_seed)} | {mean_std(g)} | {sampled} | {100 * np.mean(delta):+.1f} | {auc} | {dv} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({name: {str(s): r for s, r in v.items()} for name, v in runs.items()}, f, indent=1)
    plot(runs, os.path.join(args.out, "accuracy.png"))
    print(f"wrote {args.out}/results.md, results.json and accuracy.png")


def plot(runs: dict, path: str) -> None:
    """Greedy and sampled accuracy against the fraction of training done, per algorithm (mean over seeds, band ±1 std):
    the runs have different step counts, so the x axis is the fraction of each run's steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, idx, label in ((axes[0], 1, "greedy"), (axes[1], 2, "sampled")):
        for name in [n for n in MAIN if n in runs]:
            curves = []
            for r in runs[name].values():
                total = max(1, r["total_steps"])
                pts = [(0.0, r["reference"][label]), *[(c[0] / total, c[idx]) for c in r["curve"]], (1.0, r["final"][label])]
                curves.append(sorted(set(pts)))
            xs = sorted({x for c in curves for x, _ in c})
            ys = np.array([[np.interp(x, [p[0] for p in c], [p[1] for p in c]) for x in xs] for c in curves]) * 100
            ax.plot(xs, ys.mean(0), marker="o", ms=3, label=name)
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.15)
        ax.set_title(f"{label} accuracy, arith test (mean ± std over seeds)")
        ax.set_xlabel("fraction of training")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="where runs and reports go")
    parser.add_argument("--cache_dir", default=os.path.join(ROOT, ".cache"), help="the scripts' --cache_dir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds per configuration")
    parser.add_argument("--names", nargs="+", default=list(RUNS), help=f"configurations to run (default all: {list(RUNS)})")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each gets cores / workers threads)")
    parser.add_argument("--report_only", action="store_true", help="only write the report from finished runs")
    args = parser.parse_args()
    if unknown := [n for n in args.names if n not in RUNS]:
        parser.error(f"--names: unknown {unknown}; choose from {list(RUNS)}")
    if args.workers < 1 or not args.seeds:
        parser.error("--workers must be ≥ 1 and --seeds non-empty")
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
