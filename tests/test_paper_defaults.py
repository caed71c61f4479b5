"""With any model but `tiny` and no other flag, a script runs its paper's experiment: GSM8K, 20 samples per prompt,
the paper's global batch (grad_accum derived from it), epochs, losses and a 5-seed sampled evaluation. `--task math`
loads all seven subjects of the hub's MATH train split."""

import json
import os

import pytest
from conftest import DATA, needs_data, run_command

import common
import runtime.cli  # noqa: E402
import dqo
import spo


@needs_data
def test_dqo_with_a_local_model_runs_the_papers_gsm8k_experiment(tiny_cache, tiny_dir, tmp_path):
    """The paper's GSM8K run on a local model, cut shorter (4 prompts, 2 test problems, 32 new tokens): no --task, no
    batch flags. 80 offline rows are fewer than one global batch of 256: the one step takes all of them (10 accumulation
    steps of 8), says so, and run.json records it beside the paper's values."""
    out = tmp_path / "run"
    gsm8k = os.path.join(DATA, "gsm8k")
    cmd = ["dqo.py", "--model", tiny_dir,
           "--train_file", os.path.join(gsm8k, "train.jsonl"), "--test_file", os.path.join(gsm8k, "test.jsonl"),
           "--n_train_prompts", "4", "--n_test", "2", "--max_steps", "1", "--max_new_tokens", "32",
           "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--report_to", ""]
    code, stdout, stderr = run_command(cmd)
    assert code == 0, stderr[-4000:]
    assert "80 training examples are less than one global batch of 256: each step takes 80 (10 accumulation" in stdout
    with open(out / "run.json") as f:
        run = json.load(f)
    args = run["args"]
    assert {k: args[k] for k in ("task", "n_samples", "global_batch_size", "per_device_batch_size", "grad_accum", "epochs",
                                  "eval_seeds")} == dict(task="gsm8k", n_samples=20, global_batch_size=256,
                                                         per_device_batch_size=8, grad_accum=32, epochs=5, eval_seeds=5)
    assert {k: args[k] for k in dqo.PAPER if k in args} == {k: v for k, v in dqo.PAPER.items()}
    assert run["effective"] == {"grad_accum": 10, "global_batch_size": 80}
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1]
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["reference"]["sampled_seeds"] == results["final"]["sampled_seeds"] == 5


def test_paper_defaults_per_algorithm():
    args = spo.Args(model="google/gemma-1.1-7b-it")
    runtime.cli.resolve_defaults(args, spo.TINY, spo.PAPER)
    assert (args.task, args.loss_type, args.max_steps, args.epochs, args.global_batch_size) == ("gsm8k", "bce", 100_000,
                                                                                               None, 128)
    tiny = spo.Args()
    runtime.cli.resolve_defaults(tiny, spo.TINY, spo.PAPER)
    assert (tiny.task, tiny.loss_type, tiny.n_samples, tiny.eval_seeds) == ("arith", "squared", 8, 1)


@pytest.mark.parametrize("world, per_device, grad_accum", [(1, 8, 32), (8, 8, 4), (8, 32, 1)])
def test_global_batch_sets_grad_accum(world, per_device, grad_accum, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = dqo.Args(model="google/gemma-1.1-7b-it", per_device_batch_size=per_device, output_dir=str(tmp_path / "run"),
                    report_to="")
    runtime.cli.resolve_defaults(args, dqo.TINY, dqo.PAPER)
    before = dict(vars(args))
    runtime.cli.validate_args(args, dqo.CHECKS)
    assert vars(args) == before  # validation changes nothing
    assert args.global_batch_size == 256 and runtime.cli.grad_accum(args) == grad_accum


def test_math_train_loads_the_seven_subjects(monkeypatch):
    """EleutherAI/hendrycks_math has one config per subject and no default one: like the hub, the stand-in refuses a
    missing config."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "EleutherAI/hendrycks_math" and name not in common.MATH_SUBJECTS:
            raise ValueError(f"Config name is missing. Please pick one among the available configs: {common.MATH_SUBJECTS}")
        return [{"problem": f"{name} problem {i}", "solution": f"so \\boxed{{{i}}}"} for i in range(2)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    problems = common.load_task("math", "train")
    assert calls == [("EleutherAI/hendrycks_math", s, "train") for s in common.MATH_SUBJECTS]
    assert len(problems) == 14 and problems[-1] == {"question": "precalculus problem 1", "answer": "1",
                                                    "solution": "so \\boxed{1}"}
