"""What each script's real main() hands its loss, flag by flag: a short run of the script through
tests/wiring_driver.py, which wraps the loss (and collate, token_logprobs, the value model) in the script's own module
and records every call's arguments by name. Each expected value is built here from the rows the batch was made of, not
from the script's tensors: the flags (DQO's --no_is_policy, --no_is_value, --behavior, --lam, --is_clip,
--process_rewards; SPO's --online_fraction, --loss_type), where DRO reads V, which side of a DPO pair is chosen, which
KTO rows are desirable, which rows RS trains on. One run serves all the checks on it (module-scoped fixtures)."""

import collections
import json
import math
import os

import pytest
import torch
from conftest import SMOKE_ARGS, encode_response, run_command

import common
import spo

DRIVER = os.path.join("tests", "wiring_driver.py")


# The short runs, each recorded once: each flag of a script against its default in another run
RUNS = {
    "dqo": ("dqo.py", "--max_steps", "3"),  # 3 steps: V ≡ 0 until the value head has had a gradient
    "dqo_sampler": ("dqo.py", "--max_steps", "2", "--no_is_value", "--behavior", "sampler", "--lam", "0.5", "--is_clip", "2"),
    "dqo_process": ("dqo.py", "--max_steps", "2", "--no_is_policy", "--is_clip", "0", "--process_rewards", "--ps_samples",
                    "2"),  # --ps_samples 2 as tests/test_dqo.py's smoke run: one process-score cache for both
    "dro": ("dro.py", "--max_steps", "3"),
    "dpo": ("dpo.py", "--max_steps", "2", "--max_pairs_per_prompt", "3"),  # below most prompts' correct x failed
    "kto": ("kto.py", "--max_steps", "2", "--beta", "0.2"),  # not the tiny default's 0.3, nor the paper's 0.1
    "spo": ("spo.py", "--max_steps", "2", "--online_fraction", "0.25", "--loss_type", "bce", "--model_update_interval", "2",
            "--q0_samples", "4"),
    "rs": ("rs.py", "--max_steps", "2"),  # + --offline_data rs_offline_data
}


@pytest.fixture(scope="module")
def rs_offline_data(tmp_path_factory):
    """An --offline_data file with, per prompt, the gold solution (correct), a wrong final answer (incorrect) and, for
    every other prompt, the gold solution cut before its end-of-turn token (correct text, truncated: an export's own ids
    whose last token is not a stop token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.TINY_SHIPPED)
    rows = []
    for i, p in enumerate(common.load_task("arith", "train", limit=24)):
        wrong = p["solution"].rsplit("####", 1)[0] + f"#### {p['final'] + 1}"
        rows += [dict(question=p["question"], response=p["solution"], answer=p["answer"], reward=1),
                 dict(question=p["question"], response=wrong, answer=p["answer"], reward=0)]
        if i % 2 == 0:
            rows.append(dict(question=p["question"], response=p["solution"], answer=p["answer"], reward=1,
                             prompt_ids=common.encode_prompt(tokenizer, p["question"], "arith"),
                             response_ids=encode_response(tokenizer, p["solution"])[:-1]))
    path = tmp_path_factory.mktemp("rs-data") / "offline.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def records(tiny_cache, tmp_path_factory, rs_offline_data):
    """{name: the driver's record} of every run in RUNS on the tiny default with SMOKE_ARGS, all in one driver call (one
    import of the scripts for all of them)."""
    out = tmp_path_factory.mktemp("wiring")
    runs = []
    for name, (script, *flags) in RUNS.items():
        flags += ["--offline_data", rs_offline_data] if name == "rs" else []
        runs.append(dict(record=str(out / f"{name}.pt"), argv=[script, "--cache_dir", tiny_cache, "--output_dir",
                                                                  str(out / name), *SMOKE_ARGS, *flags]))
    (out / "runs.json").write_text(json.dumps(runs))
    code, stdout, stderr = run_command([DRIVER, str(out / "runs.json")], timeout=600)
    logs = "".join(f"--- {r['record']}.log\n{open(r['record'] + '.log').read()[-4000:]}" for r in runs
                   if os.path.exists(r["record"] + ".log"))
    assert code == 0, f"{DRIVER} exited {code}\n{stdout}\n{stderr[-3000:]}\n{logs}"
    return {name: torch.load(r["record"], weights_only=True) for name, r in zip(RUNS, runs)}


def batch_rows(call: dict) -> list[dict]:
    """The rows of the batch a loss call was computed on: those of the first collate() since the previous call."""
    return call["collate"][0]["rows"]


def per_token(rows: list[dict], values: list, T: int) -> torch.Tensor:
    """(B, T) with row i's per-response-token `values[i]` at its response positions, 0 elsewhere: positions are those of
    the sequence prompt + response, right-padded to T, as every script aligns its tensors."""
    out = torch.zeros(len(rows), T)
    for i, (r, v) in enumerate(zip(rows, values)):
        p = len(r["prompt_ids"])
        out[i, p : p + len(r["response_ids"])] = torch.tensor(v, dtype=torch.float)
    return out


def response_mask(rows: list[dict], T: int) -> torch.Tensor:
    return per_token(rows, [[1.0] * len(r["response_ids"]) for r in rows], T)  # (B, T)


# ---------------------------------------------------------------------------------------------------------------------
# DQO: three runs cover every flag, each flag against its default in another run
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run, is_policy, is_value", [("dqo", True, True), ("dqo_sampler", True, False),
                                                      ("dqo_process", False, True)],
                         ids=["default", "no_is_value", "no_is_policy"])
def test_dqo_no_is_flags_each_drop_the_weight_from_their_own_loss(records, run, is_policy, is_value):
    """--no_is_value reaches is_value and --no_is_policy is_policy (not the other way round), each alone."""
    for call in records[run]["calls"]:
        assert (call["args"]["is_policy"], call["args"]["is_value"]) == (is_policy, is_value)


@pytest.mark.parametrize("run, lam, is_clip", [("dqo", 1.0, math.e), ("dqo_sampler", 0.5, 2.0), ("dqo_process", 1.0, None)],
                         ids=["default", "lam_0.5_clip_2", "clip_0_is_no_weights"])
def test_dqo_lam_is_clip_and_beta_arrive(records, run, lam, is_clip):
    """--lam and --is_clip reach the loss; --is_clip 0 (no weights) arrives as None."""
    for call in records[run]["calls"]:
        assert call["args"]["lam"] == lam and call["args"]["is_clip"] == is_clip
        assert call["args"]["beta"] == 0.3  # the tiny default's β


@pytest.mark.parametrize("run, field", [("dqo", "ref_logps"), ("dqo_sampler", "sampler_logps")],
                         ids=["default_ref", "sampler"])
def test_dqo_behavior_logps_are_the_rows_stored_logps_of_the_chosen_behavior(records, run, field):
    """μ is the reference's stored log-probs by default and the sampler's (warped) ones with --behavior sampler, which
    differ from the reference's; ref_logps are the reference's in both."""
    for call in records[run]["calls"]:
        args, rows = call["args"], batch_rows(call)
        T = args["behavior_logps"].shape[1]
        assert torch.equal(args["behavior_logps"], per_token(rows, [r[field] for r in rows], T))
        assert torch.equal(args["ref_logps"], per_token(rows, [r["ref_logps"] for r in rows], T))
        if field == "sampler_logps":
            assert not torch.equal(args["behavior_logps"], args["ref_logps"])


def test_dqo_batch_is_the_rows_and_the_policy_starts_at_the_reference(records):
    """The mask is the response positions; policy_logps are the policy's token_logprobs; at step 1 they match the stored
    reference log-probs on the mask (same model, so float noise only): so the two are aligned position by position,
    and with --behavior ref the importance weight starts at 1."""
    calls = records["dqo"]["calls"]
    for call in calls:
        args = call["args"]
        assert torch.equal(args["mask"], response_mask(batch_rows(call), args["mask"].shape[1]))
        assert torch.equal(args["policy_logps"], call["logprobs"][0])
    first = calls[0]["args"]
    torch.testing.assert_close(first["policy_logps"] * first["mask"], first["ref_logps"], rtol=0, atol=1e-4)
    assert calls[0]["metrics"]["charts/is_weight"] == pytest.approx(1.0, abs=1e-3)


def test_dqo_outcome_reward_on_the_last_response_token_without_process_rewards(records):
    """Without --process_rewards, each row's reward (1/0) on its last response token (EOS included), 0 elsewhere."""
    for call in records["dqo"]["calls"]:
        rows = batch_rows(call)
        expected = [[0.0] * (len(r["response_ids"]) - 1) + [r["reward"]] for r in rows]
        assert torch.equal(call["args"]["rewards"], per_token(rows, expected, call["args"]["rewards"].shape[1]))


def test_dqo_process_rewards_put_one_over_n_at_each_correct_segment_end(records):
    """--process_rewards: per token, the outcome on the last token plus 1/n at the end of each of the row's leading
    segments its process score judged correct (n segments), the score being the one of that very row."""
    rec = records["dqo_process"]
    scores, with_process = rec["scores"], 0
    for call in rec["calls"]:
        rows, rewards = batch_rows(call), call["args"]["rewards"]
        expected = []
        for r in rows:
            s = scores[r["_row"]]
            reward = [0.0] * len(r["response_ids"])
            for e in s["segment_ends"][: s["correct_segments"]]:
                reward[e - 1] += 1 / len(s["segment_ends"])
            reward[-1] += r["reward"]
            expected.append(reward)
            with_process += s["correct_segments"] > 0
        torch.testing.assert_close(rewards, per_token(rows, expected, rewards.shape[1]))
    assert with_process  # some rows earned process rewards: the check above saw them


def test_dqo_values_are_the_value_models_output_at_every_position(records):
    """DQO's V enters the loss at every state of the response: the value model's whole (B, T) output."""
    calls = records["dqo"]["calls"]
    for call in calls:
        assert torch.equal(call["args"]["values"], call["values"][0])  # (B, T), not a read at one position
    last = calls[-1]["args"]
    assert (last["values"] * last["mask"]).abs().sum() > 0  # trained by then: V is not the zero it starts at


# ---------------------------------------------------------------------------------------------------------------------
# DRO, DPO, KTO
# ---------------------------------------------------------------------------------------------------------------------
def test_dro_value_is_read_at_the_state_before_the_response(records):
    """dro_loss gets V(x): the value model's output at each row's first response position, which holds V of the state
    before that token, the prompt alone; the index is computed here from the prompt's length, not from dro.py's read."""
    calls = records["dro"]["calls"]
    for call in calls:
        rows, values = batch_rows(call), call["values"][0]  # (B, T) V(s_t)
        first = torch.tensor([len(r["prompt_ids"]) for r in rows])  # (B,) the first response token's position
        assert torch.equal(call["args"]["values"], values[torch.arange(len(rows)), first])
    # by the last step V has been trained and depends on the position: a read anywhere else would give other numbers
    rows, values = batch_rows(calls[-1]), calls[-1]["values"][0]
    last = torch.tensor([len(r["prompt_ids"]) + len(r["response_ids"]) - 1 for r in rows])  # (B,) the last response token
    before = values[torch.arange(len(rows)), [len(r["prompt_ids"]) for r in rows]]  # (B,)
    assert (before != values[torch.arange(len(rows)), last]).any()


def test_dro_logps_mask_and_rewards_are_the_rows(records):
    """The policy's per-token log-probs of the batch, the rows' stored reference log-probs on their response tokens, the
    response mask, and each row's own reward (dro_loss sums over the mask itself)."""
    for call in records["dro"]["calls"]:
        args, rows = call["args"], batch_rows(call)
        T = call["logprobs"][0].shape[1]
        assert torch.equal(args["policy_logps"], call["logprobs"][0])
        assert torch.equal(args["mask"], response_mask(rows, T))
        torch.testing.assert_close(args["ref_logps"], per_token(rows, [r["ref_logps"] for r in rows], T))
        assert args["rewards"].tolist() == [r["reward"] for r in rows]
        assert args["beta"] == 0.3


@pytest.mark.parametrize("run", list(RUNS))
def test_every_optimizer_step_clips_each_network_at_max_grad_norm(records, run):
    """Each script clips every trained network's gradient at --max_grad_norm (1.0 by default) before each step: one
    clip per network and optimizer step, over all of that network's parameters. Adam all but hides a clip (its step
    is nearly scale-free), so no loss or direction check would see one dropped or set wrong."""
    rec = records[run]
    networks = 2 if run.startswith(("dqo", "dro")) else 1
    steps = int(RUNS[run][RUNS[run].index("--max_steps") + 1])
    clips = rec.get("clips", [])
    assert len(clips) == networks * steps, clips
    assert all(c["max_norm"] == 1.0 for c in clips), clips
    assert len({c["n_params"] for c in clips[:networks]}) == networks  # the policy's and the value network's own


def test_dpo_chosen_is_the_correct_response_and_rejected_the_failed_one_of_a_pair(records):
    """dpo_loss takes pairs interleaved, row 2k chosen and row 2k + 1 rejected: each chosen row is correct, each
    rejected one failed, both answer the same prompt, and the log-probs and mask handed over are those rows' own."""
    n_pairs = 0
    for call in records["dpo"]["calls"]:
        args, rows = call["args"], batch_rows(call)
        T = call["logprobs"][0].shape[1]
        assert torch.equal(args["policy_logps"], call["logprobs"][0])
        assert torch.equal(args["mask"], response_mask(rows, T))
        torch.testing.assert_close(args["ref_logps"], per_token(rows, [r["ref_logps"] for r in rows], T))
        for chosen, rejected in zip(rows[0::2], rows[1::2], strict=True):
            assert (chosen["reward"], rejected["reward"]) == (1.0, 0.0)
            assert chosen["prompt_idx"] == rejected["prompt_idx"]
            n_pairs += 1
        assert args["beta"] == 0.1
    assert n_pairs == 16  # --per_device_batch_size 8 pairs a step, 2 steps


def test_dpo_trains_on_at_most_max_pairs_per_prompt_distinct_pairs_of_each_prompt(records):
    """The training set main() builds: per prompt, min(--max_pairs_per_prompt, correct x failed) distinct (correct,
    failed) pairs of that prompt's own rows, and no pair from a prompt whose rows all agree."""
    rec = records["dpo"]
    offline, pairs = rec["offline"], rec["examples"]
    by_prompt = collections.defaultdict(list)
    for chosen, rejected in pairs:
        assert offline[chosen]["prompt_idx"] == offline[rejected]["prompt_idx"]
        assert (offline[chosen]["reward"], offline[rejected]["reward"]) == (1.0, 0.0)
        by_prompt[offline[chosen]["prompt_idx"]].append((chosen, rejected))
    n_right = collections.Counter(r["prompt_idx"] for r in offline if r["reward"] == 1.0)
    n_wrong = collections.Counter(r["prompt_idx"] for r in offline if r["reward"] != 1.0)
    expected = {p: min(3, n_right[p] * n_wrong[p]) for p in n_right | n_wrong if n_right[p] * n_wrong[p]}
    assert any(n_right[p] * n_wrong[p] > 3 for p in expected)  # the cap binds on this data
    assert {p: len(v) for p, v in by_prompt.items()} == expected
    assert all(len(set(v)) == len(v) for v in by_prompt.values())


def test_kto_desirable_rows_are_the_correct_ones(records):
    """desirable = reward 1, row by row, beside that row's own sequence log-probs; λ_D balances the correct rows; β is
    --beta."""
    rec = records["kto"]
    for call in rec["calls"]:
        args, rows = call["args"], batch_rows(call)
        assert args["beta"] == 0.2
        assert args["desirable"].tolist() == [r["reward"] == 1.0 for r in rows]
        T = call["logprobs"][0].shape[1]
        assert torch.equal(args["policy_logps"], call["logprobs"][0])
        assert torch.equal(args["mask"], response_mask(rows, T))
        torch.testing.assert_close(args["ref_logps"], per_token(rows, [r["ref_logps"] for r in rows], T))
    assert {d for call in rec["calls"] for d in call["args"]["desirable"].tolist()} == {True, False}
    # λ_D n_D = λ_U n_U over the training set: the default weight counts the correct rows as the desirable ones
    n_d = sum(r["reward"] == 1.0 for r in rec["offline"])
    args = rec["calls"][0]["args"]
    assert args["undesirable_weight"] == 1.0
    assert args["desirable_weight"] == pytest.approx((len(rec["offline"]) - n_d) / n_d)


# ---------------------------------------------------------------------------------------------------------------------
# SPO
# ---------------------------------------------------------------------------------------------------------------------
def test_spo_q0_is_the_soft_value_of_the_prompts_offline_success_rate(records):
    """Every row, offline or a fresh rollout, carries its prompt's Q̂_0 = β log(Ŝ_0 + (1 − Ŝ_0) e^{−1/β}), Ŝ_0 the
    success rate of the prompt's offline samples pooled with its --q0_samples extra ones; the reward is reward − 1."""
    rec = records["spo"]
    beta = rec["calls"][0]["args"]["beta"]
    assert beta == 0.5  # the tiny default's β
    extra = rec["q0_extra"]
    assert len(extra) == 4 * len({r["prompt_idx"] for r in rec["offline"]})  # --q0_samples 4 per prompt
    q0 = spo.estimate_q0(rec["offline"] + extra, beta)
    # the extra samples move Ŝ_0 of some prompt in these batches, so Q̂_0 from the offline rows alone would not pass
    used = {r["prompt_idx"] for call in rec["calls"] for r in batch_rows(call)}
    alone = spo.estimate_q0(rec["offline"], beta)
    assert any(abs(q0[i] - alone[i]) > 1e-6 for i in used)
    for call in rec["calls"]:
        args, rows = call["args"], batch_rows(call)
        torch.testing.assert_close(args["q0"], torch.tensor([q0[r["prompt_idx"]] for r in rows]))
        assert args["rewards"].tolist() == [r["reward"] - 1 for r in rows]
        torch.testing.assert_close(args["ref_logps"], per_token(rows, [r["ref_logps"] for r in rows],
                                                                args["ref_logps"].shape[1]))
    # Q̂_0 differs between prompts in these batches, so a constant or another prompt's would not pass
    assert len({round(v, 6) for call in rec["calls"] for v in call["args"]["q0"].tolist()}) > 1
    success = {}
    for r in rec["offline"] + extra:
        success.setdefault(r["prompt_idx"], []).append(r["reward"])
    for idx, rewards in success.items():  # estimate_q0 is the soft value of the success rate
        s = torch.tensor([sum(rewards) / len(rewards)])
        assert q0[idx] == pytest.approx(spo.soft_value_q0(s, beta).item())


def test_spo_online_fraction_and_loss_type_arrive(records):
    """--online_fraction 0.25 of a batch of 8: 2 rows of every batch are fresh rollouts (their ref_logps, rewards and
    Q̂_0 reach the loss as the offline rows' do: the test above); --loss_type bce (the tiny default: squared) arrives."""
    for call in records["spo"]["calls"]:
        rows = batch_rows(call)
        assert sum(bool(r.get("online")) for r in rows) / len(rows) == 0.25
        assert call["args"]["loss_type"] == "bce"


# ---------------------------------------------------------------------------------------------------------------------
# RS
# ---------------------------------------------------------------------------------------------------------------------
def test_rs_trains_only_on_correct_untruncated_rows(records):
    """RS's training set is exactly the correct rows not cut off at --max_new_tokens (rs_offline_data has correct
    truncated rows and incorrect whole ones), and every batch the loss sees is made of them."""
    rec = records["rs"]
    offline = rec["offline"]
    assert any(r["truncated"] and r["reward"] == 1.0 for r in offline)  # the data has what the filter must drop
    assert any(not r["truncated"] and r["reward"] == 0.0 for r in offline)
    keep = [i for i, r in enumerate(offline) if r["reward"] == 1.0 and not r["truncated"]]
    assert sorted(rec["examples"]) == keep  # the whole training set, not only the rows the first batches drew
    for call in rec["calls"]:
        rows = batch_rows(call)
        assert all(r["reward"] == 1.0 and not r["truncated"] for r in rows)
        assert torch.equal(call["args"]["mask"], response_mask(rows, call["args"]["mask"].shape[1]))
        assert torch.equal(call["args"]["policy_logps"], call["logprobs"][0])
