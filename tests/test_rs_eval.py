"""Tests for rs.py (the pure loss, one optimizer step, a smoke run) and eval.py (a smoke run on rs.py's saved model)."""

import json
import math
import os

import pytest
import torch
from transformers import AutoTokenizer
from conftest import (arith_rows, assert_accuracy, assert_rises, encode_response, gradient_step_lowers, needs_data,
                      response_logps, run_command, run_script)

import common
import rs


def test_import_starts_nothing():
    assert callable(rs.main) and rs.Args().model == "tiny" and rs.Args().data == "samples"


def test_rs_loss_hand_computed_value_and_grad():
    policy_logps = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-0.5, -4.0, -7.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    loss, metrics = rs.rs_loss(policy_logps, mask)
    assert loss.item() == pytest.approx((2.0 + 3.0 + 0.5) / 3)  # token mean over the batch, not mean of row means
    loss.backward()
    assert torch.allclose(policy_logps.grad, -mask / 3)  # -mask / (number of response tokens)
    assert metrics["losses/policy"] is loss and metrics["charts/response_tokens"] == 3
    assert all(isinstance(v, float) for k, v in metrics.items() if k != "losses/policy")  # losses/*: the loss tensors


def test_rs_loss_matches_plain_loop():
    torch.manual_seed(0)
    policy_logps = -torch.rand(4, 7, dtype=torch.float64) * 3
    mask = (torch.rand(4, 7) > 0.4).double()
    mask[0, 3] = 1
    total, count = 0.0, 0
    for b in range(4):
        for t in range(7):
            if mask[b, t]:
                total -= policy_logps[b, t].item()
                count += 1
    assert rs.rs_loss(policy_logps, mask)[0].item() == pytest.approx(total / count)


def test_rs_step_lowers_the_loss(tiny_model):
    model, tok = tiny_model
    policy = type(model)(model.config)
    policy.load_state_dict(model.state_dict())  # a copy: the session fixture stays untouched
    problems = common.load_task("arith", "train", limit=16)
    batch = common.collate(arith_rows(tok, problems), tok.pad_token_id)

    def loss_now():
        return rs.rs_loss(common.token_logprobs(policy, batch["input_ids"], batch["attention_mask"]), batch["mask"])[0]

    gradient_step_lowers(loss_now, policy.parameters())


def test_rs_gold_and_eval_smoke(tiny_cache, tmp_path, reference_greedy):
    """rs.py --data gold on a tiny configuration, then eval.py on the model it saved. The run moved what its loss
    targets the right way: the NLL of the correct responses it trained on (the training prompts' gold solutions,
    encoded as rs.py encodes them) falls, row by row, from the reference's, after each epoch."""
    out = str(tmp_path / "rs")
    results, metrics = run_script("rs.py", tiny_cache, out, "--data", "gold", "--epochs", "2", "--eval_seeds", "2")
    assert list(results) == ["reference", "epoch1", "final"]  # every epoch's model is evaluated and saved
    for r in results.values():
        assert {"greedy", "sampled", "sampled_std", "n_problems", "truncated", "samples"} <= set(r)
        assert r["n_problems"] == 32 and len(r["samples"]) == 3 and r["sampled_seeds"] == 2
        assert_accuracy(r["greedy"], 32)
        assert_accuracy(r["sampled"], 32, seeds=2)
        assert_accuracy(r["truncated"], 32)
        assert all(s["reward"] == common.grade(s["response"], p["answer"], "arith")
                   for s, p in zip(r["samples"], common.load_task("arith", "test", limit=3)))
    assert results["reference"]["greedy"] == reference_greedy(32)  # the untrained reference, evaluated independently
    assert [m["step"] for m in metrics] == list(range(1, 13))  # 48 gold solutions / batch 8, two epochs
    assert os.path.exists(os.path.join(out, "model_epoch1", "model.safetensors"))
    for m in metrics:
        assert 0.0 < m["losses/policy"] < 5.0 and math.isfinite(m["charts/grad_norm"])
        assert m["charts/lr"] == pytest.approx(rs.TINY["lr"])
    model_dir = os.path.join(out, "model")
    assert os.path.exists(os.path.join(model_dir, "model.safetensors"))
    assert os.path.exists(os.path.join(model_dir, "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(common.TINY_SHIPPED)
    with open(os.path.join(out, "run.json")) as f:
        train = common.load_task("arith", "train", limit=json.load(f)["args"]["n_train_prompts"])
    rows = [{"prompt_ids": common.encode_prompt(tokenizer, p["question"], "arith"),
             "response_ids": encode_response(tokenizer, p["solution"])} for p in train]
    n_tokens = torch.tensor([len(r["response_ids"]) for r in rows], dtype=torch.float64)
    nll = {name: -response_logps(path, rows) / n_tokens  # (N,) token-mean NLL of each gold solution
           for name, path in (("reference", common.TINY_SHIPPED), ("epoch1", os.path.join(out, "model_epoch1")),
                              ("final", model_dir))}
    assert_rises(nll["reference"] - nll["epoch1"], "rs.py: NLL of the gold solutions, reference minus epoch 1")
    assert_rises(nll["reference"] - nll["final"], "rs.py: NLL of the gold solutions, reference minus final")

    path = str(tmp_path / "eval.json")
    cmd = ["eval.py", "--model", model_dir, "--task", "arith", "--n_test", "32", "--seeds", "2", "--pass_n", "4",
           "--pass_k", "1,2,4", "--output", path, "--output_dir", str(tmp_path / "eval"), "--cache_dir", tiny_cache]
    code, stdout, stderr = run_command(cmd)
    assert code == 0, stderr[-4000:]
    with open(path) as f:
        ev = json.load(f)
    assert {"greedy", "sampled", "sampled_std", "sampled_seeds", "pass@1", "pass@2", "pass@4", "n_problems", "truncated",
            "model", "task", "pass_sampling"} <= set(ev)
    assert ev["n_problems"] == 32 and ev["sampled_seeds"] == 2 and ev["task"] == "arith" and ev["sampled_std"] >= 0
    assert ev["pass_sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": 16}
    assert 0.0 <= ev["pass@1"] <= ev["pass@2"] <= ev["pass@4"] <= 1.0
    # greedy decoding is deterministic: the saved model reproduces the in-run evaluation of the trained policy (eval.py
    # takes the run's precision from run.json beside model/: under bf16 one answer of 32 differs)
    assert ev["greedy"] == results["final"]["greedy"]
    assert "greedy" in stdout and "pass@4" in stdout  # the printed table


@pytest.mark.parametrize("task,train,test", [("gsm8k", "gsm8k/train.jsonl", "gsm8k/test.jsonl"),
                                             ("math", None, "math500/test.jsonl"), ("aime24", None, "aime24/test.jsonl")])
@needs_data
def test_real_task_files_with_a_model_loaded_by_path(task, train, test, tiny_cache, tiny_dir, tmp_path):
    """The real-model code path (a save_pretrained dir, the real GSM8K / MATH500 / AIME24 files): rs.py trains one
    step on GSM8K gold solutions, and eval.py evaluates every task. The tiny model cannot solve them; this checks
    loading, prompting, generation and grading end to end."""
    from conftest import DATA

    model_dir = tiny_dir
    test_file = os.path.join(DATA, test)
    if train:
        out = str(tmp_path / "rs")
        results, metrics = run_script("rs.py", tiny_cache, out, "--model", model_dir, "--task", task, "--data", "gold",
                                      "--train_file", os.path.join(DATA, train), "--test_file", test_file, "--n_test", "4",
                                      "--n_train_prompts", "16", "--max_steps", "1", "--max_new_tokens", "16")
        assert [m["step"] for m in metrics] == [1] and math.isfinite(metrics[0]["losses/policy"])
        assert results["final"]["n_problems"] == 4
        with open(os.path.join(out, "run.json")) as f:
            assert json.load(f)["args"]["model"] == model_dir
    path = str(tmp_path / "eval.json")
    cmd = ["eval.py", "--model", model_dir, "--task", task, "--test_file", test_file, "--n_test", "4", "--seeds", "1",
           "--pass_n", "2", "--pass_k", "1,2", "--max_new_tokens", "16", "--output", path, "--output_dir",
           str(tmp_path / "eval"), "--cache_dir", tiny_cache]
    code, _, stderr = run_command(cmd)
    assert code == 0, stderr[-4000:]
    with open(path) as f:
        ev = json.load(f)
    assert ev["task"] == task and ev["n_problems"] == 4 and "pass@2" in ev
    assert_accuracy(ev["greedy"], 4)
    assert_accuracy(ev["pass@1"], 4, seeds=2)  # pass@1 from 2 samples per problem: c/2 each
