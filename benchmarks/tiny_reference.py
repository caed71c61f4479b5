"""Build the embedded `tiny` reference (a small Llama SFT'd by the recipe TINY_CONFIG and TINY_SFT) and measure it.

    python benchmarks/tiny_reference.py                                # measure the shipped reference, assets/tiny
    python benchmarks/tiny_reference.py --build /tmp/tiny              # build a new one there, then measure it
    python benchmarks/tiny_reference.py --build assets/tiny --force    # rebuild the shipped one after a recipe change

Prints greedy and sampled accuracy on the first --n `arith` test problems and, for the greedy failures, the kind of
each one's first wrong step (arith_failure_kind), and writes them to quality.json in the model folder. The
reference is meant to fail mostly at the planted slip (a forgotten carry or borrow, written with probability 0.65 in
its SFT data, so greedy decoding keeps it and sampling sometimes avoids it): mistakes that reward can teach away.
QUALITY_BAND is what tests/test_tiny_reference.py requires of a fresh build: SFT on another CPU lands on other
weights, so the test checks the band, not the bytes.
"""

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import runtime.files  # noqa: E402

# The recipe: `--model tiny` refuses to run when assets/tiny/recipe.json is not this one (common.tiny_recipe_key)
TINY_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True)
TINY_SFT = dict(steps=700, batch_size=64, lr=3e-3, warmup=50, carry_slip=0.65, seed=0, version=4)
TINY_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_tiny_tokenizer():
    """A word-level tokenizer for the `arith` task, wrapped as a PreTrainedTokenizerFast with pad, bos and eos, and a
    chat template: digits one per token, a word with its leading space one token (" has": prompts a third shorter,
    so SFT and sampling are faster), other spaces and newlines tokens of their own."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set("has Then gets more gives away multiplies them by How many does have now".split())
    words |= set(common.ARITH_NAMES) | set(common.ARITH_ITEMS)
    words |= set(re.findall(r"[A-Za-z]+", common.PROMPT_TEMPLATES["gsm8k"]))
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    chars = list("0123456789") + [" ", "\n"] + list(".,?'#+-*=:$()/")
    vocab = {t: i for i, t in enumerate(specials + chars + sorted(words) + sorted(" " + w for w in words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_recipe() -> dict:
    """The recipe as it reads back from recipe.json: what common.tiny_recipe_key compares assets/tiny against."""
    return json.loads(json.dumps({"config": TINY_CONFIG, "sft": TINY_SFT}))


def build_tiny_reference(path: str, steps: int | None = None, carry_slip: float | None = None) -> None:
    """Build the tiny Llama and SFT it on a mix of correct and slipped `arith` solutions, so the reference makes
    step-level mistakes that reward-driven methods can learn to avoid. Saved atomically to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rs import encode_response  # the SFT data are encoded as `rs.py --data gold` encodes solutions

    cfg = dict(TINY_SFT, steps=steps or TINY_SFT["steps"])  # tests override steps and carry_slip for a quick model
    cfg["carry_slip"] = TINY_SFT["carry_slip"] if carry_slip is None else carry_slip
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(cfg["seed"])
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         **TINY_CONFIG)
    model = LlamaForCausalLM(config)
    rng = random.Random(cfg["seed"])
    problems = common.arith_problems("train", 4000, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * 0.5 * (
        1 + math.cos(math.pi * min(s, cfg["steps"]) / cfg["steps"])))
    model.train()
    for _ in tqdm(range(cfg["steps"]), desc="SFT tiny reference"):
        rows = []
        for p in rng.sample(problems, cfg["batch_size"]):  # random batches: sorting by length hurts accuracy badly
            start, *steps_ = p["answer"].split(";")
            ops = [(s[0], int(s[1:])) for s in steps_]
            text, _ = common.arith_solution(int(start), ops, rng=rng, carry_slip=cfg["carry_slip"])
            rows.append({"prompt_ids": common.encode_prompt(tokenizer, p["question"], "arith"),
                         "response_ids": encode_response(tokenizer, text)})
        batch = common.collate(rows, tokenizer.pad_token_id)
        lp = common.token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        loss = -(lp * batch["mask"]).sum() / batch["mask"].sum().clamp(min=1)  # token mean
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # common.tiny_recipe_key reads it back
    runtime.files.write_json_atomic(os.path.join(tmp, "recipe.json"), {"config": TINY_CONFIG, "sft": cfg})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):  # another process finished first: keep its copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)


QUALITY_BAND = dict(greedy=(0.30, 0.55), slip_share=0.85)  # greedy accuracy range; least share of failures at a slip


def arith_failure_kind(response: str, spec: str) -> str | None:
    """Why a response fails, judged at its first wrong step: "slip" (the planted misconception: a step that needs a
    carry or borrow, right operands, result off by exactly the forgotten 10), "copy" (a wrong previous value, operation
    or operand), "arith" (any other wrong result), "format" (a missing or malformed step, or a wrong `####` line).
    None if the response is correct."""
    if common.grade_arith(response, spec) == 1.0:
        return None
    _, i, m, value = common._arith_walk(response, spec)
    if i is None or not m:
        return "format"
    step = spec.split(";")[i + 1]
    op, b = step[0], int(step[1:])
    if int(m[1]) != value or m[2] != op or int(m[3]) != b:
        return "copy"
    forgot = common._arith_apply(value, op, b) + (-10 if op == "+" else 10)
    return "slip" if common.has_carry(value, op, b) and int(m[4]) == forgot else "arith"


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
        kinds = collections.Counter(arith_failure_kind(r["response"], r["answer"]) for r in rows if r["reward"] < 1)
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
        build_tiny_reference(os.path.abspath(args.build))
        print(f"built {args.build} in {time.time() - start:.0f} s")
    elif not os.path.exists(path):
        parser.error(f"{path}: no reference there; build one with --build")
    quality = measure(path, args.n)
    runtime.files.write_json_atomic(os.path.join(path, "quality.json"), quality)
    print(f"{path}: greedy {quality['greedy']:.3f}, sampled {quality['sampled']:.3f} on {args.n} test problems")
    for name in ("greedy", "sampled"):
        print(f"  {name} failures by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in quality[f"{name}_failures"].items()))
    lo, hi = QUALITY_BAND["greedy"]
    print(f"quality band (greedy {lo:.0%}-{hi:.0%}, slips ≥ {QUALITY_BAND['slip_share']:.0%} of greedy failures): "
          + ("inside" if in_band(quality) else "OUTSIDE"))


if __name__ == "__main__":
    main()
