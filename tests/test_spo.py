"""SPO: the loss against a plain-loop implementation with hand-derived gradients, the cumulative Q's Bellman and
path consistency (paper Theorems 2.2 and 2.3), Q̂_0, online batch assembly, one optimizer step, smoke runs."""

import copy
import inspect
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import (assert_accuracy, assert_rises, correct_minus_failed, encode_response, gradient_step_lowers, log_ratios,
                      run_script)

import common
import spo

LOSS_TYPES = ("squared", "bce", "advantage_bce", "reverse_q")
PAPER_BETA = 1 / math.log(100_000)


def loop_spo_loss(policy_logps, ref_logps, mask, q0, rewards, beta, loss_type):
    """Plain Python over sequences and tokens: (loss, d loss / d policy_logps as nested lists), the gradient derived
    by hand from the per-sequence formulas in spo.py's docstring."""
    B, T = len(policy_logps), len(policy_logps[0])
    total, grad = 0.0, [[0.0] * T for _ in range(B)]
    for b in range(B):
        resp = [t for t in range(T) if mask[b][t] == 1]
        r = rewards[b]
        q, q_t = q0[b], {}
        for t in resp:  # Q_t = q0 + Σ_{t' ≤ t} β (ℓ − ℓ_ref)
            q += beta * (policy_logps[b][t] - ref_logps[b][t])
            q_t[t] = q
        q_T = q
        if loss_type == "squared":
            value, d = (q_T - r) ** 2, {t: 2 * (q_T - r) * beta for t in resp}
        elif loss_type == "bce":
            y, x, c = q_T / beta, math.exp(r / beta), inspect.signature(spo.spo_loss).parameters["max_logp"].default
            if y < c:
                value, dy = -x * y - (1 - x) * math.log(1 - math.exp(y)), -x + (1 - x) * math.exp(y) / (1 - math.exp(y))
            else:  # clipped: the positive term is constant, the negative one passes its gradient at c straight through
                value, dy = -x * c - (1 - x) * math.log(1 - math.exp(c)), (1 - x) * math.exp(c) / (1 - math.exp(c))
            d = {t: dy for t in resp}  # dŷ/dℓ_t = 1
        elif loss_type == "advantage_bce":
            z = sum(policy_logps[b][t] - ref_logps[b][t] for t in resp)  # Σ A_t / β
            p = 1 / (1 + math.exp(-(r - q0[b]) / beta))
            s = 1 / (1 + math.exp(-z))
            value, d = -p * math.log(s) - (1 - p) * math.log(1 - s), {t: s - p for t in resp}
        elif loss_type == "reverse_q":
            value, d = 0.0, {t: 0.0 for t in resp}
            for t in resp:
                target = r - (q_T - q_t[t])  # R_t = r − Σ_{t' > t} A_t', no gradient
                value += (q_t[t] - target) ** 2
                for t2 in resp:  # Q_t depends on ℓ_{t2} for t2 ≤ t
                    if t2 <= t:
                        d[t2] += 2 * (q_t[t] - target) * beta
        total += value / B
        for t, g in d.items():
            grad[b][t] = g / B
    return total, grad


def random_batch(seed, B=5, T=9):
    g = torch.Generator().manual_seed(seed)
    policy_logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    ref_logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):  # a prompt of 1-3 tokens, then the response, then padding
        start = 1 + b % 3
        mask[b, start : T - b % 2 - (b == 0) * 2] = 1
    q0 = -torch.rand(B, generator=g, dtype=torch.float64) * 0.8
    rewards = torch.tensor([0.0, -1.0, 0.0, -1.0, 0.0][:B], dtype=torch.float64)
    policy_logps[0, :] = ref_logps[0, :] + 0.5  # sequence 0 has Q_T > 0: the bce clip is active
    return policy_logps, ref_logps, mask, q0, rewards


@pytest.mark.parametrize("beta", [0.5, PAPER_BETA])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_spo_loss_matches_plain_loop(loss_type, beta):
    policy_logps, ref_logps, mask, q0, rewards = random_batch(0)
    policy_logps.requires_grad_(True)
    loss, metrics = spo.spo_loss(policy_logps, ref_logps, q0, rewards, mask, beta, loss_type)
    loss.backward()
    want, want_grad = loop_spo_loss(policy_logps.tolist(), ref_logps.tolist(), mask.tolist(), q0.tolist(),
                                    rewards.tolist(), beta, loss_type)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(policy_logps.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-8, atol=1e-12)
    assert policy_logps.grad.abs().sum() > 0
    assert metrics["losses/policy"].item() == pytest.approx(want, rel=1e-6)


def test_bce_never_pushes_above_zero():
    """A correct sequence (x = 1) whose ŷ = Q_T/β is already above 0 gets no gradient from the positive term; a wrong
    one is pushed down (straight through the clip) with a finite loss."""
    policy_logps = torch.tensor([[0.0, 0.3, 0.3]], requires_grad=True)
    ref_logps, mask, q0 = torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 1.0]]), torch.zeros(1)
    loss, _ = spo.spo_loss(policy_logps, ref_logps, q0, torch.zeros(1), mask, 0.5, "bce")
    loss.backward()
    assert torch.isfinite(loss) and policy_logps.grad.abs().max() < 1e-3  # x = 1: only e^{r/β}-free terms, no push up
    policy_logps.grad = None
    loss, _ = spo.spo_loss(policy_logps, ref_logps, q0, -torch.ones(1), mask, 0.5, "bce")
    loss.backward()
    assert torch.isfinite(loss) and (policy_logps.grad[0, 1:] > 0).all()  # gradient descent lowers ŷ


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="loss_type"):
        policy_logps, ref_logps, mask, q0, rewards = random_batch(0)
        spo.spo_loss(policy_logps, ref_logps, q0, rewards, mask, 0.5, "hinge")


def test_soft_value_q0():
    """Q̂_0 = β log E[e^{r/β}] with r ∈ {0, −1}, checked against the Monte Carlo average over explicit rewards; finite at
    Ŝ_0 ∈ {0, 1}; estimate_q0 groups the rows by prompt."""
    beta = PAPER_BETA
    for rewards in ([0.0] * 4, [1.0] * 4, [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]):
        want = beta * math.log(sum(math.exp((r - 1) / beta) for r in rewards) / len(rewards))
        got = spo.soft_value_q0(torch.tensor([sum(rewards) / len(rewards)]), beta).item()
        assert got == pytest.approx(want, abs=1e-6)
    assert spo.soft_value_q0(torch.tensor([0.0, 1.0]), beta).tolist() == pytest.approx([-1.0, 0.0], abs=1e-7)
    rows = [{"prompt_idx": i // 4, "reward": float(i in (0, 4, 5))} for i in range(8)]
    q0 = spo.estimate_q0(rows, 0.5)
    assert q0[0] == pytest.approx(0.5 * math.log(0.25 + 0.75 * math.exp(-2)))
    assert q0[1] == pytest.approx(0.5 * math.log(0.5 + 0.5 * math.exp(-2)))


def test_path_consistency():
    """Theorem 2.3: Σ_{t=t1..tk} A_t = Q_tk − Q_{t1−1} for every response span, padding and prompt included."""
    policy_logps, ref_logps, mask, q0, _ = random_batch(1)
    advantages, q = spo.soft_q(policy_logps, ref_logps, q0, mask, 0.3)
    B, T = mask.shape
    for b in range(B):
        resp = mask[b].nonzero().flatten().tolist()
        for i, t1 in enumerate(resp):
            for tk in resp[i:]:
                prev = q[b, t1 - 1] if t1 > 0 else q0[b]
                assert advantages[b, t1 : tk + 1].sum().item() == pytest.approx((q[b, tk] - prev).item(), abs=1e-12)
        assert q[b, resp[0] - 1].item() == q0[b].item() and q[b, -1].item() == q[b, resp[-1]].item()
    assert (advantages[mask == 0] == 0).all()


def test_bellman_consistency_by_construction(tiny_model):
    """Theorem 2.2 with a full-vocabulary sum: for a randomly perturbed policy and any response (the gold one here),
    β log Σ_a π_0(a | s_t) exp(Q_{t+1}(a) / β) = Q_t at every t, where Q_{t+1}(a) is soft_q's value at the end of the
    response extended by token a (log-probs from common.token_logprobs of both models)."""
    ref, tokenizer = tiny_model
    torch.manual_seed(0)
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval(), policy.eval()
    beta, q0 = PAPER_BETA, -0.3
    problem = common.load_task("arith", "train", limit=1)[0]
    prompt = common.encode_prompt(tokenizer, problem["question"], "arith")
    response = encode_response(tokenizer, problem["solution"])[:20]  # the theorem holds for any tokens
    V = policy.config.vocab_size
    assert V == len(tokenizer) and len(response) >= 5

    @torch.no_grad()
    def q_end(seqs):  # Q at the last position of each sequence (all the same length)
        ids = torch.tensor(seqs)
        attn, mask = torch.ones_like(ids), torch.zeros(ids.shape)
        mask[:, len(prompt) :] = 1
        _, q = spo.soft_q(common.token_logprobs(policy, ids, attn), common.token_logprobs(ref, ids, attn),
                          torch.full((len(seqs),), q0), mask, beta)
        return q[:, -1]

    q_path = []
    for t in range(len(response)):
        prefix = prompt + response[:t]
        q_t = q_end([prefix])[0]
        q_next = q_end([prefix + [a] for a in range(V)])  # (V,) Q_{t+1}(a) for every token a
        with torch.no_grad():
            log_pi0 = torch.log_softmax(ref(input_ids=torch.tensor([prefix])).logits[0, -1].float(), -1)  # (V,)
        backup = beta * torch.logsumexp(log_pi0 + q_next / beta, 0)
        assert backup.item() == pytest.approx(q_t.item(), abs=2e-5), t
        q_path.append(q_t.item())
    assert q_path[0] == pytest.approx(q0) and max(abs(q - q0) for q in q_path) > 1e-2  # Q moves: a real test


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_online_slots_mix_is_exact_and_process_invariant(fraction):
    """Exactly B·f rows per micro-batch are online, and two processes with batch b get, slice by slice, the slots that
    one process with batch 2b gets."""
    for b in (4, 8, 32):
        slots = spo.online_slots(b, fraction)
        assert len(slots) == b * fraction and len(set(slots)) == len(slots) and all(0 <= j < b for j in slots)
        assert spo.online_slots(2 * b, fraction) == slots + [b + j for j in slots]
    assert spo.online_slots(8, 0.5) == [1, 3, 5, 7]  # spread evenly, not all at the end


def test_rollout_policy_refresh_schedule(tiny_model):
    """The rollout copy is frozen between refreshes and equals the trained policy at the last multiple of the interval."""
    model = copy.deepcopy(tiny_model[0])
    cpu = SimpleNamespace(mixed_precision="no", device=torch.device("cpu"))  # what frozen_copy reads of an accelerator
    rollout_policy = spo.RolloutPolicy(model, interval=3, accelerator=cpu)
    assert all(not p.requires_grad for p in rollout_policy.model.parameters())
    snapshots = {0: copy.deepcopy(model.state_dict())}
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        snapshots[step] = copy.deepcopy(model.state_dict())
        rollout_policy.maybe_refresh(model, step)
        want = step // 3 * 3
        assert rollout_policy.version == want
        for k, v in rollout_policy.model.state_dict().items():
            assert torch.equal(v, snapshots[want][k]), (step, k)
    restored = spo.RolloutPolicy(tiny_model[0], interval=3, accelerator=cpu)
    restored.load_state_dict(rollout_policy.state_dict())
    assert restored.version == 6 and torch.equal(restored.model.lm_head.weight, snapshots[6]["lm_head.weight"])


def test_online_rollouts(tiny_model):
    """Fresh rollouts keep their row's prompt, are graded by common.grade, and carry the frozen reference's log-probs
    of exactly the response tokens."""
    model, tokenizer = tiny_model
    problems = common.load_task("arith", "train", limit=3)
    rows = [{"prompt_ids": common.encode_prompt(tokenizer, p["question"], "arith"), "answer": p["answer"],
             "prompt_idx": 10 + i, "q0": -0.1 * i} for i, p in enumerate(problems)]
    sampling = dict(temperature=0.7, top_p=0.95, top_k=0)
    fresh = spo.online_rollouts(model, model, tokenizer, rows, "arith", sampling, 64, seed=3)
    assert len(fresh) == 3
    for f, r, p in zip(fresh, rows, problems):
        assert f["online"] and f["prompt_ids"] == r["prompt_ids"] and f["prompt_idx"] == r["prompt_idx"]
        assert f["reward"] == common.grade(tokenizer.decode(f["response_ids"], skip_special_tokens=True), p["answer"], "arith")
        batch = common.collate([f], tokenizer.pad_token_id)
        with torch.no_grad():
            lp = common.token_logprobs(model, batch["input_ids"], batch["attention_mask"])[0, len(f["prompt_ids"]) :]
        assert len(f["ref_logps"]) == len(f["response_ids"])
        torch.testing.assert_close(torch.tensor(f["ref_logps"]), lp, atol=1e-5, rtol=1e-5)
    again = spo.online_rollouts(model, model, tokenizer, rows, "arith", sampling, 64, seed=3)
    assert [f["response_ids"] for f in again] == [f["response_ids"] for f in fresh]  # seeded


def test_per_row_temperature(tiny_model):
    """generate_batch with one temperature per row: a list of equal values samples exactly what the scalar does (the
    same seed), and each row is sampled at its own (a near-zero temperature decodes greedily beside a hot row)."""
    model, tokenizer = tiny_model
    problems = common.load_task("arith", "train", limit=4)
    prompts = [common.encode_prompt(tokenizer, p["question"], "arith") for p in problems]
    outs = {}
    for name, t in (("scalar", 0.6), ("rows", [0.6] * 4)):
        torch.manual_seed(5)
        outs[name] = [o["response_ids"] for o in common.generate_batch(model, tokenizer, prompts, t, 0.95, 0, 32)]
    assert outs["scalar"] == outs["rows"]
    greedy = [o["response_ids"] for o in common.generate_batch(model, tokenizer, prompts, 0, 1.0, 0, 32)]
    hot_differs = False
    for seed in range(4):
        torch.manual_seed(seed)
        mixed = common.generate_batch(model, tokenizer, prompts, [1e-3, 3.0, 1e-3, 3.0], 1.0, 0, 32)
        mixed = [o["response_ids"] for o in mixed]
        assert mixed[0] == greedy[0] and mixed[2] == greedy[2]
        hot_differs |= mixed[1] != greedy[1] or mixed[3] != greedy[3]
    assert hot_differs
    with pytest.raises(ValueError, match="per-row temperatures"):
        common.generate_batch(model, tokenizer, prompts, [0.5, 0.0, 0.5, 0.5], 1.0, 0, 8)


def _window_setup(grad_accum=2, world=1, rank=0):
    examples = [{"prompt_idx": i, "n": i} for i in range(44)]  # 44 // 4 = 11 micro-batches, 10 used: 5 steps an epoch
    args = SimpleNamespace(per_device_batch_size=4 // world, grad_accum=grad_accum, seed=3, rollout_min_temperature=0.1,
                           rollout_max_temperature=0.8)
    acc = SimpleNamespace(num_processes=world, process_index=rank)
    return examples, args, acc


@pytest.mark.parametrize("world", [1, 2])
def test_window_batches_are_the_training_order(world):
    """The micro-batches of steps [first, last) are, in order, those the training loop gets from iterate_batches over
    the epochs, across an epoch end, and on every process its own slice."""
    for rank in range(world):
        examples, args, acc = _window_setup(world=world, rank=rank)
        loop = [(e, b, rows) for e in range(3) for b, rows in common.iterate_batches(examples, args.per_device_batch_size,
                                                                                      2, args.seed, e, acc)]
        assert len(loop) == 30  # 5 steps x 2 micro-batches per epoch
        for first, last in ((0, 5), (3, 8), (4, 5), (5, 15), (7, 9)):
            assert spo.window_batches(examples, args, acc, 5, first, last) == loop[first * 2 : last * 2], (first, last)


def test_pending_rollouts_keep_prompt_version_and_temperature(tiny_model, monkeypatch):
    """Refresh-time rollouts: every micro-batch of the window gets, slot by slot, a rollout of the prompt in that slot,
    from the current policy version, at the micro-batch's own temperature draw, in generate calls of at most
    --gen_batch_size; the same version regenerates the same rows (resume)."""
    model, tokenizer = tiny_model
    problems = common.load_task("arith", "train", limit=44)
    examples = [{"prompt_ids": common.encode_prompt(tokenizer, p["question"], "arith"), "answer": p["answer"],
                 "prompt_idx": i, "q0": -0.01 * i} for i, p in enumerate(problems)]
    _, args, acc = _window_setup()
    args = SimpleNamespace(**vars(args), gen_batch_size=5, rollout_top_p=0.95, task="arith", max_new_tokens=24)
    acc = SimpleNamespace(**vars(acc), device=torch.device("cpu"), mixed_precision="no")
    policy = spo.RolloutPolicy(model, interval=3, accelerator=acc)
    policy.version = 3
    calls = []
    generate = common.generate_batch
    monkeypatch.setattr(common, "generate_batch", lambda m, t, prompts, **kw: calls.append(len(prompts)) or
                        generate(m, t, prompts, **kw))
    slots = spo.online_slots(4, 0.5)
    window = spo.window_batches(examples, args, acc, 5, 3, 6)  # steps 3-5: crosses into epoch 1
    pending = spo.pending_rollouts(policy, model, tokenizer, window, slots, args, acc)
    assert calls == [5, 5, 2] and sorted(pending) == sorted((e, b) for e, b, _ in window)
    for epoch, b, rows in window:
        t = spo.rollout_temperature(args, epoch, b, acc)
        assert t == random.Random(args.seed * 1_000_003 + epoch * 100_003 + b).uniform(0.1, 0.8)
        fresh = pending[(epoch, b)]
        assert [f["prompt_idx"] for f in fresh] == [rows[j]["prompt_idx"] for j in slots]
        assert [f["prompt_ids"] for f in fresh] == [rows[j]["prompt_ids"] for j in slots]
        assert [f["q0"] for f in fresh] == [rows[j]["q0"] for j in slots]
        assert all(f["online"] and f["policy_version"] == 3 and f["temperature"] == t for f in fresh)
    assert len({f["temperature"] for rows in pending.values() for f in rows}) == 6  # one draw per micro-batch
    again = spo.pending_rollouts(policy, model, tokenizer, window, slots, args, acc)
    assert {k: [f["response_ids"] for f in v] for k, v in again.items()} == \
        {k: [f["response_ids"] for f in v] for k, v in pending.items()}


def test_resume_mid_window_continues_exactly(tiny_cache, tmp_path):
    """A run stopped at a checkpoint in the middle of a rollout window (step 7, last refresh at step 5) and resumed
    regenerates the window's rollouts: the same losses as the uninterrupted run at every later step, and the same
    final weights, bit for bit."""
    args = ["--online_fraction", "0.5", "--model_update_interval", "5", "--lr", "1e-3", "--n_train_prompts", "24",
            "--n_test", "4", "--pass_eval_problems", "2", "--max_new_tokens", "32", "--save_every", "7"]
    _, full = run_script("spo.py", tiny_cache, str(tmp_path / "full"), *args)
    out = str(tmp_path / "split")
    run_script("spo.py", tiny_cache, out, *args, "--max_steps", "7")
    _, resumed = run_script("spo.py", tiny_cache, out, *args, "--resume")
    assert len(full) == 12 and [m["step"] for m in resumed] == list(range(1, 13))
    for a, b in zip(full, resumed):
        assert a["losses/policy"] == b["losses/policy"] and a["rewards/online"] == b["rewards/online"], a["step"]
        assert a["charts/rollout_policy_step"] == b["charts/rollout_policy_step"] == (a["step"] - 1) // 5 * 5
    from safetensors.torch import load_file

    w_full, w_resumed = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("full", "split"))
    assert w_full.keys() == w_resumed.keys() and all(torch.equal(w_full[k], w_resumed[k]) for k in w_full)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_step_lowers_loss(tiny_model, loss_type):
    ref, tokenizer = tiny_model
    policy = copy.deepcopy(ref)
    problems = common.load_task("arith", "train", limit=6)
    prompts = [common.encode_prompt(tokenizer, p["question"], "arith") for p in problems]
    rows = common.rollout(ref, tokenizer, prompts, [p["answer"] for p in problems], "arith", n=3, temperature=1.0,
                          max_new_tokens=64, seed=0)
    rows += [{"prompt_idx": i, "prompt_ids": prompts[i], "response_ids": encode_response(tokenizer, p["solution"]),
              "reward": 1.0} for i, p in enumerate(problems)]  # the gold solutions: correct for sure
    q0 = spo.estimate_q0(rows, 0.5)
    batch = common.collate([dict(r, q0=q0[r["prompt_idx"]]) for r in rows], tokenizer.pad_token_id, (), ("q0", "reward"))
    assert 0 < batch["reward"].mean() < 1
    with torch.no_grad():
        ref_logps = common.token_logprobs(ref, batch["input_ids"], batch["attention_mask"])

    def loss_fn():
        lp = common.token_logprobs(policy, batch["input_ids"], batch["attention_mask"])
        return spo.spo_loss(lp, ref_logps, batch["q0"], batch["reward"] - 1, batch["mask"], 0.5, loss_type)[0]

    if loss_type != "reverse_q":
        gradient_step_lowers(loss_fn, policy.parameters())
        return
    # reverse_q regresses every Q_t onto R_t = r − Σ_{t' > t} A_t', detached: a semi-gradient. Its gradient is that of
    # the same squares with R held at the start, and a small step lowers that objective by its first-order prediction.
    with torch.no_grad():
        _, q = spo.soft_q(common.token_logprobs(policy, batch["input_ids"], batch["attention_mask"]), ref_logps,
                          batch["q0"], batch["mask"], 0.5)
        targets = (batch["reward"] - 1)[:, None] - (q[:, -1:] - q)

    def frozen():
        lp = common.token_logprobs(policy, batch["input_ids"], batch["attention_mask"])
        _, q = spo.soft_q(lp, ref_logps, batch["q0"], batch["mask"], 0.5)
        return ((q - targets) ** 2 * batch["mask"]).sum(-1).mean()

    params = list(policy.parameters())
    for a, b in zip(torch.autograd.grad(loss_fn(), params), torch.autograd.grad(frozen(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    gradient_step_lowers(frozen, params)


@pytest.mark.parametrize("mode", ["offline", "half", "online"])
def test_smoke(tiny_cache, tmp_path, mode, reference_greedy):
    """The script in its three modes: the per-step mix is exact, the rollout policy is refreshed on schedule, and
    pass@1 / pass@10 (20 samples at T=0.4) and peak memory are reported. The run moved what its loss targets the right
    way: on the offline rows (the dataset it exported), Q_T rises on correct responses over failed ones of the prompt
    (Q_T − Q̂_0 = β log π/π_ref, and Q̂_0 is the prompt's: the gap is β times the log-ratio's; 0 at the reference)."""
    fraction = {"offline": 0.0, "half": 0.5, "online": 1.0}[mode]
    out, data = str(tmp_path / "spo"), str(tmp_path / "offline.jsonl")
    results, metrics = run_script("spo.py", tiny_cache, out, "--online_fraction", str(fraction),
                                  "--model_update_interval", "5", "--lr", "1e-4", "--save_offline_data", data)
    assert len(metrics) == 24  # 48 prompts x 4 samples / batch 8
    for m in metrics:
        assert m["charts/online_fraction"] == fraction
        assert m["charts/rollout_policy_step"] == ((m["step"] - 1) // 5 * 5 if fraction else 0)
        assert math.isfinite(m["losses/policy"])
    for name in ("reference", "final"):
        assert 0 <= results[name]["pass@1"] <= results[name]["pass@10"] <= 1
        assert_accuracy(results[name]["greedy"], 32)
    assert results["reference"]["greedy"] == reference_greedy(32)  # the untrained reference, evaluated independently
    assert results["final"]["peak_memory_mb"] > 0
    with open(os.path.join(out, "run.json")) as f:
        beta = json.load(f)["args"]["beta"]
    rows = common.read_offline_data(data)
    q_gain = beta * log_ratios(os.path.join(out, "model"), rows)  # (N,) Q_T − Q̂_0
    assert_rises(correct_minus_failed(q_gain, rows), f"spo.py ({mode}): Q_T, correct minus failed responses")
