"""Shared plumbing for the algorithm files: tasks, prompts, grading, tokenization, log-probs, rollouts,
the offline dataset, the embedded default (task `arith`, model `tiny`), checkpoints and evaluation.

Nothing in here is part of an algorithm: losses, targets, pair building and value heads live in the
algorithm files, so that `diff rs.py dqo.py` shows everything that makes DQO DQO.
"""

import atexit
import copy
import functools
import hashlib
import json
import math
import os
import random
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
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
    """One problem: a start value and 2-3 steps. `answer` is the step spec ("7;+5;*3;-4") that the strict verifier
    replays; `solution` is the gold worked solution, one step per segment, segments separated by a blank line.
    Each operation appears at most once, so a step's operand is the number beside its operation's words: with repeated
    operations the 2-layer reference copied the operand of the wrong sentence in most of its failures. One-digit
    operands for + and - keep each step to at most one carry or borrow, the slip that `arith_solution` plants."""
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
    """The worked solution, returned as (text, index of the first slipped step or None). Slips are carried through
    to a wrong final answer:
      - `slip_step`: that step's result is off by 1 or 10;
      - `carry_slip`: each step that needs a carry or a borrow "forgets" it (result off by 10) with this probability:
        a systematic misconception, which the reference's greedy decoding keeps when the probability is above 1/2."""
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
    """Replay the spec along the response's step lines: (lines, index of the first step line the strict verifier
    rejects or None, that line's ARITH_STEP_RE match or None, the right value before that step, or the final one)."""
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
    """Strict verifier: 1.0 only if every step line is `a<op>b=c` with `a` the previous result, the problem's
    operation, a correct result, and the final `#### N` equals the last result."""
    lines, wrong, _, value = _arith_walk(response, spec)
    return float(wrong is None and len(lines) == spec.count(";") + 1 and lines[-1].startswith("####")
                 and lines[-1][4:].strip() == str(value))


def first_wrong_step(response: str, spec: str) -> int | None:
    """Index of the first step line that the strict verifier rejects (None if all steps are right)."""
    return _arith_walk(response, spec)[1]


def arith_failure_kind(response: str, spec: str) -> str | None:
    """Why a response fails, judged at its first wrong step: "slip" (the planted misconception: a step that needs a
    carry or borrow, right operands, result off by exactly the forgotten 10), "copy" (a wrong previous value, operation
    or operand), "arith" (any other wrong result), "format" (a missing or malformed step, or a wrong `####` line).
    None if the response is correct."""
    if grade_arith(response, spec) == 1.0:
        return None
    _, i, m, value = _arith_walk(response, spec)
    if i is None or not m:
        return "format"
    step = spec.split(";")[i + 1]
    op, b = step[0], int(step[1:])
    if int(m[1]) != value or m[2] != op or int(m[3]) != b:
        return "copy"
    forgot = _arith_apply(value, op, b) + (-10 if op == "+" else 10)
    return "slip" if has_carry(value, op, b) and int(m[4]) == forgot else "arith"


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
    """A forked child starts its own helpers: the parent's pipes are not its to use. Closing its copies of them
    lets an idle parent helper still see end-of-file when the parent exits."""
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
    """math-verify equivalence, computed in a helper process that is killed when one answer takes longer than
    `timeout_s` (counted from when the helper has the answer; starting a helper is not counted). Neither a thread
    nor signal.alarm can bound it: sympy evaluating e.g. 10^{10^{10^{10}}} is one C call that holds the GIL.
    Each call checks a helper out of a small pool, so a slow answer never delays another thread's; a subprocess
    also works inside (daemonic) worker processes, which cannot have multiprocessing children."""
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
    """Reward 1.0 if `response` is correct for reference `answer`, else 0.0.
    `answer`: GSM8K the text after ####; MATH/AIME the `answer` field; arith the step spec.
    Never raises for any `response` or `answer`: one that is not a str (None from a failed decode) grades 0.0, and
    math-verify gets GRADE_TIMEOUT_S per call, also with many threads grading at once. Raises ValueError only for a
    task not in TASKS, a programming error (the scripts check --task when they parse their arguments)."""
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


def load_task(task: str, split: str, path: str | None = None, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Problems of `task` and `split` as dicts {question, answer, solution}. `path` is a local JSONL file with the
    hub dataset's fields; without it the data comes from the hub (or, for `arith`, from the generator)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if task == "arith":
        return arith_problems(split, limit or (20_000 if split == "train" else 1000), seed=0)
    if path:
        rows, name = _read_jsonl(path), path
    else:
        if (task, split) not in HUB_SOURCES:
            raise ValueError(f"task {task!r} has no {split} split (aime24 is test only); pass a JSONL file instead")
        import datasets

        hub, configs, hub_split = HUB_SOURCES[(task, split)]
        rows, name = [row for c in configs for row in datasets.load_dataset(hub, c, split=hub_split)], hub
    problems = [_problem_from_row(task, row, f"{name}: row {i}") for i, row in enumerate(rows, 1)]
    return problems[:limit] if limit else problems


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
    """The token that closes an assistant turn: the special token that follows the message in the chat template's own
    rendering of one (Gemma `<end_of_turn>`, Llama-3 `<|eot_id|>`, ChatML `<|im_end|>`); being special, it is dropped
    from decoded text by `skip_special_tokens`. The tokenizer's EOS otherwise: no template, or one that closes
    a turn with plain text (the tiny model's newline). Computed once per tokenizer and template."""
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
    """Every id that ends a response: the model's `generation_config.eos_token_id` (an int or a list: Gemma-2-it
    [1, 107], Llama-3.1-Instruct [128001, 128008, 128009]), the tokenizer's EOS, and the template's end of turn, which
    some configs leave out (Gemma-1.1-it lists only 1, `<eos>`, though its turns end with 107, `<end_of_turn>`)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return {*ids, tokenizer.eos_token_id, end_of_turn_id(tokenizer)} - {None}


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids, closed by the end-of-turn token (`end_of_turn_id`: EOS for a model without a chat template), as
    the model ends a turn when generating. Encoded on its own so no token straddles the prompt/response boundary."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]


def collate(rows: list[dict], pad_token_id: int, token_fields: tuple = (), seq_fields: tuple = ()) -> dict:
    """Right-padded batch. `mask` is 1 exactly on response tokens (the closing stop token included). Each of
    `token_fields` is a per-response-token list on the row, placed at the response positions of a (B, T) tensor
    (0 elsewhere); each of `seq_fields` is a number per row, giving a (B,) tensor."""
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
    """One forward pass, log-probs under several warps: a (B, T) tensor per entry of `warps` (None: the model's own
    log-probs; a dict: under `warp_logits` with it). Position 0 (no prefix) and padding positions get 0.

    The model is called through its own wrapper (DDP, FSDP1/2, peft), so their hooks run, with `logits_to_keep=1`: its
    forward projects only the last position. A forward hook on the backbone takes the final (normed) hidden states,
    and the output projection is applied here to `chunk_tokens` real tokens at a time (default: LOGPROB_CHUNK_LOGITS
    logits), checkpointed under autograd so backward recomputes each chunk instead of keeping its logits. Peak extra
    memory is a few chunks, independent of B and T. On a model's first call its own last-position logits are compared
    with this head, so an architecture whose logits need something more than `_head_logits` does fails loudly."""
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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts: batched generate with KV cache and left padding, from full (unsharded) parameters
# ---------------------------------------------------------------------------------------------------------------------
@contextmanager
def unsharded(model):
    """Yields a module that runs `generate` (and no-grad forward passes) on full parameters with no communication,
    however `model` was wrapped. The wrapping is read from the model itself:
      - FSDP1 (FullyShardedDataParallel): `summon_full_params(writeback=False)`, and every FSDP unit's forward is routed
        straight to the module it wraps, so no unit reshards (and re-gathers) between decoding steps;
      - FSDP2 (`fully_shard`): every FSDP module unshards once on entry, with resharding after forward turned off
        inside; on exit it reshards and gets its own settings back;
      - DeepSpeed ZeRO-3: `deepspeed.zero.GatheredParameters` over all parameters;
      - anything else (DDP, a plain or LoRA model): the unwrapped module.
    Entering and leaving are collective under sharding (every process must enter together: it all-gathers); inside,
    each process may make any number of calls. Peak memory inside: the full parameters on every process (FSDP1: in the
    dtype of its flat parameters, fp32 under mixed precision; FSDP2: in its mixed-precision param_dtype)."""
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
    """One batched `generate` call on a module with full parameters (see `unsharded`), stopping at any of
    `stop_token_ids`. `temperature`: one for all rows (0: greedy), or a list of one per row (all > 0). Returns, per
    prompt, the response ids (up to and including the first stop id, so scoring and training see how the response
    ended), the finish reason ("stop" iff a stop id was generated, else "length") and the decoded text, without the
    stop id."""
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
    """Adds `logps` (the model's per-response-token log-probs) to each row, and with `warp` also `sampler_logps`
    (the log-probs under the sampler's temperature/top-k/top-p), from one forward pass per micro-batch, model in eval
    mode. Micro-batches take rows longest first, as many as keep rows x longest length within `max_tokens` (one row
    at least), so that the padding stays short and memory is bounded whatever the number of rows."""
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
    """n samples for each prompt index in `chunk`, graded: the unit of work that `rollout` shares across processes, and
    that SPO calls directly for its online rollouts. Seeded per chunk, so a chunk's rows do not depend on who samples it.
    `model` has full parameters (see `unsharded`)."""
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
    """n samples per prompt (temperature 0: greedy), graded. `model` may be prepared (sharded): it generates with full
    parameters (`unsharded`). Under several processes each process samples its share of the chunks, and the results
    are gathered back in prompt order. Returns rows, prompt-major."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Process scores (DQO paper §5.5): segments of a response, and how many of them are correct, from prefix completions
# ---------------------------------------------------------------------------------------------------------------------
SEGMENT_SEP = re.compile(r"\n\s*\n")
PS_CHUNK = 64  # responses per cached process-score chunk


def segment_ends(tokenizer, response_ids: list[int]) -> list[int]:
    """Exclusive token ends of a response's segments, split at blank lines. The segments partition the response: each
    keeps its trailing blank line, and the last one ends at the last token (EOS included). Token boundaries come from
    decoding prefixes (a binary search per cut), so any tokenizer works."""
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


def score_segments(policy, tokenizer, rows: list[dict], task: str, ps_samples: int, sampling: dict, max_new_tokens: int,
                   gen_batch_size: int, seed: int) -> list[dict]:
    """Per response, its segment ends and the number of leading segments judged correct. Correct responses: all n.
    Failed ones: for k = n − 1, n − 2, ..., 1, sample `ps_samples` completions of the prompt plus the first k segments
    from `policy`; the first (longest) prefix with at least one correct completion marks its k segments correct.
    All still-undecided responses of `rows` go through one prefix length per round, in batches of `gen_batch_size`."""
    ends = [segment_ends(tokenizer, r["response_ids"]) for r in rows]
    correct = [len(e) if r["reward"] == 1.0 else 0 for r, e in zip(rows, ends)]
    k = [len(e) - 1 for e in ends]  # candidate prefix length, in segments
    pending = [i for i, r in enumerate(rows) if r["reward"] != 1.0 and k[i] >= 1]
    for rnd in range(max(k, default=0)):
        if not pending:
            break
        torch.manual_seed(seed * 1_009 + rnd)
        prefixes = [rows[i]["response_ids"][: ends[i][k[i] - 1]] for i in pending]
        flat = [j for j in range(len(pending)) for _ in range(ps_samples)]
        hit = [False] * len(pending)
        for s in range(0, len(flat), gen_batch_size):
            idx = flat[s : s + gen_batch_size]
            budget = max(1, max_new_tokens - min(len(prefixes[j]) for j in idx))
            outs = generate_batch(policy, tokenizer, [rows[pending[j]]["prompt_ids"] + prefixes[j] for j in idx],
                                  max_new_tokens=budget, **sampling)
            for j, o in zip(idx, outs):
                if not hit[j]:
                    text = tokenizer.decode(prefixes[j] + o["response_ids"], skip_special_tokens=True)
                    hit[j] = grade(text, rows[pending[j]]["answer"], task) == 1.0
        for j, i in enumerate(pending):
            correct[i] = k[i] if hit[j] else 0
            k[i] -= 0 if hit[j] else 1
        pending = [i for j, i in enumerate(pending) if not hit[j] and k[i] >= 1]
    return [{"segment_ends": e, "correct_segments": c} for e, c in zip(ends, correct)]


def build_process_scores(accelerator, model, tokenizer, rows: list[dict], args) -> list[dict]:
    """`score_segments` for every offline row, by the reference (`model` before training, prepared or not), cached
    under `cache_dir/process_scores/<key>/`, keyed by the offline rows themselves and the sampling parameters. Chunks of
    PS_CHUNK rows are written atomically when done (an interrupted build resumes) and shared round-robin across
    processes (accelerator None: one process)."""
    key = dict(model=model_key(args), task=args.task, rows=cache_key([[r["prompt_ids"], r["response_ids"]] for r in rows]),
               ps_samples=args.ps_samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               max_new_tokens=args.max_new_tokens, seed=args.seed, chunk=PS_CHUNK, gen_batch_size=args.gen_batch_size)
    root = os.path.join(args.cache_dir, "process_scores", cache_key(key))
    os.makedirs(root, exist_ok=True)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    chunks = [range(s, min(s + PS_CHUNK, len(rows))) for s in range(0, len(rows), PS_CHUNK)]
    mine = range(rank, len(chunks), world)
    todo = [c for c in mine if not os.path.exists(os.path.join(root, f"chunk-{c:05d}.json"))]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="process scores", disable=rank != 0)
    with unsharded(model) as policy, reference_mode(policy):  # collective under sharding: every process enters
        for c in todo:
            scores = score_segments(policy, tokenizer, [rows[i] for i in chunks[c]], args.task, args.ps_samples, sampling,
                                    args.max_new_tokens, args.gen_batch_size, args.seed * 1_000_003 + c)
            write_json_atomic(os.path.join(root, f"chunk-{c:05d}.json"), scores)
            bar.update(1)
    bar.close()
    if accelerator:
        accelerator.wait_for_everyone()
    scores = []
    for c in range(len(chunks)):
        with open(os.path.join(root, f"chunk-{c:05d}.json")) as f:
            scores += json.load(f)
    failed = [(r, s) for r, s in zip(rows, scores) if r["reward"] != 1.0]
    n_ok, n_seg = sum(s["correct_segments"] for _, s in failed), sum(len(s["segment_ends"]) for _, s in failed)
    msg = (f"process scores: {sum(s['correct_segments'] > 0 for _, s in failed)}/{len(failed)} failed responses have a "
           f"correct prefix, {n_ok / max(1, n_seg):.3f} of their segments judged correct")
    if args.task == "arith":  # the verifier knows the first wrong step: segment i is step i, the last one the answer
        match = [arith_first_wrong(r) == s["correct_segments"] for r, s in failed]
        msg += f"; the first segment judged wrong is the verifier's first wrong step in {sum(match) / max(1, len(match)):.3f}"
    if rank == 0:
        print(f"{msg} ({root})")
    return scores


def arith_first_wrong(row: dict) -> int | None:
    """Index of the first wrong segment of an arith response (segment i is step i, the last one the `####` answer),
    by the strict verifier; None if the response is correct."""
    if row["reward"] == 1.0:
        return None
    step = first_wrong_step(row["response"], row["answer"])
    return len(row["answer"].split(";")) - 1 if step is None else step


def token_rewards(n_tokens: int, reward: float, score: dict | None = None) -> list[float]:
    """Per-token rewards of one response: the outcome reward on its last token, plus 1/n on the last token of each
    of its correct leading segments (n segments)."""
    r = [0.0] * n_tokens
    r[-1] += reward
    if score:
        for e in score["segment_ends"][: score["correct_segments"]]:
            r[e - 1] += 1 / len(score["segment_ends"])
    return r


# ---------------------------------------------------------------------------------------------------------------------
# The offline dataset: n reference samples per training prompt, graded, with reference log-probs stored
# ---------------------------------------------------------------------------------------------------------------------
def cache_key(obj) -> str:
    """A short stable hash of a JSON-able description (model, task, sampling, ...): the name of a cache directory."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: str, obj) -> None:
    """Write to a temp file and rename it into place, so a kill mid-write never leaves a truncated file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def build_offline_dataset(accelerator: Accelerator, model, tokenizer, problems: list[dict], args) -> list[dict]:
    """The DQO paper's offline dataset: for each training prompt, `args.n_samples` samples from the reference policy,
    graded 1/0, with the reference's per-token log-probs (`ref_logps`) and the sampler's (`sampler_logps`) stored.

    Cached under `args.cache_dir/offline/<key>/`, keyed by model, task, split, n, sampling parameters and seed; a
    second script on the same model and task reuses it. Each chunk of prompts is written atomically when done, so
    an interrupted build resumes without redoing finished prompts. Chunks are shared round-robin across processes."""
    key_fields = dict(model=model_key(args), task=args.task, split="train", train_file=data_key(args, "train"),
                      n_prompts=len(problems), n=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed, chunk=args.gen_batch_size)
    root = os.path.join(args.cache_dir, "offline", cache_key(key_fields))
    os.makedirs(root, exist_ok=True)
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(root, "key.json"), key_fields)
    prompts = [encode_prompt(tokenizer, p["question"], args.task) for p in problems]
    answers = [p["answer"] for p in problems]
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    plan = _chunk_plan(len(prompts), args.n_samples, args.gen_batch_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    todo = [c for c in range(rank, len(plan), world) if not os.path.exists(os.path.join(root, f"chunk-{c:05d}.jsonl"))]
    done_before = len(range(rank, len(plan), world)) - len(todo)
    bar = tqdm(total=len(range(rank, len(plan), world)), initial=done_before, desc="offline dataset",
               disable=not accelerator.is_local_main_process)
    with unsharded(model) as policy, reference_mode(policy):  # collective under sharding: every process enters
        for c in todo:
            rows = rollout_chunk(policy, tokenizer, prompts, answers, args.task, plan[c], args.n_samples, sampling,
                                 args.max_new_tokens, args.seed * 1_000_003 + c)
            score_rows(policy, rows, tokenizer.pad_token_id, warp=sampling)
            for r in rows:
                r["ref_logps"] = r.pop("logps")
            _write_jsonl_atomic(os.path.join(root, f"chunk-{c:05d}.jsonl"), rows)
            bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    rows = []
    for c in range(len(plan)):  # a cache edited by hand or damaged must not train on a reward that is not 0 or 1
        path = os.path.join(root, f"chunk-{c:05d}.jsonl")
        for i, r in enumerate(_read_jsonl(path), 1):
            if r.get("reward") not in (0, 1) or isinstance(r.get("reward"), bool):
                raise DataError(f"{path}: row {i}: reward {r.get('reward')!r} is not 0 or 1; delete {root} to rebuild it")
            rows.append(r)
    acc = np.mean([r["reward"] for r in rows])
    accelerator.print(f"offline dataset: {len(rows)} responses to {len(prompts)} prompts, "
                      f"mean reward {acc:.3f}, truncated {np.mean([r['truncated'] for r in rows]):.3f} ({root})")
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# The embedded model `tiny`: a small Llama with a local word-level tokenizer, SFT'd into an imperfect reference
# ---------------------------------------------------------------------------------------------------------------------
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
    words |= set(ARITH_NAMES) | set(ARITH_ITEMS) | set(re.findall(r"[A-Za-z]+", PROMPT_TEMPLATES["gsm8k"]))
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


TINY_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")  # benchmarks/tiny_reference.py


def tiny_recipe() -> dict:
    return json.loads(json.dumps({"config": TINY_CONFIG, "sft": TINY_SFT}))  # as it reads back from recipe.json


def tiny_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, "tiny", cache_key(tiny_recipe()))


def tiny_path(cache_dir: str) -> str:
    """Where `--model tiny` loads from: the reference shipped in assets/tiny if it was built from the current recipe
    (its recipe.json equals TINY_CONFIG and TINY_SFT), so every machine starts from the same weights (an SFT on
    another CPU lands on other weights, and another accuracy); otherwise the cache's own build, made on first use."""
    recipe = os.path.join(TINY_SHIPPED, "recipe.json")
    if os.path.exists(recipe):
        with open(recipe) as f:
            if json.load(f) == tiny_recipe():
                return TINY_SHIPPED
    return tiny_dir(cache_dir)


def build_tiny_reference(path: str, steps: int | None = None, carry_slip: float | None = None) -> None:
    """Build the tiny Llama and SFT it on a mix of correct and slipped `arith` solutions, so the reference makes
    step-level mistakes that reward-driven methods can learn to avoid. Saved atomically to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(TINY_SFT, steps=steps or TINY_SFT["steps"])  # tests override steps and carry_slip for a quick model
    cfg["carry_slip"] = TINY_SFT["carry_slip"] if carry_slip is None else carry_slip
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(cfg["seed"])
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         **TINY_CONFIG)
    model = LlamaForCausalLM(config)
    rng = random.Random(cfg["seed"])
    problems = arith_problems("train", 4000, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * 0.5 * (
        1 + math.cos(math.pi * min(s, cfg["steps"]) / cfg["steps"])))
    model.train()
    for _ in tqdm(range(cfg["steps"]), desc="SFT tiny reference"):
        rows = []
        for p in rng.sample(problems, cfg["batch_size"]):  # random batches: sorting by length hurts accuracy badly
            start, *steps_ = p["answer"].split(";")
            ops = [(s[0], int(s[1:])) for s in steps_]
            text, _ = arith_solution(int(start), ops, rng=rng, carry_slip=cfg["carry_slip"])
            rows.append({"prompt_ids": encode_prompt(tokenizer, p["question"], "arith"),
                         "response_ids": encode_response(tokenizer, text)})
        batch = collate(rows, tokenizer.pad_token_id)
        lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        loss = -masked_mean(lp, batch["mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(os.path.join(tmp, "recipe.json"), {"config": TINY_CONFIG, "sft": cfg})  # what `tiny_path` matches
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):  # another process finished first: keep its copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
def content_digest(path: str, memo_path: str | None = None) -> str:
    """sha256 of a file's bytes, or of every file in a folder (relative names and bytes): the identity of an input in
    cache keys, so a data file or model edited in place never reuses samples, log-probs or evaluations of the old one.
    Each file's hash is remembered by (path, size, ctime, inode), per process and in the JSON file `memo_path` if given,
    so a 17 GB model is read once, not at every start. In a folder, the reports this project writes beside a model
    (eval.py's eval-<task>.json, tiny_reference.py's quality.json) are not part of it."""
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


def model_key(args) -> str:
    """The reference's identity in cache keys. The tiny model: its recipe hash, wherever the cache lives, marked
    `shipped` when the weights are assets/tiny's (a build from the same recipe on this machine has other weights). A hub
    id: the id. A local directory: the digest of its contents (`content_digest`), so a model saved again to the same folder
    never reuses samples, reference log-probs or evaluations of the old one, and a copy elsewhere reuses them."""
    if args.model == "tiny":
        shipped = "shipped-" if tiny_path(args.cache_dir) == TINY_SHIPPED else ""
        return f"tiny/{shipped}{os.path.basename(tiny_dir(args.cache_dir))}"
    path = os.path.expanduser(args.model)
    if not os.path.isdir(path):
        return args.model
    return f"local:{content_digest(path, os.path.join(args.cache_dir, 'digests.json'))}"


def data_key(args, split: str) -> str | None:
    """The identity of a split's local JSONL file in cache keys (its contents' digest); None for the hub or `arith`."""
    path = args.train_file if split == "train" else args.test_file
    return content_digest(path, os.path.join(args.cache_dir, "digests.json")) if path else None


def load_model_and_tokenizer(args, accelerator: Accelerator | None = None):
    """`--model tiny` builds (once, cached) and loads the embedded reference; anything else is a hub id or a local
    directory, loaded with AutoModelForCausalLM / AutoTokenizer. Pads on the left for generation is handled in
    `generate_batch`; the tokenizer gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model
    if args.model == "tiny":
        path = tiny_path(args.cache_dir)
        if not os.path.exists(path):
            if accelerator is None or accelerator.is_main_process:
                build_tiny_reference(path)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    elif path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"--model {path}: no such directory (a local model must be a save_pretrained folder)")
    dtype = torch.bfloat16 if getattr(args, "precision", None) == "bf16" else torch.float32
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
    return model, tokenizer


def add_lora(model, r: int):
    """LoRA adapters on every linear layer (peft, imported only here); every other weight is frozen. B starts at zero,
    so the adapted model equals the base until trained; reference log-probs come from the same model with the adapter
    disabled. `model` is a causal LM (the policy) or a bare backbone (a value model's)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))


def value_backbone(causal_lm, lora_r: int = 0):
    """A copy of `causal_lm`'s backbone for a value network V_φ: its base transformer without the LM head
    (LlamaForCausalLM -> LlamaModel; a bare backbone -> itself), a LoRA policy's adapters left out. `causal_lm` is not
    changed. With `lora_r`, the copy is frozen and gets LoRA adapters of its own: a LoRA of the same base."""
    if hasattr(causal_lm, "unload"):  # a LoRA policy (load_model_and_tokenizer under --lora_r): its base alone
        backbone = copy.deepcopy(causal_lm).unload().base_model
    else:
        backbone = copy.deepcopy(causal_lm.base_model)
    return add_lora(backbone, lora_r) if lora_r else backbone


class ValueModel(torch.nn.Module):
    """V_φ of DRO and DQO: a copy of the reference's backbone (the causal LM without its LM head, `value_backbone`) and
    a scalar linear head, zero-initialised so that V ≡ 0 before training. forward(input_ids, attention_mask) gives
    (B, T) values aligned with `token_logprobs`: values[:, t] = V(s_t), the state before token t, read from the hidden
    state at t − 1 (0 at t = 0). DQO reads every position; DRO the first response position, V(x). With `lora_r` the
    backbone is frozen and trains LoRA adapters of its own. Saved (`save_pretrained`, as common.save_model calls it)
    as the backbone in transformers' format and the head as value_head.safetensors; `from_pretrained` reads both."""

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
        v = self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # (B, T): V of the state after token t
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
    """Fold LoRA adapters into their base weights, in place, wherever they are: `model` itself (a LoRA policy) or a
    direct child (a value model's backbone). Returns the merged model, a plain transformers model again that loads
    without peft, or None if `model` has no adapters. The adapters are gone afterwards: call it once training is done."""
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
    --global_batch_size. `rules` (flag -> (test, what it must be)) are the algorithm file's own, on top of
    SHARED_RULES (and replacing a shared rule of the same name). Checks, in order: each flag's range or choices; the
    global batch; the model (`tiny`, a save_pretrained folder, or a hub id ORG/NAME); the input files (they exist,
    are UTF-8 JSONL with the task's fields, not empty); the tracker; the output dir (a fresh run never writes into
    another run's; --resume needs a complete checkpoint there). Raises ArgumentError naming the flag, the value and
    what it must be."""
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
    check_report_to(args.report_to)
    check_output_dir(args.output_dir, args.resume)


def check_rules(args, rules: dict) -> None:
    """Each flag of `args` named in `rules` (flag -> (test, what it must be)) passes its test: test(value), or
    test(value, args) for a rule that relates the flag to others."""
    for name, (ok, want) in rules.items():
        value = getattr(args, name, None)
        if hasattr(args, name) and not (ok(value, args) if ok.__code__.co_argcount == 2 else ok(value)):
            raise ArgumentError(f"--{name} {value!r}: must be {want}")


def check_model_arg(model: str) -> None:
    if model == "tiny":
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


def check_output_dir(output_dir: str, resume: bool) -> None:
    """A fresh run needs an output dir with no run in it; --resume needs a complete checkpoint there."""
    if not output_dir:
        raise ArgumentError("--output_dir is empty")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ArgumentError(f"--output_dir {output_dir}: a file, not a folder")
    if resume:
        if checkpoint_path(output_dir) is None:
            raise ArgumentError(f"--resume: no complete checkpoint in {output_dir} (expected "
                                f"{os.path.join(output_dir, 'checkpoint', 'trainer_state.json')}); drop --resume for a "
                                "fresh run in a new --output_dir")
    elif os.path.isdir(output_dir) and (found := [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]):
        raise ArgumentError(f"--output_dir {output_dir} holds another run ({', '.join(found)}): pass --resume to go on "
                            "with it, or choose a new --output_dir")


def setup_accelerator(args, algo: str) -> Accelerator:
    """Accelerator with TensorBoard tracking under `output_dir`, and seeding as one block (per-rank offset)."""
    # Several processes without CUDA (e.g. `accelerate launch --multi_gpu` on a CPU machine): gloo needs cpu=True,
    # or accelerate silently runs each process as a world of one.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = not torch.cuda.is_available() and world > 1
    # accelerate launch --config_file configs/fsdp.yaml (or deepspeed_zero3.yaml) sets this; without GPUs accelerate
    # either refuses the plugin or quietly runs plain data parallel (each process holding the whole model) instead
    sharding = next((n for n in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{n}", "").lower() == "true"), None)
    no_sharding = (f"the accelerate config asks for {sharding}, which needs GPUs: accelerate does not shard on CPU "
                   "processes. On a CPU machine run `python SCRIPT.py` (one process) or `accelerate launch --multi_gpu "
                   "--num_processes N SCRIPT.py` (N gloo processes, data parallel); configs/fsdp.yaml is for GPU nodes")
    try:
        accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision="bf16" if args.precision == "bf16" else "no",
                                  log_with=args.report_to or None, project_dir=args.output_dir, cpu=cpu)
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
    accelerator.print(f"{algo}: {accelerator.num_processes} process(es), device {accelerator.device}")
    if accelerator.is_main_process:  # what ran: tests read the world size from here
        os.makedirs(args.output_dir, exist_ok=True)
        write_json_atomic(os.path.join(args.output_dir, "run.json"),
                          {"algo": algo, "world_size": accelerator.num_processes, "args": config})
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
        raise ValueError(f"{n_examples} training examples do not fill one micro-batch of {args.per_device_batch_size} on "
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


def global_token_scale(accelerator: Accelerator, mask: torch.Tensor) -> torch.Tensor:
    """Factor that turns a per-process token mean into this process's share of the global token mean: DDP averages
    gradients over processes, so loss_local * (n_local * world / n_global) sums to the global token mean."""
    n_local = mask.sum()
    n_global = accelerator.reduce(n_local.detach().clone(), reduction="sum")
    return n_local * accelerator.num_processes / n_global.clamp(min=1)


def log_metrics(accelerator: Accelerator, metrics: dict, step: int, output_dir: str) -> None:
    """Log to the trackers and append to `output_dir/metrics.jsonl` (main process), one line per optimizer step."""
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: dict) -> None:
    """Atomic: accelerate's full state (models, optimizers, registered schedulers, RNG) plus `state` goes to a temp
    dir that is renamed into place only when complete, so a kill during the save leaves the last good one intact.
    trainer_state.json, written last, lists every file with its size, so --resume can tell a damaged checkpoint."""
    final, tmp, old = (os.path.join(output_dir, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)  # before any process writes into it: under FSDP every process saves its own shards
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process has written its part (shards, its own RNG state) before the rename
    if accelerator.is_main_process:
        files = {os.path.relpath(os.path.join(d, f), tmp): os.path.getsize(os.path.join(d, f))
                 for d, _, names in os.walk(tmp) for f in names}
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), dict(state, files=files))
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoint_path(output_dir: str) -> str | None:
    """The last complete checkpoint in `output_dir`: checkpoint/, or checkpoint.old/ if a save was cut off between its
    two renames; None if there is none. Raises ArgumentError if one is damaged: a file it listed is missing or has
    another size."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(output_dir, name)
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            continue
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                files = json.load(f).get("files", {})
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArgumentError(f"--resume: {os.path.join(path, 'trainer_state.json')} is damaged ({e})") from None
        for rel, size in files.items():
            file = os.path.join(path, rel)
            if not os.path.isfile(file):
                raise ArgumentError(f"--resume: the checkpoint is incomplete: {file} is missing")
            if os.path.getsize(file) != size:
                raise ArgumentError(f"--resume: {file} has {os.path.getsize(file)} bytes, {size} when it was saved: "
                                    "the checkpoint is damaged")
        return path
    return None


def load_checkpoint(accelerator: Accelerator, output_dir: str) -> dict:
    """Restore the last complete checkpoint (`checkpoint_path`; validate_args made sure there is one). Returns the
    trainer state saved with it (step, epoch, batch, results)."""
    path = checkpoint_path(output_dir)
    try:
        accelerator.load_state(path)
    except Exception as e:
        raise RuntimeError(f"--resume: the checkpoint in {path} cannot be loaded: {type(e).__name__}: {e}") from e
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    accelerator.print(f"resumed from {path} at step {state['step']}")
    return state


def full_state_dict(accelerator: Accelerator, model) -> dict:
    """The consolidated state dict of a prepared model (on the main process; collective under sharding), with each
    tied weight under its first name only, as an unsharded save_pretrained writes it. accelerate's `get_state_dict`,
    except for FSDP1 without CUDA (the CPU tests): there torch's gather with offload_to_cpu=True, which accelerate
    always asks for, crashes the process (torch 2.13), so the gather stays where the weights are."""
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


def save_model(accelerator: Accelerator, model, tokenizer, path: str, final: bool = True) -> None:
    """save_pretrained (safetensors, tokenizer included), consolidated across processes (FSDP-safe). The final save of a
    LoRA model merges it first (in place, see `merge_lora`), so it is the same format with or without --lora_r; a save
    during training (`final=False`, e.g. model_epoch1/) of a LoRA model writes its adapters (peft's format, which
    from_pretrained loads onto the base when peft is installed) and leaves the model as it is."""
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    merged = merge_lora(unwrapped) if final else None  # on every process, so that all keep the same model after the save
    if merged is not None:  # LoRA: save the merged model, loadable without peft (the state dict has adapter keys)
        unwrapped, state_dict = merged, None
    if accelerator.is_main_process:
        unwrapped.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    accelerator.wait_for_everyone()


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
    """Greedy accuracy; sampled accuracy (the paper's T=0.7, top_p=0.9, top_k=16) as mean and std over seeds;
    optionally pass@k from `pass_n` samples per problem (default sampling as above) on the first `pass_problems`
    problems (None: all; pass_n samples per problem make this the costly part). `model` may be prepared (sharded)."""
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
    """`evaluate` on the untrained reference, cached under `cache_dir/eval/` so that every script on the same
    model, task and test set reuses it. `eval_kwargs` (e.g. pass_n, pass_k, pass_sampling) go to `evaluate` and
    into the cache key."""
    key = cache_key(dict(model=model_key(args), task=args.task, test_file=data_key(args, "test"), n=len(problems),
                         max_new_tokens=args.max_new_tokens, seed=args.seed, seeds=args.eval_seeds,
                         chunk=args.gen_batch_size, v=2, **eval_kwargs))
    path = os.path.join(args.cache_dir, "eval", f"{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    with reference_mode(accelerator.unwrap_model(model)):
        out = evaluate_run(model, tokenizer, problems, args, accelerator, **eval_kwargs)
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, out)
    return out


@torch.no_grad()
def value_traces(policy, value_model, tokenizer, problems: list[dict], args, accelerator=None, n_correct: int = 1,
                 n_incorrect: int = 1, n_problems: int = 32, n_per: int = 4) -> dict:
    """The DQO paper's value trace (Table 4). Sample `n_per` responses per problem for the first `n_problems` (the
    paper's evaluation sampling; `policy` and `value_model` prepared or not; `args`: task, seed, max_new_tokens,
    gen_batch_size), split each into segments and read V at each segment end (the state after its last token; for
    the last segment, before its stop token). Returns {"traces": the first `n_correct` correct and `n_incorrect`
    incorrect ones, "stats", "n_responses"}. On arith each segment is marked against the verifier's first wrong step,
    and stats, over all sampled responses, gives the mean change of V across correct steps and across the first wrong
    step, and the AUC with which the drop −dV ranks first-wrong-step segments above correct-step ones."""
    problems = problems[:n_problems]
    prompts = [encode_prompt(tokenizer, p["question"], args.task) for p in problems]
    rows = rollout(policy, tokenizer, prompts, [p["answer"] for p in problems], args.task, n=n_per, seed=args.seed,
                   max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, accelerator=accelerator,
                   desc="value trace", **EVAL_SAMPLING)
    was_training = value_model.training
    value_model.eval()
    device = next(value_model.parameters()).device
    traces = []
    for s in range(0, len(rows), args.gen_batch_size):
        chunk = rows[s : s + args.gen_batch_size]
        batch = collate(chunk, tokenizer.pad_token_id)
        values = value_model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()  # (B, T)
        for i, r in enumerate(chunk):
            p, n, ends = len(r["prompt_ids"]), len(r["response_ids"]), segment_ends(tokenizer, r["response_ids"])
            wrong = arith_first_wrong(r) if args.task == "arith" else None
            segs, a = [], 0
            for j, e in enumerate(ends):
                text = tokenizer.decode(r["response_ids"][a:e], skip_special_tokens=True)
                status = "" if args.task != "arith" else "ok" if wrong is None or j < wrong else "WRONG" if j == wrong else "-"
                segs.append({"text": text, "value": values[i, p + min(e, n - 1)].item(), "status": status})
                a = e
            traces.append({"question": problems[r["prompt_idx"]]["question"], "reward": r["reward"],
                           "value_start": values[i, p].item(), "segments": segs, "first_wrong": wrong})
    value_model.train(was_training)
    stats = {}
    if args.task == "arith":
        dv = {"ok": [], "WRONG": []}
        for t in traces:
            prev = t["value_start"]
            for sg in t["segments"]:
                dv.setdefault(sg["status"], []).append(sg["value"] - prev)
                prev = sg["value"]
        stats = {f"mean dV at {k} segments": sum(v) / len(v) for k, v in dv.items() if v and k in ("ok", "WRONG")}
        if dv["ok"] and dv["WRONG"]:  # P(−dV at a first wrong step > −dV at a correct step), ties counting half
            wrong, ok = -np.array(dv["WRONG"])[:, None], -np.array(dv["ok"])[None, :]
            stats["AUC of -dV, first wrong vs correct steps"] = float((wrong > ok).mean() + 0.5 * (wrong == ok).mean())
    picked = [t for t in traces if t["reward"] == 1.0][:n_correct] + [t for t in traces if t["reward"] != 1.0][:n_incorrect]
    return {"traces": picked, "stats": stats, "n_responses": len(traces)}


def format_value_traces(out: dict) -> str:
    """Plain text: per response, V at the start and at each segment end, the segment's status, and the segment."""
    lines = ["value trace: learned V at each segment end (DQO paper, Table 4)"]
    for t in out["traces"]:
        lines += ["", f"{'correct' if t['reward'] == 1.0 else 'incorrect'} response to: {t['question']}",
                  f"  {'V':>7}  {'step':<6} segment", f"  {t['value_start']:>7.3f}  {'':<6} (start)"]
        lines += [f"  {sg['value']:>7.3f}  {sg['status']:<6} {sg['text'].strip()!r}" for sg in t["segments"]]
    if out["stats"]:
        lines += ["", f"over {out['n_responses']} sampled responses: "
                  + ", ".join(f"{k} {v:+.3f}" for k, v in out["stats"].items())]
    return "\n".join(lines)


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
                prompt_tokens: int, max_new_tokens: int, online_rows: int = 0) -> dict[str, dict[str, float]]:
    """Peak bytes on one GPU in each step of `algo` under configs/fsdp.yaml (FSDP2 full shard over `world` GPUs, bf16
    mixed precision with fp32 master weights, activation checkpointing), by component. `config`: the model's
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
    tie_word_embeddings. Sequences are `prompt_tokens + max_new_tokens` long; `online_rows`: SPO's fresh rollouts per
    micro-batch (0: no frozen reference and rollout copies).
    Steps: "generate" (the offline dataset, evaluations, DQO's process scores and value traces: the policy gathered in
    bf16 plus the KV cache), "score" (reference log-probs of the offline dataset: SCORE_MAX_TOKENS tokens per forward,
    the sampler's warp on LOGPROB_CHUNK_LOGITS logits), "train" (one micro-batch forward and backward) and, for SPO,
    "rollout" (the frozen rollout copy generating a call of `gen_batch_size` sequences: spo.py generates a refresh
    window's rollouts in calls of that size). Every step counts the whole training
    state, allocated or not yet. Not counted: the CUDA context and allocator fragmentation (keep a few GB free)."""
    V, H, F, L = (config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"))
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    params, layer = param_count(config)
    head = 0 if config.get("tie_word_embeddings", True) else V * H
    value_params = params - head + H + 1  # the backbone and a scalar head
    trained = [params] + ([value_params] if algo in ("dro", "dqo") else [])
    T, N = prompt_tokens + max_new_tokens, per_device_batch_size * (prompt_tokens + max_new_tokens)
    N *= 2 if algo == "dpo" else 1  # a micro-batch of pairs: chosen and rejected
    token_act = 2 * (5 * H + 2 * q + 2 * kv + 3 * F)  # bf16 tensors one layer keeps per token for its backward
    state = {"sharded weights, grads, Adam (fp32)": sum(16 * p / world for p in trained)}
    if algo == "kto" or (algo == "spo" and online_rows):
        state["frozen reference (bf16)"] = 2 * params
    if algo == "spo" and online_rows:
        state["frozen rollout policy (bf16)"] = 2 * params
    kv_cache = kv_bytes_per_token(config)
    gen = lambda n, gathered: {  # noqa: E731
        **state, **({"policy gathered (bf16)": 2 * params} if gathered else {}),
        "KV cache": n * T * kv_cache, "prefill activations": n * prompt_tokens * token_act,
        "sampling logits (bf16 + fp32 warps)": n * V * 10}
    plan = {"generate": gen(gen_batch_size, True),
            "score": {**state, "policy gathered (bf16)": 2 * params, "layer activations": SCORE_MAX_TOKENS * token_act,
                      "log-prob chunk with the sampler's warp (fp32 + sort)": LOGPROB_CHUNK_LOGITS * 22},
            "train": {**state, "gathered layers + their grads (2 prefetched)": 2 * layer * (2 + 4),
                      "embedding/head unit + its grad": V * H * (2 + 4) * len(trained),
                      "checkpointed layer inputs": len(trained) * L * N * H * 2,
                      "one layer recomputed, forward + backward": 2 * N * token_act,
                      "log-prob chunk, forward + backward (fp32)": LOGPROB_CHUNK_LOGITS * 10}}
    if algo == "spo" and online_rows:
        plan["rollout"] = gen(gen_batch_size, False)
    return plan
