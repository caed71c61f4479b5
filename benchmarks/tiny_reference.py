"""Build the embedded `tiny` reference (common.build_tiny_reference with TINY_CONFIG and TINY_SFT) and measure it.

    python benchmarks/tiny_reference.py                                # measure the shipped reference, assets/tiny
    python benchmarks/tiny_reference.py --build /tmp/tiny              # build a new one there, then measure it
    python benchmarks/tiny_reference.py --build assets/tiny --force    # rebuild the shipped one after a recipe change

Prints greedy and sampled accuracy on the first --n `arith` test problems and, for the greedy failures, the kind of
each one's first wrong step (common.arith_failure_kind), and writes them to quality.json in the model folder. The
reference is meant to fail mostly at the planted slip (a forgotten carry or borrow, written with probability 0.65 in
its SFT data, so greedy decoding keeps it and sampling sometimes avoids it): mistakes that reward can teach away.
QUALITY_BAND is what tests/test_tiny_reference.py requires of a fresh build: SFT on another CPU lands on other
weights, so the test checks the band, not the bytes.
"""

import argparse
import collections
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402

QUALITY_BAND = dict(greedy=(0.30, 0.55), slip_share=0.85)  # greedy accuracy range; least share of failures at a slip


def measure(path: str, n: int = 500, sampled: bool = True) -> dict:
    """Greedy (and, with `sampled`, sampled) accuracy of the model at `path` on the first `n` arith test problems, and
    the share of each failure kind among the failures."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    problems = common.arith_problems("test", n)
    prompts = [common.encode_prompt(tokenizer, p["question"], "arith") for p in problems]
    answers = [p["answer"] for p in problems]
    out = {"n_problems": n}
    for name, sampling in (("greedy", dict(temperature=0.0)), ("sampled", common.EVAL_SAMPLING))[: 1 + sampled]:
        rows = common.rollout(model, tokenizer, prompts, answers, "arith", desc=name, **sampling)
        out[name] = float(np.mean([r["reward"] for r in rows]))
        kinds = collections.Counter(common.arith_failure_kind(r["response"], r["answer"]) for r in rows if r["reward"] < 1)
        failures = max(1, sum(kinds.values()))
        out[f"{name}_failures"] = {k: round(c / failures, 4) for k, c in sorted(kinds.items())}
    out["slip_share"] = out["greedy_failures"].get("slip", 0.0)
    return out


def in_band(quality: dict) -> bool:
    lo, hi = QUALITY_BAND["greedy"]
    return lo <= quality["greedy"] <= hi and quality["slip_share"] >= QUALITY_BAND["slip_share"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", help="build a new reference into this folder first (it must not exist, see --force)")
    parser.add_argument("--force", action="store_true", help="let --build replace an existing folder")
    parser.add_argument("--n", type=int, default=500, help="test problems to measure on")
    args = parser.parse_args()
    path = args.build or common.TINY_SHIPPED
    if args.build:
        if os.path.exists(args.build):
            if not args.force:
                parser.error(f"--build {args.build}: exists; pass --force to replace it")
            shutil.rmtree(args.build)
        start = time.time()
        common.build_tiny_reference(os.path.abspath(args.build))
        print(f"built {args.build} in {time.time() - start:.0f} s")
    elif not os.path.exists(path):
        parser.error(f"{path}: no reference there; build one with --build")
    quality = measure(path, args.n)
    common.write_json_atomic(os.path.join(path, "quality.json"), quality)
    print(f"{path}: greedy {quality['greedy']:.3f}, sampled {quality['sampled']:.3f} on {args.n} test problems")
    for name in ("greedy", "sampled"):
        print(f"  {name} failures by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in quality[f"{name}_failures"].items()))
    lo, hi = QUALITY_BAND["greedy"]
    print(f"quality band (greedy {lo:.0%}-{hi:.0%}, slips ≥ {QUALITY_BAND['slip_share']:.0%} of greedy failures): "
          + ("inside" if in_band(quality) else "OUTSIDE"))


if __name__ == "__main__":
    main()
