"""Tests for common.py: grading, tasks and prompts, the arith task, masks, rollouts, model loading, the cached offline
dataset, bad-input errors and pass@k (log-probs: test_logprobs.py)."""

import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import DATA, arith_ops, encode_response, needs_data

import common
import runtime.files  # noqa: E402
import runtime.mathverify  # noqa: E402
from benchmarks import tiny_reference

GSM8K_TEST = os.path.join(DATA, "gsm8k", "test.jsonl")
MATH500_TEST = os.path.join(DATA, "math500", "test.jsonl")
AIME24_TEST = os.path.join(DATA, "aime24", "test.jsonl")


def first_wrong_step(response: str, spec: str) -> int | None:
    """Index of the first step line the strict verifier rejects (None if all steps are right)."""
    return common._arith_walk(response, spec)[1]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _boxed(s):
    return f"So the answer is $\\boxed{{{s}}}$."


# ---------------------------------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------------------------------
def _wrong_number(answer: str) -> str:
    value = common.parse_number(answer) + 1
    return str(int(value)) if value == int(value) else str(value)


@needs_data
def test_gsm8k_gold_solutions_grade_correct_and_wrong_numbers_incorrect():
    problems = common.load_task("gsm8k", "test", GSM8K_TEST)
    assert len(problems) == 1319
    correct = [common.grade(p["solution"], p["answer"], "gsm8k") for p in problems]
    assert sum(correct) == len(problems), [p["answer"] for p, c in zip(problems, correct) if c != 1.0][:10]
    for p in problems:
        head = p["solution"].rsplit("####", 1)[0]
        assert common.grade(f"{head}#### {_wrong_number(p['answer'])}", p["answer"], "gsm8k") == 0.0, p["answer"]
        # the last `####` counts, not an earlier one
        assert common.grade(f"{p['solution']}\nWait.\n#### {_wrong_number(p['answer'])}", p["answer"], "gsm8k") == 0.0
    # formatting of the number: thousands separators, a dollar sign, trailing zeros, negatives
    assert common.grade("so #### $1,000", "1000", "gsm8k") == 1.0
    assert common.grade("#### 1000.00", "1,000", "gsm8k") == 1.0
    assert common.grade("#### -7", "-7", "gsm8k") == 1.0
    assert common.grade("#### 7", "-7", "gsm8k") == 0.0
    assert common.grade("the answer is 18", "18", "gsm8k") == 0.0  # no ####


@needs_data
def test_math500_solutions_grade_correct():
    rows = _jsonl(MATH500_TEST)
    problems = common.load_task("math", "test", MATH500_TEST)
    assert len(problems) == len(rows) == 500
    failing = [r["unique_id"] for r, p in zip(rows, problems) if common.grade(r["solution"], p["answer"], "math") != 1.0]
    assert failing == []
    # The boxed answers equal the `answer` field as strings, so grade() short-cuts them; check that math-verify
    # itself also accepts every pair, so the symbolic path is exercised on real MATH answers.
    equal = runtime.mathverify.math_equal
    failing = [r["unique_id"] for r in rows if not equal(common.last_boxed(r["solution"]), r["answer"])]
    assert failing == []


@needs_data
def test_math500_solutions_do_not_grade_against_other_answers():
    rows = _jsonl(MATH500_TEST)[:100]
    hits = [i for i, r in enumerate(rows) if common.grade(r["solution"], rows[(i + 1) % 100]["answer"], "math")]
    assert len(hits) <= 2, [(rows[i]["answer"], rows[(i + 1) % 100]["answer"]) for i in hits]


EQUIVALENT = [  # (boxed prediction, reference answer)
    (r"\frac12", "0.5"), (r"\dfrac{1}{2}", r"\frac{1}{2}"), ("0.5", r"\frac{1}{2}"), (r"\tfrac{1}{2}", r"\frac12"),
    ("(1, 2)", r"\left( 1, 2 \right)"), (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
    ("[2,5)", "[2, 5)"), (r"\left[ 2, 5 \right)", "[2,5)"), (r"(-\infty,3]", r"(-\infty, 3]"),
    (r"(1,2)\cup(3,4)", r"(1,2) \cup (3,4)"), (r"\text{(C)}", "(C)"), (r"\text{C}", "C"), (r"30^\circ", "30"),
    (r"30^{\circ}", "30"), (r"2\sqrt{2}", r"\sqrt{8}"), ("(x+1)^2", "x^2+2x+1"), (r"10\%", "10"), (r"\{1,2\}", r"\{2,1\}"),
    ("1,000", "1000"), (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"), ("025", "25"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
]
NOT_EQUIVALENT = [
    (r"\frac12", "0.25"), ("(1,2)", "(2,1)"), ("[2,5)", "(2,5)"), ("[2,5)", "[2,5]"), (r"\text{(C)}", r"\text{(D)}"),
    (r"30^\circ", "60"), ("x+1", "x-1"), (r"\sqrt{2}", "2"), ("3", "3.1"), (r"\frac{1}{3}", "0.33"),
    (r"\{1,2\}", r"\{1,3\}"), (r"\pi", "3.14"), ("2", "-2"), (r"\text{even}", r"\text{odd}"), ("", "1"), ("1", ""),
]


@pytest.mark.parametrize("pred,ref", EQUIVALENT)
def test_latex_equivalent(pred, ref):
    assert common.grade(_boxed(pred), ref, "math") == 1.0
    assert common.grade(_boxed(pred), ref, "aime24") == 1.0


@pytest.mark.parametrize("pred,ref", NOT_EQUIVALENT)
def test_latex_not_equivalent(pred, ref):
    assert common.grade(_boxed(pred), ref, "math") == 0.0


def test_last_boxed_matches_nested_braces():
    assert common.last_boxed(r"\boxed{1} then \boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert common.last_boxed(r"\fbox{x}") == "x"
    assert common.last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced
    assert common.last_boxed("no box") is None


HOSTILE = {
    "empty": "", "unbalanced": r"\boxed{\frac{1}{2}", "closing": "}}}}{{{\\boxed",
    "junk_latex": r"\boxed{\frac{\frac{}{\sqrt[}}{\left(}", "megabyte": "x" * 1_000_000,
    "megabyte_box": "\\boxed{" + "x+" * 500_000 + "}", "megabyte_open": "\\boxed{" + "{" * 1_000_000,
    "gsm8k_megabyte": "#### 1," * 200_000 + "#### 2", "huge_digits": "#### " + "9" * 400 + " \\boxed{" + "9" * 1500 + "}",
    "nul": "\x00#### \x00\\boxed{\x00}",
    # sympy would evaluate these exactly; 10^(10^10) is one C call that holds the GIL for hours
    "power_tower": r"\boxed{10^{10^{10^{10}}}}", "factorial": r"\boxed{1000000!}",
}


def test_hostile_strings_return_zero_quickly(monkeypatch):
    monkeypatch.setattr(common, "GRADE_TIMEOUT_S", 1.0)
    for name, response in HOSTILE.items():
        for task, answer in (("math", "5"), ("aime24", "25"), ("gsm8k", "3"), ("arith", "3;+4;*2")):
            t = time.time()
            assert common.grade(response, answer, task) == 0.0, (name, task)
            # the symbolic ones run into the timeout (plus a restart of the helper process); the rest are instant
            assert time.time() - t < 10.0, (name, task, time.time() - t)
    # a huge number on both sides does not compare equal as float('inf') == float('inf')
    assert common.grade("#### " + "9" * 400, "9" * 399 + "8", "gsm8k") == 0.0
    # bad answers, and non-string input, also give 0.0
    for task in ("math", "gsm8k", "arith"):
        assert common.grade(_boxed("1"), "", task) == 0.0
        assert common.grade(None, "1", task) == 0.0
    # and the grader still works after its helper was killed
    assert common.grade(_boxed(r"\frac12"), "0.5", "math") == 1.0


GRADE_CASES = [(_boxed(r"\frac12"), "0.5", "math", 1.0), (_boxed("(1,2)"), r"\left(1,2\right)", "math", 1.0),
               (_boxed("[2,5)"), "(2,5)", "math", 0.0), (_boxed(r"10^{10^{10^{10}}}"), "5", "math", 0.0),
               ("#### 1,000", "1000", "gsm8k", 1.0), (_boxed("025"), "25", "aime24", 1.0)]


def _grade_case(case):
    return common.grade(*case[:3])


def test_grading_off_the_main_thread(monkeypatch):
    monkeypatch.setattr(common, "GRADE_TIMEOUT_S", 2.0)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(_grade_case, GRADE_CASES * 2))
    assert got == [c[3] for c in GRADE_CASES] * 2


def test_grading_inside_worker_processes(monkeypatch):
    monkeypatch.setattr(common, "GRADE_TIMEOUT_S", 2.0)  # inherited by the forked workers
    common.grade(_boxed(r"\frac12"), "0.5", "math")  # the parent's helper process must not leak into the children
    with multiprocessing.get_context("fork").Pool(2) as pool:  # pool workers are daemonic: they cannot fork children
        got = pool.map(_grade_case, GRADE_CASES, chunksize=1)
    assert got == [c[3] for c in GRADE_CASES]
    assert common.grade(_boxed(r"\frac12"), "0.5", "math") == 1.0


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="nope"):
        common.grade("#### 1", "1", "nope")
    with pytest.raises(ValueError, match="nope"):
        common.load_task("nope", "test")


# ---------------------------------------------------------------------------------------------------------------------
# Tasks, loading and prompts
# ---------------------------------------------------------------------------------------------------------------------
@needs_data
def test_load_local_task_files():
    gsm = common.load_task("gsm8k", "test", GSM8K_TEST)
    raw = _jsonl(GSM8K_TEST)
    assert gsm[0] == {"question": raw[0]["question"], "answer": "18", "solution": raw[0]["answer"]}
    assert all(common.parse_number(p["answer"]) is not None for p in gsm)
    assert common.load_task("gsm8k", "test", GSM8K_TEST, limit=5) == gsm[:5]
    math500 = common.load_task("math", "test", MATH500_TEST)
    raw = _jsonl(MATH500_TEST)
    assert [p["answer"] for p in math500] == [r["answer"] for r in raw]
    assert [p["question"] for p in math500] == [r["problem"] for r in raw]
    aime = common.load_task("aime24", "test", AIME24_TEST)
    assert len(aime) == 30 and [p["answer"] for p in aime] == [str(r["answer"]) for r in _jsonl(AIME24_TEST)]
    with pytest.raises(ValueError, match="test only"):
        common.load_task("aime24", "train")


@needs_data
def test_aime24_answers_grade():
    for p in common.load_task("aime24", "test", AIME24_TEST):
        assert common.grade(_boxed(p["answer"]), p["answer"], "aime24") == 1.0
        assert common.grade(_boxed(str(int(p["answer"]))), p["answer"], "aime24") == 1.0  # "025" == 25
        assert common.grade(_boxed(str(int(p["answer"]) + 1)), p["answer"], "aime24") == 0.0


PAPER_GSM8K = "{problem}\nPlease reason step by step, and produce a final answer following 4 '#', like '#### 0'."
PAPER_MATH = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def test_prompt_templates_are_the_papers():
    assert common.PROMPT_TEMPLATES["gsm8k"] == common.PROMPT_TEMPLATES["arith"] == PAPER_GSM8K
    assert common.PROMPT_TEMPLATES["math"] == common.PROMPT_TEMPLATES["aime24"] == PAPER_MATH
    assert PAPER_MATH.format(problem="Q") == "Q\nPlease reason step by step, and put your final answer within \\boxed{}."


def _char_bpe_tokenizer(texts, merges=(), chat_template=None):
    """A character-level BPE tokenizer (no pre-tokenizer, so merges can cross any boundary), no chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    for c in sorted(set("".join(texts))):
        vocab.setdefault(c, len(vocab))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_encode_prompt_with_and_without_chat_template():
    q = "Tom has 3 cats. How many cats?"
    text = PAPER_GSM8K.format(problem=q)
    plain = _char_bpe_tokenizer([text, PAPER_MATH.format(problem=q)])
    assert plain.decode(common.encode_prompt(plain, q, "gsm8k")) == text
    assert plain.decode(common.encode_prompt(plain, q, "math")) == PAPER_MATH.format(problem=q)
    chat = _char_bpe_tokenizer([text, "<|user|>\n<|assistant|>"], chat_template=tiny_reference.TINY_CHAT_TEMPLATE)
    assert chat.decode(common.encode_prompt(chat, q, "gsm8k")) == f"<s><|user|>\n{text}\n<|assistant|>\n"
    tiny = tiny_reference.build_tiny_tokenizer()  # the embedded default goes through the same chat-template path
    p = common.load_task("arith", "test", limit=1)[0]
    ids = common.encode_prompt(tiny, p["question"], "arith")
    assert ids[0] == tiny.bos_token_id and ids.count(tiny.bos_token_id) == 1
    assert tiny.decode(ids) == f"<s><|user|>\n{PAPER_GSM8K.format(problem=p['question'])}\n<|assistant|>\n"
    assert tiny.unk_token_id not in ids


# ---------------------------------------------------------------------------------------------------------------------
# The arith task and its strict verifier
# ---------------------------------------------------------------------------------------------------------------------
def test_arith_problems_format_deterministic_and_disjoint():
    train = common.arith_problems("train", 5000)
    test = common.arith_problems("test", 1000)
    assert train[:50] == common.arith_problems("train", 50)  # seeded and deterministic, a prefix of a longer run
    assert len({p["question"] for p in train}) == 5000 and len({p["question"] for p in test}) == 1000
    other_seed = common.arith_problems("train", 2000, seed=7)
    assert not {p["question"] for p in train + other_seed} & {p["question"] for p in test}
    assert common.load_task("arith", "test", limit=20) == test[:20]
    for p in train[:500] + test[:500]:
        segments = p["solution"].split("\n\n")  # one step per segment, blank line between
        start, ops = arith_ops(p["answer"])
        assert 2 <= len(ops) <= 5 and len(segments) == len(ops) + 1
        assert segments[-1] == f"#### {p['final']}" and p["question"].startswith(f"{p['question'].split()[0]} has {start} ")
        assert common.grade(p["solution"], p["answer"], "arith") == 1.0
        assert common.grade(p["solution"], str(p["final"]), "gsm8k") == 1.0  # GSM8K format: answer-grading agrees
        assert first_wrong_step(p["solution"], p["answer"]) is None


def test_arith_strict_verifier_rejects_right_answers_on_wrong_steps():
    rng = random.Random(0)
    for p in common.arith_problems("test", 200):
        start, ops = arith_ops(p["answer"])
        lines = p["solution"].split("\n\n")
        # a wrong intermediate result, final answer still right: answer-only grading would pass it
        i = rng.randrange(len(ops))
        a, rest = lines[i].split("=")
        bad = lines[:i] + [f"{a}={int(rest) + 1}"] + lines[i + 1:]
        resp = "\n\n".join(bad)
        assert common.grade(resp, str(p["final"]), "gsm8k") == 1.0
        assert common.grade(resp, p["answer"], "arith") == 0.0
        assert first_wrong_step(resp, p["answer"]) == i
        # skipped steps, a wrong operation, an extra line, a wrong final line
        assert common.grade(f"#### {p['final']}", p["answer"], "arith") == 0.0
        op, b = ops[0]
        other = {"+": "-", "-": "+", "*": "+"}[op]
        wrong_op = [f"{start}{other}{b}={common._arith_apply(start, other, b)}"] + lines[1:]
        assert common.grade("\n\n".join(wrong_op), p["answer"], "arith") == 0.0
        assert first_wrong_step("\n\n".join(wrong_op), p["answer"]) == 0
        assert common.grade(p["solution"].replace("\n\n####", "\n\n1+1=2\n\n####"), p["answer"], "arith") == 0.0
        assert common.grade(p["solution"] + "1", p["answer"], "arith") == 0.0


def test_arith_slipped_solutions_and_first_wrong_step():
    rng = random.Random(1)
    for p in common.arith_problems("train", 300):
        start, ops = arith_ops(p["answer"])
        slip = rng.randrange(len(ops))
        text, step = common.arith_solution(start, ops, slip, rng)
        assert step == slip
        assert common.grade(text, p["answer"], "arith") == 0.0
        assert first_wrong_step(text, p["answer"]) == slip
        assert common.grade(text, str(p["final"]), "gsm8k") == 0.0  # carried through to a wrong final answer
        assert text.split("\n\n")[:slip] == p["solution"].split("\n\n")[:slip]  # steps before the slip are right
        assert first_wrong_step(text.split("\n\n")[0], p["answer"]) == (0 if slip == 0 else 1)  # truncated


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization and masks
# ---------------------------------------------------------------------------------------------------------------------
def test_prompt_response_boundary_is_never_merged():
    q = "Sue has 2 kg."
    response = "5 kg more\n#### 7"
    prompt_text = PAPER_GSM8K.format(problem=q)  # ends with "."; the response starts with "5"
    tok = _char_bpe_tokenizer([prompt_text, response], merges=[(".", "5")])
    merged_id = tok.convert_tokens_to_ids(".5")
    assert merged_id in tok(prompt_text + response)["input_ids"]  # encoding the two jointly merges ".5" at the boundary
    prompt_ids, response_ids = common.encode_prompt(tok, q, "gsm8k"), encode_response(tok, response)
    assert response_ids[-1] == tok.eos_token_id and tok.decode(response_ids[:-1]) == response
    batch = common.collate([{"prompt_ids": prompt_ids, "response_ids": response_ids}], tok.pad_token_id)
    ids, mask = batch["input_ids"][0].tolist(), batch["mask"][0]
    assert ids == prompt_ids + response_ids and merged_id not in ids
    assert ids[len(prompt_ids) - 1] != merged_id and ids[len(prompt_ids)] == tok.convert_tokens_to_ids("5")
    assert mask.tolist() == [0.0] * len(prompt_ids) + [1.0] * len(response_ids)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == response + "</s>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == prompt_text


def test_collate_masks_padding_and_fields():
    rows = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9], "ref_logps": [-0.5, -1.5], "reward": 1.0},
            {"prompt_ids": [5], "response_ids": [10, 11, 12, 13], "ref_logps": [-1.0, -2.0, -3.0, -4.0], "reward": 0.0},
            {"prompt_ids": [5, 6, 7, 8, 9], "response_ids": [2], "ref_logps": [-0.25], "reward": 1.0}]
    b = common.collate(rows, pad_token_id=0, token_fields=("ref_logps",), seq_fields=("reward",))
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [5, 10, 11, 12, 13, 0], [5, 6, 7, 8, 9, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert b["mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert b["ref_logps"].tolist() == [[0, 0, 0, -0.5, -1.5, 0], [0, -1, -2, -3, -4, 0], [0, 0, 0, 0, 0, -0.25]]
    assert b["reward"].tolist() == [1.0, 0.0, 1.0]
    assert b["input_ids"].dtype == torch.long and b["mask"].dtype == torch.float32


def test_encode_response_on_the_tiny_tokenizer(tiny_model):
    _, tok = tiny_model
    p = common.load_task("arith", "train", limit=1)[0]
    prompt_ids, response_ids = common.encode_prompt(tok, p["question"], "arith"), encode_response(tok, p["solution"])
    assert response_ids[-1] == tok.eos_token_id and tok.bos_token_id not in response_ids
    batch = common.collate([{"prompt_ids": prompt_ids, "response_ids": response_ids}], tok.pad_token_id)
    ids = batch["input_ids"][0]
    assert tok.decode(ids[batch["mask"][0].bool()], skip_special_tokens=True) == p["solution"]
    assert tok.decode(ids[: len(prompt_ids)]).endswith("<|assistant|>\n")


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------------------
def test_rollout_shapes_finish_reasons_and_grades(tiny_model):
    model, tok = tiny_model
    problems = common.load_task("arith", "test", limit=5)
    prompts = [common.encode_prompt(tok, p["question"], "arith") for p in problems]
    answers = [p["answer"] for p in problems]
    rows = common.rollout(model, tok, prompts, answers, "arith", n=3, temperature=1.0, top_p=0.9, top_k=16,
                          max_new_tokens=64, gen_batch_size=6, seed=3)
    assert len(rows) == 15 and [r["prompt_idx"] for r in rows] == [i for i in range(5) for _ in range(3)]
    assert sum(r["finish"] == "stop" for r in rows) >= 10  # a trained reference ends its short solutions
    for r in rows:
        ids = r["response_ids"]
        assert r["prompt_ids"] == prompts[r["prompt_idx"]] and r["answer"] == answers[r["prompt_idx"]]
        assert r["finish"] in ("stop", "length") and r["truncated"] == (r["finish"] == "length")
        if r["finish"] == "stop":
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1] and len(ids) <= 64
        else:
            assert tok.eos_token_id not in ids and len(ids) == 64
        assert tok.pad_token_id not in ids
        assert r["response"] == tok.decode(ids, skip_special_tokens=True)
        assert r["reward"] == common.grade(r["response"], r["answer"], "arith")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = common.rollout(model, tok, prompts, answers, "arith", n=3, temperature=1.0, top_p=0.9, top_k=16,
                           max_new_tokens=64, gen_batch_size=6, seed=3)
    assert [r["response_ids"] for r in again] == [r["response_ids"] for r in rows]  # seeded
    # and the caller's random state is untouched: a run whose rollouts came from a cache draws the same dropout masks
    assert torch.equal(torch.get_rng_state(), state)
    cut = common.rollout(model, tok, prompts, answers, "arith", temperature=0.0, max_new_tokens=4)
    for r in cut:
        assert r["finish"] == "length" and r["truncated"] and len(r["response_ids"]) == 4
        assert tok.eos_token_id not in r["response_ids"] and r["reward"] == 0.0
    for training in (True, False):  # generation runs in eval mode and restores the mode it found
        model.train(training)
        common.rollout(model, tok, prompts[:1], answers[:1], "arith", temperature=0.0, max_new_tokens=4)
        assert model.training == training


def test_left_padded_greedy_matches_unpadded(tiny_model):
    model, tok = tiny_model
    problems = common.load_task("arith", "test", limit=8)
    prompts = [common.encode_prompt(tok, p["question"], "arith") for p in problems]
    assert len({len(p) for p in prompts}) > 2  # different lengths, so the batch is left-padded
    batched = common.generate_batch(model, tok, prompts, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=48)
    for prompt, out in zip(prompts, batched):
        alone = common.generate_batch(model, tok, [prompt], temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=48)[0]
        assert out == alone
        with torch.no_grad():  # and greedy really is the argmax of the model's next-token distribution
            ids = torch.tensor([prompt + out["response_ids"]])
            argmax = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        assert argmax == out["response_ids"]


# ---------------------------------------------------------------------------------------------------------------------
# Models: load by path, clear errors
# ---------------------------------------------------------------------------------------------------------------------
def test_model_saved_to_temp_dir_loads_by_path(tiny_model, tmp_path):
    model, tok = tiny_model
    path = str(tmp_path / "saved")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    loaded, loaded_tok = common.load_model_and_tokenizer(path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert loaded_tok.get_vocab() == tok.get_vocab() and loaded_tok.chat_template == tok.chat_template
    q = common.load_task("arith", "test", limit=1)[0]["question"]
    assert common.encode_prompt(loaded_tok, q, "arith") == common.encode_prompt(tok, q, "arith")
    assert loaded_tok.pad_token_id == tok.pad_token_id is not None


def test_missing_model_path_is_a_clear_error(tmp_path):
    for path in (str(tmp_path / "no-such-model"), "./no-such-model-dir"):
        with pytest.raises(FileNotFoundError, match="no-such-model"):
            common.load_model_and_tokenizer(path)


def test_reference_mode_runs_the_model_in_eval_mode_and_restores_it():
    """The reference is deterministic: no dropout inside the context, even when the caller's model is training."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    x = torch.ones(2, 4)
    with common.reference_mode(model):
        assert not model.training and torch.equal(model(x), model(x))
    assert model.training
    model.eval()
    with pytest.raises(RuntimeError, match="inside"):  # restored even when the body raises
        with common.reference_mode(model):
            model.train()
            raise RuntimeError("inside")
    assert not model.training


def test_cache_keys_follow_the_contents_not_the_path(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    # the tiny model: the same key from a relative or an absolute cache dir
    monkeypatch.chdir(tmp_path)
    assert runtime.files.model_key("tiny", ".cache") == runtime.files.model_key("tiny", str(tmp_path / ".cache"))
    # a local folder: the same key by a relative or an absolute path, and for a copy elsewhere; a new key once a
    # different model is saved into the same folder, even with the same sizes and times
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    key = runtime.files.model_key("ckpt", ".cache")
    assert key == runtime.files.model_key(str(path), ".cache")
    shutil.copytree(path, tmp_path / "copy")
    assert runtime.files.model_key(str(tmp_path / "copy"), ".cache") == key
    weights = path / "model.safetensors"
    stat, data = weights.stat(), bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert runtime.files.model_key(str(path), ".cache") != key
    assert runtime.files.model_key("google/gemma-1.1-7b-it", ".cache") == "google/gemma-1.1-7b-it"  # a hub id
    # bf16 samples and log-probs are not fp32 ones: the precision is part of every key, and fp32 keys stay as they were
    assert runtime.files.model_key("google/gemma-1.1-7b-it", precision="bf16") == "google/gemma-1.1-7b-it@bf16"
    assert runtime.files.model_key(str(tmp_path / "copy"), ".cache", "bf16") == key + "@bf16"
    model_key = runtime.files.model_key
    assert model_key("tiny", precision="bf16") != model_key("tiny", precision="fp32") == model_key("tiny")
    # a data file edited in place: a new key
    data_file = tmp_path / "test.jsonl"
    data_file.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    before = runtime.files.content_digest(str(data_file), str(tmp_path / ".cache"))
    data_file.write_text(json.dumps({"question": "q", "answer": "#### 2"}) + "\n")
    data_key = runtime.files.content_digest
    assert data_key(str(data_file), str(tmp_path / ".cache")) != before and data_key(None, ".cache") is None


# ---------------------------------------------------------------------------------------------------------------------
# The offline dataset: caching and resume
# ---------------------------------------------------------------------------------------------------------------------
def test_offline_dataset_caches_and_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    model, tok = tiny_model
    accelerator = Accelerator()
    settings = dict(model_name="tiny", cache_dir=str(tmp_path), task="arith", n=2, max_new_tokens=48, seed=5,
                    gen_batch_size=8, sampling=dict(temperature=0.9, top_p=0.9, top_k=16))
    problems = common.load_task("arith", "train", limit=12)
    calls, real = [], common.rollout_chunk

    def counting(*a, **kw):
        calls.append(list(a[5]))
        return real(*a, **kw)

    monkeypatch.setattr(common, "rollout_chunk", counting)
    rows = common.build_offline_dataset(accelerator, model, tok, problems, **settings)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # 8 sequences / 2 samples = 4 prompts per chunk
    assert len(rows) == 24 and [r["prompt_idx"] for r in rows] == [i for i in range(12) for _ in range(2)]
    for r in rows:
        n = len(r["response_ids"])
        assert r["prompt_ids"] == common.encode_prompt(tok, problems[r["prompt_idx"]]["question"], "arith")
        assert r["reward"] == common.grade(r["response"], problems[r["prompt_idx"]]["answer"], "arith")
        assert r["truncated"] == (r["finish"] == "length")
        assert len(r["ref_logps"]) == len(r["sampler_logps"]) == n and max(r["ref_logps"]) <= 0
        # every sampled token lies inside the sampler's top-k/top-p support
        assert all(math.isfinite(x) for x in r["sampler_logps"])
    # the stored reference log-probs are the model's own, recomputed here
    batch = common.collate(rows[:6], tok.pad_token_id, token_fields=("ref_logps",))
    with torch.no_grad():
        lp = common.token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(lp * batch["mask"], batch["ref_logps"], rtol=1e-4, atol=1e-4)

    roots = os.listdir(os.path.join(tmp_path, "offline"))
    assert len(roots) == 1
    root = os.path.join(tmp_path, "offline", roots[0])
    assert sorted(f for f in os.listdir(root) if f.startswith("chunk-")) == [f"chunk-{c:05d}.jsonl" for c in range(3)]
    assert json.load(open(os.path.join(root, "key.json")))["n"] == 2

    calls.clear()  # a second build (another script on the same model and task) reuses it: no generation
    assert common.build_offline_dataset(accelerator, model, tok, problems, **settings) == rows and calls == []

    os.remove(os.path.join(root, "chunk-00001.jsonl"))  # an interrupted build: only the missing chunk is redone
    assert common.build_offline_dataset(accelerator, model, tok, problems, **settings) == rows
    assert calls == [[4, 5, 6, 7]]

    chunk = os.path.join(root, "chunk-00002.jsonl")
    with open(chunk) as f:
        lines = f.readlines()
    # a damaged cache is named and sampled again, never trained on: a reward edited by hand (same row count), a chunk cut
    # at a line boundary, a chunk whose check file (row count and CRC-32, written after it) is missing
    edited = lines[:1] + [json.dumps(dict(json.loads(lines[1]), reward=float("nan"))) + "\n"] + lines[2:]
    for damage, message in ((edited, "chunk-00002.jsonl: its bytes do not match the CRC-32"),
                            (lines[:5], "chunk-00002.jsonl has 5 rows, 8 when it was written (8 expected)"),
                            (None, "chunk-00002.jsonl has no check file")):
        if damage is None:
            os.remove(os.path.join(root, "check-00002.json"))
        else:
            with open(chunk, "w") as f:
                f.writelines(damage)
        calls.clear()
        capsys.readouterr()
        assert common.build_offline_dataset(accelerator, model, tok, problems, **settings) == rows
        assert calls == [[8, 9, 10, 11]] and message in capsys.readouterr().err
        with open(chunk) as f:
            assert f.readlines() == lines
    os.remove(chunk)

    calls.clear()  # a different sampling parameter is a different dataset
    settings["sampling"] = dict(settings["sampling"], temperature=0.7)
    common.build_offline_dataset(accelerator, model, tok, problems, **settings)
    assert len(calls) == 3 and len(os.listdir(os.path.join(tmp_path, "offline"))) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors that name the row and field
# ---------------------------------------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_bad_jsonl_rows_name_row_and_field(tmp_path):
    good = {"question": "Q?", "answer": "x\n#### 5"}
    path = _write_jsonl(tmp_path / "a.jsonl", [good, good, {"answer": "#### 3"}])
    with pytest.raises(common.DataError, match=r"a\.jsonl: row 3: missing field 'question'"):
        common.load_task("gsm8k", "test", path)
    path = _write_jsonl(tmp_path / "b.jsonl", [good, {"question": "Q?", "answer": "so\n#### five"}])
    with pytest.raises(common.DataError, match=r"row 2: field 'answer'.*'five'.*not a number"):
        common.load_task("gsm8k", "train", path)
    path = _write_jsonl(tmp_path / "c.jsonl", [{"question": "Q?", "answer": "no final line"}])
    with pytest.raises(common.DataError, match=r"row 1: field 'answer' has no '#### <number>'"):
        common.load_task("gsm8k", "test", path)
    path = _write_jsonl(tmp_path / "d.jsonl", [good, "{not json"])
    with pytest.raises(common.DataError, match=r"row 2: not valid JSON"):
        common.load_task("gsm8k", "test", path)
    path = _write_jsonl(tmp_path / "e.jsonl", [{"problem": "P", "answer": "1"}, {"question": "P", "answer": "2"}])
    with pytest.raises(common.DataError, match=r"row 2: missing field 'problem'"):
        common.load_task("math", "test", path)
    path = _write_jsonl(tmp_path / "f.jsonl", [{"problem": "P", "solution": "no box"}])
    with pytest.raises(common.DataError, match=r"row 1: no answer: field 'answer' is missing or empty"):
        common.load_task("math", "test", path)
    path = _write_jsonl(tmp_path / "h.jsonl", [{"question": "Q?", "answer": ""}])
    with pytest.raises(common.DataError, match=r"row 1: field 'answer' is empty"):
        common.load_task("gsm8k", "test", path)
    with pytest.raises(common.DataError, match="file not found"):
        common.load_task("gsm8k", "test", str(tmp_path / "missing.jsonl"))
    path = _write_jsonl(tmp_path / "g.jsonl", [{"problem": "P", "solution": r"so \boxed{\frac{1}{2}}"}])
    assert common.load_task("math", "test", path)[0]["answer"] == r"\frac{1}{2}"  # answer taken from the solution


# ---------------------------------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------------------------------
def test_pass_at_k_matches_combinatorial_definition():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert common.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    for n in range(1, 8):  # by enumeration: the fraction of k-subsets of the n samples with at least one correct
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                assert common.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert common.pass_at_k(16, 4, 1) == pytest.approx(0.25)


def test_each_epoch_has_its_own_order_and_every_process_its_own_slice():
    """iterate_batches: the permutation depends on (seed, epoch): a new order each epoch, the same on a rerun; with 2
    processes of batch b the global batch is the 1-process batch 2b, split by rank."""
    class Acc:
        def __init__(self, world, rank):
            self.num_processes, self.process_index = world, rank

    examples = list(range(64))

    def order(seed, epoch, world=1, rank=0, bs=8):
        return [x for _, batch in common.iterate_batches(examples, bs, 1, seed, epoch, Acc(world, rank)) for x in batch]

    assert sorted(order(1, 0)) == examples and order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    one = [b for _, b in common.iterate_batches(examples, 8, 1, 1, 0, Acc(1, 0))]
    two = [[*a, *b] for (_, a), (_, b) in zip(common.iterate_batches(examples, 4, 1, 1, 0, Acc(2, 0)),
                                               common.iterate_batches(examples, 4, 1, 1, 0, Acc(2, 1)))]
    assert one == two
