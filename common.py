"""Shared plumbing for the algorithm files, in the order data flows through a run:

    task and prompt        the embedded task `arith`; loading GSM8K, MATH, AIME24 from the hub or a local JSONL file
    grading                grade(response, answer, task) -> 0 or 1 (math-verify for MATH and AIME in a helper process)
    tokenization           prompt and response encoded separately; collate into (B, T) batches with exact masks
    log-probs              token_logprobs: per-token log-probs without the (B, T, V) logits
    generation, sharding   generate_batch, rollout; `unsharded` (FSDP1/2, ZeRO-3) and consolidated state dicts
    offline dataset        n reference samples per prompt, graded, with reference log-probs; import and export
    models                 loading (precision, LoRA), the value network as a module, frozen copies
    run plumbing           args and validation, the accelerator, the memory preflight, batches, checkpoints, logging
    evaluation             greedy and sampled accuracy, pass@k, reports

Nothing in here is part of an algorithm: losses, targets, pair building, process rewards and rollout policies live in
the algorithm files, so that `diff rs.py dqo.py` shows everything that makes DQO DQO. Everything here is used by at
least two of the seven entry points (tests/test_layout.py checks it).

What a reader would copy (tasks, grading, tokens, log-probs, generation, scoring, the offline dataset, the value
network, `evaluate`) takes explicit parameters. Only run plumbing takes the run's `args`, as the bridge from the
command line: loading the model the flags name, validation, the accelerator and its preflight, step planning, and
`evaluate_run` / `evaluate_reference`, which evaluate with the run's settings (and cache the reference's result).
"""

import argparse
import atexit
import contextlib
import copy
import difflib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

TASKS = ("arith", "gsm8k", "math", "aime24")
PROMPT_TEMPLATES = {  # the DQO paper's templates (Appendix A)
    "gsm8k": "{problem}\nPlease reason step by step, and produce a final answer following 4 '#', like '#### 0'.",
    "math": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
}
PROMPT_TEMPLATES["arith"] = PROMPT_TEMPLATES["gsm8k"]
PROMPT_TEMPLATES["aime24"] = PROMPT_TEMPLATES["math"]
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
                 "precalculus")  # EleutherAI/hendrycks_math has one config per subject and no default config
HUB_SOURCES = {  # (path, configs, split) per task and split; a local JSONL file replaces any of them
    ("gsm8k", "train"): ("openai/gsm8k", ("main",), "train"),
    ("gsm8k", "test"): ("openai/gsm8k", ("main",), "test"),
    ("math", "train"): ("EleutherAI/hendrycks_math", MATH_SUBJECTS, "train"),  # the seven subjects, concatenated
    ("math", "test"): ("HuggingFaceH4/MATH-500", (None,), "test"),
    ("aime24", "test"): ("HuggingFaceH4/aime_2024", (None,), "train"),
}
EVAL_SAMPLING = dict(temperature=0.7, top_p=0.9, top_k=16)  # the DQO paper's sampled-evaluation protocol


class DataError(ValueError):
    """Bad input data: the message names the file, row and field."""


# ---------------------------------------------------------------------------------------------------------------------
# The embedded task `arith`: seeded multi-step arithmetic word problems in GSM8K format
# ---------------------------------------------------------------------------------------------------------------------
ARITH_NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Fay")
ARITH_ITEMS = ("apples", "coins", "cards", "books", "shells")
ARITH_STEPS = (2, 3)  # min and max number of steps per problem
ARITH_OPERANDS = {"+": (2, 9), "-": (2, 9), "*": (2, 3)}  # operand range per operation
ARITH_STEP_RE = re.compile(r"^(\d+)([+\-*])(\d+)=(-?\d+)$")


def _arith_apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arith_problem(rng: random.Random) -> dict:
    """One problem: a start value and 2-3 steps; `answer` is the step spec ("7;+5;*3;-4") the strict verifier replays,
    `solution` the gold worked solution, one step per blank-line-separated segment. Each operation appears at most once
    (with repeats the 2-layer reference copied the wrong sentence's operand), and + and - take one-digit operands: at
    most one carry or borrow per step, the slip `arith_solution` plants."""
    name, item = rng.choice(ARITH_NAMES), rng.choice(ARITH_ITEMS)
    start = value = rng.randint(2, 20)
    words, ops = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(*ARITH_STEPS)):  # intermediate values stay in [1, 99]: two digits at most
        room = {"+": 99 - value, "-": value - 1, "*": 99 // value}  # the largest operand that keeps the value in range
        choices = [o for o in "+-*" if room[o] >= ARITH_OPERANDS[o][0]]
        op = rng.choice([o for o in choices if o not in [x for x, _ in ops]] or choices)
        b = rng.randint(ARITH_OPERANDS[op][0], min(ARITH_OPERANDS[op][1], room[op]))
        words.append({"+": f"Then {name} gets {b} more.", "-": f"Then {name} gives away {b}.",
                      "*": f"Then {name} multiplies them by {b}."}[op])
        ops.append((op, b))
        value = _arith_apply(value, op, b)
    words.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(words), "answer": ";".join([str(start)] + [f"{o}{b}" for o, b in ops]),
            "solution": arith_solution(start, ops)[0], "final": value}


def has_carry(a: int, op: str, b: int) -> bool:
    """Whether the step needs a carry (addition) or a borrow (subtraction) in the units digit."""
    return (op == "+" and a % 10 + b % 10 >= 10) or (op == "-" and a % 10 < b % 10)


def arith_solution(start: int, ops: list, slip_step: int | None = None, rng: random.Random | None = None,
                   carry_slip: float = 0.0) -> tuple:
    """The worked solution as (text, index of the first slipped step or None); slips carry through to a wrong final answer.
    `slip_step`: that step is off by 1 or 10. `carry_slip`: each step that needs a carry or borrow forgets it (off by
    10) with this probability, a systematic misconception that greedy decoding keeps above 1/2."""
    lines, value, first = [], start, None
    for i, (op, b) in enumerate(ops):
        result = _arith_apply(value, op, b)
        if i == slip_step:
            result += rng.choice([d for d in (-10, -1, 1, 10) if result + d >= 0])
        elif carry_slip and has_carry(value, op, b) and rng.random() < carry_slip:
            result += -10 if op == "+" else 10
        if result != _arith_apply(value, op, b) and first is None:
            first = i
        lines.append(f"{value}{op}{b}={result}")
        value = result
    return "\n\n".join(lines + [f"#### {value}"]), first


def arith_problems(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct problems. Train and test are disjoint by construction: a problem belongs to the test split iff
    a hash of its question is 0 mod 5, whatever the seed or n."""
    rng, seen, out = random.Random(f"arith-{split}-{seed}"), set(), []
    while len(out) < n:
        p = arith_problem(rng)
        in_test = int(hashlib.md5(p["question"].encode()).hexdigest(), 16) % 5 == 0
        if in_test == (split == "test") and p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def _arith_walk(response: str, spec: str) -> tuple:
    """Replay the spec along the response's step lines: (lines, index of the first rejected step line or None, its
    ARITH_STEP_RE match or None, the right value before that step, or the final one)."""
    start, *steps = spec.split(";")
    lines = [ln.strip() for ln in response.strip().split("\n") if ln.strip()]
    value = int(start)
    for i, step in enumerate(steps):
        m = ARITH_STEP_RE.match(lines[i]) if i < len(lines) else None
        op, b = step[0], int(step[1:])
        if not m or int(m[1]) != value or m[2] != op or int(m[3]) != b or int(m[4]) != _arith_apply(value, op, b):
            return lines, i, m, value
        value = int(m[4])
    return lines, None, None, value


def grade_arith(response: str, spec: str) -> float:
    """Strict verifier: 1.0 only if every step line is `a<op>b=c` with `a` the previous result, the problem's operation and
    a correct result, and the final `#### N` equals the last result."""
    lines, wrong, _, value = _arith_walk(response, spec)
    return float(wrong is None and len(lines) == spec.count(";") + 1 and lines[-1].startswith("####")
                 and lines[-1][4:].strip() == str(value))


def arith_first_wrong(row: dict) -> int | None:
    """Index of the first wrong segment of an arith row's response (segment i is step i, the last the `####` answer), by
    the strict verifier; None if the response is correct."""
    if row["reward"] == 1.0:
        return None
    step = _arith_walk(row["response"], row["answer"])[1]  # the first step line the strict verifier rejects
    return len(row["answer"].split(";")) - 1 if step is None else step


# ---------------------------------------------------------------------------------------------------------------------
# Tasks: loading from the hub or a local JSONL file
# ---------------------------------------------------------------------------------------------------------------------
def _read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file, one JSON object per non-blank line; errors name the file and the line."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file (a JSONL file is expected)")
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: row {i}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: row {i}: not valid JSON ({e})") from None
                if not isinstance(rows[-1], dict):
                    raise DataError(f"{path}: row {i}: a JSON object is expected, got {type(rows[-1]).__name__}")
    return rows


def _problem_from_row(task: str, row: dict, where: str) -> dict:
    """Normalise one raw row into {question, answer, solution}; `where` names the file and row for errors."""
    def need(field):
        if field not in row:
            raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(row)})")
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__} ({row[field]!r:.60})")
        if not row[field].strip():
            raise DataError(f"{where}: field {field!r} is empty")
        return row[field]

    if task == "gsm8k":
        question, solution = need("question"), need("answer")
        if "####" not in solution:
            raise DataError(f"{where}: field 'answer' has no '#### <number>' line")
        answer = solution.rsplit("####", 1)[1].strip()
        if parse_number(answer) is None:
            raise DataError(f"{where}: field 'answer': final answer {answer!r} after '####' is not a number")
        return {"question": question, "answer": answer, "solution": solution}
    question = need("problem")
    answer, solution = row.get("answer"), row.get("solution")
    for name, value, types in (("answer", answer, (str, int)), ("solution", solution, (str,))):
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise DataError(f"{where}: field {name!r} must be {' or '.join(t.__name__ for t in types)}, got "
                            f"{type(value).__name__} ({value!r:.60})")
    if answer is None or str(answer).strip() == "":  # an integer answer (AIME) is fine: it is compared as text
        answer = last_boxed(solution) if solution else None
    if answer is None:
        raise DataError(f"{where}: no answer: field 'answer' is missing or empty, and 'solution' has no \\boxed{{}}")
    return {"question": question, "answer": str(answer), "solution": solution or f"\\boxed{{{answer}}}"}


def load_task(task: str, split: str, path: str | None = None, limit: int | None = None) -> list[dict]:
    """Problems of `task` and `split` as {question, answer, solution}: from the local JSONL file `path` (the hub dataset's
    fields), else the hub (`arith`: the generator)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if task == "arith":
        return arith_problems(split, limit or (20_000 if split == "train" else 1000))
    if path:
        rows, name = _read_jsonl(path), path
    else:
        if (task, split) not in HUB_SOURCES:
            raise ValueError(f"task {task!r} has no {split} split (aime24 is test only); pass a JSONL file instead")
        import datasets

        hub, configs, hub_split = HUB_SOURCES[(task, split)]
        try:
            rows, name = [row for c in configs for row in datasets.load_dataset(hub, c, split=hub_split)], hub
        except Exception as e:  # no network, an offline hub (HF_HUB_OFFLINE), a gated or moved dataset: all one line
            local = {("gsm8k", "train"): "gsm8k/train.jsonl", ("gsm8k", "test"): "gsm8k/test.jsonl",
                     ("math", "test"): "math500/test.jsonl", ("aime24", "test"): "aime24/test.jsonl"}.get((task, split))
            raise DataError(f"task {task}: the {split} split of {hub} cannot be loaded from the Hugging Face hub "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no message'}); without "
                            f"network pass --{split}_file with a local copy (JSONL with the hub's fields"
                            + (f", e.g. ../shared/data/{local}" if local else "") + "; README: Real models)") from None
    problems = [_problem_from_row(task, row, f"{name}: row {i}") for i, row in enumerate(rows, 1)]
    return problems[:limit] if limit else problems


# ---------------------------------------------------------------------------------------------------------------------
# Grading: grade(response, answer, task) -> 0.0 or 1.0, never raises for any response or answer
# ---------------------------------------------------------------------------------------------------------------------
GSM8K_ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
MAX_ANSWER_CHARS = 2000  # longer boxed answers are compared as strings only: symbolic parsing of them can hang
GRADE_TIMEOUT_S = 5.0  # per math-verify call, however many threads grade at once


def parse_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", "").replace("$", "").strip())
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None  # "inf", "nan" and 400-digit numbers are not answers


def extract_gsm8k_answer(response: str) -> str | None:
    """The number after the last `####`, with `,` and `$` removed."""
    matches = GSM8K_ANSWER_RE.findall(response[-10_000:])  # the answer is at the end; bounds regex cost
    return matches[-1].replace(",", "") if matches else None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces matched; None if absent or unbalanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


_MATH_HELPER = r"""
import json, signal, sys
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
configs = [LatexExtractionConfig(), ExprExtractionConfig()]
signal.signal(signal.SIGALRM, signal.SIG_DFL)  # SIGALRM then ends this process even inside a C call that holds the GIL
out, sys.stdout = sys.stdout, sys.stderr  # only replies go to our parent; a library's prints must not look like one
print("ready", file=out, flush=True)
for line in sys.stdin:  # ends when the parent closes the pipe, or exits
    pred, ref, timeout_s = json.loads(line)
    signal.setitimer(signal.ITIMER_REAL, timeout_s + 1.0)  # our parent kills us at timeout_s; this covers its death
    try:
        gold, guess = (parse("$" + s + "$", extraction_config=configs, parsing_timeout=None) for s in (ref, pred))
        ok = bool(gold and guess and verify(gold, guess, timeout_seconds=None))
    except Exception:
        ok = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(int(ok), file=out, flush=True)
"""
HELPER_START_TIMEOUT_S = 300.0  # importing sympy and math-verify takes about a second; much longer on a loaded machine
MAX_IDLE_HELPERS = 4  # helpers kept between calls, about 60 MB each; more start when more threads grade at once
_helpers = {"idle": [], "live": set(), "lock": threading.Lock()}


def _forget_helpers_after_fork() -> None:
    """A forked child starts its own helpers; closing its copies of the parent's pipes lets an idle parent helper still see
    end-of-file when the parent exits."""
    for proc in _helpers["live"]:
        proc.stdin.close()
        proc.stdout.close()
    _helpers.update(idle=[], live=set(), lock=threading.Lock())


def _stop_helper(proc) -> None:
    proc.kill()
    proc.wait()  # reaped: no zombie
    with _helpers["lock"]:
        _helpers["live"].discard(proc)


def _stop_all_helpers() -> None:
    _helpers["idle"].clear()
    for proc in list(_helpers["live"]):  # busy ones too: their calls then return 0.0
        _stop_helper(proc)


os.register_at_fork(after_in_child=_forget_helpers_after_fork)
atexit.register(_stop_all_helpers)


def _readline(proc, timeout_s: float) -> bytes:
    """One line from the helper, or b"" after `timeout_s` or at its exit. poll, unlike select, takes any fd number
    (a training process can have more than 1024 open files)."""
    poller = select.poll()
    poller.register(proc.stdout, select.POLLIN)
    return proc.stdout.readline() if poller.poll(timeout_s * 1000) else b""


def _checkout_helper():
    """An idle helper, or a fresh one (None if it does not start): each call has one to itself."""
    with _helpers["lock"]:
        while _helpers["idle"]:
            proc = _helpers["idle"].pop()
            if proc.poll() is None:
                return proc
            _helpers["live"].discard(proc)  # it died while idle; poll() reaped it
    proc = subprocess.Popen([sys.executable, "-c", _MATH_HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=0)  # raw pipes: poll sees all, no buffer lock at a fork
    with _helpers["lock"]:
        _helpers["live"].add(proc)
    if _readline(proc, HELPER_START_TIMEOUT_S) != b"ready\n":
        _stop_helper(proc)
        return None
    return proc


def _math_equal(pred: str, ref: str, timeout_s: float = GRADE_TIMEOUT_S) -> bool:
    """math-verify equivalence in a helper process, killed when an answer takes over `timeout_s` (from when the helper has
    it). Neither a thread nor signal.alarm can bound it: sympy on e.g. 10^{10^{10^{10}}} is one C call holding the GIL.
    Each call checks a helper out of a small pool, so a slow answer never delays another thread's, and a subprocess
    works inside daemonic workers."""
    proc = _checkout_helper()
    if proc is None:
        return False
    try:
        proc.stdin.write((json.dumps([pred, ref, timeout_s]) + "\n").encode())
        reply = _readline(proc, timeout_s)
    except OSError:  # it died before reading the answer
        reply = b""
    with _helpers["lock"]:
        keep = reply in (b"0\n", b"1\n") and len(_helpers["idle"]) < MAX_IDLE_HELPERS
        if keep:
            _helpers["idle"].append(proc)
    if not keep:  # timed out, died, out of step, or one too many
        _stop_helper(proc)
    return reply == b"1\n"


def grade(response: str, answer: str, task: str) -> float:
    """1.0 if `response` is correct for `answer` (GSM8K: the text after ####; MATH/AIME: the answer field; arith: the step
    spec), else 0.0. Never raises for any response or answer (a non-str grades 0.0; math-verify gets GRADE_TIMEOUT_S a
    call, however many threads grade); ValueError only for a task not in TASKS, a programming error."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not isinstance(response, str) or not isinstance(answer, str):
        return 0.0
    try:
        if task == "arith":
            return grade_arith(response, answer)
        if task == "gsm8k":
            pred, ref = extract_gsm8k_answer(response), parse_number(answer)
            return float(pred is not None and ref is not None and parse_number(pred) == ref)
        pred = last_boxed(response)  # math, aime24
        if pred is None:
            return 0.0
        if pred.strip() == answer.strip():
            return 1.0
        if len(pred) > MAX_ANSWER_CHARS or len(answer) > MAX_ANSWER_CHARS:
            return 0.0
        return float(_math_equal(pred, answer, GRADE_TIMEOUT_S))
    except Exception:  # a grader must never take a training run down
        return 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization: prompt and response encoded separately, masks exact at the boundary
# ---------------------------------------------------------------------------------------------------------------------
def encode_prompt(tokenizer, question: str, task: str) -> list[int]:
    """Prompt ids: the task template, wrapped in the chat template as the user turn when the tokenizer has one."""
    text = PROMPT_TEMPLATES[task].format(problem=question)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already carries BOS
    return tokenizer(text)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: the special token after the message in the chat template's rendering of one
    (Gemma `<end_of_turn>`, Llama-3 `<|eot_id|>`, ChatML `<|im_end|>`), dropped from decoded text by
    `skip_special_tokens`; else the tokenizer's EOS (no template, or one closing a turn with plain text, as the tiny
    model's newline). Cached per tokenizer and template."""
    return _end_of_turn_id(tokenizer, str(getattr(tokenizer, "chat_template", None)))


@functools.lru_cache(maxsize=64)
def _end_of_turn_id(tokenizer, template: str) -> int:  # `template` only keys the cache: a new template, a new answer
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token_id
    marker = "END_OF_TURN_PROBE"  # no spaces or newlines, so a template that trims the content keeps it whole
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = text[text.rindex(marker) + len(marker) :]
    # matched as text, not by tokenizing `after`: no tokenizer quirk (a prefix space, merges) can shift the first token
    closing = [(len(t.content), i) for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content
               and after.startswith(t.content)]
    return max(closing)[1] if closing else tokenizer.eos_token_id


def stop_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: the model's `generation_config.eos_token_id` (an int or a list: Gemma-2-it [1, 107]),
    the tokenizer's EOS, and the template's end of turn, which some configs leave out (Gemma-1.1-it lists only 1, though
    its turns end with 107)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return {*ids, tokenizer.eos_token_id, end_of_turn_id(tokenizer)} - {None}


def encode_response(tokenizer, text: str) -> list[int]:
    """Response text as response ids, encoded on its own (no token straddles the prompt/response boundary) and closed by
    `end_of_turn_id`, as the model ends a turn when generating."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]


def collate(rows: list[dict], pad_token_id: int, token_fields: tuple = (), seq_fields: tuple = ()) -> dict:
    """Right-padded batch; `mask` is 1 exactly on response tokens (the closing stop token included). Each of `token_fields`
    (a per-response-token list on the row) fills the response positions of a (B, T) tensor, 0 elsewhere; each of
    `seq_fields` (a number per row) gives a (B,) tensor."""
    T = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    out = {f: torch.zeros(B, T) for f in token_fields}
    for i, r in enumerate(rows):
        p, n = len(r["prompt_ids"]), len(r["response_ids"])
        input_ids[i, : p + n] = torch.tensor(r["prompt_ids"] + r["response_ids"])
        attention_mask[i, : p + n] = 1
        mask[i, p : p + n] = 1
        for f in token_fields:
            out[f][i, p : p + n] = torch.tensor(r[f], dtype=torch.float)
    out.update({f: torch.tensor([float(r[f]) for r in rows]) for f in seq_fields})
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask, **out}


SEGMENT_SEP = re.compile(r"\n\s*\n")  # segments of a response (process scores, value traces) end at blank lines


def segment_ends(tokenizer, response_ids: list[int]) -> list[int]:
    """Exclusive token ends of a response's segments, split at blank lines: they partition the response, each keeping its
    trailing blank line, the last ending at the last token (EOS included). Token boundaries come from decoding prefixes
    (a binary search per cut), so any tokenizer works."""
    def n_chars(k):
        return len(tokenizer.decode(response_ids[:k], skip_special_tokens=True))

    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    ends, start = [], 0
    for m in SEGMENT_SEP.finditer(text):
        if not text[start : m.start()].strip() or not text[m.end() :].strip():
            continue  # blank lines at the start or the end do not open a new segment
        start = m.end()
        lo, hi = 1, len(response_ids)
        while lo < hi:  # the first token that reaches past the blank line
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if n_chars(mid) >= start else (mid + 1, hi)
        if lo < len(response_ids) and (not ends or lo > ends[-1]):
            ends.append(lo)
    return ends + [len(response_ids)]


# ---------------------------------------------------------------------------------------------------------------------
# Per-token log-probs: the backbone, then the output projection in checkpointed chunks, never the (B, T, V) logits
# ---------------------------------------------------------------------------------------------------------------------
LOGPROB_CHUNK_LOGITS = 2**26  # logits per chunk, 256 MiB in fp32: 262 tokens at a 256k vocabulary, 1M at the tiny 68
SCORE_MAX_TOKENS = 16384  # padded tokens (rows x length) per forward pass when scoring rows
_HEADS_CHECKED = weakref.WeakSet()  # causal LMs whose own logits have been compared with `_head_logits`


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The sampler's logits, as transformers' warpers apply them: temperature, then top-k, then top-p."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def unwrap_causal_lm(model):
    """The transformers causal LM inside DDP, FSDP1 or DeepSpeed (`.module`) and peft (`get_base_model`) wrappers.
    Under FSDP2 (`fully_shard`) the model is the causal LM itself."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def _head_logits(hidden: torch.Tensor, head: dict) -> torch.Tensor:
    """(n, H) final hidden states -> (n, V) logits, as the model's forward computes them: its output projection under
    the autocast state its forward ran in, then a logit scale (Cohere, Granite) or Gemma-2's soft-cap c tanh(z / c)."""
    with torch.autocast(*head["autocast"]) if head["autocast"] else nullcontext():
        logits = torch.nn.functional.linear(hidden, head["weight"], head["bias"])  # (n, V) in the model's dtype
        if head["scale"] is not None:
            logits = logits * head["scale"]
        if head["softcap"] is not None:
            logits = torch.tanh(logits / head["softcap"]) * head["softcap"]
    return logits


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: dict, warps: tuple) -> torch.Tensor:
    """(n, H) hidden states, (n,) next tokens -> (len(warps), n) log-probs: the logit minus an fp32 logsumexp, for
    each warp (None: the model's own distribution). Only this chunk's logits exist, upcast to fp32."""
    logits = _head_logits(hidden, head).float()  # (n, V)
    out = []
    for warp in warps:
        lg = warp_logits(logits, **warp) if warp else logits
        out.append(lg.gather(-1, targets[:, None]).squeeze(-1) - lg.logsumexp(-1))  # (n,)
    return torch.stack(out)


class _ModelOutputInGraph(torch.autograd.Function):
    """Identity on the log-probs that gives the model's own (unused) logits a zero gradient in backward, so that the
    hooks FSDP puts on a forward's outputs (unshard the root for backward, finish the gradient reduction) run."""

    @staticmethod
    def forward(ctx, lps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ctx.logits = (logits.shape, logits.dtype, logits.device)
        return lps.view_as(lps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.logits
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def token_logprob_variants(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, warps: tuple = (None,),
                           chunk_tokens: int | None = None) -> list[torch.Tensor]:
    """One forward pass, a (B, T) tensor of log-probs per entry of `warps` (None: the model's own; a dict: under
    `warp_logits`), 0 at position 0 and at padding.
    The model is called through its wrapper (DDP, FSDP, peft), so their hooks run, with `logits_to_keep=1`. A hook on
    the backbone takes the final hidden states, and the output projection runs here on `chunk_tokens` tokens at a time
    (default: LOGPROB_CHUNK_LOGITS logits), checkpointed so backward recomputes each chunk: peak extra memory is a few
    chunks, whatever B and T. A model's first call compares its own last logits with `_head_logits`, so an architecture
    that needs more fails loudly."""
    lm = unwrap_causal_lm(model)
    captured = {}

    def keep_hidden(module, args, output):  # inside the forward: FSDP1's root has its unsharded weights in place
        proj, device = lm.get_output_embeddings(), output[0].device.type
        autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        captured.update(hidden=output[0], weight=proj.weight, bias=proj.bias, autocast=autocast)  # as the forward uses them

    hook = lm.base_model.register_forward_hook(keep_hidden)
    try:
        last_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1).logits
    finally:
        hook.remove()
    hidden, config = captured.pop("hidden"), lm.config  # (B, T, H)
    head = dict(captured, softcap=getattr(config, "final_logit_softcapping", None), scale=getattr(lm, "logit_scale", None))
    if getattr(config, "logits_scaling", None) and config.model_type.startswith("granite"):
        head["scale"] = 1 / config.logits_scaling  # Granite divides its logits by logits_scaling
    if lm not in _HEADS_CHECKED:
        with torch.no_grad():
            ours, theirs = _head_logits(hidden[:, -1], head).float(), last_logits[:, -1].float()  # (B, V)
        if not torch.allclose(ours, theirs, rtol=0.02, atol=0.02 * theirs.abs().max().item() + 1e-4):
            raise NotImplementedError(f"token_logprobs: {type(lm).__name__}'s logits are not its output projection of the "
                                      "backbone's hidden states (with soft-cap or scale): add what it does to _head_logits")
        _HEADS_CHECKED.add(lm)
    B, T, H = hidden.shape
    pos = attention_mask[:, 1:].nonzero()  # (N, 2) (row, position) of every prefix whose next token is real
    flat = pos[:, 0] * T + pos[:, 1]  # (N,) index into (B * T)
    h = hidden.reshape(B * T, H).index_select(0, flat)  # (N, H)
    targets = input_ids.reshape(-1).index_select(0, flat + 1)  # (N,)
    n = chunk_tokens or max(1, LOGPROB_CHUNK_LOGITS // head["weight"].shape[0])
    checkpoint = torch.is_grad_enabled() and (h.requires_grad or head["weight"].requires_grad)
    parts = [h.new_zeros(len(warps), 0, dtype=torch.float)]
    for s in range(0, len(flat), n):
        args = (h[s : s + n], targets[s : s + n], head, warps)
        parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False) if checkpoint
                     else _chunk_logprobs(*args))
    lps = torch.cat(parts, dim=1)  # (len(warps), N)
    if lps.requires_grad and last_logits.requires_grad:
        lps = _ModelOutputInGraph.apply(lps, last_logits)
    out = lps.new_zeros(len(warps), B * T).index_copy(1, flat + 1, lps)  # each log-prob at its token's position
    return list(out.view(len(warps), B, T).unbind(0))


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, warp: dict | None = None,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """(model, input_ids, attention_mask) -> (B, T) log-prob of each token given its prefix, 0 at position 0 and at
    padding; under the sampler's `warp` if given. See `token_logprob_variants`."""
    return token_logprob_variants(model, input_ids, attention_mask, (warp,), chunk_tokens)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Generation and sharding: generate from full parameters, log-probs through any wrapper, consolidated state dicts
# ---------------------------------------------------------------------------------------------------------------------
@contextmanager
def unsharded(model):
    """Yields a module that runs `generate` (and no-grad forwards) on full parameters with no communication, however
    `model` was wrapped:
      - FSDP1: `summon_full_params(writeback=False)`, every unit's forward routed straight to its module, so no unit
        reshards and re-gathers between decoding steps;
      - FSDP2 (`fully_shard`): every FSDP module unshards once, resharding after forward off inside; its settings come
        back on exit;
      - DeepSpeed ZeRO-3: `GatheredParameters` over all parameters; anything else: the unwrapped module.
    Entering and leaving are collective under sharding; inside, each process makes any number of calls. Peak memory
    inside: the full parameters on every process."""
    from accelerate.utils import extract_model_from_parallel
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    fsdp1 = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    fsdp2 = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if fsdp1 and fsdp1[0] is not model:
        raise ValueError("unsharded() needs the prepared (FSDP-wrapped) model, not the module inside it")
    if fsdp1:
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            for unit in fsdp1:  # an instance attribute shadows FullyShardedDataParallel.forward: no unshard/reshard per call
                unit.forward = unit.module.forward
            try:
                yield model.module
            finally:
                for unit in fsdp1:
                    del unit.forward
    elif fsdp2:
        # set_reshard_after_forward has no getter: keep each parameter group's setting (private) to put it back
        states = [m._get_fsdp_state() for m in fsdp2]
        saved = [(s, s._auto_reshard_after_forward, [(g, g.post_forward_mesh_info) for g in s._fsdp_param_groups])
                 for s in states]
        for m in fsdp2:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield model
        finally:
            for m in fsdp2:
                m.reshard()
            for s, auto, groups in saved:
                s._auto_reshard_after_forward = auto
                for g, info in groups:
                    g.post_forward_mesh_info = info
    elif any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield extract_model_from_parallel(model)
    else:
        yield extract_model_from_parallel(model)


class RowTemperature(LogitsProcessor):
    """Divides each row's next-token logits by that row's temperature, as generate's temperature warper does with one."""

    def __init__(self, temperatures: list[float]):
        self.temperatures = torch.tensor(temperatures)  # (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperatures.to(scores)[:, None]  # (B, V)


def generate_batch(model, tokenizer, prompts: list[list[int]], temperature: float | list[float], top_p: float, top_k: int,
                   max_new_tokens: int) -> list[dict]:
    """One batched `generate` call on a module with full parameters (see `unsharded`), stopping at any of `stop_token_ids`.
    `temperature`: one for all rows (0: greedy) or one per row (all > 0). Per prompt: the response ids up to and
    including the first stop id (scoring and training see how it ended), the finish ("stop" or "length") and the decoded
    text."""
    pad = tokenizer.pad_token_id
    stop = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    per_row = isinstance(temperature, list | tuple)
    if per_row and (len(temperature) != len(prompts) or min(temperature) <= 0):
        raise ValueError(f"per-row temperatures: expected {len(prompts)} values > 0, got {temperature}")
    sample = per_row or temperature > 0
    # one temperature per row: divided in before top-k/top-p, where generate's own temperature warper would be (1.0: none)
    kwargs = dict(temperature=1.0 if per_row else temperature, top_p=top_p, top_k=top_k) if sample else {}
    if per_row:
        kwargs["logits_processor"] = LogitsProcessorList([RowTemperature(temperature)])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # synced_gpus=False: `model` holds full parameters (see `unsharded`), so no rank waits on another's step
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=sample, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=sorted(stop), synced_gpus=False, **kwargs)
    model.train(was_training)
    results = []
    for row in out[:, L:].tolist():
        end = next((k for k, t in enumerate(row) if t in stop), None)  # finished rows are padded after their stop id
        text_ids = row if end is None else row[:end]
        results.append({"response_ids": row if end is None else row[: end + 1], "finish": "length" if end is None else "stop",
                        "response": tokenizer.decode(text_ids, skip_special_tokens=True)})
    return results


@torch.no_grad()
def score_rows(model, rows: list[dict], pad_token_id: int, warp: dict | None = None,
               max_tokens: int = SCORE_MAX_TOKENS) -> None:
    """Adds `logps` (the model's per-response-token log-probs) to each row, and with `warp` `sampler_logps` (under the
    sampler's warps), in eval mode. Micro-batches take rows longest first, as many as keep rows x length within
    `max_tokens`: short padding, bounded memory."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(rows, key=lambda r: len(r["prompt_ids"]) + len(r["response_ids"]), reverse=True)
    s = 0
    while s < len(order):
        chunk = order[s : s + max(1, max_tokens // (len(order[s]["prompt_ids"]) + len(order[s]["response_ids"])))]
        s += len(chunk)
        batch = collate(chunk, pad_token_id)
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        variants = {"logps": None, "sampler_logps": warp} if warp else {"logps": None}
        for name, lp in zip(variants, token_logprob_variants(model, ids, attn, tuple(variants.values()))):
            lp = lp.cpu()
            for i, r in enumerate(chunk):
                p = len(r["prompt_ids"])
                r[name] = lp[i, p : p + len(r["response_ids"])].tolist()
    model.train(was_training)


def _chunk_plan(n_prompts: int, n: int, gen_batch_size: int) -> list[range]:
    """Prompts in fixed chunks of about `gen_batch_size` sequences. Chunk boundaries do not depend on the number of
    processes, and each chunk is sampled under its own seed, so results are the same for any process count."""
    per = max(1, gen_batch_size // n)
    return [range(s, min(s + per, n_prompts)) for s in range(0, n_prompts, per)]


def rollout_chunk(model, tokenizer, prompts, answers, task, chunk, n, sampling, max_new_tokens, seed):
    """n graded samples for each prompt index in `chunk`, by a module with full parameters: the unit of work `rollout`
    shares across processes (SPO's online rollouts call it directly). Seeded per chunk: its rows do not depend on who
    samples it."""
    torch.manual_seed(seed)
    flat = [i for i in chunk for _ in range(n)]
    outs = generate_batch(model, tokenizer, [prompts[i] for i in flat], max_new_tokens=max_new_tokens, **sampling)
    for i, o in zip(flat, outs):
        o.update(prompt_idx=i, prompt_ids=prompts[i], answer=answers[i], truncated=o["finish"] == "length",
                 reward=grade(o["response"], answers[i], task))
    return outs


def rollout(model, tokenizer, prompts: list[list[int]], answers: list[str], task: str, n: int = 1,
            temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
            gen_batch_size: int = 256, seed: int = 0, accelerator: Accelerator | None = None, desc: str = "rollout"):
    """n graded samples per prompt (temperature 0: greedy), rows prompt-major. `model` may be prepared (it generates under
    `unsharded`); each process samples its share of the chunks, gathered back in prompt order."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    plan = _chunk_plan(len(prompts), n, gen_batch_size)
    mine = []
    with unsharded(model) as policy:
        for c in tqdm(range(rank, len(plan), world), desc=desc, disable=rank != 0, leave=False):
            mine.append((c, rollout_chunk(policy, tokenizer, prompts, answers, task, plan[c], n, sampling,
                                          max_new_tokens, seed * 1_000_003 + c)))
    chunks = gather_object(mine) if world > 1 else mine
    return [row for _, rows in sorted(chunks, key=lambda x: x[0]) for row in rows]


def full_state_dict(accelerator: Accelerator, model) -> dict:
    """A prepared model's consolidated state dict (main process; collective under sharding), each tied weight under its
    first name only, as save_pretrained writes it. FSDP1 without CUDA gathers in place: torch's gather with
    offload_to_cpu=True, which accelerate always asks for, crashes there (torch 2.13)."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    if isinstance(model, FullyShardedDataParallel) and not torch.cuda.is_available():
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            state_dict = model.state_dict()
    else:
        state_dict = accelerator.get_state_dict(model)
    seen, aliases = set(), []  # a gathered tied weight comes back as separate copies under each name
    for name, p in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        aliases += [plain_name(name)] if id(p) in seen else []
        seen.add(id(p))
    return {k: v for k, v in state_dict.items() if k not in aliases}


def plain_name(name: str) -> str:
    """A parameter's name in the plain model: without the FSDP1 and activation-checkpointing wrappers' prefixes."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


# ---------------------------------------------------------------------------------------------------------------------
# The offline dataset: n reference samples per training prompt, graded, with reference log-probs stored
# ---------------------------------------------------------------------------------------------------------------------
def cache_key(obj) -> str:
    """A short stable hash of a JSON-able description (model, task, sampling, ...): the name of a cache directory."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def failpoint(name: str) -> None:
    """Crash tests: with FAILPOINT=<name> (or <name>@<n>: the n-th time it is reached) the process dies here as a SIGKILL
    would leave it (exit 137, no cleanup, no flush); a no-op otherwise. The points sit between the steps of every save
    that must survive a kill."""
    want = os.environ.get("FAILPOINT")
    if not want or want.partition("@")[0] != name:
        return
    _FAILPOINT_HITS[name] = _FAILPOINT_HITS.get(name, 0) + 1
    if _FAILPOINT_HITS[name] == int(want.partition("@")[2] or 1):
        os._exit(137)


_FAILPOINT_HITS: dict[str, int] = {}


def file_hash(path: str) -> str:
    """CRC-32 of a file's bytes, streamed, as 8 hex digits: what checkpoint manifests, offline-dataset chunks and caches
    record to tell a damaged file. It guards against accidents, not attackers (any burst of up to 32 flipped bits, other
    damage but one in 4 billion), and is the fastest streaming hash in the standard library (1.4 GB/s here, sha256 0.8):
    a 7B checkpoint with its optimizer states (100 GB) is hashed at every save and resume."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def file_hashes(paths: list[str]) -> list[str]:
    """`file_hash` of each path, several files at once: zlib releases the GIL while it hashes, so a sharded checkpoint
    is hashed at the disk's speed rather than one core's."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(paths) or 1, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_hash, paths))


class WriteError(SystemExit):
    """A write that failed (disk full, file-size limit, permissions), as one line naming the file and the free space
    left there, instead of a traceback from deep inside safetensors or torch."""

    def __init__(self, path: str, e: BaseException, consequence: str = ""):
        code = re.search(r"os error (\d+)|code: (\d+)", str(e))  # safetensors and torch wrap the OSError in their own
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else os.strerror(int(code.group(1) or code.group(2)))
                  if code else (str(e).strip().splitlines() or [""])[0] or type(e).__name__)
        if not isinstance(e, OSError) and (limit := _file_size_limit()):
            reason += f" (this process may write files of at most {limit} bytes: ulimit -f)"
        tail = f". {consequence}" if consequence else ""
        super().__init__(f"error: cannot write {path}: {reason}; {free_space(path)}{tail}")


def _file_size_limit() -> int | None:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _failed_file(e: BaseException, folder: str) -> str:
    """The file under `folder` being written when `e` was raised (safetensors and torch remove a file they failed to write,
    and do not name it): the innermost traceback frame's path there, else the newest file, else `folder`."""
    tb, found = e.__traceback__, None
    while tb is not None:
        for v in tb.tb_frame.f_locals.values():
            if isinstance(v, str | os.PathLike) and str(v).startswith(folder + os.sep):
                found = str(v)
        tb = tb.tb_next
    if found:
        return found
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    return max(files, key=os.path.getmtime) if files else folder


def free_space(path: str) -> str:
    """'12.3 GB free on <the nearest existing folder above path>' (shutil.disk_usage); not a temp folder, which a
    failed write removes."""
    d = os.path.abspath(path)
    while (not os.path.isdir(d) or ".tmp" in os.path.basename(d)) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    try:
        return f"{shutil.disk_usage(d).free / 1e9:.1f} GB free on {d}"
    except OSError:
        return f"free space on {d} unknown"


@contextmanager
def writing(path: str, cleanup: str | None = None, consequence: str = ""):
    """Turn any failure inside the block into a WriteError naming `path` (for a folder: its newest file, the one
    being written), after removing `cleanup` (a temp file or folder), so nothing half-written stays to be trusted."""
    try:
        yield
    except (WriteError, KeyboardInterrupt):
        raise
    except Exception as e:
        if os.path.isdir(path):
            path = _failed_file(e, path)
        err = WriteError(path, e, consequence)  # before the cleanup: the file it names may be inside it
        if cleanup and os.path.isdir(cleanup):
            shutil.rmtree(cleanup, ignore_errors=True)
        elif cleanup and os.path.exists(cleanup):
            os.remove(cleanup)
        raise err from None


def write_atomic(path: str, lines) -> None:
    """Write `lines` (strings, streamed) to a temp file and rename it into place: a kill mid-write never leaves a
    truncated file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with writing(path, cleanup=tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    write_atomic(path, [json.dumps(obj)])


def _write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    write_atomic(path, (json.dumps(r) + "\n" for r in rows))


def write_json_checked(path: str, obj) -> None:
    """`write_json_atomic` of {"crc32": ..., "data": obj}, the CRC-32 over obj's canonical JSON: a cache file that
    `read_json_checked` can verify."""
    data = json.dumps(obj, sort_keys=True)
    write_json_atomic(path, {"crc32": f"{zlib.crc32(data.encode()):08x}", "data": obj})


def read_json_checked(path: str) -> object | None:
    """What `write_json_checked` wrote to `path`; None if there is no such file, or if it is damaged (not JSON, or its
    CRC-32 does not match): then it is named, removed and must be computed again."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            out = json.load(f)
        if zlib.crc32(json.dumps(out["data"], sort_keys=True).encode()) == int(out["crc32"], 16):
            return out["data"]
        problem = "its content does not match its CRC-32"
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        problem = f"{type(e).__name__}: {e}"
    print(f"warning: {path} is damaged ({problem}): computing it again", file=sys.stderr)
    with contextlib.suppress(FileNotFoundError):  # another process may have removed it first
        os.remove(path)
    return None


def clean_orphans(folder: str, min_age_s: float = 0.0) -> list[str]:
    """Remove the temp files of atomic writes (`*.tmp-PID`) in `folder` whose process is gone and that are at least
    `min_age_s` old (in a cache shared across machines a PID alive on another host is not visible). Returns what it
    removed."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.search(r"\.tmp-(\d+)$", name)
        path = os.path.join(folder, name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            if time.time() - os.path.getmtime(path) < min_age_s:
                continue
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def chunk_problem(root: str, c: int, n_rows: int) -> str | None:
    """Why offline-dataset chunk `c` in `root` cannot be used (missing, or its row count or CRC-32 differs from its check
    file), or None if it verifies. A chunk without its check file (written after it) was cut off and is never trained
    on."""
    path, check = os.path.join(root, f"chunk-{c:05d}.jsonl"), os.path.join(root, f"check-{c:05d}.json")
    if not os.path.exists(check):
        return "missing" if not os.path.exists(path) else f"{path} has no check file (its write was cut off)"
    try:
        with open(check) as f:
            want = json.load(f)
        with open(path, "rb") as f:
            rows = sum(1 for _ in f)
        if rows != want["rows"] or rows != n_rows:
            return f"{path} has {rows} rows, {want['rows']} when it was written ({n_rows} expected)"
        if file_hash(path) != want["crc32"]:
            return f"{path}: its bytes do not match the CRC-32 written with it"
    except FileNotFoundError:
        return f"{path} is missing"
    except (ValueError, KeyError, TypeError) as e:
        return f"{check} is damaged ({type(e).__name__}: {e})"
    return None


def chunks_to_build(root: str, mine: range, n_rows: dict) -> list[int]:
    """The chunks of `mine` that are not in `root` yet or do not verify (`chunk_problem`); each damaged one is named."""
    todo = []
    for c in mine:
        problem = chunk_problem(root, c, n_rows[c])
        if problem and problem != "missing":
            print(f"warning: offline dataset: {problem}: sampling it again", file=sys.stderr)
        todo += [c] if problem else []
    return todo


def claim_chunks(root: str, todo: list[int], n_rows: dict) -> Iterator[int]:
    """The chunks of `todo` this process must sample, each under an exclusive flock (lock-NNNNN) while it builds it, so two
    runs building one dataset split the work: a chunk held elsewhere is waited for, and taken over only if its holder
    died (the kernel drops a dead process's lock); one that then verifies is skipped."""
    waiting, built = [], 0
    for blocking in (False, True):
        for c in todo if not blocking else waiting:
            fd = os.open(os.path.join(root, f"lock-{c:05d}"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    waiting.append(c)
                    continue
                except OSError:  # a filesystem without locks: no sharing with other runs, the chunk is still verified
                    pass
                if chunk_problem(root, c, n_rows[c]) is None:
                    continue
                for name in os.listdir(root):  # a killed writer's temp files: nobody else writes this chunk now
                    if name.startswith((f"chunk-{c:05d}.jsonl.tmp-", f"check-{c:05d}.json.tmp-")):
                        os.remove(os.path.join(root, name))
                yield c
                built += 1
            finally:
                os.close(fd)  # releases the lock
    if todo:
        print(f"offline dataset: sampled {built} of the {len(todo)} missing chunks here, {len(todo) - built} by another run "
              f"({root})")


def write_chunk(root: str, c: int, rows: list[dict]) -> None:
    """Offline-dataset chunk `c` (atomic), then its check file: row count and CRC-32 (`chunk_problem` reads them)."""
    path = os.path.join(root, f"chunk-{c:05d}.jsonl")
    _write_jsonl_atomic(path, rows)
    failpoint("dataset.chunk.before_check")
    write_json_atomic(os.path.join(root, f"check-{c:05d}.json"), {"rows": len(rows), "crc32": file_hash(path)})


def build_offline_dataset(accelerator: Accelerator, model, tokenizer, problems: list[dict], *, model_name: str, task: str,
                          n: int, sampling: dict, max_new_tokens: int, gen_batch_size: int, seed: int, cache_dir: str,
                          train_file: str | None = None, offline_data: str | None = None,
                          save_to: str | None = None) -> list[dict]:
    """The DQO paper's offline dataset: for each training prompt, `n` samples from the reference `model` (named
    `model_name`, as --model) under `sampling` (temperature, top_p, top_k), graded 1/0, with the reference's per-token
    log-probs (`ref_logps`) and the sampler's (`sampler_logps`). `train_file`: the local file `problems` came from, if
    any.
    Cached under `cache_dir/offline/<key>/`, keyed by model, task, data, n, sampling and seed, so another script on the
    same model and task reuses it; in chunks written atomically (an interrupted build resumes) and shared round-robin
    across processes. With `offline_data` the rows come from that file instead (`import_offline_dataset`). Either way
    the dataset is also exported as one file (`save_to`, or offline.jsonl in its cache folder)."""
    if offline_data:
        return import_offline_dataset(accelerator, model, tokenizer, problems, path=offline_data, model_name=model_name,
                                      task=task, sampling=sampling, max_new_tokens=max_new_tokens,
                                      gen_batch_size=gen_batch_size, cache_dir=cache_dir, save_to=save_to)
    sampling = dict(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
    key_fields = dict(model=model_key(model_name, cache_dir, PRECISIONS[accelerator.mixed_precision]), task=task,
                      split="train", train_file=data_key(train_file, cache_dir), n_prompts=len(problems), n=n, **sampling,
                      max_new_tokens=max_new_tokens, seed=seed, chunk=gen_batch_size)
    root = os.path.join(cache_dir, "offline", cache_key(key_fields))
    os.makedirs(root, exist_ok=True)
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(root, "key.json"), key_fields)
    prompts = [encode_prompt(tokenizer, p["question"], task) for p in problems]
    answers = [p["answer"] for p in problems]
    plan = _chunk_plan(len(prompts), n, gen_batch_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    n_rows = {c: len(chunk) * n for c, chunk in enumerate(plan)}
    todo = chunks_to_build(root, range(rank, len(plan), world), n_rows)
    done_before = len(range(rank, len(plan), world)) - len(todo)
    bar = tqdm(total=len(range(rank, len(plan), world)), initial=done_before, desc="offline dataset",
               disable=not accelerator.is_local_main_process)
    with unsharded(model) as policy, reference_mode(policy):  # collective under sharding: every process enters
        for c in claim_chunks(root, todo, n_rows):  # another run building this dataset may take some of them
            rows = rollout_chunk(policy, tokenizer, prompts, answers, task, plan[c], n, sampling, max_new_tokens,
                                 seed * 1_000_003 + c)
            score_rows(policy, rows, tokenizer.pad_token_id, warp=sampling)
            for r in rows:
                r["ref_logps"] = r.pop("logps")
            write_chunk(root, c, rows)
            bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    rows = []
    for c in range(len(plan)):  # a cache edited by hand or damaged must not train on a reward that is not 0 or 1
        path = os.path.join(root, f"chunk-{c:05d}.jsonl")
        if problem := chunk_problem(root, c, n_rows[c]):  # damaged since it was built or verified: never trained on
            raise DataError(f"offline dataset: {problem}; run again to sample it again")
        for i, r in enumerate(_read_jsonl(path), 1):
            if r.get("reward") not in (0, 1) or isinstance(r.get("reward"), bool):
                raise DataError(f"{path}: row {i}: reward {r.get('reward')!r} is not 0 or 1; delete {root} to rebuild it")
            rows.append(r)
    acc = np.mean([r["reward"] for r in rows])
    accelerator.print(f"offline dataset: {len(rows)} responses to {len(prompts)} prompts, "
                      f"mean reward {acc:.3f}, truncated {np.mean([r['truncated'] for r in rows]):.3f} ({root})")
    export_offline_dataset(accelerator, rows, problems, root, save_to)
    return rows


# Importing samples made elsewhere (--offline_data) and exporting the built dataset (offline.jsonl, --save_offline_data)
EXPORT_FIELDS = ("prompt_idx", "truncated", "prompt_ids", "response_ids", "ref_logps", "sampler_logps")  # export adds


def read_offline_data(path: str) -> list[dict]:
    """The rows of an --offline_data file (JSONL, or Parquet as `datasets` writes it), checked: non-empty string
    `question`, `response` and `answer` (an int answer is taken as text), `reward` absent, null or 0/1. An export's
    `prompt_ids` and `response_ids` are kept (`_stored_ids`). DataError names the file, the 1-based row and the field."""
    if path.endswith(".parquet") and os.path.isfile(path):
        import pyarrow.parquet  # what `datasets` reads and writes Parquet with

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors are many kinds: a damaged file is one line, like a bad JSON row
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    elif path.endswith((".jsonl", ".json")) or not os.path.isfile(path):
        rows = _read_jsonl(path)
    else:
        raise DataError(f"{path}: unknown format; --offline_data takes a .jsonl or .parquet file")
    if not rows:
        raise DataError(f"{path}: no rows")
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{path}: row {i}"
        for name in ("question", "response", "answer"):
            v = row.get(name)
            if v is None:
                raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
            if name == "answer" and isinstance(v, int) and not isinstance(v, bool):
                v = row[name] = str(v)
            if not isinstance(v, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(v).__name__} ({v!r:.60})")
            if not v.strip():
                raise DataError(f"{where}: field {name!r} is empty")
        reward = row.get("reward")
        if reward is not None and (isinstance(reward, bool) or reward not in (0, 1)):
            raise DataError(f"{where}: field 'reward' is {reward!r}; it must be 0 or 1, or left out (the task's grader "
                            "then computes it)")
        ids = {k: row[k] for k in ("prompt_ids", "response_ids") if isinstance(row.get(k), list)
               and all(isinstance(t, int) and not isinstance(t, bool) for t in row[k])}
        out.append({"question": row["question"], "response": row["response"], "answer": row["answer"],
                    "reward": None if reward is None else float(reward), **(ids if len(ids) == 2 else {})})
    return out


def _stored_ids(row: dict, prompt_ids: list[int], tokenizer, max_new_tokens: int) -> list[int] | None:
    """An exported row's own response ids, when they are this tokenizer's: its prompt ids are the prompt as encoded
    now, its response ids decode to its text, and they fit --max_new_tokens. A sampled response's ids need not be the
    ones its text encodes to (a BPE merge the model did not make), so only these give back the very same tokens."""
    ids = row.get("response_ids")
    if not ids or row.get("prompt_ids") != prompt_ids or len(ids) > max_new_tokens:
        return None
    return ids if tokenizer.decode(ids, skip_special_tokens=True) == row["response"] else None


def import_offline_dataset(accelerator: Accelerator, model, tokenizer, problems: list[dict], *, path: str, model_name: str,
                           task: str, sampling: dict, max_new_tokens: int, gen_batch_size: int, cache_dir: str,
                           save_to: str | None = None) -> list[dict]:
    """The offline dataset from the file `path` (`read_offline_data`), in the form `build_offline_dataset` gives:
      - prompt_ids: `encode_prompt` of the question;
      - response_ids: `encode_response` of the text, as a sampled response (an export's own ids when they are this
        tokenizer's: `_stored_ids`). One over `max_new_tokens` is cut to its first `max_new_tokens` tokens, `truncated`
        and graded on what is left, as a sample cut off at the limit;
      - reward: the file's, else the task's grader; ref_logps: the reference's log-probs;
      - sampler_logps: the reference's log-probs under `sampling`: μ of imported rows is taken to be the reference
        sampling with these settings, as for self-sampled rows (DQO's --behavior sampler);
      - prompt_idx: questions numbered in order of first appearance.
    Questions not among `problems` are used anyway, with a warning naming the first. Cached like
    `build_offline_dataset`, keyed by the file's content, the model, the task and the settings above."""
    src = read_offline_data(path)
    sampling = dict(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
    key_fields = dict(model=model_key(model_name, cache_dir, PRECISIONS[accelerator.mixed_precision]), task=task,
                      offline_data=content_digest(path), n_rows=len(src), **sampling, max_new_tokens=max_new_tokens,
                      chunk=gen_batch_size)
    root = os.path.join(cache_dir, "offline", cache_key(key_fields))
    os.makedirs(root, exist_ok=True)
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(root, "key.json"), key_fields)
    known = {p["question"] for p in problems}
    prompt_idx = {}
    for r in src:
        prompt_idx.setdefault(r["question"], len(prompt_idx))
    unknown = [i for i, r in enumerate(src, 1) if r["question"] not in known]
    if unknown:
        accelerator.print(f"warning: {path}: {len(unknown)} of {len(src)} rows have a question that is not among the "
                          f"{len(problems)} training prompts of task {task} (first: row {unknown[0]}); they are "
                          "used as they are")
    chunks = [range(s, min(s + gen_batch_size, len(src))) for s in range(0, len(src), gen_batch_size)]
    rank, world = accelerator.process_index, accelerator.num_processes
    todo = [c for c in range(rank, len(chunks), world) if not os.path.exists(os.path.join(root, f"chunk-{c:05d}.jsonl"))]
    bar = tqdm(total=len(range(rank, len(chunks), world)), initial=len(range(rank, len(chunks), world)) - len(todo),
               desc="import offline data", disable=not accelerator.is_local_main_process)
    prompts = {}  # question -> prompt ids
    with unsharded(model) as policy, reference_mode(policy):  # collective under sharding: every process enters
        stops = stop_token_ids(policy, tokenizer)
        for c in todo:
            rows = []
            for i in chunks[c]:
                r = src[i]
                if r["question"] not in prompts:
                    prompts[r["question"]] = encode_prompt(tokenizer, r["question"], task)
                ids = _stored_ids(r, prompts[r["question"]], tokenizer, max_new_tokens)
                stored = ids is not None  # an export read back: its own tokens, `truncated` as it was
                ids = ids if stored else encode_response(tokenizer, r["response"])  # text, then the end-of-turn token
                truncated = ids[-1] not in stops if stored else len(ids) > max_new_tokens
                response, reward = r["response"], r["reward"]
                if truncated and not stored:  # what generation keeps of a response that reaches the limit: no stop token
                    ids = ids[:max_new_tokens]
                    response, reward = tokenizer.decode(ids, skip_special_tokens=True), None
                rows.append(dict(response_ids=ids, finish="length" if truncated else "stop", response=response,
                                 prompt_idx=prompt_idx[r["question"]], prompt_ids=prompts[r["question"]],
                                 answer=r["answer"], truncated=truncated, row=i + 1,
                                 reward=grade(response, r["answer"], task) if reward is None else reward))
            score_rows(policy, rows, tokenizer.pad_token_id, warp=sampling)
            for r in rows:
                r["ref_logps"] = r.pop("logps")
            _write_jsonl_atomic(os.path.join(root, f"chunk-{c:05d}.jsonl"), rows)
            bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    rows = [r for c in range(len(chunks)) for r in _read_jsonl(os.path.join(root, f"chunk-{c:05d}.jsonl"))]
    given = [(r, s) for r, s in zip(rows, src) if s["reward"] is not None and not r["truncated"]]
    disagree = sum(r["reward"] != grade(r["response"], r["answer"], task) for r, _ in given)
    n_trunc = sum(r["truncated"] for r in rows)
    accelerator.print(f"offline dataset: {len(rows)} responses to {len(prompt_idx)} prompts imported from {path}, mean "
                      f"reward {np.mean([r['reward'] for r in rows]):.3f}; {len(rows) - len(given)} rewards by the grader"
                      f"{f', {disagree} of the {len(given)} given rewards differ from it' if disagree else ''}; "
                      f"{n_trunc} responses over --max_new_tokens {max_new_tokens} truncated ({root})")
    questions = {i: q for q, i in prompt_idx.items()}
    export_offline_dataset(accelerator, rows, [{"question": questions[i]} for i in range(len(questions))], root, save_to)
    return rows


def export_offline_dataset(accelerator: Accelerator, rows: list[dict], problems: list[dict], root: str,
                           save_to: str | None = None) -> None:
    """Write the offline dataset as one JSONL file (`save_to`, else offline.jsonl in its cache folder `root`): per response
    the import schema (question, response, answer, reward), which --offline_data reads back, plus EXPORT_FIELDS. Main
    process only; atomic."""
    path = save_to or os.path.join(root, "offline.jsonl")
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _write_jsonl_atomic(path, [dict(question=problems[r["prompt_idx"]]["question"], response=r["response"],
                                        answer=r["answer"], reward=r["reward"], **{k: r[k] for k in EXPORT_FIELDS})
                                   for r in rows])
    OUTPUTS.append(("offline dataset", path))


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
TINY_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")  # `--model tiny`
TINY_REBUILD = "python benchmarks/tiny_reference.py --build assets/tiny --force"


def tiny_recipe_key() -> str:
    """The hash of the recipe assets/tiny was built from (its recipe.json), checked against the recipe
    benchmarks/tiny_reference.py holds now: a reference built from an older recipe is an error, not silently another
    model."""
    from benchmarks.tiny_reference import tiny_recipe  # the recipe only: a small dict beside the builder

    with open(os.path.join(TINY_SHIPPED, "recipe.json")) as f:
        shipped = cache_key(json.load(f))
    if shipped != cache_key(tiny_recipe()):
        raise ArgumentError(f"--model tiny: {TINY_SHIPPED} was built from another recipe than benchmarks/tiny_reference.py's: "
                           f"rebuild it with `{TINY_REBUILD}`")
    return shipped


def content_digest(path: str, memo_path: str | None = None) -> str:
    """sha256 of a file, or of a folder's files (names and bytes): an input's identity in cache keys, so a file or model
    changed in place never reuses results of the old one. Each file's hash is remembered by (path, size, ctime, inode),
    per process and in `memo_path`, so a 17 GB model is read once. Reports written beside a model (REPORT_FILES) are
    left out."""
    memo = {}
    if memo_path and os.path.exists(memo_path):
        with open(memo_path) as f:
            memo = json.load(f)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names if not REPORT_FILES.fullmatch(f))
    h, changed = hashlib.sha256(), False
    for file in files:
        st = os.stat(file)
        key = f"{os.path.abspath(file)}:{st.st_size}:{st.st_ctime_ns}:{st.st_ino}"  # any write or utime changes ctime
        if key not in memo and key not in _DIGESTS:
            fh = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    fh.update(chunk)
            _DIGESTS[key], changed = fh.hexdigest(), True
        h.update(f"{os.path.relpath(file, path)}:{memo.get(key) or _DIGESTS[key]}\n".encode())
    if memo_path and changed:
        os.makedirs(os.path.dirname(memo_path) or ".", exist_ok=True)
        write_json_atomic(memo_path, {**memo, **_DIGESTS})
    return h.hexdigest()[:16]


_DIGESTS: dict[str, str] = {}
REPORT_FILES = re.compile(r"eval-.*\.json|quality\.json")  # written into a model folder after it was saved


def model_key(model: str, cache_dir: str | None = None, precision: str = "fp32") -> str:
    """The reference's identity in cache keys: for tiny the hash of its recipe, for a hub id the id, for a local folder the
    digest of its contents (`content_digest`): a model saved again in place never reuses results of the old one, and a
    copy elsewhere reuses them. A bf16 run's samples and log-probs differ from an fp32 run's, so `precision` bf16 is
    part of the identity ("@bf16"); fp32 keys are the ones caches have always had."""
    if model == "tiny":
        key = f"tiny/shipped-{tiny_recipe_key()}"  # "shipped-": the key the shipped weights have always had
    elif os.path.isdir(path := os.path.expanduser(model)):
        key = f"local:{content_digest(path, cache_dir and os.path.join(cache_dir, 'digests.json'))}"
    else:
        key = model
    return key if precision == "fp32" else f"{key}@{precision}"


def data_key(path: str | None, cache_dir: str | None = None) -> str | None:
    """The identity of a local JSONL data file in cache keys (its contents' digest); None for the hub or `arith`."""
    return content_digest(path, cache_dir and os.path.join(cache_dir, "digests.json")) if path else None


def load_model_and_tokenizer(args, accelerator: Accelerator | None = None, trainable: bool = True):
    """The model and tokenizer --model names: `tiny` (assets/tiny), a hub id or a local save_pretrained folder; the
    tokenizer gets a pad token if it has none. `args.precision` fp32 loads fp32, bf16 the stored dtype; a `trainable`
    model gets fp32 master weights (`master_weights`) unless the launch shards it (FSDP2's `prepare` upcasts them
    itself, on each process's shard only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model
    if args.model == "tiny":
        tiny_recipe_key()  # a stale assets/tiny stops here
        path = TINY_SHIPPED
    elif path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"--model {path}: no such directory (a local model must be a save_pretrained folder)")
    dtype = "auto" if args.precision == "bf16" else torch.float32  # "auto": the dtype the weights were saved in
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if getattr(args, "gradient_checkpointing", False):
        # renamed in recent transformers; a GPU node's own older install has only gradient_checkpointing_enable
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.config.use_cache = False
    if getattr(args, "lora_r", 0):
        model = add_lora(model, args.lora_r)
    sharded = accelerator is not None and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    if trainable and not sharded:
        master_weights(model)
    return model, tokenizer


def master_weights(model) -> None:
    """Trained weights in fp32, in place; frozen ones (a LoRA base) keep their dtype. Under bf16 autocast the forward
    runs in bf16 either way, but AdamW's updates at the papers' lr (1e-7) are below bf16's resolution (2^-8 of the
    weight): on bf16 weights most of them would round to no change at all."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def add_lora(model, r: int):
    """LoRA adapters on every linear layer of a causal LM or a bare backbone (peft, imported only here); every other weight
    frozen. B starts at zero, so the model equals its base until trained; the reference is the same model with the
    adapter disabled."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))


def value_backbone(causal_lm, lora_r: int = 0):
    """A copy of `causal_lm`'s base transformer without its LM head (LlamaForCausalLM -> LlamaModel), a LoRA policy's
    adapters left out, for a value network. With `lora_r` the copy is frozen and gets LoRA adapters of its own."""
    if hasattr(causal_lm, "unload"):  # a LoRA policy (load_model_and_tokenizer under --lora_r): its base alone
        backbone = copy.deepcopy(causal_lm).unload().base_model
    else:
        backbone = copy.deepcopy(causal_lm.base_model)
    return add_lora(backbone, lora_r) if lora_r else backbone


class ValueModel(torch.nn.Module):
    """V_φ of DRO and DQO: a copy of the reference's backbone (`value_backbone`) and a scalar head, zero-initialised so V ≡
    0 before training. forward gives (B, T) values aligned with `token_logprobs`: values[:, t] = V(s_t), the state
    before token t, read from the hidden state at t − 1 (0 at t = 0). Saved as the backbone in transformers' format plus
    value_head.safetensors; `from_pretrained` reads both."""

    def __init__(self, causal_lm, lora_r: int = 0, copy_backbone: bool = True):
        super().__init__()
        # e.g. LlamaModel: loadable on its own with AutoModel. from_pretrained hands over a freshly loaded backbone, which
        # is used as is: a copy would hold the weights twice while loading
        self.backbone = value_backbone(causal_lm, lora_r) if copy_backbone else causal_lm
        self.head = torch.nn.Linear(causal_lm.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self._no_split_modules = getattr(self.backbone, "_no_split_modules", None)  # FSDP's layer-wise auto-wrap reads it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        v = self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # (B, T): V of the state after token t, fp32
        return torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], dim=1)  # (B, T): V of the state before token t

    def save_pretrained(self, path: str, state_dict: dict | None = None, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        state_dict = self.state_dict() if state_dict is None else state_dict
        self.backbone.save_pretrained(path, safe_serialization=safe_serialization, state_dict={
            k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")})
        save_file({k.removeprefix("head."): v.contiguous() for k, v in state_dict.items() if k.startswith("head.")},
                  os.path.join(path, "value_head.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32) -> "ValueModel":
        from safetensors.torch import load_file
        from transformers import AutoModel

        model = cls(AutoModel.from_pretrained(path, dtype=dtype), copy_backbone=False)
        model.head.load_state_dict(load_file(os.path.join(path, "value_head.safetensors")))
        return model.to(dtype)


def merge_lora(model):
    """Fold LoRA adapters into their base weights, in place, in `model` (a LoRA policy) or a direct child (a value model's
    backbone): returns the merged model, loadable without peft, or None if there are none. Call it once training is
    done."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    merged = None
    for name, child in model.named_children():
        if hasattr(child, "merge_and_unload"):
            setattr(model, name, child.merge_and_unload())
            merged = model
    return merged


def frozen_copy(model, accelerator: Accelerator):
    """A frozen copy of a not yet prepared model for inference on this process alone (a reference, a rollout policy):
    eval mode, no gradients, on this process's device, in bf16 under bf16 mixed precision (17 GB at 7B, not 34)."""
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
    return copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device, dtype=dtype)


@contextmanager
def reference_mode(model):
    """Context in which `model` computes the reference policy: in eval mode (no dropout), with its adapters off if it
    is a LoRA model. The model's train/eval mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------------
# Run plumbing: accelerator, seeding, batches, checkpoints, logging
# ---------------------------------------------------------------------------------------------------------------------
def arg(default, help: str):
    """A dataclass field with a one-line doc that HfArgumentParser shows in --help."""
    return field(default=default, metadata={"help": help})


TASK_MAX_NEW_TOKENS = {"arith": 64, "gsm8k": 512, "math": 1024, "aime24": 2048}
# Defaults every algorithm shares: the embedded experiment's, and the paper's (any --model but tiny)
RUN_DEFAULTS = {
    "tiny": dict(task="arith", n_samples=8, gen_batch_size=256, eval_seeds=1, max_steps=0, warmup_steps=0),
    # the DQO paper: GSM8K; 20 samples per prompt (Table 8: 150000 = 7500 x 20); sampled accuracy as mean ± std over 5
    # seeds. The generation batch is each algorithm's (PAPER): what fits an 80 GB GPU at 7B
    "paper": dict(task="gsm8k", n_samples=20, eval_seeds=5, max_steps=0, warmup_steps=0),
}


def resolve_defaults(args, tiny: dict, paper: dict) -> None:
    """Fill the fields left at None: with `--model tiny` the embedded experiment's values (`tiny`, RUN_DEFAULTS["tiny"]),
    otherwise the paper's (`paper`, RUN_DEFAULTS["paper"])."""
    which = "tiny" if args.model == "tiny" else "paper"
    for k, v in {**RUN_DEFAULTS[which], **(tiny if which == "tiny" else paper)}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.max_new_tokens is None and args.task in TASKS:
        args.max_new_tokens = TASK_MAX_NEW_TOKENS[args.task]


def _default_note(name: str, default, tiny: dict | None, paper: dict | None) -> str:
    """What --help says a flag defaults to: both values when the model decides (None in Args, filled by
    `resolve_defaults`), else the one default; nothing for a switch."""
    if default is None and tiny is not None:
        t = {**RUN_DEFAULTS["tiny"], **tiny}.get(name)
        p = {**RUN_DEFAULTS["paper"], **(paper or {})}.get(name)
        t, p = (f"{v:.4g}" if isinstance(v, float) else v for v in (t, p))
        if t is not None and t == p:
            return f"default: {t}"
        if t is not None or p is not None:
            return f"tiny: {'unset' if t is None else t}, paper: {'unset' if p is None else p}"
    if default is None or isinstance(default, bool):
        return ""
    return f"default: {default!r}" if isinstance(default, str) else f"default: {default:.4g}" if isinstance(
        default, float) else f"default: {default}"


class _ArgParser(argparse.ArgumentParser):
    """argparse, with a near miss named in the error: `unrecognized argument --lrr (did you mean --lr?)`, exit 2."""

    def parse_args(self, argv=None, namespace=None):
        ns, unknown = self.parse_known_args(argv, namespace)
        if unknown:
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            bad = next((u for u in unknown if u.startswith("-")), unknown[0])
            near = difflib.get_close_matches(bad.split("=")[0], flags, n=1, cutoff=0.6)
            self.error(f"unrecognized argument {bad}" + (f" (did you mean {near[0]}?)" if near else ""))
        return ns


def build_parser(Args, tiny: dict | None = None, paper: dict | None = None):
    """The command line of a dataclass of `arg` fields: booleans are switches (`--resume`, not `--resume True`), and
    each flag's help ends with its default, or its two defaults (`tiny: ..., paper: ...`) when the model decides."""
    import typing
    from dataclasses import fields

    parser = _ArgParser(prog=os.path.basename(sys.argv[0]), allow_abbrev=False,
                        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=32, width=120))
    for f in fields(Args):
        help_text = f.metadata.get("help", "")
        note = "" if "default" in help_text else _default_note(f.name, f.default, tiny, paper)  # one note, not two
        help_text = f"{help_text} ({note})" if note else help_text
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # `int | None` -> int
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text.replace("%", "%%"))
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, metavar=kind.__name__.upper(),
                                help=help_text.replace("%", "%%"))
    return parser


def _one_line_errors(kind, value, tb) -> None:
    """sys.excepthook: bad data found once the run is going (no pairs, too few examples, a hub dataset out of reach)
    ends as one `error:` line, like a bad flag, not a traceback; any other exception keeps its traceback."""
    if issubclass(kind, DataError):
        print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


def parse_args(Args, tiny: dict | None = None, paper: dict | None = None):
    """Parse the command line into `Args` and fill the model-dependent defaults (`resolve_defaults`; eval.py passes no
    `tiny`/`paper`). Remembers which settings differ from the file's defaults, for `describe_run`."""
    args = Args(**vars(build_parser(Args, tiny, paper).parse_args()))
    sys.excepthook = _one_line_errors
    if tiny is not None:
        base = Args(model=args.model, task=args.task)  # the defaults this model and task get
        resolve_defaults(args, tiny, paper)
        resolve_defaults(base, tiny, paper)
    else:
        base = Args()
    args._changed = {k: v for k, v in vars(args).items() if not k.startswith("_") and getattr(base, k, None) != v}
    return args


def describe_run(args, extra: str = "") -> None:
    """One line, on the first process, of what the run is: model, task, data source, and the settings given that
    differ from the file's defaults."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    data = getattr(args, "offline_data", None)
    source = f"imported from {data}" if data else "self-sampled by the reference" if hasattr(args, "n_samples") else None
    changed = [f"--{k}" if v is True else f"--{k} {v!r}" if isinstance(v, str) else f"--{k} {v}"
               for k, v in getattr(args, "_changed", {}).items() if k not in ("model", "task")]
    print(f"run: model {args.model}, task {args.task}" + (f", offline data {source}" if source else "") + extra
          + ("; settings changed from the defaults: " + ", ".join(changed) if changed else "; every other setting at its "
             "default"), flush=True)


OUTPUTS: list[tuple[str, str]] = []  # (what, path) of outputs written outside --output_dir, for `report_outputs`


def report_outputs(accelerator: Accelerator, output_dir: str) -> None:
    """The run's last lines: where every output went (each entry of --output_dir, and the exported offline dataset)."""
    if not accelerator.is_main_process:
        return
    lines = [f"outputs in {os.path.abspath(output_dir)}:"]
    for name in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []:
        lines.append(f"  {name}{'/' if os.path.isdir(os.path.join(output_dir, name)) else ''}")
    lines += [f"{what}: {os.path.abspath(path)}" for what, path in dict.fromkeys(OUTPUTS)]
    print("\n".join(lines), flush=True)


# Rules for validate_args: flag -> (test of its value, what it must be)
def at_least(lo, unset_ok: bool = False) -> tuple:
    return (lambda v: (unset_ok and v is None) or (isinstance(v, int | float) and v >= lo),
            f"≥ {lo}" + (" (or unset)" if unset_ok else ""))


def positive(unset_ok: bool = False) -> tuple:
    return (lambda v: (unset_ok and v is None) or (isinstance(v, int | float) and math.isfinite(v) and v > 0),
            "> 0" + (" (or unset)" if unset_ok else ""))


def between(lo, hi, lo_open: bool = False) -> tuple:
    return (lambda v: isinstance(v, int | float) and (lo < v if lo_open else lo <= v) and v <= hi,
            f"in {'(' if lo_open else '['}{lo}, {hi}]")


def one_of(*choices) -> tuple:
    return (lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))


SHARED_RULES = {
    "task": one_of(*TASKS), "n_train_prompts": at_least(1, unset_ok=True), "n_test": at_least(1, unset_ok=True),
    "seed": at_least(0), "n_samples": at_least(1), "temperature": positive(), "top_p": between(0, 1, lo_open=True),
    "top_k": at_least(0), "max_new_tokens": at_least(1), "gen_batch_size": at_least(1), "epochs": at_least(1, True),
    "lr": positive(), "warmup_steps": at_least(0), "per_device_batch_size": at_least(1),
    "global_batch_size": at_least(1, True), "grad_accum": at_least(1, True), "max_grad_norm": positive(),
    "eval_every": at_least(0), "eval_seeds": at_least(0), "save_every": at_least(0), "max_steps": at_least(0),
    "lora_r": at_least(0), "beta": positive(),
}


class ArgumentError(SystemExit):
    """A bad flag or input file, found before any work: the process prints "error: ..." and exits with status 1."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def validate_args(args, rules: dict | None = None) -> None:
    """Check every flag right after parsing, before anything is loaded or written, and derive --grad_accum from
    --global_batch_size. `rules` (flag -> (test, what it must be)) are the file's own, over SHARED_RULES. Then the
    model, the input files, the tracker, the cache dir and the output dir (`check_*`). Raises ArgumentError naming the
    flag, the value and what it must be."""
    check_rules(args, {**SHARED_RULES, **(rules or {})})
    if not args.epochs and not args.max_steps:
        raise ArgumentError("--epochs or --max_steps must be set: nothing to train")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch and torchrun
    per_step = args.per_device_batch_size * world  # one micro-batch on every process
    if args.global_batch_size is None:
        args.grad_accum = args.grad_accum or 1
        args.global_batch_size = per_step * args.grad_accum
    elif args.global_batch_size % per_step or (args.grad_accum and args.grad_accum != args.global_batch_size // per_step):
        raise ArgumentError(f"--global_batch_size {args.global_batch_size} must equal --per_device_batch_size "
                            f"{args.per_device_batch_size} x {world} processes x --grad_accum"
                            f"{f' {args.grad_accum}' if args.grad_accum else ' (a whole number)'}")
    else:
        args.grad_accum = args.global_batch_size // per_step
    check_model_arg(args.model)
    check_task_files(args)
    check_offline_data(args)
    check_report_to(args.report_to)
    check_writable_dir("--cache_dir", args.cache_dir)
    check_output_dir(args.output_dir, args.resume)
    describe_run(args)


def check_rules(args, rules: dict) -> None:
    """Each flag of `args` named in `rules` (flag -> (test, what it must be)) passes its test, test(value). A file
    without the flag skips its rule. Rules that relate two flags are the algorithm file's own small checks."""
    for name, (ok, want) in rules.items():
        if hasattr(args, name) and not ok(getattr(args, name)):
            raise ArgumentError(f"--{name} {getattr(args, name)!r}: must be {want}")


def check_model_arg(model: str) -> None:
    if model == "tiny":
        tiny_recipe_key()  # assets/tiny is built from the current recipe
        return
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ArgumentError(f"--model {model}: the folder has no config.json (a save_pretrained folder is expected)")
    elif os.path.exists(path):
        raise ArgumentError(f"--model {model}: a file; a model is a save_pretrained folder or a hub id")
    elif path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise ArgumentError(f"--model {model}: no such folder, and not a hub id (ORG/NAME, e.g. google/gemma-1.1-7b-it)")


def check_task_files(args) -> None:
    """Local data files fit the task: each is read and parsed now (errors name the file and row), not after hours."""
    for split, path, limit in (("train", getattr(args, "train_file", None), getattr(args, "n_train_prompts", None)),
                               ("test", args.test_file, args.n_test)):
        if path is None:
            continue
        if args.task == "arith":
            raise ArgumentError(f"--{split}_file {path}: task arith generates its own problems; pass --task gsm8k, "
                                "math or aime24 with a data file")
        try:
            problems = load_task(args.task, split, path)
        except (DataError, ValueError) as e:
            raise ArgumentError(f"--{split}_file: {e}") from None
        if not problems:
            raise ArgumentError(f"--{split}_file {path}: no problems in the file")


def check_offline_data(args) -> None:
    """--offline_data is read and checked row by row now (`read_offline_data`); --save_offline_data can be written and
    is not the file being imported."""
    path, save = getattr(args, "offline_data", None), getattr(args, "save_offline_data", None)
    if path:
        try:
            read_offline_data(path)
        except DataError as e:
            raise ArgumentError(f"--offline_data: {e}") from None
    if save:
        if os.path.isdir(save):
            raise ArgumentError(f"--save_offline_data {save}: a folder; a .jsonl file path is expected")
        if path and os.path.abspath(save) == os.path.abspath(path):
            raise ArgumentError(f"--save_offline_data {save}: the file --offline_data reads; choose another path")
        check_writable_dir("--save_offline_data", os.path.dirname(os.path.abspath(save)))


def check_writable_dir(flag: str, path: str) -> None:
    """`path` is a folder this process can write in, or one it can create: its nearest existing ancestor is a writable
    folder. Nothing is created here."""
    if not path:
        raise ArgumentError(f"{flag} is empty")
    probe = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ArgumentError(f"{flag} {path}: cannot be created, {probe} is a file")
    try:  # a real write, removed at once: permission bits say nothing to root, or of a read-only or virtual file system
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-probe-"))
    except OSError as e:
        raise ArgumentError(f"{flag} {path}: cannot be {'written' if probe == os.path.abspath(path) else 'created'}: "
                            f"{probe}: {e.strerror}") from None


TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab")  # = their packages


def check_report_to(report_to: str) -> None:
    import importlib.util

    for tracker in filter(None, (t.strip() for t in (report_to or "").split(","))):
        if tracker not in TRACKERS:
            raise ArgumentError(f"--report_to {tracker}: unknown tracker ({', '.join(TRACKERS)}; empty for none)")
        if importlib.util.find_spec(tracker) is None:
            raise ArgumentError(f"--report_to {tracker}: the {tracker} package is not installed (pip install {tracker}), "
                                "or pass --report_to '' for no tracker")


RUN_FILES = ("run.json", "metrics.jsonl", "results.json", "checkpoint", "checkpoint.old", "model")
CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")  # the current one, the one before, the one being saved
RESUME_MAY_CHANGE = ("resume", "max_steps", "epochs", "save_every", "eval_every", "report_to", "dist_timeout",
                     "skip_memory_check")  # how long and how often, not what: a resumed run may change these flags


def check_output_dir(output_dir: str, resume: bool) -> None:
    """A fresh run needs an output dir with no run in it; --resume a checkpoint there (sizes checked here, CRC-32 in
    `load_checkpoint`) or the run.json of a run that stopped before its first one (it starts again in place). The first
    process then claims the folder (`claim_output_dir`), checks again under the claim and removes killed runs' temp
    files."""
    if not output_dir:
        raise ArgumentError("--output_dir is empty")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ArgumentError(f"--output_dir {output_dir}: a file, not a folder")
    main = os.environ.get("RANK", "0") == "0"  # accelerate launch and torchrun set it; only the first process claims
    for claimed in (False, True) if main else (False,):
        if claimed:
            claim_output_dir(output_dir)
        if resume:
            if checkpoint_path(output_dir, hashes=False, quiet=claimed or not main) is None:
                run = _read_run_json(output_dir)
                if not (isinstance(run, dict) and "algo" in run and "args" in run):
                    raise ArgumentError(f"--resume: no complete checkpoint in {output_dir} (expected "
                                        f"{os.path.join(output_dir, 'checkpoint', 'trainer_state.json')}) and no run.json "
                                        "of a run to start again in place; drop --resume for a fresh run in a new "
                                        "--output_dir")
                if os.path.exists(os.path.join(output_dir, "model")) and "final" in (_read_run_json(
                        output_dir, "results.json") or {}):
                    raise ArgumentError(f"--resume: the run in {output_dir} has finished (model/ and the final results "
                                        "are there) and kept no checkpoint; choose a new --output_dir")
        elif os.path.isdir(output_dir) and (found := [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]):
            raise ArgumentError(f"--output_dir {output_dir} holds another run ({', '.join(found)}): pass --resume to go on "
                                "with it, or choose a new --output_dir")
    if main:
        for path in clean_orphans(output_dir):
            print(f"removed {path}, left by a killed run")


def _read_run_json(output_dir: str, name: str = "run.json"):
    try:
        with open(os.path.join(output_dir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


_CLAIMS: dict[str, int] = {}  # output dir -> the open file descriptor holding its lock


def claim_output_dir(output_dir: str) -> None:
    """Make this process the only writer of `output_dir`: an exclusive flock on `output_dir/.lock`, which names its holder.
    A second launch stops with an error naming it. The kernel drops the lock when its process dies (even SIGKILL), so a
    lock left by a dead run is taken over, with a note. Released at exit."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(output_dir, ".lock"))
    if path in _CLAIMS:  # this process claimed it already (e.g. two runs in one test process, one after the other)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ArgumentError(f"--output_dir {output_dir} is in use by another run ({holder or 'starting'}, see "
                            f"{path}): wait until it ends, or choose a new --output_dir") from None
    except OSError as e:  # a filesystem without locks (some NFS mounts): go on, unprotected, and say so
        print(f"warning: cannot lock {path} ({e.strerror}): nothing stops a second launch into {output_dir}",
              file=sys.stderr)
    if holder:  # the lock was free but not emptied: its holder died without its exit handler
        print(f"{output_dir}: the run that held it ({holder}) is gone; taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(sys.argv)}\n".encode(), 0)
    _CLAIMS[path] = fd
    atexit.register(_release_output_dir, path)


def _release_output_dir(path: str) -> None:
    fd = _CLAIMS.pop(path, None)
    if fd is not None:
        os.ftruncate(fd, 0)  # empty: the next run takes it without a note
        os.close(fd)  # releases the lock


def check_same_run(output_dir: str, algo: str, config: dict) -> None:
    """--resume goes on with the run in `output_dir` only if its run.json records this algorithm and these flags
    (except RESUME_MAY_CHANGE); otherwise an error names every field that differs."""
    run = _read_run_json(output_dir)
    if run is None:
        return
    diff = [f"the algorithm ({run.get('algo')} there, {algo} here)"] if run.get("algo") != algo else []
    old = run.get("args", {})
    diff += [f"--{k} ({old.get(k, 'unset')!r} there, {config.get(k, 'unset')!r} here)" for k in sorted(set(old) | set(config))
             if k not in RESUME_MAY_CHANGE and old.get(k) != config.get(k)]
    if diff:
        raise ArgumentError(f"--resume: {os.path.join(output_dir, 'run.json')} is another run's: {', '.join(diff)} "
                            "differ; resume with that run's flags, or choose a new --output_dir")


PRECISIONS = {"no": "fp32", "fp32": "fp32", "bf16": "bf16"}  # accelerate's mixed_precision names -> ours
# The versions whose FSDP2 internals `unsharded` and the sharded tests were run against (requirements.txt's floors)
FSDP2_TESTED = {"torch": (2, 13), "accelerate": (1, 16)}


def resolve_precision(model: str, precision: str | None) -> str:
    """fp32 or bf16 for this run. An accelerate launch's mixed_precision (ACCELERATE_MIXED_PRECISION, from its
    --config_file or --mixed_precision) is what the user launched, so it is never overridden: --precision may only
    repeat it. Without a launch: --precision, else fp32 for the tiny CPU default and bf16 for any other model (the
    papers' 7B runs; fp32 weights would double every gathered copy, frozen copy and KV cache)."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision is not None and precision not in ("fp32", "bf16"):
        raise ArgumentError(f"--precision {precision!r}: must be one of 'fp32', 'bf16'")
    if launched:
        if launched not in PRECISIONS:
            raise ArgumentError(f"the accelerate launch asks for mixed_precision {launched}: only bf16 or no (fp32) is "
                                "supported (fp16 needs loss scaling, which these scripts do not do)")
        if precision is not None and precision != PRECISIONS[launched]:
            raise ArgumentError(f"--precision {precision} contradicts the accelerate launch's mixed_precision {launched}: "
                                "drop --precision, or launch with --mixed_precision "
                                f"{'no' if precision == 'fp32' else precision}")
        return PRECISIONS[launched]
    return precision or ("fp32" if model == "tiny" else "bf16")


def check_versions(sharding: str | None, fsdp_version: int, versions: dict | None = None) -> None:
    """Under FSDP2, `unsharded` reads private fully_shard state and `token_logprobs` needs accelerate's root wrapping (an
    older one frees the head's weight after forward): stop at start, not at the first evaluation. `versions` defaults to
    the installed ones."""
    if sharding != "FSDP" or fsdp_version != 2:
        return
    import accelerate

    versions = versions or {"torch": torch.__version__, "accelerate": accelerate.__version__}
    for name, version in versions.items():
        have = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
        need = FSDP2_TESTED[name]
        if have < need:
            raise ArgumentError(f"FSDP2 (configs/fsdp.yaml) needs {name} >= {need[0]}.{need[1]} (the version whose FSDP2 "
                                f"internals this code was tested with); found {version}. Upgrade {name}, or launch "
                                "with configs/deepspeed_zero3.yaml")


ALGOS = ("rs", "dpo", "kto", "dro", "dqo", "spo")


def preflight(args, algo: str, accelerator: Accelerator, sharding: str | None) -> str:
    """This launch's memory plan on its GPUs (`memory_preflight`) and host RAM (`host_ram_preflight`), from the
    model's config alone; stops the run if either will not fit, unless --skip_memory_check."""
    config = read_model_config(args.model)
    device = accelerator.device
    device_bytes = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
    online = round(args.per_device_batch_size * args.online_fraction) if algo == "spo" else 0
    gpu = memory_preflight(algo, config, accelerator.num_processes, sharding, args.precision, args.per_device_batch_size,
                           args.gen_batch_size, args.max_new_tokens, args.lora_r, device_bytes, args.skip_memory_check,
                           online_rows=online, n_samples=args.n_samples)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    host = host_ram_preflight(algo, config, local, sharding, args.precision, args.lora_r,
                              os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), args.skip_memory_check)
    return f"{gpu}\n{host}"


def setup_accelerator(args, algo: str) -> Accelerator:
    """The Accelerator this launch asked for, checked, with trackers and seeding (per-rank offset); sets `args.precision`
    (`resolve_precision`). What it decides, and why:
      - bf16 reaches accelerate as mixed_precision (autocast; under FSDP a policy of bf16 compute, fp32 reduction over
        fp32 master weights);
      - under FSDP gradient accumulation reduce-scatters every micro-batch (`sync_each_batch`): with no_sync FSDP2 keeps
        each layer's unsharded gradient, a whole model per GPU (+34 GB at 7B); DDP's gradients are full-size either way;
      - the process-group timeout is --dist_timeout: the offline dataset, sampled by each process alone, has no
        collective for hours, and NCCL's 10-minute default would kill the run;
      - the memory preflight (`preflight`) runs before any weights load; what was launched is printed and written to
        run.json."""
    from datetime import timedelta

    from accelerate.utils import FullyShardedDataParallelPlugin, GradientAccumulationPlugin, InitProcessGroupKwargs

    # Several processes without CUDA (e.g. `accelerate launch --multi_gpu` on a CPU machine): gloo needs cpu=True,
    # or accelerate silently runs each process as a world of one.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = not torch.cuda.is_available() and world > 1
    # accelerate launch --config_file configs/fsdp.yaml (or deepspeed_zero3.yaml) sets this; without GPUs accelerate
    # either refuses the plugin or quietly runs plain data parallel (each process holding the whole model) instead
    sharding = next((n for n in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{n}", "").lower() == "true"), None)
    fsdp_version = int(os.environ.get("FSDP_VERSION", "1")) if sharding == "FSDP" else 0
    args.precision = resolve_precision(args.model, args.precision)
    check_versions(sharding, fsdp_version)
    no_sharding = (f"the accelerate config asks for {sharding}, which needs GPUs: accelerate does not shard on CPU "
                   "processes. On a CPU machine run `python SCRIPT.py` (one process) or `accelerate launch --multi_gpu "
                   "--num_processes N SCRIPT.py` (N gloo processes, data parallel); configs/fsdp.yaml is for GPU nodes")
    kwargs = {}
    if sharding == "FSDP" and args.precision == "bf16":
        from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if fsdp_version == 2 else
                  MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16))
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(mixed_precision_policy=policy)  # the rest from the env
    accumulation = GradientAccumulationPlugin(num_steps=getattr(args, "grad_accum", 1) or 1,
                                              sync_each_batch=sharding == "FSDP", sync_with_dataloader=False)
    try:
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))
        accelerator = Accelerator(gradient_accumulation_plugin=accumulation, log_with=args.report_to or None,
                                  mixed_precision="bf16" if args.precision == "bf16" else "no", project_dir=args.output_dir,
                                  cpu=cpu, kwargs_handlers=[timeout], **kwargs)
    except RuntimeError as e:  # e.g. FSDP1 with sync_module_states: "no available devices"
        if sharding and not torch.cuda.is_available():
            raise ArgumentError(no_sharding) from e
        raise
    if sharding and accelerator.distributed_type.name != sharding:
        raise ArgumentError(f"{no_sharding} (accelerate set up {accelerator.distributed_type.name} instead)")
    if accelerator.num_processes != world:
        raise RuntimeError(f"{world} processes were launched, but accelerate runs a world of {accelerator.num_processes}")
    set_seed(args.seed + accelerator.process_index)
    torch.use_deterministic_algorithms(False)
    config = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in asdict(args).items()}
    if args.report_to:
        accelerator.init_trackers(algo, config=config)
    launch = dict(precision=args.precision, world_size=accelerator.num_processes,
                  sharding=f"FSDP{fsdp_version}" if sharding == "FSDP" else sharding or "none",
                  per_device_batch_size=getattr(args, "per_device_batch_size", None),
                  grad_accum=getattr(args, "grad_accum", None), global_batch_size=getattr(args, "global_batch_size", None),
                  threads=torch.get_num_threads())  # float results reproduce exactly only at the same thread count
    accelerator.print(f"{algo}: {accelerator.num_processes} process(es), device {accelerator.device}, "
                      + ", ".join(f"{k} {v}" for k, v in launch.items() if k != "world_size" and v is not None))
    if getattr(args, "resume", False):  # before run.json is written again: only the run that wrote it goes on
        check_same_run(args.output_dir, algo, config)
    if algo in ALGOS:  # before any weights load: a launch that cannot fit stops here, not hours later
        accelerator.print(preflight(args, algo, accelerator, sharding))
    if accelerator.is_main_process:  # what ran: tests read the world size from here
        os.makedirs(args.output_dir, exist_ok=True)
        write_json_atomic(os.path.join(args.output_dir, "run.json"), {"algo": algo, **launch, "args": config})
    return accelerator


def iterate_batches(examples: list, per_device_batch_size: int, grad_accum: int, seed: int, epoch: int,
                    accelerator: Accelerator, start: int = 0) -> Iterator[tuple[int, list]]:
    """This process's micro-batches of one epoch, as (index, examples), from index `start` on (for resume).
    The permutation depends only on (seed, epoch); each global batch of `per_device_batch_size * processes` is cut
    into per-process slices, so one process with batch 2b sees the same data per step as two with batch b.
    Incomplete global batches and accumulation windows at the end of an epoch are dropped."""
    world, rank = accelerator.num_processes, accelerator.process_index
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(len(examples), generator=g).tolist()
    global_bs = per_device_batch_size * world
    n_batches = len(perm) // global_bs // grad_accum * grad_accum
    for b in range(start, n_batches):
        idx = perm[b * global_bs + rank * per_device_batch_size : b * global_bs + (rank + 1) * per_device_batch_size]
        yield b, [examples[i] for i in idx]


def plan_steps(n_examples: int, args, accelerator: Accelerator) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in all) for `n_examples`. Rows left over after the last whole global
    batch of an epoch are dropped. With fewer examples than one global batch, each step takes all of them that fill a
    micro-batch on every process (fewer accumulation steps; a warning says so, and run.json records it). With
    --epochs unset, as many epochs as --max_steps needs."""
    per_step = args.per_device_batch_size * accelerator.num_processes  # one micro-batch on every process
    micro = n_examples // per_step
    if micro == 0:
        raise DataError(f"{n_examples} training examples do not fill one micro-batch of {args.per_device_batch_size} on "
                         f"each of {accelerator.num_processes} processes; lower --per_device_batch_size")
    if micro < args.grad_accum:
        accelerator.print(f"warning: {n_examples} training examples are less than one global batch of "
                          f"{args.global_batch_size}: each step takes {micro * per_step} ({micro} accumulation steps)")
        args.grad_accum = accelerator.gradient_accumulation_steps = micro
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, "run.json")) as f:
                run = json.load(f)
            write_json_atomic(os.path.join(args.output_dir, "run.json"),
                              dict(run, effective={"grad_accum": micro, "global_batch_size": micro * per_step}))
    steps_per_epoch = micro // args.grad_accum
    args.epochs = args.epochs or math.ceil(args.max_steps / steps_per_epoch)
    return steps_per_epoch, min(steps_per_epoch * args.epochs, args.max_steps or steps_per_epoch * args.epochs)


def log_metrics(accelerator: Accelerator, metrics: dict, step: int, output_dir: str) -> None:
    """Log to the trackers and append to `output_dir/metrics.jsonl` (main process), one line per optimizer step."""
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with writing(os.path.join(output_dir, "metrics.jsonl")), open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")  # a line cut off by a kill is dropped on resume


# accelerate's "Removed shared tensor {'lm_head.weight'} while saving", at each checkpoint, says nothing a user can act
# on: a tied output projection (the tiny model's, Gemma's) is stored once on purpose and tied again on load
logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: dict) -> None:
    """Atomic: accelerate's state (models, optimizers, registered schedulers, RNG) plus `state` goes to checkpoint.tmp,
    which becomes checkpoint/ only when complete. trainer_state.json, written last, lists every file's size and CRC-32:
    a folder without it was cut off and is never loaded. One checkpoint is kept, plus the one being written
    (`_rotate_checkpoints`). The first save prints the size."""
    tmp = os.path.join(output_dir, "checkpoint.tmp")
    lost = "The checkpoint was not written; the previous one, if any, is untouched"
    if accelerator.is_main_process:
        if os.path.isfile(os.path.join(tmp, "trainer_state.json")):  # a complete save whose rotation was cut off:
            with writing(output_dir, consequence="The checkpoint rotation failed"):  # the newest, so it is kept
                _rotate_checkpoints(output_dir)
        shutil.rmtree(tmp, ignore_errors=True)  # a save cut off before its manifest: never trusted, so never kept
        with writing(tmp, consequence=lost):
            os.makedirs(tmp)  # before any process writes into it: under FSDP every process saves its own shards
    accelerator.wait_for_everyone()
    with writing(tmp, cleanup=tmp, consequence=lost):
        accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process has written its part (shards, its own RNG state) before the rename
    if accelerator.is_main_process:
        failpoint("checkpoint.save.before_manifest")
        paths = sorted(os.path.join(d, f) for d, _, names in os.walk(tmp) for f in names)
        files = {os.path.relpath(p, tmp): {"bytes": os.path.getsize(p), "crc32": h} for p, h in zip(paths, file_hashes(paths))}
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), dict(state, files=files))
        failpoint("checkpoint.save.after_manifest")
        with writing(output_dir, consequence="The checkpoint rotation failed; --resume picks the newest one that verifies"):
            _rotate_checkpoints(output_dir)
        if output_dir not in _SIZES_PRINTED:
            _SIZES_PRINTED.add(output_dir)
            size = sum(f["bytes"] for f in files.values())
            print(f"checkpoint: {size / 1e9:.2f} GB" if size >= 1e9 else f"checkpoint: {size / 1e6:.1f} MB",
                  f"in {os.path.join(output_dir, 'checkpoint')} (one is kept, plus the one being written)")
    accelerator.wait_for_everyone()


_SIZES_PRINTED: set[str] = set()


def _rotate_checkpoints(output_dir: str) -> None:
    """checkpoint.tmp (complete) becomes checkpoint/, the old checkpoint/ goes to checkpoint.old and is removed. Every
    state a kill can leave holds a checkpoint that verifies: checkpoint/; or checkpoint.old/ and the complete
    checkpoint.tmp/; or the complete checkpoint.tmp/ alone. A leftover checkpoint.old (complete or partly removed) is
    older than checkpoint.tmp and is removed first: renaming onto a folder that is not empty fails."""
    final, tmp, old = (os.path.join(output_dir, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    failpoint("checkpoint.rotate.between_renames")
    os.replace(tmp, final)
    failpoint("checkpoint.rotate.after_rename")
    if os.path.exists(old):
        first = min((os.path.join(d, f) for d, _, names in os.walk(old) for f in names), default=None)
        if first:  # removing a folder is not atomic: rmtree removes file by file
            os.remove(first)
        failpoint("checkpoint.rotate.removing_old")
        shutil.rmtree(old)


def _checkpoint_problem(path: str, files: dict, hashes: bool) -> str | None:
    """Why the checkpoint at `path` cannot be loaded (a file it lists is missing, or has another size or CRC-32), or
    None if it verifies. `hashes=False` checks sizes only (quick: at argument validation)."""
    for rel, want in files.items():
        file = os.path.join(path, rel)
        size = want if isinstance(want, int) else want["bytes"]
        if not os.path.isfile(file):
            return f"the checkpoint is incomplete: {file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, {size} when it was saved: the checkpoint is damaged"
    crcs = {os.path.join(path, rel): want["crc32"] for rel, want in files.items() if hashes and isinstance(want, dict)}
    for file, crc, found in zip(crcs, crcs.values(), file_hashes(list(crcs))):
        if found != crc:
            return f"{file} does not match the CRC-32 saved with it: the checkpoint is damaged"
    return None


def checkpoint_path(output_dir: str, hashes: bool = True, quiet: bool = False) -> str | None:
    """The newest checkpoint in `output_dir` that verifies (`_checkpoint_problem`): checkpoint/, or after a cut-off save or
    rotation checkpoint.tmp/ or checkpoint.old/; None if none is complete. A damaged newest is named and an older one
    used; ArgumentError if none verifies."""
    found = []
    for name in CHECKPOINTS:
        path = os.path.join(output_dir, name)
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            continue
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                state = json.load(f)
            found.append((state.get("step", 0), path, state.get("files", {}), None))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            found.append((-1, path, {}, f"{os.path.join(path, 'trainer_state.json')} is damaged ({e})"))
    problems = []
    for step, path, files, problem in sorted(found, key=lambda f: -f[0]):  # stable: checkpoint/ first among equals
        problem = problem or _checkpoint_problem(path, files, hashes)
        if problem is None:
            if problems and not quiet:
                print(f"--resume: {problems[0]}; falling back to {path} (step {step}), which verifies", file=sys.stderr)
            return path
        problems.append(problem)
    if problems:
        raise ArgumentError(f"--resume: {'; '.join(problems)}")
    return None


def on_main(accelerator: Accelerator, decide: Callable[[], object]) -> object:
    """`decide()` run on the main process only, its result sent to every process: for a choice every process must make
    the same way (which checkpoint to load, whether a cached result is there) from files that may change meanwhile."""
    from accelerate.utils import broadcast_object_list

    found = [decide() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    return found[0]


def load_checkpoint(accelerator: Accelerator, output_dir: str) -> dict | None:
    """Restore the newest checkpoint that verifies (decided on the main process). Returns its trainer state (step, epoch,
    batch, results), or None if the run stopped before its first checkpoint: it starts again in place. metrics.jsonl is
    cut back to the checkpoint's step, so every step is logged once."""
    def find() -> tuple[str | None, str | None]:  # (path, error)
        try:
            return checkpoint_path(output_dir), None
        except ArgumentError as e:
            return None, str(e.code)

    path, error = on_main(accelerator, find)  # decided once, so every process loads the same one
    if error:
        raise ArgumentError(error.removeprefix("error: "))
    state = None
    if path is None:
        accelerator.print(f"--resume: {output_dir} has no checkpoint yet (the run stopped before its first save): "
                          "starting fresh in place")
    else:
        try:
            accelerator.load_state(path)
        except Exception as e:
            raise RuntimeError(f"--resume: the checkpoint in {path} cannot be loaded: {type(e).__name__}: {e}") from e
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        accelerator.print(f"resumed from {path} at step {state['step']}")
    if accelerator.is_main_process and path == os.path.join(output_dir, "checkpoint"):  # the others are older or partial
        for name in ("checkpoint.old", "checkpoint.tmp"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if accelerator.is_main_process:
        _truncate_metrics(os.path.join(output_dir, "metrics.jsonl"), state["step"] if state else 0)
        if os.path.exists(results := os.path.join(output_dir, "results.json")):  # results after the checkpoint: gone
            write_json_atomic(results, state["results"]) if state else os.remove(results)
    accelerator.wait_for_everyone()
    return state


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (a killed run logged the steps after its checkpoint, which the
    resumed run logs again), and drop a line cut off by the kill."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(line)["step"] <= step:
                    keep.append(line)
    write_atomic(path, keep)


def save_model(accelerator: Accelerator, model, tokenizer, path: str, final: bool = True) -> None:
    """save_pretrained (safetensors, tokenizer included), consolidated across processes, in the model's load dtype
    (`load_dtype`: bf16 for a bf16 hub model trained over fp32 masters). Atomic: written to `path`.tmp-PID and renamed
    into place. The final save of a LoRA model merges it first (`merge_lora`), so the format is the same with or without
    --lora_r; a save during training (`final=False`) writes a LoRA model's adapters and leaves the model as it is."""
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    dtype = load_dtype(unwrapped)
    merged = merge_lora(unwrapped) if final else None  # on every process, so that all keep the same model after the save
    if merged is not None:  # LoRA: save the merged model, loadable without peft (the state dict has adapter keys)
        unwrapped, state_dict = merged, None
    if accelerator.is_main_process:
        state_dict = unwrapped.state_dict() if state_dict is None else state_dict
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp, cleanup=tmp, consequence=_what_is_lost(path)):
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if dtype is not None:  # save_pretrained records the parameters' dtype (fp32 masters), not the tensors'
                _set_config_dtype(unwrapped, tmp, dtype)
            failpoint("model.save.partial")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            failpoint("model.save.before_rename")
            if os.path.exists(path):  # a model left by an interrupted final save of this run: replaced
                os.replace(path, f"{path}.old.tmp-{os.getpid()}")
            os.replace(tmp, path)
            shutil.rmtree(f"{path}.old.tmp-{os.getpid()}", ignore_errors=True)
        failpoint("model.save.after_rename")
    accelerator.wait_for_everyone()


def load_dtype(model) -> torch.dtype | None:
    """The dtype a model was loaded in: its config's (for a value model, its backbone's), which stays when training
    upcasts the weights to fp32; None if the config does not say."""
    config = getattr(getattr(model, "backbone", model), "config", None)
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _set_config_dtype(model, path: str, dtype: torch.dtype) -> None:
    """Record `dtype` in the saved config.json and in the live config (save_pretrained set both to the weights' dtype)."""
    getattr(model, "backbone", model).config.dtype = dtype
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:  # in the temp folder: atomic with it
        json.dump(dict(config, dtype=str(dtype).removeprefix("torch.")), f, indent=2, sort_keys=True)


def _what_is_lost(path: str) -> str:
    """For a failed save of `path`: what is lost, and what a rerun can resume from."""
    output_dir = os.path.dirname(os.path.abspath(path))
    steps = []
    for name in CHECKPOINTS:
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(os.path.join(output_dir, name, "trainer_state.json")) as f:
                steps.append((json.load(f)["step"], os.path.join(output_dir, name)))
    kept = (f"the checkpoint at step {max(steps)[0]} ({max(steps)[1]}) is intact: free some space and rerun with --resume "
            "to go on from there" if steps else "there is no checkpoint (--save_every 0, or none saved yet): the training "
            "of this run is lost; rerun with --resume to train again in place")
    return f"{path} was not saved (nothing half-written was kept); {kept}"


# ---------------------------------------------------------------------------------------------------------------------
# Memory plan: bytes per GPU of every step of a run, by arithmetic on the model config
# ---------------------------------------------------------------------------------------------------------------------
def param_count(config: dict) -> tuple[int, int]:
    """(parameters of the causal LM, parameters of one decoder layer) of a Llama/Gemma-style config: attention without
    biases, a gated MLP, RMS norms, an output head unless it is tied to the embedding."""
    V, H, F, L = (config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"))
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    layer = 2 * H * q + 2 * H * kv + 3 * H * F + 2 * H  # q and o, k and v, gate/up/down, two norms
    return L * layer + V * H * (1 if config.get("tie_word_embeddings", True) else 2) + H, layer


def kv_bytes_per_token(config: dict, bytes_per_value: int = 2) -> int:
    """KV-cache bytes per token: K and V of every layer, in bf16 by default."""
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * bytes_per_value


def memory_plan(config: dict, algo: str, world: int, per_device_batch_size: int, gen_batch_size: int,
                prompt_tokens: int, max_new_tokens: int, online_rows: int = 0, sharded: bool = True,
                precision: str = "bf16", lora_r: int = 0, n_samples: int = 20) -> dict[str, dict[str, float]]:
    """Peak bytes on one GPU in each step of `algo`, by component, under configs/fsdp.yaml (FSDP2 full shard over `world`
    GPUs, bf16 parameters over fp32 master weights and reduction, activation checkpointing, a reduce-scatter every
    micro-batch). Each component is one the fake-tensor trace (benchmarks/memory_trace.py) measures, sized as it found
    it on Gemma-1.1-7B; tests/test_memory_plan.py holds every step within 10% of the trace. `config`: as
    `read_model_config` gives it; sequences are `prompt_tokens + max_new_tokens` long.
    Steps: "train" (a micro-batch's forward and backward, earlier micro-batches' gradients and the moments resident),
    "generate" (a generate call: the policy gathered, the KV cache), "score" (score_rows on an offline chunk), "save"
    (one parameter gathered in fp32) and, for SPO with `online_rows` (fresh rollouts per micro-batch), "rollout" (the
    frozen rollout copy generating `gen_batch_size` sequences, the frozen reference scoring `online_rows`) and "refresh"
    (the copy refreshed from the gathered policy). Not counted: what MEMORY_MARGIN_BYTES is left for (CUDA context, NCCL
    buffers, fragmentation, workspaces).
    `sharded` False: plain data parallel or one process (whole models on every GPU; DDP's fp32 gradient buckets when
    `world` > 1). `precision` "fp32": parameters, copies and activations in fp32. `lora_r`: frozen base weights in the
    compute dtype, LoRA adapters on every linear layer trained."""
    V, H, F, L = (config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"))
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    params, layer = param_count(config)
    head = 0 if config.get("tie_word_embeddings", True) else V * H
    value_params = params - head + H + 1  # the backbone and a scalar head
    trained = [params] + ([value_params] if algo in ("dro", "dqo") else [])
    w = 2 if precision == "bf16" else 4  # bytes per parameter and activation in the compute dtype
    shards = world if sharded else 1
    T = prompt_tokens + max_new_tokens
    N = per_device_batch_size * T * (2 if algo == "dpo" else 1)  # a DPO micro-batch is pairs: chosen and rejected
    adapters = lora_r * L * (2 * (H + q) + 2 * (H + kv) + 3 * (H + F))  # A and B of q, o, k, v, gate, up, down
    if lora_r:  # the frozen base of each network (the value network's own copy of the backbone) and fp32 adapters
        state = {"frozen base weights": sum(w * p / shards for p in trained),
                 "LoRA adapters and Adam moments (fp32)": 12 * adapters * len(trained) / shards}
        grads = {"LoRA gradients (fp32)": 4 * adapters * len(trained) / shards}
    else:
        state = {"weights (fp32" + (", sharded)" if sharded else ")"): sum(4 * p / shards for p in trained),
                 "Adam moments (fp32)": sum(8 * p / shards for p in trained)}
        grads = {"gradients (fp32)": sum(4 * p / shards for p in trained)}
        if not sharded and world > 1:
            grads["DDP gradient buckets (fp32)"] = sum(4 * p for p in trained)
    if (algo == "kto" or (algo == "spo" and online_rows)) and not lora_r:
        state["frozen reference"] = w * params
    if algo == "spo" and online_rows:
        state["frozen rollout policy"] = w * params + (4 * adapters if lora_r else 0)
    gathered = {"policy gathered": w * params} if sharded else {}  # unsharded: the weights are already whole
    kv_bytes = kv_bytes_per_token(config, w)

    def generate(n: int) -> dict:  # the KV cache, growing one layer's K or V at a time, and the sampler's logits
        return {"KV cache": n * T * kv_bytes * (1 + 1 / (2 * L)), "sampling logits and warps": n * V * 8}

    def score(rows: int) -> dict:  # one forward of up to SCORE_MAX_TOKENS tokens: the MLP's three (tokens, F) tensors
        tokens = min(rows, max(1, SCORE_MAX_TOKENS // T)) * T
        return {"forward activations (no grad)": tokens * (3 * F + 4 * H) * w}

    # the peak is at the backward of a network's embedding: its checkpointed layer inputs, accelerate's embedding/head/norm
    # unit of every network gathered (it stays gathered through forward), that unit's gradient with the fp32 copy the
    # reduce-scatter takes and, with two networks, the other one's embedding gradient and a layer's reduce-scatter
    train = {**state, **grads, "checkpointed layer inputs and outputs": (1 if sharded else len(trained)) * (L + 6) * N * H * w}
    if sharded:
        train.update({"embedding/head units gathered": len(trained) * V * H * w,
                      "embedding gradient and its fp32 reduce-scatter": V * H * (w + 4)})
        if len(trained) > 1:
            train["the other network's embedding gradient, a layer's reduce-scatter"] = V * H * w + 4 * layer
    rows_per_chunk = max(1, gen_batch_size // n_samples) * n_samples  # an offline-dataset chunk: whole prompts
    plan = {"train": train,
            "generate": {**state, **gathered, **generate(gen_batch_size)},
            "score": {**state, **gathered, **score(rows_per_chunk)},
            "save": {**state, "one parameter gathered (fp32)": 4 * max(V * H, layer // L if L else 0)}}
    if algo == "spo" and online_rows:
        plan["rollout"] = {**state, **generate(gen_batch_size), **score(online_rows)}
        plan["refresh"] = {**state, **gathered}
    return plan


MEMORY_MARGIN_BYTES = 8e9  # left free on each GPU for what no plan sees: CUDA context, NCCL, fragmentation, workspaces
PREFLIGHT_PROMPT_TOKENS = 320  # the longest GSM8K prompt (template and chat markup included); MATH's are shorter


def read_model_config(model: str) -> dict:
    """The numbers `memory_plan` reads from a model's config, without loading its weights: `tiny` is assets/tiny;
    anything else goes to transformers' AutoConfig (a local directory, or a hub id: its config.json only)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(TINY_SHIPPED if model == "tiny" else model).get_text_config()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    out = {k: getattr(cfg, k) for k in keys}
    out["num_key_value_heads"] = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    out["head_dim"] = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out["tie_word_embeddings"] = bool(getattr(cfg, "tie_word_embeddings", True))
    return out


def memory_preflight(algo: str, model_config: dict, world: int, sharding: str | None, precision: str,
                     per_device_batch_size: int, gen_batch_size: int, max_new_tokens: int, lora_r: int,
                     device_bytes: int | None, skip: bool, online_rows: int = 0, n_samples: int = 20,
                     prompt_tokens: int = PREFLIGHT_PROMPT_TOKENS) -> str:
    """This launch's memory plan before any weights load (`memory_plan`), as text to print: the peak GB per GPU of each
    step, for `world` processes under `sharding` ("FSDP", "DEEPSPEED" or None) and `precision`. `device_bytes` None (no
    GPU): nothing checked. Raises ArgumentError naming the step, the GB it needs and has (the GPU less
    MEMORY_MARGIN_BYTES, or 10% of a GPU under 80 GB) and the fixes, when a step does not fit and not `skip`."""
    plan = memory_plan(model_config, algo, world, per_device_batch_size, gen_batch_size, prompt_tokens, max_new_tokens,
                       online_rows, sharded=sharding is not None, precision=precision, lora_r=lora_r, n_samples=n_samples)
    need = {step: sum(parts.values()) for step, parts in plan.items()}
    how = f"{world} process(es), {sharding or 'no sharding'}, {precision}" + (f", LoRA r={lora_r}" if lora_r else "")
    steps = ", ".join(f"{step} {b / 1e9:.1f}" for step, b in need.items())
    if device_bytes is None:
        return f"memory plan ({how}), GB per device: {steps}; no GPU: nothing checked"
    avail = device_bytes - min(MEMORY_MARGIN_BYTES, 0.1 * device_bytes)
    text = f"memory plan ({how}), GB per GPU of {device_bytes / 1e9:.0f}: {steps}"
    step, worst = max(need.items(), key=lambda kv: kv[1])
    if worst <= avail:
        return text + f"; fits (at most {avail / 1e9:.1f} GB)"
    fixes = []
    if sharding is None and world > 1:
        fixes.append("shard the models: `accelerate launch --config_file configs/fsdp.yaml`")
    batch, gen = "a smaller --per_device_batch_size (the global batch stays)", "a smaller --gen_batch_size"
    fixes += [gen, batch] if step == "generate" else [batch, gen]
    if not lora_r:
        fixes.append("--lora_r 16")
    message = (f"{algo}: the {step} step needs {worst / 1e9:.1f} GB per GPU, {avail / 1e9:.1f} GB available "
               f"({how}; {steps}). Fixes: " + "; ".join(fixes) + ". --skip_memory_check runs it anyway")
    if skip:
        return text + f"; warning (--skip_memory_check): {message}"
    raise ArgumentError(message)


def host_ram_preflight(algo: str, model_config: dict, local_world: int, sharding: str | None, precision: str,
                       lora_r: int, host_bytes: int, skip: bool) -> str:
    """Host RAM of one node while the models load, from the dtypes: every process loads the model itself
    (configs/fsdp.yaml). Per process the trained weights in fp32 (FSDP2's `prepare` upcasts on the host), plus DRO's and
    DQO's value copy (load dtype under FSDP, else fp32); with LoRA the frozen base and value copy in the load dtype.
    ArgumentError above 90% of the RAM, unless `skip`."""
    params, _ = param_count(model_config)
    w = 2 if precision == "bf16" else 4
    value = algo in ("dro", "dqo")
    per_process = (w * params * (2 if value else 1) if lora_r else
                   4 * params + (params * (w if sharding else 4) if value else 0))
    need, text = local_world * per_process, f"host RAM while loading: {local_world} x {per_process / 1e9:.1f} GB"
    text += f" = {local_world * per_process / 1e9:.1f} GB of {host_bytes / 1e9:.0f} GB"
    if need <= 0.9 * host_bytes or skip:
        return text + ("" if need <= 0.9 * host_bytes else " (over 90%: --skip_memory_check)")
    raise ArgumentError(f"{algo}: {text}: every process loads the model itself. Fixes: fewer processes per node, "
                        "--lora_r 16; --skip_memory_check runs it anyway")


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def evaluate(model, tokenizer, problems: list[dict], task: str, accelerator: Accelerator | None = None,
             max_new_tokens: int = 256, gen_batch_size: int = 256, sampled_seeds: int = 1, pass_k: tuple = (),
             pass_n: int = 0, pass_sampling: dict | None = None, pass_problems: int | None = None, seed: int = 0) -> dict:
    """Greedy accuracy; sampled accuracy (EVAL_SAMPLING, the paper's protocol) as mean and std over `sampled_seeds`; with
    `pass_n`, pass@k from `pass_n` samples per problem (`pass_sampling`, default EVAL_SAMPLING) on the first
    `pass_problems`. `model` may be prepared (sharded)."""
    prompts = [encode_prompt(tokenizer, p["question"], task) for p in problems]
    answers = [p["answer"] for p in problems]
    common = dict(max_new_tokens=max_new_tokens, gen_batch_size=gen_batch_size, accelerator=accelerator)
    greedy = rollout(model, tokenizer, prompts, answers, task, temperature=0.0, desc="eval greedy", **common)
    out = {"greedy": float(np.mean([r["reward"] for r in greedy])), "n_problems": len(problems)}
    accs = []
    for s in range(sampled_seeds):
        rows = rollout(model, tokenizer, prompts, answers, task, seed=seed + s, desc="eval sampled", **EVAL_SAMPLING,
                       **common)
        accs.append(np.mean([r["reward"] for r in rows]))
    if accs:
        out.update(sampled=float(np.mean(accs)), sampled_std=float(np.std(accs)), sampled_seeds=len(accs))
    if pass_n:
        m = min(pass_problems or len(problems), len(problems))
        rows = rollout(model, tokenizer, prompts[:m], answers[:m], task, n=pass_n, seed=seed + 10_000,
                       desc="eval pass@k", **(pass_sampling or EVAL_SAMPLING), **common)
        correct = np.array([r["reward"] for r in rows]).reshape(m, pass_n).sum(1)
        out["pass_problems"] = m
        for k in pass_k:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(pass_n, int(c), k) for c in correct]))
    out["truncated"] = float(np.mean([r["truncated"] for r in greedy]))
    out["samples"] = [{"question": problems[i]["question"], "response": greedy[i]["response"],
                       "reward": greedy[i]["reward"]} for i in range(min(3, len(problems)))]
    return out


def evaluate_run(model, tokenizer, problems: list[dict], args, accelerator: Accelerator, **eval_kwargs) -> dict:
    """`evaluate` with the run's settings (task, generation length and batch, seed, --eval_seeds sampled seeds), and
    this process's peak memory so far."""
    out = evaluate(model, tokenizer, problems, args.task, accelerator, args.max_new_tokens, args.gen_batch_size,
                   sampled_seeds=args.eval_seeds, seed=args.seed, **eval_kwargs)
    return dict(out, peak_memory_mb=peak_memory_mb(accelerator.device))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, else the maximum resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def evaluate_reference(model, tokenizer, problems: list[dict], args, accelerator: Accelerator, **eval_kwargs) -> dict:
    """`evaluate_run` on the untrained reference, cached under `cache_dir/eval/` so every script on the same model, task
    and test set reuses it; `eval_kwargs` go to `evaluate` and into the key."""
    key = cache_key(dict(model=model_key(args.model, args.cache_dir, args.precision), task=args.task,
                         test_file=data_key(args.test_file, args.cache_dir), n=len(problems),
                         max_new_tokens=args.max_new_tokens, seed=args.seed, seeds=args.eval_seeds,
                         chunk=args.gen_batch_size, v=3, **eval_kwargs))
    path = os.path.join(args.cache_dir, "eval", f"{key}.json")
    # Read on the main process only: another run sharing the cache may write the file between two processes' reads, and
    # a process that skipped the evaluation (its results are gathered) would leave the others waiting for it.
    if (cached := on_main(accelerator, lambda: read_json_checked(path))) is not None:  # damaged: named, evaluated again
        return cached
    with reference_mode(accelerator.unwrap_model(model)):
        out = evaluate_run(model, tokenizer, problems, args, accelerator, **eval_kwargs)
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        clean_orphans(os.path.dirname(path), min_age_s=3600)
        write_json_checked(path, out)
    return out


def format_results(results: dict[str, dict]) -> str:
    """A plain-text table: one row per evaluated policy."""
    keys = [k for k in ("greedy", "sampled", "sampled_std") if any(k in r for r in results.values())]
    keys += sorted({k for r in results.values() for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    lines = [f"{'policy':<12}" + "".join(f"{k:>12}" for k in keys)]
    for name, r in results.items():
        lines.append(f"{name:<12}" + "".join(f"{r[k]:>12.4f}" if k in r else f"{'-':>12}" for k in keys))
    return "\n".join(lines)


def log_eval(accelerator: Accelerator, results: dict[str, dict], step: int, output_dir: str) -> None:
    """Print the table, log charts/*, and write results.json beside the run."""
    accelerator.print(format_results(results))
    last = list(results.values())[-1]
    accelerator.log({f"charts/{k}": v for k, v in last.items() if isinstance(v, float)}, step=step)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        write_json_atomic(os.path.join(output_dir, "results.json"), results)


def throughput(tokens: float, since: float) -> float:
    return tokens / max(time.time() - since, 1e-9)
