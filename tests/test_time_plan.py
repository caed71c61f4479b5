"""benchmarks/time_plan.py: its counting functions against a tiny SPO run's own generate calls and training batches,
and against hand arithmetic at the paper defaults."""

import json
import os
import sys

import pytest
from conftest import DATA, ROOT, needs_data, run_command

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import time_plan  # noqa: E402


def test_counts_match_a_tiny_spo_run(tmp_path):
    """Two epochs of SPO with half online rollouts, a fresh cache: every phase's sequences, generate calls and largest
    call are what the counting functions say; decode positions are at most the counted bound; the training batches
    hold the counted sequences, and their tokens are the counted ones (mean lengths from the offline rows) within 2%, and
    so are their padded positions."""
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
    # each micro-batch pads to its longest row: E[longest of 8] from the offline rows' lengths (18,804 counted, 18,800
    # measured here, 4.5% over the real tokens)
    assert measured["training"]["padded"] > measured["training"]["trained"]
    assert measured["training"]["padded"] == pytest.approx(counted["training"]["padded"], rel=0.02)


def test_process_score_calls_by_hand():
    """Rounds per failed row, per chunk: round r takes the rows that tried more than r prefixes, × ps_samples."""
    assert time_plan.process_score_calls([[2, 1, 3], [1]], ps_samples=4, gen_batch_size=8) == [8, 4, 8, 4, 4]
    assert time_plan.process_score_calls([[]], 4, 8) == []


def test_paper_counts_by_hand():
    """SPO and DQO at the paper defaults on 8 GPUs, checked against arithmetic on their settings."""
    shape = time_plan.model_shape(time_plan.GEMMA_7B)
    spo_args = time_plan.paper_args("spo")
    assert spo_args["grad_accum"] == 2 and spo_args["gen_batch_size"] == 20
    spo = time_plan.count("spo", spo_args, time_plan.paper_data("spo", spo_args), shape, 8)
    assert spo["SPO rollouts"]["sequences"] == 100_000 * 128 // 2  # half of every batch of 128, 100k steps
    assert (spo["SPO rollouts"]["calls"], spo["SPO rollouts"]["batch"]) == (100_000 // 10 * 8 * 4, 20)  # 80 per window
    before = spo["SPO rollouts, one call per micro-batch (before)"]
    assert (before["calls"], before["batch"]) == (100_000 * 2 * 8, 4)
    assert spo["totals"]["steps"] == 100_000 and spo["totals"]["epochs"] == 86  # 149,460 rows // 128 = 1167 steps/epoch
    assert spo["totals"]["evaluations"] == 86
    by_steps = time_plan.count("spo", dict(spo_args, save_every_minutes=0, save_every=50),
                               time_plan.paper_data("spo", spo_args), shape, 8)
    assert by_steps["totals"]["checkpoints"] == 2000  # --save_every 50; every 60 minutes instead: test_paper_corrections
    dqo_args = time_plan.paper_args("dqo")
    dqo = time_plan.count("dqo", dqo_args, time_plan.paper_data("dqo", dqo_args), shape, 8)
    assert (dqo["offline dataset"]["sequences"], dqo["offline dataset"]["calls"]) == (7473 * 20, 3737)  # 40 // 20 = 2
    assert "process scores" not in dqo and dqo["totals"]["steps"] == 149_460 // 256 * 5
    assert dqo["training"]["trained"]["value"] == dqo["training"]["trained"]["policy"]


def test_paper_corrections_by_hand():
    """DQO's paper plan with its corrections, each term against arithmetic on its settings: configs/fsdp.yaml
    recomputes activations (8·N), micro-batches of 8 rows pad to their longest (the head on real tokens only), the
    checkpoints hold both networks as stored, every 60 minutes of the training loop (the paper cadence), written then
    read back,
    models in bf16, the bf16 model loaded once; without the terms, the plan before (6·N, unpadded, no I/O)."""
    shape = time_plan.model_shape(time_plan.GEMMA_7B)
    n, head, n_value, L, d_attn = (shape[k] for k in ("n", "head", "n_value", "layers", "d_attn"))
    assert head == 256_000 * 3072 and n_value == n - head
    args = time_plan.paper_args("dqo")
    assert args["activation_checkpointing"] is True and args["save_every_minutes"] == 60
    data = time_plan.paper_data("dqo", args)
    after = time_plan.count("dqo", args, data, shape, 8)
    before = time_plan.count("dqo", args, data, shape, 8, terms=())
    seqs, S = 2915 * 256, 100 + 200  # optimizer steps x global batch; mean prompt + response
    train = after["training"]
    pad = train["pad_factor"]
    assert train["flops_per_param"] == 8 and 1.5 < pad < 1.7  # GSM8K's spread at 8 rows (1.62)
    T = pad * S
    policy = 8 * ((n - head) * T + head * S) + 8 * L * d_attn * T**2  # the head on real tokens, the rest padded
    value = 8 * n_value * T + 8 * L * d_attn * T**2  # no head
    assert train["train_flops"] == pytest.approx(seqs * (policy + value), rel=1e-12)
    assert train["padded"] == pytest.approx(seqs * T)
    unpadded = 6 * n * S + 6 * L * d_attn * S**2 + 6 * n_value * S + 6 * L * d_attn * S**2
    assert before["training"]["train_flops"] == pytest.approx(seqs * unpadded, rel=1e-12)
    assert "checkpoints" not in before and before["totals"]["checkpoints"] == 2915 // 50  # the step cadence
    assert before["totals"]["models_gb"] == pytest.approx(5 * 4 * (n + n_value) / 1e9)  # 4 bytes, value without embedding
    t, gb = after["totals"], 1e9
    each = 12 * (n + n + 3072 + 1)  # fp32 weights, 2 Adam moments: the policy; the value backbone (embedding kept), head
    loop = sum(time_plan.phase_hours(after[p], 512, 8) for p in ("training", "evaluations"))
    assert t["checkpoints"] == int(loop) > 0  # one every 60 minutes
    assert t["checkpoint_gb"] == pytest.approx(t["checkpoints"] * each / gb)
    assert after["checkpoints"]["io_seconds"] == pytest.approx(
        t["checkpoints"] * each / gb * (1 / time_plan.DISK_WRITE_GB_PER_S + 1 / time_plan.DISK_READ_GB_PER_S))
    assert t["models_gb"] == pytest.approx(2 * (5 * n + n + 3072 + 1) / gb)  # bf16: the policy 5 times, the value once
    assert after["model saves"]["io_seconds"] == pytest.approx(t["models_gb"] / time_plan.DISK_WRITE_GB_PER_S)
    assert after["model loading"]["io_seconds"] == pytest.approx(2 * n / gb / time_plan.DISK_READ_GB_PER_S)
    io = sum(after[p]["io_seconds"] for p in ("checkpoints", "model saves", "model loading")) / 3600
    assert time_plan.total_hours(after, 512, 8) == pytest.approx(
        sum(time_plan.phase_hours(after[p], 512, 8) for p in ("reference evaluation", "offline dataset", "training",
                                                               "evaluations")) + io)
    # the step cadence instead: 58 checkpoints of both networks
    steps = time_plan.count("dqo", dict(args, save_every_minutes=0, save_every=50), data, shape, 8)["totals"]
    assert steps["checkpoints"] == 58 and steps["checkpoint_gb"] == pytest.approx(58 * each / gb)


def test_dqo_total_includes_recompute_padding_and_io():
    """DQO's estimated paper total is the plan with every correction: dropping any one of them (TERMS) makes it
    smaller, and the terms the total includes are the ones the plan names."""
    world = time_plan.WORLD
    d, plan = time_plan.paper_plan("dqo")
    total = time_plan.total_hours(plan, d["max_new_tokens"], world)
    assert set(time_plan.TERMS) == {"recompute", "padding", "io"}
    for term in time_plan.TERMS:
        _, without = time_plan.paper_plan("dqo", terms=tuple(t for t in time_plan.TERMS if t != term))
        assert time_plan.total_hours(without, d["max_new_tokens"], world) < total, term
    train = plan["training"]
    assert train["flops_per_param"] == 8 and train["pad_factor"] > 1
    assert all(plan[p]["io_seconds"] > 0 for p in ("checkpoints", "model saves", "model loading"))


def test_padding_and_train_flops_by_hand():
    """pad_factor: E[longest of B draws] / mean; train_flops: body and attention on padded positions, head on real."""
    # lengths 1..4, 2 draws: the longest is 1, 2, 3, 4 with probability 1/16, 3/16, 5/16, 7/16: E = 50/16; mean 2.5
    assert time_plan.pad_factor([1, 2, 3, 4], 2) == pytest.approx(50 / 16 / 2.5)
    assert time_plan.pad_factor([1, 2, 3, 4], 1) == pytest.approx(1.0) and time_plan.pad_factor([7] * 5, 8) == 1.0
    shape = dict(layers=2, d_attn=3)
    # 2 sequences, 10 real tokens padded to 15; 100 parameters of which a 40-parameter head; 8 per parameter-token
    assert time_plan.train_flops(2, 10, 15, 100, 40, shape, 8) == 2 * (8 * (60 * 15 + 40 * 10) + 8 * 2 * 3 * 15**2)
    assert time_plan.train_flops(2, 10, 10, 100, 40, shape, 6) == time_plan.fwd_flops(10, 2, 100, shape, 6)


@needs_data
def test_stored_padding_factors_match_the_gsm8k_file():
    lengths = time_plan.gsm8k_lengths(512, os.path.join(DATA, "gsm8k", "train.jsonl"))
    assert len(lengths) == 7473
    for rows, factor in time_plan.PAD_FACTOR.items():
        assert round(time_plan.pad_factor(lengths, rows), 3) == factor


def test_docs_carry_the_table():
    with open(os.path.join(ROOT, "docs", "memory-and-time.md")) as f:
        text = f.read()
        assert time_plan.before_after() in text, "docs/memory-and-time.md's before/after table is stale"
        assert time_plan.paper_table() in text, \
            "docs/memory-and-time.md's time plan is stale: paste `python benchmarks/time_plan.py`"
