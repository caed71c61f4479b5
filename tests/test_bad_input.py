"""Bad input fails fast and clearly: every case below stops right after argument parsing (before the accelerator, the
model or any data is loaded), with a message naming the flag or file and what is wrong, and leaves the cache and the
output dir byte for byte as they were. A few cases also run as real processes, for the exit status and the message."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import DATA, ROOT

import common
import runtime.launch
import dpo
import dqo
import dro
import eval as eval_script
import kto
import rs
import spo

SCRIPTS = {"rs": rs, "dpo": dpo, "kto": kto, "dro": dro, "dqo": dqo, "spo": spo, "eval": eval_script}
GSM8K = os.path.join(DATA, "gsm8k", "test.jsonl")


def _files(tmp):
    """Input files for the cases, made once per case under `tmp`."""
    (tmp / "empty_model").mkdir()
    (tmp / "empty.jsonl").write_text("")
    (tmp / "latin1.jsonl").write_bytes(json.dumps({"question": "q", "answer": "#### 1"}).encode() + b"\n" +
                                       '{"question": "caf\xe9", "answer": "#### 2"}\n'.encode("latin-1"))
    (tmp / "int_answer.jsonl").write_text(json.dumps({"question": "q", "answer": 42}) + "\n")
    (tmp / "bad_json.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": oops}\n')
    (tmp / "a_folder").mkdir()
    (tmp / "old_run").mkdir()
    (tmp / "old_run" / "run.json").write_text("{}")
    (tmp / "old_run" / "metrics.jsonl").write_text('{"step": 1}\n')
    for name, damage in (("no_ckpt", None), ("missing_file", "remove"), ("truncated", "truncate")):
        run = tmp / name
        run.mkdir()
        (run / "run.json").write_text("{}")
        if damage:
            ckpt = run / "checkpoint"
            ckpt.mkdir()
            (ckpt / "model.safetensors").write_bytes(b"x" * 100)
            (ckpt / "optimizer.bin").write_bytes(b"y" * 50)
            (ckpt / "trainer_state.json").write_text(json.dumps(
                {"step": 2, "files": {"model.safetensors": 100, "optimizer.bin": 50}}))
            if damage == "remove":
                os.remove(ckpt / "optimizer.bin")
            else:
                (ckpt / "model.safetensors").write_bytes(b"x" * 40)


# (script, flags, what the message must name). {tmp} is the case's temp dir.
CASES = [
    ("rs", "--epochs 0", "--epochs 0: must be ≥ 1"),
    ("rs", "--epochs -1", "--epochs -1: must be ≥ 1"),
    ("dpo", "--per_device_batch_size -1", "--per_device_batch_size -1: must be ≥ 1"),
    ("rs", "--per_device_batch_size 0", "--per_device_batch_size 0: must be ≥ 1"),
    ("kto", "--per_device_batch_size 1", "--per_device_batch_size 1: must be ≥ 2: z0 pairs"),
    ("rs", "--grad_accum -1", "--grad_accum -1: must be ≥ 1"),
    ("rs", "--grad_accum 0", "--grad_accum 0: must be ≥ 1"),
    ("rs", "--max_steps -1", "--max_steps -1: must be ≥ 0"),
    ("rs", "--global_batch_size 10 --per_device_batch_size 4", "--global_batch_size 10 must equal"),
    ("rs", "--global_batch_size 64 --per_device_batch_size 8 --grad_accum 2", "--global_batch_size 64 must equal"),
    ("dpo", "--beta 0", "--beta 0.0: must be > 0"),
    ("dpo", "--beta -0.1", "--beta -0.1: must be > 0"),
    ("kto", "--beta 0", "--beta 0.0: must be > 0"),
    ("dqo", "--beta 0", "--beta 0.0: must be > 0"),
    ("spo", "--beta 0", "--beta 0.0: must be > 0"),
    ("dqo", "--lam 1.5", "--lam 1.5: must be in [0, 1]"),
    ("dqo", "--lam -0.1", "--lam -0.1: must be in [0, 1]"),
    ("dqo", "--is_clip -1", "--is_clip -1.0: must be 0 (no weights) or ≥ 1"),
    ("dqo", "--is_clip 0.5", "--is_clip 0.5: must be 0 (no weights) or ≥ 1"),
    ("dqo", "--value_lr 0", "--value_lr 0.0: must be > 0"),
    ("dqo", "--behavior bogus", "--behavior 'bogus': must be one of 'ref', 'sampler'"),
    ("dro", "--value_lr -1", "--value_lr -1.0: must be > 0"),
    ("dpo", "--max_pairs_per_prompt 0", "--max_pairs_per_prompt 0: must be ≥ 1"),
    ("rs", "--data bogus", "--data 'bogus': must be one of 'samples', 'gold'"),
    ("spo", "--loss_type bogus", "--loss_type 'bogus': must be one of"),
    ("spo", "--online_fraction 1.5", "--online_fraction 1.5: must be in [0, 1]"),
    ("spo", "--online_fraction 0.3", "--online_fraction 0.3: must be in [0, 1], a whole number of rollouts per micro"),
    ("spo", "--rollout_min_temperature 0.9 --rollout_max_temperature 0.5", "--rollout_max_temperature 0.5: must be ≥ --r"),
    ("rs", "--n_test 0", "--n_test 0: must be ≥ 1"),
    ("rs", "--n_test -1", "--n_test -1: must be ≥ 1"),
    ("rs", "--n_samples 0", "--n_samples 0: must be ≥ 1"),
    ("rs", "--gen_batch_size 0", "--gen_batch_size 0: must be ≥ 1"),
    ("rs", "--temperature 0", "--temperature 0.0: must be > 0"),
    ("rs", "--top_p 1.5", "--top_p 1.5: must be in (0, 1]"),
    ("rs", "--lr 0", "--lr 0.0: must be > 0"),
    ("rs", "--task bogus", "--task 'bogus': must be one of 'arith', 'gsm8k', 'math', 'aime24'"),
    ("rs", "--report_to wandb", "--report_to wandb: the wandb package is not installed"),
    ("rs", "--report_to bogus", "--report_to bogus: unknown tracker"),
    ("rs", "--model missing", "--model missing: no such folder, and not a hub id"),
    ("dqo", "--model ./missing/", "--model ./missing/: no such folder"),
    ("rs", "--model {tmp}/empty_model", "empty_model: the folder has no config.json"),
    ("rs", "--model {tmp}/empty.jsonl", "empty.jsonl: a file; a model is a save_pretrained folder"),
    ("rs", "--task gsm8k --train_file {tmp}/nope.jsonl", "nope.jsonl: file not found"),
    ("rs", "--task gsm8k --train_file {tmp}/a_folder", "a_folder: not a file"),
    ("rs", "--task gsm8k --train_file {tmp}/latin1.jsonl", "latin1.jsonl: row 2: not UTF-8 text"),
    ("rs", "--task gsm8k --test_file {tmp}/empty.jsonl", "empty.jsonl: no problems in the file"),
    ("dpo", "--task gsm8k --test_file {tmp}/int_answer.jsonl", "row 1: field 'answer' must be a string, got int"),
    ("rs", "--task gsm8k --test_file {tmp}/bad_json.jsonl", "bad_json.jsonl: row 3: not valid JSON"),
    ("rs", f"--train_file {GSM8K}", "task arith generates its own problems"),
    ("rs", "--output_dir {tmp}/old_run", "old_run holds another run (run.json, metrics.jsonl): pass --resume"),
    ("rs", "--output_dir {tmp}/no_ckpt --resume", "--resume: no complete checkpoint in"),
    ("rs", "--output_dir {tmp}/missing_file --resume", "the checkpoint is incomplete: "),
    ("dqo", "--output_dir {tmp}/truncated --resume", "model.safetensors has 40 bytes, 100 when it was saved"),
    ("eval", "--task bogus", "--task 'bogus': must be one of"),
    ("eval", "--seeds -1", "--seeds -1: must be ≥ 0"),
    ("eval", "--pass_k 1,40", "--pass_k 1,40: every k must be in [1, --pass_n 16]"),
    ("eval", "--pass_k a,b", "--pass_k 'a,b': must be comma-separated whole numbers"),
    ("eval", "--model missing", "--model missing: no such folder"),
    ("eval", "--task gsm8k --test_file {tmp}/latin1.jsonl", "latin1.jsonl: row 2: not UTF-8 text"),
    ("eval", "--n_test 0", "--n_test 0: must be ≥ 1"),
]


def _tree(path) -> dict:
    """Every file under `path` with a hash of its bytes, and every folder."""
    out = {}
    for d, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), path)] = "dir"
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("script, flags, message", CASES, ids=[f"{s} {f}" for s, f, _ in CASES])
def test_bad_input_fails_fast_and_names_the_problem(script, flags, message, tmp_path, monkeypatch):
    _files(tmp_path)
    cache = tmp_path / "cache"
    (cache / "offline").mkdir(parents=True)
    (cache / "offline" / "keep.txt").write_text("an earlier run's cache")
    flags = flags.format(tmp=tmp_path).split()
    out = [] if "--output_dir" in flags or script == "eval" else ["--output_dir", str(tmp_path / "new_run")]
    argv = [f"{script}.py", "--cache_dir", str(cache), *out, "--report_to", "", *flags]
    before = _tree(tmp_path)

    def no_work(*_, **__):
        raise AssertionError("bad input got past validation: it started the accelerator or loaded a model")

    monkeypatch.setattr(runtime.launch, "setup_accelerator", no_work)  # what start() calls after validation
    monkeypatch.setattr(SCRIPTS[script], "setup_accelerator", no_work, raising=False)  # eval.py calls it itself
    monkeypatch.setattr(SCRIPTS[script], "load_model_and_tokenizer", no_work)
    monkeypatch.setattr(sys, "argv", argv)
    start = time.time()
    with pytest.raises(SystemExit) as exc:
        SCRIPTS[script].main()
    assert exc.value.code != 0 and str(exc.value.code).startswith("error: "), exc.value.code
    assert message in str(exc.value.code)
    assert time.time() - start < 5
    assert _tree(tmp_path) == before  # nothing written, nothing removed


def test_grader_bad_input_never_raises_and_unknown_task_is_named():
    assert common.grade("\\boxed{" * 5000, "1", "math") == 0.0
    assert common.grade(None, "1", "gsm8k") == 0.0
    with pytest.raises(ValueError, match="unknown task 'bogus'"):
        common.grade("#### 1", "1", "bogus")


@pytest.mark.parametrize("cmd, message", [
    (["rs.py", "--epochs", "0"], "error: --epochs 0: must be ≥ 1"),
    (["dqo.py", "--lam", "2"], "error: --lam 2.0: must be in [0, 1]"),
    (["eval.py", "--task", "bogus"], "error: --task 'bogus': must be one of"),
])
def test_a_real_process_exits_nonzero_with_the_message(cmd, message, tmp_path):
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:], "--cache_dir", str(tmp_path / "cache")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert time.time() - start < 60 and os.listdir(tmp_path) == []


def test_a_model_whose_config_cannot_be_read_is_one_line(tmp_path):
    """A hub id that cannot be reached (no network here: HF_HUB_OFFLINE=1 skips the retries) and a folder of an unknown
    architecture: the memory preflight reads the config first, so either ends in one `error:` line naming --model, not
    transformers' traceback; eval.py reads it before loading anything."""
    import runtime.memory

    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(SystemExit) as exc:
        runtime.memory.read_model_config(str(tmp_path / "odd"))
    assert str(exc.value.code).startswith(f"error: --model {tmp_path / 'odd'}: its config cannot be read (ValueError: ")
    assert "\n" not in str(exc.value.code)
    model = ["--model", "no-such-org/no-such-model", "--cache_dir", str(tmp_path / "cache")]
    for cmd in (["rs.py", *model, "--output_dir", str(tmp_path / "run"), "--report_to", ""], ["eval.py", *model]):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert last.startswith("error: --model no-such-org/no-such-model: its config cannot be read"), last
