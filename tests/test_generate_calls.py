"""Full generate calls at the paper settings: every generate call a paper run makes (each algorithm file's PAPER with
runtime/cli.py's paper defaults, 8 processes as configs/fsdp.yaml launches) holds --gen_batch_size sequences, none
empty and none over. The scripts' own batching runs on GSM8K's sizes (7473 train, 1319 test problems) with
`generate_batch` recording each call's size in place of a model:
  - the offline dataset: `build_offline_dataset` (its chunk cache held in memory);
  - the evaluations: `evaluate` (greedy, --eval_seeds sampled, SPO's pass@k on every test problem);
  - SPO's online rollouts: `pending_rollouts` of one refresh window from `window_batches`, on rank 0 of 8.
A pass over a data set ends where the data ends: its last call holds what is left (the offline dataset's 7473 prompts
at 2 per call leave 1 for the last; the 1319 test problems leave 39 of 40). Every other call is full. An online
window's size is a setting (interval x micro-batches x online slots), so all its calls are full."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common  # noqa: E402
import time_plan  # noqa: E402

ALGOS = ("rs", "dpo", "kto", "dro", "dqo", "spo")
N_TRAIN, N_TEST = time_plan.GSM8K["n_train"], time_plan.GSM8K["n_test"]
WORLD = 8


@pytest.fixture
def calls(monkeypatch):
    """Generate calls by pass: a list of lists of sizes. `common.rollout` starts a pass; so does calls.new()."""
    passes = []

    def generate_batch(model, tokenizer, prompts, temperature, top_p, top_k, max_new_tokens):
        passes[-1].append(len(prompts))
        return [dict(response_ids=[1], finish="stop", response="") for _ in prompts]

    def score_rows(model, rows, pad_token_id, warp=None, **_):
        for r in rows:
            r["logps"] = [0.0] * len(r["response_ids"])
            r.update(sampler_logps=r["logps"]) if warp else None

    rollout = common.rollout

    def rollout_pass(*a, **k):
        passes.append([])
        return rollout(*a, **k)

    monkeypatch.setattr(common, "generate_batch", generate_batch)
    monkeypatch.setattr(common, "score_rows", score_rows)
    monkeypatch.setattr(common, "grade", lambda *a: 0.0)
    monkeypatch.setattr(common, "encode_prompt", lambda tokenizer, question, task: [2, 3, 4])
    monkeypatch.setattr(common, "rollout", rollout_pass)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)  # no sampling here; on CPU it formats a stack each call
    # the offline dataset's chunk cache, in memory: the chunks and their order are the scripts' own
    monkeypatch.setattr(common, "cached_chunks", lambda accelerator, parent, key, sizes, make, desc: (
        [make(c) for c in range(len(sizes))], parent))
    monkeypatch.setattr(common, "export_offline_dataset", lambda *a, **k: None)
    return SimpleNamespace(passes=passes, new=lambda: passes.append([]))


def accelerator(rank: int = 0, world: int = 1):
    return SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                           is_local_main_process=rank == 0, mixed_precision="bf16", device=torch.device("cpu"),
                           wait_for_everyone=lambda: None, print=lambda *a, **k: None)


def run_paper_calls(algo: str, calls, tmp_path) -> dict:
    """Every generate call pass of `algo`'s paper run, by phase: {phase: [[sizes of a pass's calls], ...]}."""
    import importlib

    module = importlib.import_module(algo)
    d = time_plan.paper_args(algo, WORLD)
    model, tokenizer = torch.nn.Linear(1, 1), SimpleNamespace(pad_token_id=0)
    train = [dict(question=f"q{i}", answer="1") for i in range(N_TRAIN)]
    test = [dict(question=f"t{i}", answer="1") for i in range(N_TEST)]
    sampling = dict(temperature=d["temperature"], top_p=d["top_p"], top_k=d["top_k"])
    out = {}
    start = len(calls.passes)
    calls.new()
    rows = common.build_offline_dataset(  # one process: chunks are the same for any number (see _chunk_plan)
        accelerator(), model, tokenizer, train, model_name="google/gemma-1.1-7b-it", task=d["task"], n=d["n_samples"],
        sampling=sampling, max_new_tokens=d["max_new_tokens"], gen_batch_size=d["gen_batch_size"], seed=d["seed"],
        cache_dir=str(tmp_path))
    assert len(rows) == N_TRAIN * d["n_samples"]
    out["offline dataset"], start = calls.passes[start:], len(calls.passes)
    pass_eval = dict(module.PASS_EVAL, pass_problems=d["pass_eval_problems"]) if algo == "spo" else {}
    common.evaluate(model, tokenizer, test, d["task"], None, d["max_new_tokens"], d["gen_batch_size"],
                    sampled_seeds=d["eval_seeds"], seed=d["seed"], **pass_eval)
    out["evaluation"], start = calls.passes[start:], len(calls.passes)
    if algo == "spo" and d["online_fraction"]:
        args = SimpleNamespace(**d)
        acc = accelerator(0, WORLD)
        examples = [dict(r, q0=0.0) for r in rows]
        steps_per_epoch = len(examples) // (d["per_device_batch_size"] * WORLD * d["grad_accum"])
        window = module.window_batches(examples, args, acc, steps_per_epoch, 0, d["model_update_interval"])
        calls.new()
        module.pending_rollouts(SimpleNamespace(model=model, version=0), model, tokenizer, window,
                                module.online_slots(d["per_device_batch_size"], d["online_fraction"]), args, acc)
        out["online rollouts"] = calls.passes[start:]
    return out


@pytest.mark.parametrize("algo", ALGOS)
def test_no_paper_generate_call_has_empty_slots(algo, calls, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module(algo)
    monkeypatch.setattr(module, "score_rows", common.score_rows, raising=False)  # SPO's online rollouts score by name
    gen = time_plan.paper_args(algo, WORLD)["gen_batch_size"]
    phases = run_paper_calls(algo, calls, tmp_path)
    assert set(phases) == {"offline dataset", "evaluation"} | ({"online rollouts"} if algo == "spo" else set())
    for phase, passes in phases.items():
        assert passes and all(passes), phase
        for sizes in passes:
            empty = sum(max(0, gen - s) for s in sizes[:-1])
            over = [s for s in sizes if s > gen]
            last_full = phase == "online rollouts"  # a window's size is a setting, not data
            assert (empty, over) == (0, []), f"{algo} {phase}: {len(sizes)} calls of at most {gen}: {empty} empty " \
                                             f"slots before the last call, calls over {gen}: {sorted(set(over))}"
            assert 0 < sizes[-1] <= gen and (sizes[-1] == gen or not last_full), (algo, phase, sizes[-1])
    if algo == "dqo":  # the offline dataset: 2 prompts of 20 samples per call, the 7473rd prompt alone at the end
        assert phases["offline dataset"] == [[40] * (N_TRAIN // 2) + [20]]
