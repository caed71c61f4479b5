"""The command line as a new user meets it: --help shows what a run will use, a misspelled flag gets argparse's error
with a suggestion, and bad input found up front or once the run is going ends in one `error:` line, no traceback."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import common
import runtime.cli  # noqa: E402
import runtime.launch  # noqa: E402
import dpo
import dqo
import dro
import eval as eval_script
import kto
import rs
import spo

ALGOS = {"rs": rs, "dpo": dpo, "kto": kto, "dro": dro, "dqo": dqo, "spo": spo}


def flag_help(module, tiny=None, paper=None) -> dict[str, str]:
    """--help of a script, as {flag: its whole entry (flag, metavar and help text, lines joined)}."""
    text = runtime.cli.build_parser(module.Args, tiny, paper).format_help()
    entries = re.split(r"\n  (?=--)", text.split("options:", 1)[1])
    return {e.split()[0]: " ".join(e.split()) for e in entries if e.startswith("--")}


@pytest.mark.parametrize("name", ALGOS)
def test_help_shows_both_model_defaults_one_note_and_switches(name):
    module = ALGOS[name]
    entries = flag_help(module, module.TINY, module.PAPER)
    lr = entries["--lr"]
    assert lr.endswith(f"(tiny: {module.TINY['lr']:.4g}, paper: {module.PAPER['lr']:.4g})"), lr
    assert "None" not in " ".join(entries.values())
    for flag, entry in entries.items():
        assert entry.count("default") <= 1, entry  # one note, however it is worded
    for switch in ("--resume", "--gradient_checkpointing"):
        assert entries[switch].split()[1] != "RESUME" and "default" not in entries[switch]
        assert entries[switch].split()[0] == switch and not entries[switch].split()[1].isupper()  # no metavar
    assert entries["--seed"].endswith("(default: 1)")
    text = " ".join(runtime.cli.build_parser(module.Args, module.TINY, module.PAPER).format_help().split())
    assert " ".join(module.__doc__.split())[:50] in text.split("options:")[0]  # what the script does, before its flags
    # each script writes to its own folder: `python rs.py` then `python dqo.py` must not find each other's run
    assert entries["--output_dir"].endswith(f"(default: 'runs/{name}')"), entries["--output_dir"]


def test_eval_help_has_no_training_flags_and_the_same_seed():
    entries = flag_help(eval_script)
    assert not {"--grad_accum", "--epochs", "--lr", "--n_samples", "--offline_data"} & set(entries)
    assert eval_script.Args().seed == dqo.Args().seed == 1


@pytest.mark.parametrize("module, argv, message", [
    (dpo, ["--n_sample", "4"], "error: unrecognized argument --n_sample (did you mean --n_samples?)"),
    (eval_script, ["--grad_accum", "2"], "error: unrecognized argument --grad_accum"),
    (rs, ["--resume", "true"], "error: unrecognized argument true"),  # a switch takes no value
    (kto, ["--lr", "1e-5", "--betta=0.2"], "error: unrecognized argument --betta=0.2 (did you mean --beta?)"),
])
def test_misspelled_flag_is_argparse_error_with_suggestion(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        runtime.cli.build_parser(module.Args).parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_misspelled_flag_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dqo.py"), "--lrr", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "dqo.py: error: unrecognized argument --lrr (did you mean --lr?)"
    assert os.listdir(tmp_path) == []


def _main_exits(module, argv, monkeypatch) -> str:
    """Run `module.main()` with `argv`, stopping if it gets past validation; returns the SystemExit message."""
    def no_work(*_, **__):
        raise AssertionError("bad input got past validation")

    monkeypatch.setattr(runtime.launch, "setup_accelerator", no_work)  # what start() calls after validation
    monkeypatch.setattr(module, "setup_accelerator", no_work, raising=False)  # eval.py calls it itself
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        module.main()
    return str(exc.value.code)


def test_cache_dir_that_cannot_be_created_is_refused_in_validation(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    for cache, message in ((tmp_path / "a_file" / "cache", f"cannot be created, {tmp_path}/a_file is a file"),
                           ("/proc/no/cache", "cannot be created: /proc: ")):
        for module in (dqo, eval_script):
            out = [] if module is eval_script else ["--output_dir", str(tmp_path / "run")]
            msg = _main_exits(module, ["x.py", "--cache_dir", str(cache), "--report_to", "", *out], monkeypatch)
            assert msg.startswith(f"error: --cache_dir {cache}: {message}"), msg
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_each_algorithm_refuses_too_few_samples_up_front(tmp_path, monkeypatch):
    """DPO needs two samples per prompt to form a pair; every other algorithm learns from one (KTO labels rows, RS keeps
    correct ones, DRO/DQO/SPO regress on each), so --n_samples 1 passes their validation."""
    argv = ["x.py", "--n_samples", "1", "--report_to", "", "--cache_dir", str(tmp_path / "c"), "--output_dir",
            str(tmp_path / "run")]
    msg = _main_exits(dpo, argv, monkeypatch)
    assert msg == "error: --n_samples 1: must be ≥ 2: a pair is a correct and an incorrect response"
    for name in ("rs", "kto", "dro", "dqo", "spo"):
        with pytest.raises(AssertionError, match="got past validation"):
            _main_exits(ALGOS[name], argv, monkeypatch)
    # imported rows are not --n_samples per prompt: the file decides
    samples = tmp_path / "mine.jsonl"
    samples.write_text(json.dumps({"question": "q", "response": "#### 1", "answer": "1"}) + "\n")
    with pytest.raises(AssertionError, match="got past validation"):
        _main_exits(dpo, [*argv, "--offline_data", str(samples)], monkeypatch)


def _script(cmd: list, tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:], "--report_to", "", "--save_every", "0",
                           "--output_dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env))


def test_hub_task_without_network_is_one_line_naming_the_dataset_and_the_fix(tiny_cache, tmp_path):
    proc = _script(["dpo.py", "--task", "gsm8k", "--cache_dir", tiny_cache], tmp_path, HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "ds"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("error: task gsm8k: the train split of openai/gsm8k cannot be loaded from the Hugging Face hub")
    assert last.endswith("pass --train_file with a local copy (JSONL with the hub's fields, e.g. "
                         "../shared/data/gsm8k/train.jsonl; README: Real models)"), last


@pytest.mark.parametrize("script, reward, message", [
    ("dpo.py", 1, "error: DPO has no training pairs: none of the 2 prompts has both a correct and an incorrect response"),
    ("rs.py", 0, "error: 0 training examples do not fill one micro-batch of 8 on each of 1 processes"),
])
def test_data_errors_found_during_the_run_are_one_line(script, reward, message, tiny_cache, tmp_path):
    problems = common.arith_problems("train", 2)
    rows = [{"question": p["question"], "response": "#### 0", "answer": p["answer"], "reward": reward} for p in problems]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _script([script, "--cache_dir", tiny_cache, "--offline_data", str(tmp_path / "mine.jsonl"), "--n_test", "4",
                    "--eval_seeds", "0", "--per_device_batch_size", "8"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-1000:]


def test_the_run_line_names_model_task_data_and_only_changed_settings(monkeypatch, capsys, tmp_path):
    """At start: model, task, data source, and the settings that differ from the file's defaults for this model: a flag
    given at its default value (--lr 5e-5 with tiny) is not a change."""
    monkeypatch.setattr(sys, "argv", ["dqo.py", "--lr", "5e-5", "--n_samples", "4", "--process_rewards"])
    args = runtime.cli.parse_args(dqo.Args, dqo.TINY, dqo.PAPER)
    runtime.cli.describe_run(args)
    assert capsys.readouterr().out == ("run: model tiny, task arith, offline data self-sampled by the reference; settings "
                                       "changed from the defaults: --n_samples 4, --process_rewards\n")
    monkeypatch.setattr(sys, "argv", ["eval.py", "--seed", "1"])
    args = runtime.cli.parse_args(eval_script.Args)
    eval_script.resolve(args)  # the task resolved, then the run line
    runtime.cli.describe_run(args)
    assert capsys.readouterr().out == "run: model tiny, task arith; every other setting at its default\n"


def test_flags_that_cannot_go_together_and_unbalanced_kto_data():
    """rs.py --data gold reads no samples, so an --offline_data file beside it is refused, not ignored; KTO's default
    weights need both correct and incorrect responses, a data error (one `error:` line at run time)."""
    from types import SimpleNamespace

    with pytest.raises(runtime.cli.ArgumentError, match="--data gold trains on the dataset's solutions"):
        rs.check_flag_pairs(SimpleNamespace(data="gold", offline_data="mine.jsonl"))
    rs.check_flag_pairs(SimpleNamespace(data="samples", offline_data="mine.jsonl"))
    rows = [{"reward": 1.0}] * 3
    with pytest.raises(common.DataError, match="3 of 3 responses are correct.*pass --desirable_weight"):
        kto.kto_weights(rows, None, 1.0)
    assert kto.kto_weights(rows + [{"reward": 0.0}], None, 1.0) == (1 / 3, 1.0)
