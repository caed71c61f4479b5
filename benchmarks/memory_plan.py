"""GPU memory per step of every algorithm's paper run on 8 x 80 GB with configs/fsdp.yaml, by arithmetic.

    python benchmarks/memory_plan.py            # the README's memory table (markdown), then DQO's and SPO's breakdown

Each algorithm file's PAPER defaults (micro-batch, generation batch) and the shared ones (common.RUN_DEFAULTS), on
google/gemma-1.1-7b-it's config (numbers below, from its config.json), GSM8K prompts of at most PROMPT_TOKENS tokens
and the task's 512 new tokens, through `common.memory_plan`. Derived, not measured: no GPU has run it.
"""

import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402

GEMMA_7B = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=16, head_dim=256, tie_word_embeddings=True)  # google/gemma-1.1-7b-it config.json
GPU_BYTES = 80e9
BUDGET = 0.92  # of the GPU: the CUDA context (~0.5 GB) and the caching allocator's fragmentation need the rest
WORLD = 8  # configs/fsdp.yaml's num_processes
PROMPT_TOKENS = 320  # the longest GSM8K question (985 characters, 183 words) with the prompt template and chat markup
ALGOS = ("rs", "dpo", "kto", "dro", "dqo", "spo")
STEPS = ("generate", "score", "train", "rollout")


def paper_plan(algo: str, config: dict = GEMMA_7B, world: int = WORLD) -> dict[str, dict[str, float]]:
    """`common.memory_plan` at the algorithm's paper defaults."""
    module = importlib.import_module(algo)
    d = {**common.RUN_DEFAULTS["paper"], **module.PAPER}
    online = d["per_device_batch_size"] * module.Args.online_fraction if algo == "spo" else 0
    return common.memory_plan(config, algo, world, d["per_device_batch_size"], d["gen_batch_size"], PROMPT_TOKENS,
                              common.TASK_MAX_NEW_TOKENS[d["task"]], int(online))


def table() -> str:
    """The README's table: each algorithm's micro-batch, generation batch and the peak GB per GPU of each step."""
    lines = ["| algorithm | micro-batch per GPU | generate batch | generate | score | train | SPO rollout | peak of 80 GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for algo in ALGOS:
        module = importlib.import_module(algo)
        d = {**common.RUN_DEFAULTS["paper"], **module.PAPER}
        plan = paper_plan(algo)
        gb = {s: sum(plan[s].values()) / 1e9 for s in plan}
        cells = [f"{gb[s]:.1f} GB" if s in gb else "-" for s in STEPS]
        unit = " pairs" if algo == "dpo" else ""
        lines.append(f"| {algo.upper()} | {d['per_device_batch_size']}{unit} | {d['gen_batch_size']} | " + " | ".join(cells)
                     + f" | {max(gb.values()) / (GPU_BYTES / 1e9):.0%} |")
    return "\n".join(lines)


def breakdown(algo: str) -> str:
    plan = paper_plan(algo)
    out = [f"{algo.upper()}, GB per GPU:"]
    for step, parts in plan.items():
        out.append(f"  {step}: {sum(parts.values()) / 1e9:.1f}")
        out += [f"    {v / 1e9:6.2f}  {k}" for k, v in parts.items()]
    return "\n".join(out)


if __name__ == "__main__":
    print(table())
    for algo in ("dqo", "spo"):
        print()
        print(breakdown(algo))
