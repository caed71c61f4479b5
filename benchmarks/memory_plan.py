"""`runtime.memory.memory_plan` (the arithmetic the launch preflight uses) at every algorithm's paper defaults, against the
fake-tensor trace (benchmarks/memory_trace.py, its results in benchmarks/results/memory_trace.json).

    python benchmarks/memory_plan.py            # per algorithm and step: the plan's GB, the trace's GB, their ratio

Each algorithm file's PAPER defaults (micro-batch, generation batch) and the shared ones (runtime.cli.RUN_DEFAULTS), on
google/gemma-1.1-7b-it's config, GSM8K prompts of at most PROMPT_TOKENS tokens and the task's 512 new tokens.
"""

import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import runtime.cli  # noqa: E402
import runtime.memory  # noqa: E402
from benchmarks.memory_trace import ALGOS, GEMMA_7B, GPU_GB, MARGIN_GB, PROMPT_TOKENS, RESULTS, WORLD, stale  # noqa: E402,F401


def paper_plan(algo: str, config: dict = GEMMA_7B, world: int = WORLD) -> dict[str, dict[str, float]]:
    """`runtime.memory.memory_plan` at the algorithm's paper defaults."""
    module = importlib.import_module(algo)
    d = {**runtime.cli.RUN_DEFAULTS["paper"], **module.PAPER}
    terms = module.Args(per_device_batch_size=d["per_device_batch_size"]).memory_terms()  # what the algorithm declares
    return runtime.memory.memory_plan(config, terms, world, d["per_device_batch_size"], d["gen_batch_size"], PROMPT_TOKENS,
                                      common.TASK_MAX_NEW_TOKENS[d["task"]], n_samples=d["n_samples"])


def trace_results(path: str = RESULTS) -> dict:
    with open(path) as f:
        return json.load(f)["results"]


def comparison(results: dict) -> list[tuple[str, str, float, float]]:
    """(algo, step, plan bytes, traced bytes) for every traced step."""
    out = []
    for algo in ALGOS:
        plan = paper_plan(algo)
        for step, st in results[algo]["steps"].items():
            out.append((algo, step, sum(plan[step].values()), st["peak"]))
    return out


if __name__ == "__main__":
    if why := stale():
        print(f"warning: {why}\n")
    print(f"{'algo':5} {'step':9} {'plan GB':>8} {'trace GB':>9} {'plan/trace':>10}")
    for algo, step, plan, traced in comparison(trace_results()):
        print(f"{algo:5} {step:9} {plan / 1e9:8.2f} {traced / 1e9:9.2f} {plan / traced:10.3f}")
    print()
    for algo in ("dqo", "spo"):
        print(f"{algo.upper()}, GB per GPU (plan):")
        for step, parts in paper_plan(algo).items():
            print(f"  {step}: {sum(parts.values()) / 1e9:.1f}")
            print("\n".join(f"    {v / 1e9:6.2f}  {k}" for k, v in parts.items()))
