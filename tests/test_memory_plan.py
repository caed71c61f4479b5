"""The memory plan: every step of every algorithm's paper run fits an 80 GB GPU (less the 8 GB margin) at
gemma-1.1-7b's size on 8 GPUs with configs/fsdp.yaml; the plan agrees with the fake-tensor trace within 10% on every
step and its arithmetic with real models built tiny from their configs; docs/memory-and-time.md's table is the trace's
output."""

import os

import pytest
import torch
import yaml
from conftest import ROOT

import dqo
import rs
import runtime.cli  # noqa: E402
import runtime.memory  # noqa: E402
from benchmarks import memory_plan as plan
from benchmarks import memory_trace

DQO = dqo.Args().memory_terms()  # what DQO declares: the policy and a value network


@pytest.mark.parametrize("algo", plan.ALGOS)
def test_every_step_of_the_paper_run_fits_80gb(algo):
    with open(os.path.join(ROOT, "configs", "fsdp.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["num_processes"] == plan.WORLD and cfg["fsdp_config"]["fsdp_version"] == 2
    steps = plan.paper_plan(algo)
    assert {"generate", "score", "train", "save"} <= steps.keys() and ("rollout" in steps) == (algo == "spo")
    for step, parts in steps.items():
        fits = sum(parts.values()) <= (plan.GPU_GB - plan.MARGIN_GB) * 1e9
        assert fits, (algo, step, {k: v / 1e9 for k, v in parts.items()})


def test_the_old_defaults_did_not_fit():
    """256 sequences per generate call (the old default) hold ~76 GB of KV cache beside the gathered weights."""
    generate = runtime.memory.memory_plan(plan.GEMMA_7B, DQO, 8, 8, 256, 128, 512)["generate"]
    assert generate["KV cache"] == pytest.approx(256 * 640 * 458_752 * (1 + 1 / 56)) and sum(generate.values()) > 80e9


def test_gemma_7b_numbers():
    params, layer = runtime.memory.param_count(plan.GEMMA_7B)
    assert params == 8_537_680_896  # gemma-1.1-7b-it's parameter count (its config on the meta device)
    # 458 KB of bf16 KV cache per token: 28 layers x 2 (K, V) x 16 heads x 256 dims x 2 bytes
    assert runtime.memory.kv_bytes_per_token(plan.GEMMA_7B) == 458_752


@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_arithmetic_matches_real_models(arch):
    """Parameters and KV-cache bytes per token of a model built from the config, tied (Gemma) and untied (Llama)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=arch == "gemma")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **cfg), dtype=torch.bfloat16)
    params, layer = runtime.memory.param_count(cfg)
    assert params == sum(p.numel() for p in model.parameters())
    assert layer == sum(p.numel() for p in model.model.layers[0].parameters())
    with torch.no_grad():
        cache = model(input_ids=torch.zeros(2, 7, dtype=torch.long), use_cache=True).past_key_values
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv == 2 * 7 * runtime.memory.kv_bytes_per_token(cfg)


def test_the_stored_trace_is_what_this_code_traces():
    """benchmarks/results/memory_trace.json, which the tests below and the README's table read, carries the fingerprint
    of what it was traced from: benchmarks/memory_trace.py (its decode, micro-batch and sizes), configs/fsdp.yaml, every
    algorithm's paper settings and the project code the trace runs (log-probs, the value network, collate, scoring,
    `unsharded`, each loss, ...). Any of them changed without tracing again fails here, naming what changed and the
    command that traces again (tests/test_memory_trace.py re-traces DQO's training step and generate call at full size
    against the file)."""
    why = memory_trace.stale()
    assert why is None, why


def test_plan_agrees_with_the_trace_on_every_step():
    """`runtime.memory.memory_plan` (what the preflight checks) within 10% of the fake-tensor trace, every step."""
    for algo, step, planned, traced in plan.comparison(plan.trace_results()):
        assert planned == pytest.approx(traced, rel=0.10), (algo, step, planned / 1e9, traced / 1e9)


def test_docs_table_is_the_traces_output():
    with open(os.path.join(ROOT, "docs", "memory-and-time.md")) as f:
        assert memory_trace.table(plan.trace_results()) in f.read(), \
            "docs/memory-and-time.md's memory table is stale: paste the table `python benchmarks/memory_trace.py` prints"


def test_host_ram_preflight_at_7b():
    """Every process loads the model itself: 8 DQO processes need 8 x (34.1 GB fp32 policy in `prepare` + 17.1 GB bf16
    value copy) = 410 GB of host RAM while loading; a node with 1 TB starts, one with 256 GB stops with the fixes."""
    text = runtime.memory.host_ram_preflight("dqo", DQO, plan.GEMMA_7B, 8, "FSDP", "bf16", 0, int(1e12), skip=False)
    assert "8 x 51.2 GB = 409.8 GB of 1000 GB" in text
    rs_terms = rs.Args().memory_terms()
    assert "8 x 34.2 GB" in runtime.memory.host_ram_preflight("rs", rs_terms, plan.GEMMA_7B, 8, "FSDP", "bf16", 0, int(1e12),
                                                              skip=False)
    with pytest.raises(runtime.cli.ArgumentError, match=r"host RAM while loading: 8 x 51.2 GB = 409.8 GB of 256 GB.*--lora_r"):
        runtime.memory.host_ram_preflight("dqo", DQO, plan.GEMMA_7B, 8, "FSDP", "bf16", 0, int(256e9), skip=False)
    assert "over 90%" in runtime.memory.host_ram_preflight("dqo", DQO, plan.GEMMA_7B, 8, "FSDP", "bf16", 0, int(256e9),
                                                           skip=True)
