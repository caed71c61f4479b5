"""benchmarks/time_plan.py: its counting functions against a tiny SPO run's own generate calls and training batches,
and against hand arithmetic at the paper defaults."""

import json
import os
import sys

import pytest
from conftest import ROOT, run_command

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import time_plan  # noqa: E402


def test_counts_match_a_tiny_spo_run(tmp_path):
    """Two epochs of SPO with half online rollouts, a fresh cache: every phase's sequences, generate calls and largest
    call are what the counting functions say; decode positions are at most the counted bound; the training batches
    hold the counted sequences, and their tokens are the counted ones (mean lengths from the offline rows) within 2%."""
    out = tmp_path / "plan.json"
    cmd = [os.path.join("benchmarks", "time_plan.py"), "--measure", "spo", "--json", str(out), "--",
           "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run"), "--n_train_prompts", "24",
           "--n_test", "8", "--n_samples", "4", "--per_device_batch_size", "8", "--model_update_interval", "5",
           "--pass_eval_problems", "2", "--max_new_tokens", "24", "--report_to", "", "--save_every", "4", "--epochs", "2",
           "--gen_batch_size", "12"]
    code, _, stderr = run_command(cmd)
    assert code == 0, stderr[-4000:]
    result = json.loads(out.read_text())
    measured, counted = result["measured"], result["counted"]
    for phase in ("reference evaluation", "offline dataset", "SPO rollouts", "evaluations"):
        m, c = measured[phase], counted[phase]
        assert m["sequences"] > 0, phase
        assert (m["sequences"], m["calls"], m["batch"]) == (c["sequences"], c["calls"], c["batch"]), phase
        assert m["generated"] <= m["positions"] <= c["positions"], phase
    assert measured["offline dataset"]["generated"] == pytest.approx(counted["offline dataset"]["generated"])
    # 96 rows / batch 8 = 12 steps an epoch, 24 in all; refreshes every 5 steps: 5 windows x 5 steps x 4 rollouts, calls of 12
    assert counted["SPO rollouts"]["sequences"] == 100 and counted["SPO rollouts"]["calls"] == 10
    assert counted["totals"]["steps"] == 24 and counted["totals"]["evaluations"] == 2 and counted["totals"]["checkpoints"] == 6
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(metrics) == 24
    assert measured["training"]["sequences"] == counted["training"]["sequences"] == 24 * 8
    assert measured["training"]["trained"] == pytest.approx(counted["training"]["trained"]["policy"], rel=0.02)


def test_process_score_calls_by_hand():
    """Rounds per failed row, per chunk: round r takes the rows that tried more than r prefixes, × ps_samples."""
    assert time_plan.process_score_calls([[2, 1, 3], [1]], ps_samples=4, gen_batch_size=8) == [8, 4, 8, 4, 4]
    assert time_plan.process_score_calls([[]], 4, 8) == []


def test_paper_counts_by_hand():
    """SPO and DQO at the paper defaults on 8 GPUs, checked against arithmetic on their settings."""
    shape = time_plan.model_shape(time_plan.GEMMA_7B)
    spo_args = time_plan.paper_args("spo")
    assert spo_args["grad_accum"] == 2 and spo_args["gen_batch_size"] == 8
    spo = time_plan.count("spo", spo_args, time_plan.paper_data("spo", spo_args), shape, 8)
    assert spo["SPO rollouts"]["sequences"] == 100_000 * 128 // 2  # half of every batch of 128, 100k steps
    assert (spo["SPO rollouts"]["calls"], spo["SPO rollouts"]["batch"]) == (100_000 // 10 * 8 * 10, 8)  # 80 per window
    before = spo["SPO rollouts, one call per micro-batch (before)"]
    assert (before["calls"], before["batch"]) == (100_000 * 2 * 8, 4)
    assert spo["totals"]["steps"] == 100_000 and spo["totals"]["epochs"] == 86  # 149,460 rows // 128 = 1167 steps/epoch
    assert spo["totals"]["evaluations"] == 86 and spo["totals"]["checkpoints"] == 2000
    dqo_args = time_plan.paper_args("dqo")
    dqo = time_plan.count("dqo", dqo_args, time_plan.paper_data("dqo", dqo_args), shape, 8)
    assert (dqo["offline dataset"]["sequences"], dqo["offline dataset"]["calls"]) == (7473 * 20, 7473)  # 32 // 20 = 1 prompt
    assert "process scores" not in dqo and dqo["totals"]["steps"] == 149_460 // 256 * 5
    assert dqo["training"]["trained"]["value"] == dqo["training"]["trained"]["policy"]


def test_docs_carry_the_table():
    with open(os.path.join(ROOT, "docs", "memory-and-time.md")) as f:
        assert time_plan.paper_table() in f.read(), \
            "docs/memory-and-time.md's time plan is stale: paste `python benchmarks/time_plan.py`"
