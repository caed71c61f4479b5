"""Your own samples (--offline_data) and the exported offline dataset (offline.jsonl, --save_offline_data): rows are
tokenized, graded and scored as self-sampled ones; bad rows name the file, row and field; the export reads back with
--offline_data and trains to the same losses as the cache it came from."""

import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, run_command

import common
import runtime.launch

TRAIN = common.arith_problems("train", 6)

OFFLINE_FIELDS = ("question", "response", "answer", "reward")  # the import schema docs/your-samples.md gives


def _wrong(p: dict) -> str:
    """The gold solution with its final answer off by one: graded 0."""
    return p["solution"].rsplit("#### ", 1)[0] + f"#### {p['final'] + 1}"


def hand_built(path, problems=TRAIN, drop_reward_at: int = 2) -> list[dict]:
    """Two correct and two wrong responses per problem, rewards given except on one row (a correct one, 0-based
    `drop_reward_at`), written as JSONL to `path`."""
    rows = []
    for p in problems:
        for _ in range(2):
            rows.append({"question": p["question"], "response": p["solution"], "answer": p["answer"], "reward": 1})
            rows.append({"question": p["question"], "response": _wrong(p), "answer": p["answer"], "reward": 0})
    rows[drop_reward_at].pop("reward")
    write_jsonl(path, rows)
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def run(script: str, cache: str, out: str, *flags: str) -> SimpleNamespace:
    """`script` on the tiny default, few prompts, few steps, in a child of the warm runner; returns its stdout and
    stderr. Raises with them if it fails."""
    cmd = [script, "--cache_dir", cache, "--output_dir", out, "--report_to", "", "--n_train_prompts", "8", "--n_test", "8",
           "--eval_seeds", "0", "--per_device_batch_size", "8", "--save_every", "0", *flags]
    code, stdout, stderr = run_command(cmd, env=dict(OMP_NUM_THREADS="1"), timeout=300)
    if code != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {code}\n{stdout[-3000:]}\n{stderr[-4000:]}")
    return SimpleNamespace(stdout=stdout, stderr=stderr)


def metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def import_args(cache: str, path: str, **kw) -> dict:
    """build_offline_dataset's settings for importing the file `path`, as the scripts' defaults give them."""
    return {**dict(model_name="tiny", cache_dir=cache, task="arith", n=4, sampling=dict(temperature=0.9, top_p=0.9, top_k=16),
                   max_new_tokens=64, seed=1, gen_batch_size=8, offline_data=path), **kw}


# ---------------------------------------------------------------------------------------------------------------------
# Import: tokenized, graded and scored exactly as self-sampled rows; cached by the file's content
# ---------------------------------------------------------------------------------------------------------------------
def test_imported_rows_are_tokenized_graded_and_scored_as_samples(tiny_model, tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    model, tok = tiny_model
    src = hand_built(tmp_path / "mine.jsonl")
    cache = str(tmp_path / "cache")
    settings = import_args(cache, str(tmp_path / "mine.jsonl"))
    accelerator = Accelerator()
    rows = common.build_offline_dataset(accelerator, model, tok, TRAIN, **settings)
    eot = common.end_of_turn_id(tok)
    assert len(rows) == len(src) == 24
    assert [r["prompt_idx"] for r in rows] == [i for i in range(6) for _ in range(4)]
    for r, s in zip(rows, src):
        assert r["prompt_ids"] == common.encode_prompt(tok, s["question"], "arith")
        assert r["response_ids"] == tok(s["response"], add_special_tokens=False)["input_ids"] + [eot]
        assert r["response_ids"][-1] == eot and not r["truncated"]
        assert r["reward"] == common.grade(s["response"], s["answer"], "arith") == s.get("reward", 1.0)
        assert len(r["ref_logps"]) == len(r["sampler_logps"]) == len(r["response_ids"])
    assert "reward" not in src[2] and rows[2]["reward"] == 1.0  # the grader filled the missing reward
    # the stored reference log-probs are the model's own, recomputed here
    batch = common.collate(rows[:8], tok.pad_token_id, token_fields=("ref_logps",))
    with torch.no_grad():
        lp = common.token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(lp * batch["mask"], batch["ref_logps"], rtol=1e-4, atol=1e-4)
    out = capsys.readouterr().out
    assert "24 responses to 6 prompts imported from" in out and "1 rewards by the grader" in out

    # cached under a key from the file's content: a second import scores nothing, an edited file is a new dataset
    calls, real = [], common.score_rows
    monkeypatch.setattr(common, "score_rows", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    assert common.build_offline_dataset(accelerator, model, tok, TRAIN, **settings) == rows and calls == []
    src[0]["reward"] = 0  # a different (given) reward: same path, new content
    write_jsonl(tmp_path / "mine.jsonl", src)
    edited = common.build_offline_dataset(accelerator, model, tok, TRAIN, **settings)
    assert calls and edited[0]["reward"] == 0.0 and len(os.listdir(os.path.join(cache, "offline"))) == 2

    # the export: one JSONL in the import schema plus token ids, log-probs and `truncated`, readable by `datasets`
    import datasets

    export = read_jsonl(os.path.join(cache, "offline", sorted(os.listdir(os.path.join(cache, "offline")))[0],
                                     "offline.jsonl"))
    assert len(export) == 24 and set(export[0]) == {*OFFLINE_FIELDS, *common.EXPORT_FIELDS}
    path = os.path.join(cache, "offline", sorted(os.listdir(os.path.join(cache, "offline")))[0], "offline.jsonl")
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 24 and ds[0]["question"] == src[0]["question"]

    # Parquet, as `datasets` writes it, gives the same rows as the JSONL
    datasets.Dataset.from_list(hand_built(tmp_path / "again.jsonl")).to_parquet(str(tmp_path / "mine.parquet"))
    parquet = common.build_offline_dataset(accelerator, model, tok, TRAIN,
                                           **import_args(cache, str(tmp_path / "mine.parquet")))
    assert [(r["response_ids"], r["reward"]) for r in parquet] == [(r["response_ids"], r["reward"]) for r in rows]


def test_long_responses_are_truncated_and_unknown_questions_warned(tiny_model, tmp_path, capsys):
    """A response over --max_new_tokens is cut there like a sample that reached the limit (no end-of-turn token,
    `truncated`, graded on what is left, a given reward dropped); a question outside the training prompts is used,
    with a warning naming the first such row."""
    from accelerate import Accelerator

    model, tok = tiny_model
    p, other = TRAIN[0], common.arith_problems("test", 1)[0]
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"question": p["question"], "response": p["solution"], "answer": p["answer"], "reward": 1},
        {"question": other["question"], "response": other["solution"], "answer": other["answer"], "reward": 1}])
    n = len(tok(p["solution"], add_special_tokens=False)["input_ids"])
    cache = str(tmp_path / "cache")
    rows = common.build_offline_dataset(Accelerator(), model, tok, TRAIN, **import_args(cache, path, max_new_tokens=n // 2))
    r = rows[0]
    assert r["truncated"] and r["finish"] == "length" and len(r["response_ids"]) == n // 2
    assert common.end_of_turn_id(tok) not in r["response_ids"] and "####" not in r["response"]
    assert r["reward"] == 0.0  # graded on the cut text, which has no final answer; the file's 1 no longer applies
    out = capsys.readouterr().out
    assert (f"warning: {path}: 1 of 2 rows have a question that is not among the 6 training prompts of task arith "
            "(first: row 2); they are used as they are") in out
    assert "responses over --max_new_tokens" in out and "truncated" in out


# ---------------------------------------------------------------------------------------------------------------------
# Bad rows: one error naming the file, the row and the field, before anything is loaded
# ---------------------------------------------------------------------------------------------------------------------
GOOD = {"question": "Ann has 3 apples. How many apples does Ann have now?", "response": "#### 3", "answer": "3"}
BAD_ROWS = [  # (rows after one good row, the message)
    ([{"response": "#### 3", "answer": "3"}], "row 2: missing field 'question'"),
    ([dict(GOOD, question=7)], "row 2: field 'question' must be a string, got int"),
    ([dict(GOOD, question=" ")], "row 2: field 'question' is empty"),
    ([dict(GOOD, response="")], "row 2: field 'response' is empty"),
    ([{"question": "q", "answer": "3"}], "row 2: missing field 'response'"),
    ([{"question": "q", "response": "r"}], "row 2: missing field 'answer'"),
    ([dict(GOOD, reward=2)], "row 2: field 'reward' is 2; it must be 0 or 1, or left out"),
    ([dict(GOOD, reward=0.5)], "row 2: field 'reward' is 0.5; it must be 0 or 1"),
    ([dict(GOOD, reward="1")], "row 2: field 'reward' is '1'; it must be 0 or 1"),
    ([dict(GOOD, reward=True)], "row 2: field 'reward' is True; it must be 0 or 1"),
    (["{not json"], "row 2: not valid JSON"),
    (["[1, 2]"], "row 2: a JSON object is expected, got list"),
]


@pytest.mark.parametrize("rows, message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_rows_name_file_row_and_field(rows, message, tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [GOOD, *rows])
    with pytest.raises(common.DataError) as exc:
        common.read_offline_data(path)
    assert str(exc.value) == f"{path}: {message}" or str(exc.value).startswith(f"{path}: {message}")


def test_bad_files_are_refused_in_validation(tmp_path, monkeypatch):
    """Whole-file problems, and the script's own refusal: `error: --offline_data: ...` before the accelerator starts,
    with the cache untouched."""
    import dqo

    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "samples.csv").write_text("question,response\n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    cases = [("empty.jsonl", "empty.jsonl: no rows"), ("missing.jsonl", "missing.jsonl: file not found"),
             ("samples.csv", "samples.csv: unknown format; --offline_data takes a .jsonl or .parquet file"),
             ("broken.parquet", "broken.parquet: not a readable Parquet file")]
    write_jsonl(tmp_path / "bad.jsonl", [GOOD, dict(GOOD, reward=3)])
    cases.append(("bad.jsonl", "bad.jsonl: row 2: field 'reward' is 3"))
    cache = tmp_path / "cache"
    (cache / "offline").mkdir(parents=True)
    (cache / "offline" / "keep.txt").write_text("an earlier run's cache")

    def no_work(*_, **__):
        raise AssertionError("bad input got past validation")

    monkeypatch.setattr(runtime.launch, "setup_accelerator", no_work)  # what start() calls after validation
    for name, message in cases:
        path = str(tmp_path / name)
        monkeypatch.setattr(sys, "argv", ["dqo.py", "--offline_data", path, "--cache_dir", str(cache), "--output_dir",
                                          str(tmp_path / "run"), "--report_to", ""])
        with pytest.raises(SystemExit) as exc:
            dqo.main()
        assert str(exc.value.code).startswith(f"error: --offline_data: {tmp_path}/{message}"), exc.value.code
    assert os.listdir(cache / "offline") == ["keep.txt"] and not os.path.exists(tmp_path / "run")
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    monkeypatch.setattr(sys, "argv", ["dqo.py", "--offline_data", good, "--save_offline_data", good, "--cache_dir",
                                      str(cache), "--output_dir", str(tmp_path / "run"), "--report_to", ""])
    with pytest.raises(SystemExit, match="the file --offline_data reads"):
        dqo.main()


# ---------------------------------------------------------------------------------------------------------------------
# End to end: DPO and DQO on a hand-built file; the round trip export -> import trains to the same losses
# ---------------------------------------------------------------------------------------------------------------------
def test_dpo_and_dqo_train_on_hand_built_samples(tiny_cache, tmp_path):
    src = hand_built(tmp_path / "mine.jsonl")
    for script in ("dpo.py", "dqo.py"):
        out, export = str(tmp_path / script), str(tmp_path / f"{script}.jsonl")
        proc = run(script, tiny_cache, out, "--offline_data", str(tmp_path / "mine.jsonl"), "--save_offline_data", export,
                   "--save_every", "1")
        assert f"run: model tiny, task arith, offline data imported from {tmp_path}/mine.jsonl" in proc.stdout
        rows = read_jsonl(export)
        assert [r["reward"] for r in rows] == [common.grade(s["response"], s["answer"], "arith") for s in src]
        assert [r["reward"] for r in rows] == [float(s.get("reward", 1)) for s in src]
        steps = metrics(out)
        assert [m["step"] for m in steps] == [1, 2, 3]  # 24 examples, 8 a step: DPO 2 x 2 pairs per prompt, DQO every row
        assert all(math.isfinite(m["losses/policy"]) for m in steps)
        if script == "dpo.py":
            assert "DPO pairs: 24 from 6 prompts; 0 prompts dropped" in proc.stdout
            assert steps[0]["losses/policy"] == pytest.approx(math.log(2), abs=1e-4)  # π = π_ref at the first step
        # the end of the console says where every output went; no tied-weights warning from the checkpoints
        assert f"outputs in {out}:" in proc.stdout and f"offline dataset: {export}" in proc.stdout
        assert "Removed shared tensor" not in proc.stdout + proc.stderr


def test_round_trip_export_then_import_trains_to_the_same_losses(tiny_cache, tmp_path):
    export, again = str(tmp_path / "export.jsonl"), str(tmp_path / "again.jsonl")
    flags = ("--n_samples", "4", "--max_steps", "3")
    proc = run("dqo.py", tiny_cache, str(tmp_path / "sampled"), *flags, "--save_offline_data", export)
    assert "offline data self-sampled by the reference" in proc.stdout
    proc = run("dqo.py", tiny_cache, str(tmp_path / "imported"), *flags, "--offline_data", export, "--save_offline_data",
               again)
    assert f"offline data imported from {export}" in proc.stdout
    rows, back = read_jsonl(export), read_jsonl(again)
    assert len(rows) == 32 and set(rows[0]) == {*OFFLINE_FIELDS, *common.EXPORT_FIELDS}
    # the import rebuilt the exported tokens, rewards and truncation exactly, and the reference log-probs
    exact = ("question", "response", "answer", "reward", "prompt_idx", "truncated", "prompt_ids", "response_ids")
    assert [{k: r[k] for k in exact} for r in back] == [{k: r[k] for k in exact} for r in rows]
    for r, s in zip(rows, back):
        assert s["ref_logps"] == pytest.approx(r["ref_logps"], abs=1e-5)
    a, b = metrics(str(tmp_path / "sampled")), metrics(str(tmp_path / "imported"))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("losses/policy", "losses/value", "rewards/return"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (k, x[k], y[k])


def test_docs_example_rows_read_and_grade(tmp_path):
    """docs/your-samples.md's three example rows are a valid file, and their rewards are the grader's (the third's is
    left out)."""
    with open(os.path.join(ROOT, "docs", "your-samples.md")) as f:
        section = f.read()
    lines = section.split("```json\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(lines) == 3
    rows = common.read_offline_data(write_jsonl(tmp_path / "example.jsonl", lines))
    assert [r["reward"] for r in rows] == [1.0, 0.0, None]
    assert [common.grade(r["response"], r["answer"], "arith") for r in rows] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("family", ["gemma-1.1", "llama-3.1", "qwen2"])
def test_imported_chat_rows_equal_the_model_s_own_samples(family, tmp_path):
    """With a chat template whose end of turn is not EOS, an imported response is the tokens the model itself generates
    for that text: the same prompt ids, the same response ids ending with the end-of-turn token, the same log-probs."""
    from accelerate import Accelerator
    from test_chat_tokens import ANSWER, FAMILIES, answering_model

    tok, model = answering_model(family, FAMILIES[family]["end_of_turn"])
    questions = ["What is 3+4?", "Ann has 3 apples and gets 4 more. How many?"]
    prompts = [common.encode_prompt(tok, q, "gsm8k") for q in questions]
    sampled = common.rollout(model, tok, prompts, ["7", "7"], "gsm8k", temperature=0.0, max_new_tokens=12)
    common.score_rows(model, sampled, tok.pad_token_id)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"question": q, "response": s["response"], "answer": "7"}
                                                 for q, s in zip(questions, sampled)])
    settings = import_args(str(tmp_path / "cache"), path, model_name=f"test/{family}", task="gsm8k", max_new_tokens=12)
    rows = common.build_offline_dataset(Accelerator(), model, tok, [{"question": q} for q in questions], **settings)
    eot = tok.convert_tokens_to_ids(FAMILIES[family]["end_of_turn"])
    for r, s in zip(rows, sampled):
        assert s["response"] == ANSWER and r["response_ids"][-1] == eot
        assert (r["prompt_ids"], r["response_ids"], r["reward"], r["truncated"]) == (
            s["prompt_ids"], s["response_ids"], s["reward"], s["truncated"])
        assert r["ref_logps"] == pytest.approx(s["logps"], abs=1e-5)


def test_an_export_read_back_keeps_its_own_tokens(tmp_path):
    """A sampled response's ids need not be those its text encodes to. An exported row carries them, and the import
    keeps them when they are this tokenizer's (same prompt ids, decoding to the text); otherwise the text is encoded."""
    from accelerate import Accelerator
    from test_chat_tokens import FAMILIES, answering_model

    tok, model = answering_model("gemma-2", FAMILIES["gemma-2"]["end_of_turn"])
    eot = common.end_of_turn_id(tok)
    spelled = tok.convert_tokens_to_ids(["#", "#", "#", "#", " ", "7"]) + [eot]  # "####" is also one token
    canonical = common.encode_response(tok, "#### 7")
    assert spelled != canonical and tok.decode(spelled, skip_special_tokens=True) == "#### 7"
    prompt = common.encode_prompt(tok, "What is 3+4?", "gsm8k")
    base = {"question": "What is 3+4?", "response": "#### 7", "answer": "7"}
    path = write_jsonl(tmp_path / "export.jsonl", [
        dict(base, prompt_ids=prompt, response_ids=spelled),  # this tokenizer's ids: kept
        dict(base, prompt_ids=prompt[1:], response_ids=spelled),  # another tokenizer's prompt: the text is encoded
        dict(base, prompt_ids=prompt, response_ids=spelled[:-2] + [eot]),  # ids of another text: the text is encoded
        dict(base, response="#### ", prompt_ids=prompt, response_ids=spelled[:5])])  # no stop id: truncated, kept
    settings = import_args(str(tmp_path / "cache"), path, model_name="test/gemma-2", task="gsm8k", max_new_tokens=12)
    rows = common.build_offline_dataset(Accelerator(), model, tok, [base], **settings)
    assert [r["response_ids"] for r in rows] == [spelled, canonical, canonical, spelled[:5]]
    assert [r["truncated"] for r in rows] == [False, False, False, True]
