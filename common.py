"""Data, rollouts and grading, as a reader of any algorithm meets them, in the order data flows through a run:

    tasks and prompts      the embedded task `arith`; GSM8K, MATH, AIME24 from the hub or a local JSONL file
    grading                grade(response, answer, task) -> 0 or 1 (math-verify for MATH and AIME, with a timeout)
    tokens and masks       prompt and response encoded separately; collate into (B, T) batches with exact masks
    log-probs              token_logprobs: per-token log-probs without the (B, T, V) logits
    generation, rollouts   generate_batch, rollout, score_rows (under FSDP from full parameters: runtime.sharding)
    offline dataset        n reference samples per prompt, graded, with reference log-probs; import and export
    models                 loading (precision, LoRA), the value network, frozen copies, the reference's identity
    batches                each process's micro-batches, and how many optimizer steps the data gives
    evaluation             greedy and sampled accuracy, pass@k, the cached reference evaluation, reports

Nothing in here is part of an algorithm: losses, targets, pair building, process rewards and rollout policies live in
the algorithm files, so that `diff rs.py dqo.py` shows all of DQO. Everything here is used by at least two of the seven
entry points (tests/test_layout.py checks it). What keeps a run safe and launchable is in runtime/, which a reader may
skip: this file uses its verified cache, math-verify's helper processes and `unsharded` (full parameters under FSDP).
"""

import copy
import functools
import hashlib
import json
import math
import os
import random
import re
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from runtime.files import (OUTPUTS, cache_key, cached_chunks, content_digest, model_key, on_main, read_chunk,
                           write_chunk, write_json_atomic, write_jsonl_atomic)
from runtime.mathverify import math_equal
from runtime.sharding import unsharded

TASKS = ("arith", "gsm8k", "math", "aime24")
TASK_MAX_NEW_TOKENS = {"arith": 64, "gsm8k": 512, "math": 1024, "aime24": 2048}  # generation length per task
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


# The embedded task `arith`: seeded multi-step arithmetic word problems in GSM8K format ---------------------------------
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


# Tasks: loading from the hub or a local JSONL file ---------------------------------------------------------------------
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


def _text(row: dict, field: str, where: str) -> str:
    """row[field], a non-empty string; else DataError naming `where` (the file and row) and the field."""
    if row.get(field) is None:
        raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(row)})")
    if not isinstance(row[field], str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__} ({row[field]!r:.60})")
    if not row[field].strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return row[field]


def _problem_from_row(task: str, row: dict, where: str) -> dict:
    """Normalise one raw row into {question, answer, solution}; `where` names the file and row for errors."""
    if task == "gsm8k":
        question, solution = _text(row, "question", where), _text(row, "answer", where)
        if "####" not in solution:
            raise DataError(f"{where}: field 'answer' has no '#### <number>' line")
        answer = solution.rsplit("####", 1)[1].strip()
        if parse_number(answer) is None:
            raise DataError(f"{where}: field 'answer': final answer {answer!r} after '####' is not a number")
        return {"question": question, "answer": answer, "solution": solution}
    question = _text(row, "problem", where)
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


# Grading: grade(response, answer, task) -> 0.0 or 1.0, never raises for any response or answer -------------------------
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
        return float(math_equal(pred, answer, GRADE_TIMEOUT_S))
    except Exception:  # a grader must never take a training run down
        return 0.0


# Tokenization: prompt and response encoded separately, masks exact at the boundary -------------------------------------
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


# Per-token log-probs: the backbone, then the output projection in checkpointed chunks, never the (B, T, V) logits ------
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
    """The transformers causal LM inside DDP (`.module`) and peft (`get_base_model`) wrappers.
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
    """(n, H) hidden states, (n,) next tokens -> (len(warps), n) log-probs: the logit minus an fp32 logsumexp, for each
    warp (None: the model's own distribution). Only this chunk's logits exist, projected in fp32 outside autocast: a bf16
    logit is off by up to 0.06 nats at |logit| ≈ 30, and DQO's importance weight sums ~200 log-probs (logprob_bf16.py).
    The fp32 copy of the weight is transient: V x H x 4 bytes per chunk (3.1 GB at Gemma-7B), as much for its gradient."""
    bias = None if head["bias"] is None else head["bias"].float()
    fp32 = dict(head, weight=head["weight"].float(), bias=bias, autocast=None)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = _head_logits(hidden.float(), fp32)  # (n, V) fp32
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
    `warp_logits`), 0 at position 0 and at padding. The model is called through its wrapper (DDP, FSDP, peft), so their
    hooks run, with `logits_to_keep=1`; a hook on the backbone takes the final hidden states, and the output projection
    runs here on `chunk_tokens` tokens at a time (default: LOGPROB_CHUNK_LOGITS logits), checkpointed so backward
    recomputes each chunk: a few chunks of extra memory, whatever B and T. A model's first call checks its own last
    logits against `_head_logits`, so an architecture that needs more fails loudly."""
    lm = unwrap_causal_lm(model)
    captured = {}

    def keep_hidden(module, args, output):  # inside the forward: the FSDP2 root's weights are unsharded here
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


# Generation and rollouts: graded samples, and the log-probs of given rows ----------------------------------------------
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
    flat = [i for i in chunk for _ in range(n)]
    device = next(model.parameters()).device
    # the caller's random state is left as it was: with a rollout or its rows from a cache, dropout draws the same
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
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

# The offline dataset: n reference samples per training prompt, graded, with reference log-probs stored -----------------
def build_offline_dataset(accelerator: Accelerator, model, tokenizer, problems: list[dict], *, model_name: str, task: str,
                          n: int, sampling: dict, max_new_tokens: int, gen_batch_size: int, seed: int, cache_dir: str,
                          train_file: str | None = None, offline_data: str | None = None,
                          save_to: str | None = None) -> list[dict]:
    """The DQO paper's offline dataset: for each training prompt, `n` samples from the reference `model` (`model_name`,
    as --model) under `sampling` (temperature, top_p, top_k), graded 1/0, with the reference's per-token log-probs
    (`ref_logps`) and the sampler's (`sampler_logps`); with `offline_data`, that file's rows (`import_offline_dataset`).
    Cached under `cache_dir/offline/<key>/`, keyed by model, task, data (`train_file`: where `problems` came from), n,
    sampling and seed, so another script reuses it; exported as one file (`save_to`, else offline.jsonl beside it)."""
    if offline_data:
        return import_offline_dataset(accelerator, model, tokenizer, problems, path=offline_data, model_name=model_name,
                                      task=task, sampling=sampling, max_new_tokens=max_new_tokens,
                                      gen_batch_size=gen_batch_size, cache_dir=cache_dir, save_to=save_to)
    sampling = dict(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
    key_fields = dict(model=model_key(model_name, cache_dir, precision_of(accelerator)), task=task, split="train",
                      train_file=content_digest(train_file, cache_dir), n_prompts=len(problems), n=n, **sampling,
                      max_new_tokens=max_new_tokens, seed=seed, chunk=gen_batch_size)
    prompts = [encode_prompt(tokenizer, p["question"], task) for p in problems]
    answers = [p["answer"] for p in problems]
    plan = _chunk_plan(len(prompts), n, gen_batch_size)

    def sample(c: int) -> list[dict]:  # chunk c: its prompts' samples, graded, with the log-probs of both
        rows = rollout_chunk(policy, tokenizer, prompts, answers, task, plan[c], n, sampling, max_new_tokens,
                             seed * 1_000_003 + c)
        score_rows(policy, rows, tokenizer.pad_token_id, warp=sampling)
        return [dict(r, ref_logps=r.pop("logps")) for r in rows]

    with unsharded(model) as policy, reference_mode(policy):  # collective under sharding: every process enters
        chunks, root = cached_chunks(accelerator, os.path.join(cache_dir, "offline"), key_fields,
                                     [len(chunk) * n for chunk in plan], sample, "offline dataset")
    for c, chunk in enumerate(chunks):  # a cache edited by hand must not train on a reward that is not 0 or 1
        for i, r in enumerate(chunk, 1):
            if r.get("reward") not in (0, 1) or isinstance(r.get("reward"), bool):
                raise DataError(f"{root}/chunk-{c:05d}.jsonl: row {i}: reward {r.get('reward')!r} is not 0 or 1; delete "
                                f"{root} to rebuild it")
    rows = [r for chunk in chunks for r in chunk]
    accelerator.print(f"offline dataset: {len(rows)} responses to {len(prompts)} prompts, mean reward "
                      f"{np.mean([r['reward'] for r in rows]):.3f}, truncated {np.mean([r['truncated'] for r in rows]):.3f}"
                      f" ({root})")
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
        if isinstance(row.get("answer"), int) and not isinstance(row["answer"], bool):
            row["answer"] = str(row["answer"])
        for name in ("question", "response", "answer"):
            _text(row, name, where)
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
    """The offline dataset from the file `path` (`read_offline_data`), as `build_offline_dataset` gives it: the prompt
    and the response encoded (an export's own ids when they are this tokenizer's: `_stored_ids`; a response over
    `max_new_tokens` cut there, `truncated` and graded on what is left, as a sample cut off at the limit); the file's
    reward, else the grader's; the reference's log-probs, plain and under `sampling` (μ of imported rows: the reference's
    sampling, as for self-sampled rows); questions numbered by first appearance, those not among `problems` used anyway
    with a warning. Cached like `build_offline_dataset`, keyed by the file."""
    src = read_offline_data(path)
    sampling = dict(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
    key_fields = dict(model=model_key(model_name, cache_dir, precision_of(accelerator)), task=task,
                      offline_data=content_digest(path), n_rows=len(src), **sampling, max_new_tokens=max_new_tokens,
                      chunk=gen_batch_size, v=2)
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
    prompts = {}  # question -> prompt ids

    def encode(c: int) -> list[dict]:  # chunk c: its rows as sampled rows, graded, with the log-probs of both
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
        return [dict(r, ref_logps=r.pop("logps")) for r in rows]

    with unsharded(model) as policy, reference_mode(policy):  # collective under sharding: every process enters
        stops = stop_token_ids(policy, tokenizer)
        parts, root = cached_chunks(accelerator, os.path.join(cache_dir, "offline"), key_fields,
                                    [len(chunk) for chunk in chunks], encode, "import offline data")
    rows = [r for part in parts for r in part]
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
        write_jsonl_atomic(path, [dict(question=problems[r["prompt_idx"]]["question"], response=r["response"],
                                        answer=r["answer"], reward=r["reward"], **{k: r[k] for k in EXPORT_FIELDS})
                                   for r in rows])
    OUTPUTS.append(("offline dataset", path))


# Models ----------------------------------------------------------------------------------------------------------------
TINY_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")  # `--model tiny`


def precision_of(accelerator: Accelerator) -> str:
    """fp32 or bf16: what the accelerator computes in."""
    return "bf16" if accelerator.mixed_precision == "bf16" else "fp32"


def load_model_and_tokenizer(model_name: str, accelerator: Accelerator | None = None, lora_r: int = 0,
                             gradient_checkpointing: bool = False, trainable: bool = True):
    """The model and tokenizer `model_name` names (as --model): `tiny` (assets/tiny), a hub id or a local
    save_pretrained folder; the tokenizer gets a pad token if it has none. In the accelerator's precision (none: fp32):
    fp32 loads fp32, bf16 the stored dtype; a `trainable` model gets fp32 master weights (`master_weights`) unless the
    launch shards it (FSDP2's `prepare` upcasts them itself, on each process's shard only). `lora_r` > 0: LoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = TINY_SHIPPED if model_name == "tiny" else model_name
    if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"--model {path}: no such directory (a local model must be a save_pretrained folder)")
    bf16 = accelerator is not None and precision_of(accelerator) == "bf16"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if bf16 else torch.float32)  # auto: as saved
    if gradient_checkpointing:
        # renamed in recent transformers; a GPU node's own older install has only gradient_checkpointing_enable
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.config.use_cache = False
    if lora_r:
        model = add_lora(model, lora_r)
    sharded = accelerator is not None and accelerator.distributed_type.name == "FSDP"
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


# Batches: each process's micro-batches, and the optimizer steps the data gives -----------------------------------------
def iterate_batches(examples: list, per_device_batch_size: int, grad_accum: int, seed: int, epoch: int,
                    accelerator: Accelerator, start: int = 0) -> Iterator[tuple[int, list]]:
    """This process's micro-batches of one epoch, as (index, examples), from index `start` on (for resume). The
    permutation depends only on (seed, epoch), cut into global batches and those into per-process slices: one process
    with batch 2b sees the data of two with batch b. Incomplete global batches and accumulation windows are dropped."""
    world, rank = accelerator.num_processes, accelerator.process_index
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(len(examples), generator=g).tolist()
    global_bs = per_device_batch_size * world
    n_batches = len(perm) // global_bs // grad_accum * grad_accum
    for b in range(start, n_batches):
        idx = perm[b * global_bs + rank * per_device_batch_size : b * global_bs + (rank + 1) * per_device_batch_size]
        yield b, [examples[i] for i in idx]


def plan_steps(n_examples: int, per_device_batch_size: int, world: int, grad_accum: int, epochs: int | None,
               max_steps: int | None) -> dict:
    """How `n_examples` fill optimizer steps: per_device_batch_size, grad_accum, steps_per_epoch, total_steps, epochs.
    Rows left over after the last whole global batch of an epoch are dropped; fewer examples than one global batch give
    fewer accumulation steps, then smaller micro-batches. With `epochs` unset, as many as `max_steps` needs. Changes
    nothing: the caller applies the plan (runtime.launch.fit_to_data)."""
    if n_examples < world:
        raise DataError(f"{n_examples} training examples do not fill one micro-batch of {per_device_batch_size} on each "
                        f"of {world} processes, not even one example on each")
    per_device_batch_size = min(per_device_batch_size, n_examples // world)
    micro = n_examples // (per_device_batch_size * world)
    grad_accum = min(grad_accum, micro)
    steps_per_epoch = micro // grad_accum
    epochs = epochs or math.ceil(max_steps / steps_per_epoch)
    total = min(steps_per_epoch * epochs, max_steps or steps_per_epoch * epochs)
    return dict(per_device_batch_size=per_device_batch_size, grad_accum=grad_accum, steps_per_epoch=steps_per_epoch,
                total_steps=total, epochs=epochs)


def throughput(tokens: float, since: float) -> float:
    return tokens / max(time.time() - since, 1e-9)


# Evaluation ------------------------------------------------------------------------------------------------------------
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


def evaluate_run(model, tokenizer, problems: list[dict], accelerator: Accelerator, **settings) -> dict:
    """`evaluate` (`settings`: its keyword arguments, task included), and this process's peak memory so far."""
    return dict(evaluate(model, tokenizer, problems, accelerator=accelerator, **settings),
                peak_memory_mb=peak_memory_mb(accelerator.device))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, else the maximum resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def evaluate_reference(model, tokenizer, problems: list[dict], accelerator: Accelerator, model_name: str, cache_dir: str,
                       test_file: str | None = None, **settings) -> dict:
    """`evaluate_run` on the untrained reference `model_name`, cached (verified) under `cache_dir/eval/` for every script
    on the same model, task and test set (`test_file`: `problems`' local file); `settings` go to `evaluate` and the key."""
    s = dict(settings)  # in the key under the names caches were written with
    key = dict(model=model_key(model_name, cache_dir, precision_of(accelerator)), task=s.pop("task"),
               test_file=content_digest(test_file, cache_dir), n=len(problems), max_new_tokens=s.pop("max_new_tokens"),
               seed=s.pop("seed"), seeds=s.pop("sampled_seeds"), chunk=s.pop("gen_batch_size"), v=4, **s)
    root = os.path.join(cache_dir, "eval", cache_key(key))
    # read on the main process only: another run may write it between two processes' reads, and they must all agree
    if (cached := on_main(accelerator, lambda: read_chunk(root, 0, 1))) is not None:
        return cached[0]
    with reference_mode(accelerator.unwrap_model(model)):
        out = evaluate_run(model, tokenizer, problems, accelerator, **settings)
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        write_chunk(root, 0, [out], point="eval.chunk.before_check")
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
