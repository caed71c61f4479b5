"""The embedded default's comparison: all six algorithms and the DQO paper's ablations over several seeds, on the tiny
reference, with 95% intervals, paired differences and the mechanism behind the value function's ablation measured.

    python benchmarks/compare.py                  # every run (finished runs are kept: run it again to resume), then the report
    python benchmarks/compare.py --workers 1      # one run at a time (default 2; each gets cores / workers threads)
    python benchmarks/compare.py --report_only    # only rebuild the tables and plots from the finished runs

Each run is the algorithm file itself with its tiny defaults (`python dqo.py --seed 2 ...`), plus --eval_every so that
the plot has points along training; `--seed` changes the offline samples, the data order and the sampled evaluation.
The DQO variants run seeds 1-8 (--seeds), the other methods seeds 1-5 (--other_seeds); within a seed every run shares
the same offline samples, so differences between variants are paired by seed. DQO runs are followed by
`eval.py --value_model` on 2000 responses (500 test problems × 4 samples), which measures how well the value function
localises the first wrong step (AUC, with its bootstrap standard error over responses). Writes under --out (default
benchmarks/results): runs/<name>/seed<k>/ (each run's own folder and log), results.json, results.md (the README's
tables), accuracy.png and mechanism.png. An interrupted run resumes from its checkpoint; its log says where it stopped.
A seed's numbers reproduce exactly only at the same thread count (float reduction order): results.json records it.
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

import runtime.checkpoint  # noqa: E402
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
ABLATIONS = [n for n in RUNS if n.startswith("DQO ")]
VALUE_STATS = {"auc": "AUC of -dV, first wrong vs correct steps", "auc_se": "AUC bootstrap SE",
               "dv_wrong": "mean dV at WRONG segments", "dv_ok": "mean dV at ok segments"}
TRACE = ["--trace_problems", "500", "--trace_samples", "4"]  # 2000 responses: a per-seed AUC standard error ≤ 0.02
# variants whose value loss carries the trajectory weight (the mechanism's check compares them with those that do not)
WEIGHTED_VALUE = {"DQO", "DQO λ=0.95", "DQO IS on value loss only", "DQO + process rewards"}


def run_dir(out: str, name: str, seed: int) -> str:
    return os.path.join(out, "runs", name.replace(" ", "_").replace("=", ""), f"seed{seed}")


def commands(name: str, seed: int, out: str, cache: str) -> list[list[str]]:
    script, extra, eval_every = RUNS[name]
    d = run_dir(out, name, seed)
    cmd = [sys.executable, os.path.join(ROOT, script), "--seed", str(seed), "--output_dir", d, "--cache_dir", cache,
           "--report_to", "", "--save_every", "25", "--eval_every", str(eval_every), *extra]
    if trained(d):
        cmds = []  # only its value trace is missing
    elif runtime.checkpoint.checkpoint_path(d):
        cmds = [cmd + ["--resume"]]
    else:
        shutil.rmtree(d, ignore_errors=True)  # interrupted before its first checkpoint: start it again
        cmds = [cmd]
    if script == "dqo.py":  # the value function's localisation of errors, on 2000 sampled test responses
        cmds.append([sys.executable, os.path.join(ROOT, "eval.py"), "--model", os.path.join(d, "model"), "--value_model",
                     os.path.join(d, "value_model"), "--task", "arith", *TRACE, "--seed", str(seed),
                     "--cache_dir", cache, "--report_to", ""])
    return cmds


def trained(d: str) -> bool:
    return os.path.exists(os.path.join(d, "results.json")) and "final" in json.load(open(os.path.join(d, "results.json")))


def finished(out: str, name: str, seed: int) -> bool:
    d = run_dir(out, name, seed)
    return trained(d) and (RUNS[name][0] != "dqo.py" or os.path.exists(os.path.join(d, "value_trace.json")))


def seeds_of(args, name: str) -> list[int]:
    return args.seeds if RUNS[name][0] == "dqo.py" else args.other_seeds


def run_all(args) -> None:
    """Run every unfinished (name, seed), `args.workers` at a time. The first run of a seed samples that seed's offline
    dataset and evaluates the reference into the cache, so no other run of that seed starts until it is done."""
    order = ["DQO", "DQO IS on policy loss only", *ABLATIONS, *MAIN]  # the value-function question first
    names = sorted(args.names, key=order.index)
    todo = [(n, s) for n in names for s in seeds_of(args, n) if not finished(args.out, n, s)]
    warm = {s for s in {*args.seeds, *args.other_seeds} if any(finished(args.out, n, s) for n in RUNS)}
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


# two-sided 95% quantiles of Student's t by degrees of freedom (standard tables; 30 and more: 2.042, slightly wide)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201,
       12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060,
       30: 2.042}
MECHANISM = ("is_weight_failed", "is_weight_correct", "value_first_failed", "value_first_correct")


def interval(xs) -> dict:
    """n, mean, std (n − 1) and the 95% t-interval of the mean, over seeds."""
    xs = np.asarray([x for x in xs if x is not None], dtype=float)
    n = len(xs)
    if n < 2:
        return dict(n=n, mean=float(xs.mean()) if n else float("nan"), std=float("nan"), lo=float("nan"), hi=float("nan"))
    t = T95[max(k for k in T95 if k <= n - 1)]
    mean, std = float(xs.mean()), float(xs.std(ddof=1))
    return dict(n=n, mean=mean, std=std, lo=mean - t * std / np.sqrt(n), hi=mean + t * std / np.sqrt(n))


def fmt(st: dict, scale: float = 100, digits: int = 1, sign: bool = False) -> str:
    """`mean ± std [lo, hi]`, scaled (accuracy in %)."""
    if not st["n"]:
        return ""
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if st["n"] < 2:
        return f.format(scale * st["mean"])
    return (f"{f.format(scale * st['mean'])} ± {scale * st['std']:.{digits}f} "
            f"[{f.format(scale * st['lo'])}, {f.format(scale * st['hi'])}]")


def verdict(st: dict, higher: str = "higher", lower: str = "lower") -> str:
    """The direction only where the 95% interval of a paired difference excludes 0."""
    if st["n"] < 2:
        return ""
    return higher if st["lo"] > 0 else lower if st["hi"] < 0 else f"no detectable difference at {st['n']} seeds"


def paired(a: dict, b: dict, get) -> dict:
    """The interval of get(b) − get(a) over the seeds both have."""
    return interval([get(b[s]) - get(a[s]) for s in sorted(set(a) & set(b)) if get(a[s]) is not None and
                     get(b[s]) is not None])


def mechanism(d: str) -> dict:
    """From a DQO run's metrics.jsonl: per step, the mean importance weight and V at the first response token on
    correct and on failed samples (`dqo_loss`'s per-outcome metrics)."""
    rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    return {k: [(r["step"], r[f"charts/{k}"]) for r in rows if f"charts/{k}" in r] for k in MECHANISM}


def second_half(series: list) -> float | None:
    """The mean over the second half of training: where the weight has settled."""
    if not series:
        return None
    last = max(s for s, _ in series)
    return float(np.mean([v for s, v in series if s > last / 2]))


def load_runs(args) -> dict:
    runs = {}
    for name in RUNS:
        for seed in seeds_of(args, name):
            d = run_dir(args.out, name, seed)
            if not finished(args.out, name, seed):
                continue
            res = json.load(open(os.path.join(d, "results.json")))
            curve = sorted((int(k[4:]), v) for k, v in res.items() if k.startswith("step"))
            steps = max(json.loads(line).get("step", 0) for line in open(os.path.join(d, "metrics.jsonl")))
            run_json = os.path.join(d, "run.json")
            threads = json.load(open(run_json)).get("threads") if os.path.exists(run_json) else None
            r = {"reference": res["reference"], "final": res["final"], "total_steps": steps, "threads": threads,
                 "curve": [(s, v["greedy"], v.get("sampled")) for s, v in curve]}
            if os.path.exists(os.path.join(d, "value_trace.json")):
                stats = json.load(open(os.path.join(d, "value_trace.json")))
                r["value"] = {k: stats["stats"].get(v) for k, v in VALUE_STATS.items()} | {
                    "n": stats["n_responses"], "segments": stats.get("n_segments")}
                series = mechanism(d)
                r["mechanism"] = {f"{k}_second_half": second_half(v) for k, v in series.items()}
                r["mechanism_series"] = series  # plotted; not written to results.json
            runs.setdefault(name, {})[seed] = r
    return runs


def value_weight(name: str, r: dict) -> float | None:
    """The weight the value loss puts on failed samples (second half of training): 1 where it carries none."""
    return r["mechanism"]["is_weight_failed_second_half"] if name in WEIGHTED_VALUE else 1.0


def pearson(xs: list, ys: list) -> str:
    """r with a 95% interval (Fisher z)."""
    if len(xs) < 4:
        return "n < 4"
    r = float(np.corrcoef(xs, ys)[0, 1])
    z, half = np.arctanh(r), 1.96 / np.sqrt(len(xs) - 3)
    return f"r = {r:+.2f} [{np.tanh(z - half):+.2f}, {np.tanh(z + half):+.2f}] over {len(xs)} runs"


def report(args) -> None:
    """results.json (every run's final and intermediate accuracy, value and mechanism statistics, thread count),
    results.md (the README's tables), accuracy.png and mechanism.png."""
    runs = load_runs(args)
    if not runs:
        sys.exit("no finished runs yet")
    g = lambda r: r["final"]["greedy"]  # noqa: E731
    sp = lambda r: r["final"]["sampled"]  # noqa: E731
    auc = lambda r: r.get("value", {}).get("auc")  # noqa: E731
    dv = lambda r: r.get("value", {}).get("dv_wrong")  # noqa: E731
    refs = {s: r["reference"] for v in runs.values() for s, r in v.items()}
    threads = sorted({str(r["threads"]) for v in runs.values() for r in v.values()})
    lines = ["Tiny reference, `arith` test split (1000 problems). Accuracy in %, as mean ± std [95% t-interval of the mean] "
             "over seeds; each seed has its own offline samples, data order and sampled evaluation, shared by every run "
             f"of that seed, so differences are paired by seed. Threads per run: {', '.join(threads)}. The intervals are "
             "per comparison (no correction for the number of comparisons).", "",
             "| method | seeds | greedy | sampled | Δ greedy over the reference |", "|---|---|---|---|---|",
             f"| reference | {len(refs)} | {fmt(interval(r['greedy'] for r in refs.values()))} | "
             f"{fmt(interval(r['sampled'] for r in refs.values()))} | |"]
    for name in [n for n in MAIN if n in runs]:
        by = runs[name]
        delta = interval(g(r) - r["reference"]["greedy"] for r in by.values())
        lines.append(f"| {name} | {len(by)} | {fmt(interval(map(g, by.values())))} | {fmt(interval(map(sp, by.values())))} "
                     f"| {fmt(delta, sign=True)} |")
    lines += ["", "Method pairs, paired by seed (second minus first; a direction only where the interval excludes 0):", "",
              "| pair | seeds | Δ greedy | Δ sampled | greedy |", "|---|---|---|---|---|"]
    main = [n for n in MAIN if n in runs]
    for i, a in enumerate(main):
        for b in main[i + 1:]:
            dg, ds = paired(runs[a], runs[b], g), paired(runs[a], runs[b], sp)
            lines.append(f"| {b} − {a} | {dg['n']} | {fmt(dg, sign=True)} | {fmt(ds, sign=True)} | "
                         f"{verdict(dg, f'{b} better', f'{a} better')} |")
    lines += ["", "DQO and its ablations (value AUC: −dV ranking first-wrong-step segments above correct-step ones, over "
              "2000 sampled test responses per seed; SE: the largest per-seed bootstrap standard error):", "",
              "| variant | seeds | greedy | sampled | value AUC | AUC SE | mean dV at first wrong step | first-wrong segments "
              "per seed |", "|---|---|---|---|---|---|---|---|"]
    for name in [n for n in RUNS if n.startswith("DQO") and n in runs]:
        by = runs[name]
        ses = [r["value"]["auc_se"] for r in by.values() if r["value"].get("auc_se") is not None]
        segs = [r["value"]["segments"]["WRONG"] for r in by.values() if r["value"].get("segments")]
        lines.append(f"| {name} | {len(by)} | {fmt(interval(map(g, by.values())))} | "
                     f"{fmt(interval(map(sp, by.values())))} | {fmt(interval(map(auc, by.values())), 1, 3)} | "
                     f"{max(ses):.3f} | {fmt(interval(map(dv, by.values())), 1, 3, sign=True)} | "
                     f"{min(segs)}-{max(segs)} |" if ses and segs else "| | | |")
    if "DQO" in runs:
        lines += ["", "Each ablation minus the default DQO, paired by seed:", "",
                  "| ablation | seeds | Δ greedy | Δ sampled | Δ value AUC | Δ dV at first wrong step |",
                  "|---|---|---|---|---|---|"]
        for name in [n for n in ABLATIONS if n in runs]:
            cells = []
            for get, scale, digits in ((g, 100, 1), (sp, 100, 1), (auc, 1, 3), (dv, 1, 3)):
                st = paired(runs["DQO"], runs[name], get)
                cells.append(f"{fmt(st, scale, digits, sign=True)} ({verdict(st)})")
            lines.append(f"| {name} | {paired(runs['DQO'], runs[name], g)['n']} | {' | '.join(cells)} |")
        lines += ["", "The mechanism: per run, the trajectory weight min(e, Π π/μ) and V at the first response token on "
                  "correct and on failed training samples, averaged over the second half of training:", "",
                  "| variant | seeds | weight, failed | weight, correct | V(s_1), failed | V(s_1), correct |",
                  "|---|---|---|---|---|---|"]
        for name in [n for n in RUNS if n.startswith("DQO") and n in runs]:
            by = runs[name]
            cells = [fmt(interval(r["mechanism"][f"{k}_second_half"] for r in by.values()), 1, 3) for k in MECHANISM]
            lines.append(f"| {name} | {len(by)} | {' | '.join(cells)} |")
        pts = [(value_weight(n, r), auc(r)) for n in runs if n.startswith("DQO") for r in runs[n].values()]
        within = [(value_weight(n, r), auc(r)) for n in runs if n in WEIGHTED_VALUE for r in runs[n].values()]
        lines += ["", "Does the final value AUC track the weight the value loss puts on failed samples (1 where it carries "
                  f"none)? All DQO runs: {pearson(*zip(*pts))}; only the variants whose value loss carries the weight: "
                  f"{pearson(*zip(*within)) if within else 'none'}."]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    saved = {name: {str(s): {k: v for k, v in r.items() if k != "mechanism_series"} for s, r in by.items()}
             for name, by in runs.items()}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(saved, f, indent=1)
    plot(runs, os.path.join(args.out, "accuracy.png"))
    if "DQO" in runs:
        plot_mechanism(runs, os.path.join(args.out, "mechanism.png"))
    print(f"wrote {args.out}/results.md, results.json, accuracy.png and mechanism.png")


def plot_mechanism(runs: dict, path: str) -> None:
    """Over training, for the default DQO and the variant without the weight on the value loss: the mean weight on
    failed and on correct samples, and V(s_1) on each (per seed thin, mean thick; moving average of 10 steps);
    and per run, the final value AUC against the weight its value loss puts on failed samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, colour in (("DQO", "tab:red"), ("DQO IS on policy loss only", "tab:blue")):
        for ax, kind in ((axes[0], "is_weight"), (axes[1], "value_first")):
            for outcome, style in (("failed", "-"), ("correct", ":")):
                curves = []
                for r in runs.get(name, {}).values():
                    series = r["mechanism_series"][f"{kind}_{outcome}"]
                    if len(series) >= 10:
                        steps, vals = zip(*series)
                        smooth = np.convolve(vals, np.ones(10) / 10, mode="valid")
                        ax.plot(steps[9:], smooth, style, color=colour, lw=0.5, alpha=0.35)
                        curves.append((steps[9:], smooth))
                if curves:
                    n = min(len(c[1]) for c in curves)
                    ax.plot(curves[0][0][:n], np.mean([c[1][:n] for c in curves], 0), style, color=colour, lw=2,
                            label=f"{name}, {outcome}")
    axes[0].set_title("trajectory weight min(e, Π π/μ) on training samples")
    axes[1].set_title("V at the first response token")
    for ax in axes[:2]:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for name in [n for n in RUNS if n.startswith("DQO") and n in runs]:
        xs = [value_weight(name, r) for r in runs[name].values()]
        axes[2].scatter(xs, [r["value"]["auc"] for r in runs[name].values()], s=18, label=name)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("weight on failed samples in the value loss (1: none)")
    axes[2].set_ylabel("final value AUC")
    axes[2].set_title("value AUC against the value loss's weight on failures")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 9)), help="seeds of DQO and its ablations")
    parser.add_argument("--other_seeds", type=int, nargs="+", default=list(range(1, 6)), help="seeds of the other methods")
    parser.add_argument("--names", nargs="+", default=list(RUNS), help=f"configurations to run (default all: {list(RUNS)})")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each gets cores / workers threads)")
    parser.add_argument("--report_only", action="store_true", help="only write the report from finished runs")
    args = parser.parse_args()
    if unknown := [n for n in args.names if n not in RUNS]:
        parser.error(f"--names: unknown {unknown}; choose from {list(RUNS)}")
    if args.workers < 1 or not args.seeds or not args.other_seeds:
        parser.error("--workers must be ≥ 1 and --seeds, --other_seeds non-empty")
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
