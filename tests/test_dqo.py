"""dqo.py: the loss against a plain-loop implementation of its equations, the horizon-one reduction to DRO, the
λ-return, one optimizer step, the value model's alignment, process scores on a hand-made case, and smoke runs."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from conftest import (CORES, WORKERS, arith_rows, assert_accuracy, assert_rises, correct_minus_failed, encode_response,
                      gradient_step_lowers, log_ratios, run_command, run_script)

import common
import runtime.files
import dqo
import eval as eval_script


# ---------------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------------
def reference_dqo(pl, rl, bl, v, r, mask, beta, lam, is_clip, is_policy=True, is_value=True):
    """dqo.py's equations (its docstring), one trajectory and one token at a time, on scalar tensors (so autograd sees exactly
    which terms are detached)."""
    policy_terms, value_terms = [], []
    for b in range(mask.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()
        H = len(idx)
        delta = [r[b, t] - beta * (pl[b, t].detach() - rl[b, t]) for t in idx]
        v_bar = [v[b, t].detach() for t in idx] + [0.0]  # V̄_{H+1} = 0
        G = [0.0] * (H + 1)  # G_{H+1} = 0
        for h in reversed(range(H)):
            G[h] = delta[h] + (1 - lam) * v_bar[h + 1] + lam * G[h + 1]
        log_w = sum(float(pl[b, t].detach() - bl[b, t]) for t in idx)
        w = 1.0 if is_clip is None else math.exp(min(math.log(is_clip), log_w))
        value_terms.append((w if is_value else 1.0) * sum((G[h] - v[b, idx[h]]) ** 2 for h in range(H)))
        policy_terms.append((w if is_policy else 1.0) * sum(
            (beta * (pl[b, idx[h]] - rl[b, idx[h]]) - (r[b, idx[h]] + G[h + 1] - v_bar[h])) ** 2 for h in range(H)))
    return sum(policy_terms) / len(policy_terms), sum(value_terms) / len(value_terms)


def dqo_terms(*args, **kwargs):
    """dqo_loss's two terms, its metrics' `losses/policy` and `losses/value` (still differentiable, so each is checked
    on its own), and the metrics; the loss it returns, the one the training loop minimises, must be their sum."""
    loss, metrics = dqo.dqo_loss(*args, **kwargs)
    policy_loss, value_loss = metrics["losses/policy"], metrics["losses/value"]
    assert torch.equal(loss, policy_loss + value_loss)
    return policy_loss, value_loss, metrics


def ragged_batch(seed=0, B=5, T=9):
    """Rows with different prompt lengths and response lengths (one of length 1, one running to the last column).
    Off-mask positions hold garbage, which the loss must ignore."""
    g = torch.Generator().manual_seed(seed)
    spans = [(2, 7), (0, 9), (4, 5), (1, 4), (3, 9)][:B]
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = 1
    pl = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_()
    rl = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    # behaviour: some trajectories far above the policy (w < 1), some below (w clipped at is_clip)
    bl = pl.detach() + torch.randn(B, 1, generator=g, dtype=torch.float64) * 0.6
    v = torch.randn(B, T, generator=g, dtype=torch.float64).requires_grad_()
    r = torch.randn(B, T, generator=g, dtype=torch.float64) * mask + (1 - mask) * 7.0
    return pl, rl, bl, v, r, mask


@pytest.mark.parametrize("lam", [1.0, 0.95, 0.5])
@pytest.mark.parametrize("is_clip", [None, math.e])
def test_dqo_loss_matches_plain_loop(lam, is_clip):
    pl, rl, bl, v, r, mask = ragged_batch()
    beta = 0.3
    log_w = ((pl.detach() - bl) * mask).sum(1)
    if is_clip is not None:  # the batch exercises both sides of the clip
        assert (log_w > 1).any() and (log_w < 1).any()
    policy_loss, value_loss, metrics = dqo_terms(pl, rl, bl, v, r, mask, beta, lam, is_clip)
    ref_policy, ref_value = reference_dqo(pl, rl, bl, v, r, mask, beta, lam, is_clip)
    torch.testing.assert_close(policy_loss, ref_policy)
    torch.testing.assert_close(value_loss, ref_value)
    assert metrics["losses/policy"].item() == pytest.approx(ref_policy.item())
    # gradients, each loss into its own network only
    for loss, ref, wrt, other in ((policy_loss, ref_policy, pl, v), (value_loss, ref_value, v, pl)):
        (grad,) = torch.autograd.grad(loss, wrt, retain_graph=True)
        (ref_grad,) = torch.autograd.grad(ref, wrt, retain_graph=True)
        torch.testing.assert_close(grad, ref_grad)
        assert grad.abs().sum() > 0
        assert (grad * (1 - mask)).abs().sum() == 0  # nothing flows into off-mask positions
        (cross,) = torch.autograd.grad(loss, other, retain_graph=True, allow_unused=True)
        assert cross is None or cross.abs().sum() == 0


@pytest.mark.parametrize("no_is", ["policy", "value"])
def test_dqo_loss_drops_importance_weight_from_one_loss(no_is):
    pl, rl, bl, v, r, mask = ragged_batch(seed=1)
    flags = dict(is_policy=no_is != "policy", is_value=no_is != "value")
    policy_loss, value_loss, _ = dqo_terms(pl, rl, bl, v, r, mask, 0.1, 0.95, math.e, **flags)
    ref_policy, ref_value = reference_dqo(pl, rl, bl, v, r, mask, 0.1, 0.95, math.e, **flags)
    torch.testing.assert_close(policy_loss, ref_policy)
    torch.testing.assert_close(value_loss, ref_value)
    unweighted = reference_dqo(pl, rl, bl, v, r, mask, 0.1, 0.95, None)
    weighted = reference_dqo(pl, rl, bl, v, r, mask, 0.1, 0.95, math.e)
    dropped, kept = (0, 1) if no_is == "policy" else (1, 0)
    torch.testing.assert_close((policy_loss, value_loss)[dropped], unweighted[dropped])
    torch.testing.assert_close((policy_loss, value_loss)[kept], weighted[kept])
    assert not torch.isclose(weighted[dropped], unweighted[dropped])  # the flag really changes something


def test_horizon_one_reduces_to_dro():
    """Remark 4.2: one token, behaviour = policy (w = 1): DRO's (βΔ − (r − V̄))² and (r − βΔ̄ − V)²."""
    g = torch.Generator().manual_seed(3)
    B, T, beta = 4, 6, 0.2
    mask = torch.zeros(B, T, dtype=torch.float64)
    mask[torch.arange(B), torch.tensor([1, 5, 3, 0])] = 1
    pl = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    rl = -torch.rand(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64).requires_grad_()
    r = torch.bernoulli(torch.full((B, T), 0.5, dtype=torch.float64), generator=g)
    for lam in (1.0, 0.5):
        policy_loss, value_loss, metrics = dqo_terms(pl, rl, pl.detach(), v, r, mask, beta, lam, math.e)
        assert metrics["charts/is_weight"] == 1.0
        sel = mask.bool()
        delta_, r_, v_ = (pl - rl)[sel], r[sel], v[sel]  # (B,) the one action of each trajectory
        dro_policy = ((beta * delta_ - (r_ - v_.detach())) ** 2).mean()
        dro_value = ((r_ - beta * delta_.detach() - v_) ** 2).mean()
        torch.testing.assert_close(policy_loss, dro_policy)
        torch.testing.assert_close(value_loss, dro_value)
        torch.testing.assert_close(torch.autograd.grad(policy_loss, pl)[0], torch.autograd.grad(dro_policy, pl)[0])
        torch.testing.assert_close(torch.autograd.grad(value_loss, v)[0], torch.autograd.grad(dro_value, v)[0])


def test_lambda_one_losses_equal_in_value_not_in_gradient():
    """With λ = 1, Ḡ_h − V_h = −(βΔ_h − (r_h + Ḡ_{h+1} − V̄_h)) token by token: the two losses are the same number
    (which is why the progress bar leaves the value loss out), yet each still trains only its own network. With λ < 1
    they differ."""
    pl, rl, bl, v, r, mask = ragged_batch(seed=4)
    policy_loss, value_loss, _ = dqo_terms(pl, rl, bl, v, r, mask, 0.3, 1.0, math.e)
    torch.testing.assert_close(policy_loss, value_loss)
    assert torch.autograd.grad(policy_loss, v, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(value_loss, pl, retain_graph=True, allow_unused=True)[0] is None
    policy_loss, value_loss, _ = dqo_terms(pl, rl, bl, v, r, mask, 0.3, 0.5, math.e)
    assert not torch.isclose(policy_loss, value_loss)


def test_lambda_returns():
    _, _, _, v, r, mask = ragged_batch(seed=2)
    delta, v = r * mask, v.detach()
    G = dqo.lambda_returns(delta, v, mask, 1.0)
    torch.testing.assert_close(G, delta.flip(1).cumsum(1).flip(1) * mask)  # λ = 1: reverse cumulative sum of δ
    G0 = dqo.lambda_returns(delta, v, mask, 0.0)  # λ = 0: one-step TD target δ_h + V_{h+1}, 0 after the last token
    v_next = torch.cat([v[:, 1:] * mask[:, 1:], torch.zeros(v.shape[0], 1, dtype=v.dtype)], dim=1)
    torch.testing.assert_close(G0, (delta + v_next) * mask)


# ---------------------------------------------------------------------------------------------------------------------
# The value model and one optimizer step on the tiny model
# ---------------------------------------------------------------------------------------------------------------------
def tiny_batch(tokenizer, n=4):
    """Gold and slipped solutions of a few arith problems, rewards 1 and 0 on the last token."""
    import random

    rng, rows = random.Random(0), []
    for i, p in enumerate(common.arith_problems("train", n, seed=5)):  # a slip at step 1 in every other response
        (row,) = arith_rows(tokenizer, [p], (i % 2 or None,), rng)
        rows.append(dict(row, rewards=dqo.token_rewards(len(row["response_ids"]), row["reward"])))
    assert {r["rewards"][-1] for r in rows} == {0.0, 1.0}
    return common.collate(rows, tokenizer.pad_token_id, ("rewards",))


def test_value_model_alignment_and_save_load(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    vm = common.ValueModel(copy.deepcopy(model))
    assert vm.head.weight.abs().sum() == 0  # V ≡ 0 before training
    torch.nn.init.normal_(vm.head.weight)
    batch = tiny_batch(tokenizer)
    with torch.no_grad():
        values = vm(batch["input_ids"], batch["attention_mask"])  # (B, T)
        hidden = vm.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert values.shape == batch["input_ids"].shape
    torch.testing.assert_close(values[:, 1:], vm.head(hidden).squeeze(-1)[:, :-1])  # V(s_t) = head(hidden[t - 1])
    assert (values[:, 0] == 0).all()
    # V(s_t) depends only on tokens before t: changing token t leaves values[:, :t + 1] unchanged
    ids = batch["input_ids"].clone()
    ids[:, 10] = (ids[:, 10] + 1) % len(tokenizer)
    with torch.no_grad():
        changed = vm(ids, batch["attention_mask"])
    torch.testing.assert_close(changed[:, :11], values[:, :11])
    assert not torch.allclose(changed[:, 11:], values[:, 11:])
    vm.save_pretrained(str(tmp_path / "vm"))
    with torch.no_grad():
        torch.testing.assert_close(common.ValueModel.from_pretrained(str(tmp_path / "vm"))(batch["input_ids"],
                                                                                        batch["attention_mask"]), values)


def test_one_step_lowers_both_losses(tiny_model):
    """The value loss is a plain regression onto detached targets: a small gradient step on the value model lowers it
    by its first-order prediction. The policy loss is a semi-gradient (its targets Ḡ and weights w move with the
    policy, detached): its gradient equals that of the same squares with Ḡ, V̄ and w held at the start, and a small
    step lowers that objective by its first-order prediction."""
    model, tokenizer = tiny_model
    policy, vm = copy.deepcopy(model), common.ValueModel(copy.deepcopy(model))
    torch.nn.init.normal_(vm.head.weight, std=0.1)  # a non-zero head: the zero-initialised one blocks the backbone's gradient
    batch = tiny_batch(tokenizer)
    ids, attn, mask, rewards = batch["input_ids"], batch["attention_mask"], batch["mask"], batch["rewards"]
    beta, lam = 0.1, 0.95
    with torch.no_grad():
        ref_logps = common.token_logprobs(model, ids, attn)

    def losses():
        return dqo_terms(common.token_logprobs(policy, ids, attn), ref_logps, ref_logps, vm(ids, attn), rewards, mask,
                         beta, lam, math.e)

    gradient_step_lowers(lambda: losses()[1], vm.parameters())
    with torch.no_grad():  # the detached parts at the start; policy = behaviour: w = 1
        v0 = vm(ids, attn) * mask
        G = dqo.lambda_returns((rewards - beta * (common.token_logprobs(policy, ids, attn) - ref_logps)) * mask, v0, mask, lam)
        target = rewards + torch.cat([G[:, 1:], G.new_zeros(len(G), 1)], dim=1) - v0  # r_h + Ḡ_{h+1} − V̄_h

    def frozen():
        log_ratio = (common.token_logprobs(policy, ids, attn) - ref_logps) * mask
        return ((beta * log_ratio - target) ** 2 * mask).sum(1).mean()

    params = list(policy.parameters())
    for a, b in zip(torch.autograd.grad(losses()[0], params), torch.autograd.grad(frozen(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    gradient_step_lowers(frozen, params)


# ---------------------------------------------------------------------------------------------------------------------
# Process scores on a hand-made case
# ---------------------------------------------------------------------------------------------------------------------
def arith_case(tokenizer):
    """A 3-step problem; responses: the gold solution, and slips at steps 0, 1 and 2 (first wrong segment known)."""
    import random

    p = next(q for q in common.arith_problems("train", 100, seed=3) if q["answer"].count(";") == 3)
    rows = [arith_rows(tokenizer, [p], (slip,), random.Random(slip))[0] for slip in (None, 0, 1, 2)]
    assert [r["reward"] for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert [common.arith_first_wrong(r) for r in rows] == [None, 0, 1, 2]
    return p, rows


def fake_generator(tokenizer, gold: str, ps_samples: int, log: list):
    """Stands in for generate_batch: continues a prefix with the gold solution's remaining lines in one sample out of
    every `ps_samples` (the last), with a wrong answer otherwise. The grader decides whether prefix + completion is
    correct, so only gold prefixes can be completed correctly."""
    gold_lines = gold.split("\n\n")
    counter = [0]

    def generate(model, tok, prompts, temperature, top_p, top_k, max_new_tokens):
        out = []
        for ids in prompts:
            prefix = tok.decode(ids).split("<|assistant|>\n", 1)[1]
            log.append(prefix)
            k = len([s for s in prefix.split("\n\n") if s.strip()])
            rest = "\n\n".join(gold_lines[k:]) if counter[0] % ps_samples == ps_samples - 1 else "#### 99999"
            counter[0] += 1
            ids_out = encode_response(tok, rest)
            out.append({"response_ids": ids_out, "finish": "stop", "response": rest})
        return out

    return generate


def test_segments_and_process_scores(monkeypatch, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(common.TINY_SHIPPED)  # the embedded model's, without loading the model
    p, rows = arith_case(tokenizer)
    # segments: split at blank lines, partitioning the response, each keeping its blank line; the last ends at EOS
    for r in rows:
        ends = common.segment_ends(tokenizer, r["response_ids"])
        pieces = [tokenizer.decode(r["response_ids"][a:e], skip_special_tokens=True) for a, e in zip([0] + ends, ends)]
        assert pieces == [s + "\n\n" for s in r["response"].split("\n\n")[:-1]] + [r["response"].split("\n\n")[-1]]
        assert ends[-1] == len(r["response_ids"]) and r["response_ids"][-1] == tokenizer.eos_token_id
    ps, log = 3, []
    monkeypatch.setattr(dqo, "generate_batch", fake_generator(tokenizer, p["solution"], ps, log))
    scores = dqo.score_segments(None, tokenizer, rows, "arith", ps, {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
                                64, 7, seed=0)
    assert [s["correct_segments"] for s in scores] == [4, 0, 1, 2]  # = the first wrong step, for each slip
    # backwards from the longest proper prefix, stopping at the first prefix with a correct completion
    n_prefix_segments = [len([s for s in x.split("\n\n") if s.strip()]) for x in log[::ps]]
    assert sorted(n_prefix_segments, reverse=True) == n_prefix_segments  # one prefix length per round, longest first
    assert n_prefix_segments == [3, 3, 3, 2, 2, 2, 1, 1]  # rounds: slips 0, 1, 2 | 0, 1, 2 (2 found) | 0, 1 (1 found)
    assert not any(x == "" for x in log)  # never the empty prefix
    # rewards: 1/n on the last token of each correct segment, the outcome on the last token
    ends = scores[2]["segment_ends"]
    r = dqo.token_rewards(len(rows[2]["response_ids"]), rows[2]["reward"], scores[2])
    assert r[ends[0] - 1] == 0.25 and sum(r) == 0.25
    assert tokenizer.decode(rows[2]["response_ids"][ends[0] - 2 : ends[0]]) == "\n\n"  # it sits on the blank line
    r = dqo.token_rewards(len(rows[0]["response_ids"]), rows[0]["reward"], scores[0])
    assert sum(r) == 2.0 and r[-1] == 1.25 and [r[e - 1] for e in scores[0]["segment_ends"][:-1]] == [0.25] * 3

    # cached and resumable: a second build reads the cache; a lost chunk is rebuilt alone
    monkeypatch.setattr(dqo, "PS_CHUNK", 2)
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}

    def build():
        return dqo.build_process_scores(None, reference, tokenizer, rows, "arith", ps, sampling, 64, 7, 0, str(tmp_path), "x")

    log.clear()
    reference = torch.nn.Linear(1, 1)  # stands in for the model: the fake generator ignores it
    built = build()
    assert built == scores and log
    root = os.path.join(str(tmp_path), "process_scores", os.listdir(os.path.join(str(tmp_path), "process_scores"))[0])
    os.remove(os.path.join(root, "chunk-00001.jsonl"))
    log.clear()
    assert build() == scores
    assert len(log) == ps * 5  # only the lost chunk's rows (slips 1 and 2: 3 + 2 prefixes), not all 8 prefixes
    monkeypatch.setattr(dqo, "generate_batch", None)  # a complete cache never generates
    assert build() == scores


# ---------------------------------------------------------------------------------------------------------------------
# Smoke runs
# ---------------------------------------------------------------------------------------------------------------------
def test_smoke_run_and_value_trace(tiny_cache, tiny_model, tmp_path, reference_greedy, monkeypatch):
    """A DQO run with process rewards saves its value model; eval.py --value_model prints its value trace, with its
    statistics, in the run's precision, and writes the HTML page. On the rows it trained on (the offline dataset it
    exported) the run moved what its losses target the right way: the log-ratio log π/π_ref rises on correct responses
    over failed ones of the prompt, and the value loss falls from the reference's (V ≡ 0, π = π_ref)."""
    out, data = str(tmp_path / "dqo"), str(tmp_path / "offline.jsonl")
    results, metrics = run_script("dqo.py", tiny_cache, out, "--process_rewards", "--ps_samples", "2", "--lam", "0.95",
                                  "--behavior", "sampler", "--save_offline_data", data)
    assert results["reference"]["greedy"] == reference_greedy(32)  # the untrained reference, evaluated independently
    assert_accuracy(results["final"]["greedy"], 32)
    assert metrics and all(math.isfinite(m["losses/policy"]) and math.isfinite(m["losses/value"]) for m in metrics)
    assert os.path.exists(os.path.join(out, "value_model", "value_head.safetensors"))
    assert os.listdir(os.path.join(tiny_cache, "process_scores"))
    assert_dqo_learned(out, data, tiny_cache, tiny_model, monkeypatch)
    code, stdout, stderr = run_command(["eval.py", "--value_model", os.path.join(out, "value_model"), "--task", "arith",
                                        "--n_test", "16", "--trace_problems", "16", "--cache_dir", tiny_cache,
                                        "--output_dir", str(tmp_path / "eval")], timeout=300)
    assert code == 0, stderr[-3000:]
    # the run's precision (fp32), not the bf16 default of a local model: bf16 would round V to 1/256 near 1
    assert "eval: 1 process(es), device cpu, precision fp32" in stdout + stderr
    assert "value trace" in stdout and "(start)" in stdout and "over 64 sampled responses" in stdout
    assert "incorrect response" in stdout  # the weak test reference always fails some
    with open(os.path.join(out, "value_trace.html")) as f:
        assert "<span style='background:" in f.read()
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == results
    # conftest's cores ÷ workers threads per pytest worker reach this process and the runs it starts
    if os.environ.get("OMP_NUM_THREADS_FROM_CONFTEST"):
        assert torch.get_num_threads() == max(1, CORES // WORKERS)
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["threads"] == int(os.environ["OMP_NUM_THREADS"])


def assert_dqo_learned(out: str, data: str, cache: str, tiny_model, monkeypatch) -> None:
    """The direction checks of a DQO run in `out` that exported its offline dataset to `data`: the log-ratio, correct
    minus failed within each prompt, rises from 0; the value loss (dqo.py's equations with the run's β, λ, behaviour
    and clip, its per-token rewards read back from the process-score cache) falls, row by row, from its value with the
    untrained value model and policy."""
    model, tokenizer = tiny_model
    with open(os.path.join(out, "run.json")) as f:
        args = json.load(f)["args"]
    rows = common.read_offline_data(data)
    assert_rises(correct_minus_failed(log_ratios(os.path.join(out, "model"), rows), rows),
                 "dqo.py: log π/π_ref, correct minus failed responses")
    # the per-token rewards the run trained on: outcome plus the process scores it cached (a complete cache never
    # generates: a miss here fails instead of scoring again with other samples)
    monkeypatch.setattr(dqo, "generate_batch", None)
    sampling = dict(temperature=args["temperature"], top_p=args["top_p"], top_k=args["top_k"])
    scores = dqo.build_process_scores(None, model, tokenizer, rows, args["task"], args["ps_samples"], sampling,
                                      args["max_new_tokens"], args["gen_batch_size"], args["seed"], cache,
                                      runtime.files.model_key(args["model"], cache, args["precision"]))
    with open(data) as f:  # the behaviour log-probs the export keeps beside each row
        behavior = [json.loads(line)[f"{args['behavior']}_logps"] for line in f]
    rows = [dict(r, rewards=dqo.token_rewards(len(r["response_ids"]), r["reward"], sc), behavior_logps=b)
            for r, sc, b in zip(rows, scores, behavior, strict=True)]
    batch = {k: v.double() for k, v in common.collate(rows, tokenizer.pad_token_id, ("rewards", "behavior_logps")).items()}
    ids, attn, mask = batch["input_ids"].long(), batch["attention_mask"].long(), batch["mask"]
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"), dtype=torch.float32)
    value_model = common.ValueModel.from_pretrained(os.path.join(out, "value_model"))
    with torch.no_grad():
        ref_logps = common.token_logprobs(model, ids, attn).double() * mask  # (N, T)
        policy_logps = common.token_logprobs(policy, ids, attn).double() * mask  # (N, T)
        values = value_model(ids, attn).double() * mask  # (N, T)

    def value_loss(logps, v):  # (N,) per row: w Σ_h (G_h − V_h)², G from detached inputs (dqo.py's docstring)
        delta = (batch["rewards"] - args["beta"] * (logps - ref_logps)) * mask  # (N, T)
        G = dqo.lambda_returns(delta, v, mask, args["lam"])  # (N, T)
        log_w = ((logps - batch["behavior_logps"]) * mask).sum(1)  # (N,)
        w = log_w.clamp(max=math.log(args["is_clip"])).exp() if args["is_clip"] else torch.ones_like(log_w)
        return w * ((G - v) ** 2 * mask).sum(1)

    assert_rises(value_loss(ref_logps, torch.zeros_like(values)) - value_loss(policy_logps, values),
                 "dqo.py: value loss, reference minus trained")


def test_value_trace_statistics(tiny_model):
    """dV per segment against the verifier's first wrong step, and the AUC of −dV, on a value model whose V is known:
    a stand-in that reads 1 before a slipped step's result and 0 after it."""
    model, tokenizer = tiny_model
    _, rows = arith_case(tokenizer)
    problems = [{"question": "q", "answer": rows[0]["answer"]}]

    class Known(torch.nn.Linear):  # V = 1 up to the first wrong segment's last token, 0 from there on
        def forward(self, input_ids, attention_mask):
            v = torch.zeros(input_ids.shape)
            for i, ids in enumerate(input_ids.tolist()):
                r = next(r for r in rows if ids[: len(r["prompt_ids"]) + len(r["response_ids"])] == r["prompt_ids"] + r[
                    "response_ids"])
                ends, wrong = common.segment_ends(tokenizer, r["response_ids"]), common.arith_first_wrong(r)
                cut = len(r["prompt_ids"]) + (ends[wrong] if wrong is not None else len(r["response_ids"]) + 1)
                v[i, :cut] = 1.0
            return v

    import unittest.mock as mock

    def fake_rollout(policy, tok, prompts, answers, task, n, **kw):
        return [dict(r, prompt_idx=0) for r in rows]

    with mock.patch.object(eval_script, "rollout", fake_rollout):
        out = eval_script.value_traces(model, Known(1, 1), tokenizer, problems, "arith", seed=0, max_new_tokens=64,
                                       gen_batch_size=3, n_problems=1, n_per=4)
    stats = out["stats"]
    assert out["n_responses"] == 4
    assert stats["mean dV at WRONG segments"] == pytest.approx(-1.0)  # V drops from 1 to 0 exactly there
    assert stats["mean dV at ok segments"] == pytest.approx(0.0)
    assert stats["AUC of -dV, first wrong vs correct steps"] == pytest.approx(1.0)
    assert stats["AUC bootstrap SE"] == 0.0  # every resample is separated perfectly
    n_wrong = sum(common.arith_first_wrong(r) is not None for r in rows)
    assert out["n_segments"]["WRONG"] == n_wrong and out["n_segments"]["ok"] > 0
    text = eval_script.format_value_traces(out)  # dV signed, the AUC a probability
    assert "mean dV at WRONG segments -1.000" in text and "AUC of -dV, first wrong vs correct steps 1.000" in text


def test_metrics_split_correct_and_failed():
    """The weight and V(s_1) are also reported per outcome: rows 0 and 2 correct (return 1 + process reward 1/2), rows
    1 and 3 failed (return 0, and 1/2 from a correct first segment). Hand values: w_i = min(e, exp(Σ_h (ℓ − μ))), V at
    each row's first response position."""
    B, T = 4, 5
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.float64)
    rewards = torch.zeros(B, T, dtype=torch.float64)
    rewards[0, 3], rewards[0, 1], rewards[2, 1], rewards[1, 2], rewards[3, 1] = 1.0, 0.5, 1.5, 0.5, 0.5
    pl = torch.full((B, T), -1.0, dtype=torch.float64)
    mu = pl - torch.tensor([0.1, -0.3, 0.6, 0.2], dtype=torch.float64)[:, None]  # per-token log π/μ of each row
    values = torch.arange(B * T, dtype=torch.float64).reshape(B, T) / 100
    _, _, m = dqo_terms(pl, pl, mu, values, rewards, mask, 0.1, 1.0, math.e)
    w = [min(math.e, math.exp(0.1 * 3)), math.exp(-0.3 * 3), min(math.e, math.exp(0.6 * 2)), math.exp(0.2 * 2)]
    assert m["charts/is_weight_correct"] == pytest.approx((w[0] + w[2]) / 2)
    assert m["charts/is_weight_failed"] == pytest.approx((w[1] + w[3]) / 2)
    assert m["charts/value_first_correct"] == pytest.approx((values[0, 1] + values[2, 0]).item() / 2)
    assert m["charts/value_first_failed"] == pytest.approx((values[1, 2] + values[3, 1]).item() / 2)
    _, _, m = dqo_terms(pl[:2], pl[:2], mu[:2], values[:2], rewards[:2] * 0, mask[:2], 0.1, 1.0, math.e)
    assert "charts/is_weight_correct" not in m and m["charts/is_weight_failed"] == pytest.approx((w[0] + w[1]) / 2)


def test_value_auc_and_its_bootstrap_error():
    """`value_auc` equals the pairwise definition (ties counting half); its bootstrap SE over responses is about the
    spread of the AUC across independent samples of the same size, and halves with four times the responses."""
    rng = np.random.default_rng(0)

    def sample(n_resp):  # 4 segments per response, the last one first-wrong in 30% of the responses, drops rounded: ties
        response = np.repeat(np.arange(n_resp), 4)
        wrong = (np.arange(4 * n_resp) % 4 == 3) & (rng.random(4 * n_resp) < 0.3)
        drop = np.round(rng.normal(wrong * 0.5, 1.0), 1)
        return drop, wrong, response

    drop, wrong, response = sample(200)
    pairs = drop[wrong][:, None] - drop[~wrong][None, :]
    auc, se = eval_script.value_auc(drop, wrong, response, n_boot=400)
    assert auc == pytest.approx((pairs > 0).mean() + 0.5 * (pairs == 0).mean(), abs=1e-12)
    spread = np.std([eval_script.value_auc(*sample(200), n_boot=1)[0] for _ in range(200)])
    assert 0.7 * spread < se < 1.4 * spread
    _, se4 = eval_script.value_auc(*sample(800), n_boot=400)
    assert 0.35 * se < se4 < 0.65 * se
