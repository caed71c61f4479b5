"""The fake-tensor memory trace (benchmarks/memory_trace.py) and the launch preflight (runtime.memory.memory_preflight): the
full-size DQO training step fits 80 GB, the trace of a tiny configuration agrees with the same code on real tensors,
and the preflight refuses what cannot fit."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import common
import dqo
import runtime.cli  # noqa: E402
import runtime.memory  # noqa: E402
from benchmarks import memory_trace as mt

GPU = 80 * 10**9
DQO = dqo.Args().memory_terms()  # what DQO declares: the policy and a value network


def test_preflight_refuses_unsharded_data_parallel_and_accepts_fsdp2():
    """`accelerate launch dqo.py --model google/gemma-1.1-7b-it` (8 processes, plain data parallel) on 8 x 80 GB stops
    before loading anything, naming the sharded config; the configs/fsdp.yaml launch passes."""
    settings = dict(precision="bf16", per_device_batch_size=8, gen_batch_size=32, max_new_tokens=512, lora_r=0)
    with pytest.raises(runtime.cli.ArgumentError) as e:
        runtime.memory.memory_preflight("dqo", DQO, mt.GEMMA_7B, 8, None, device_bytes=GPU, skip=False, **settings)
    message = str(e.value)
    assert "configs/fsdp.yaml" in message and "--per_device_batch_size" in message and "--lora_r" in message
    assert "GB per GPU" in message and "72.0 GB available" in message
    step = message.split("the ")[1].split(" step")[0]
    need = runtime.memory.memory_plan(mt.GEMMA_7B, DQO, 8, 8, 32, runtime.memory.PREFLIGHT_PROMPT_TOKENS, 512, sharded=False)
    assert step in need and f"needs {sum(need[step].values()) / 1e9:.1f} GB" in message
    text = runtime.memory.memory_preflight("dqo", DQO, mt.GEMMA_7B, 8, "FSDP", device_bytes=GPU, skip=False, **settings)
    assert "fits" in text and "FSDP" in text
    # --skip_memory_check: the same refusal, printed as a warning
    preflight = runtime.memory.memory_preflight
    assert "warning" in preflight("dqo", DQO, mt.GEMMA_7B, 8, None, device_bytes=GPU, skip=True, **settings)
    # no GPU: nothing to check against
    assert "nothing checked" in preflight("dqo", DQO, mt.GEMMA_7B, 8, None, device_bytes=None, skip=False, **settings)


def test_read_model_config_of_tiny_matches_the_model():
    import torch
    from transformers import AutoModelForCausalLM

    cfg = runtime.memory.read_model_config("tiny")
    model = AutoModelForCausalLM.from_pretrained(common.TINY_SHIPPED, dtype=torch.float32)
    assert runtime.memory.param_count(cfg)[0] == sum(p.numel() for p in model.parameters())


def test_dqo_training_step_at_full_size_fits_80gb():
    """Gemma-1.1-7B, 8 GPUs, configs/fsdp.yaml, DQO's paper micro-batch with 4 accumulation steps: policy and value
    network sharded, their fp32 states, the step's activations; within 80 GB less the 8 GB margin."""
    code = ("import json, sys; sys.path.insert(0, '.'); from benchmarks import memory_trace as mt; "
            "print(json.dumps(mt.trace('dqo', steps=('train',), grad_accum=4)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    train = result["steps"]["train"]
    assert result["grad_accum"] == 4 and result["per_device_batch_size"] == 8
    b = train["breakdown"]
    params = runtime.memory.param_count(mt.GEMMA_7B)[0]
    value = params + 3072 + 1  # the backbone (the tied head is the embedding) and a scalar head
    assert b["Sharded Param"] == pytest.approx(4 * (params + value) / 8, rel=1e-3)  # fp32 master weights, 1/8 each
    assert b["OptState"] >= 8 * (params + value) / 8 * 0.999  # both Adam moments of both networks
    assert train["peak"] <= (mt.GPU_GB - mt.MARGIN_GB) * 1e9


def test_real_and_fake_traces_agree_at_tiny_size(tmp_path):
    """The same DQO steps on 2 gloo processes with real tensors and in one process with fake ones, measured by the same
    tracker: each step's peak within 5%."""
    real_json = tmp_path / "real.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          os.path.join(ROOT, "tests", "memory_trace_driver.py"), str(real_json)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    code = ("import json, sys; sys.path.insert(0, '.'); sys.path.insert(0, 'tests'); from benchmarks import memory_trace "
            "as mt; from memory_trace_driver import SETTINGS; "
            "print(json.dumps(mt.trace('dqo', steps=('train', 'generate', 'score'), **SETTINGS)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    fake = json.loads(out.stdout.strip().splitlines()[-1])["steps"]
    real = json.loads(real_json.read_text())["steps"]
    for step in ("train", "generate", "score"):
        assert fake[step]["peak"] == pytest.approx(real[step]["peak"], rel=0.05), (step, fake[step], real[step])
