"""The fake-tensor memory trace (benchmarks/memory_trace.py) and the launch preflight (runtime.memory.memory_preflight): the
full-size DQO training step fits 80 GB and, traced again, is the stored trace; each script's own training loop (and the
scripts' generation) on real tensors uses the memory the trace's copy of it finds, at a tiny size; the preflight
refuses what cannot fit."""

import json
import os
import subprocess
import sys

import accelerate
import pytest
import torch
import transformers
from conftest import ROOT, launch

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


@pytest.fixture(scope="module")
def stored():
    with open(mt.RESULTS) as f:
        return json.load(f)


def test_dqo_at_full_size_fits_80gb_and_is_the_stored_trace(stored):
    """Gemma-1.1-7B, 8 GPUs, configs/fsdp.yaml, DQO's paper micro-batch with 4 accumulation steps: policy and value
    network sharded, their fp32 states, the step's activations; within 80 GB less the 8 GB margin. Traced again here,
    its training step and generate call (the KV cache) are byte for byte what benchmarks/results/memory_trace.json
    holds: the stored trace, whose numbers the README and the memory plan's test use, is what this code traces."""
    code = ("import json, sys; sys.path.insert(0, '.'); from benchmarks import memory_trace as mt; "
            "print(json.dumps(mt.trace('dqo', steps=('train', 'generate'), grad_accum=4)))")
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
    versions = {m.__name__: m.__version__ for m in (torch, transformers, accelerate)}
    for step in ("train", "generate"):
        now, then = result["steps"][step], stored["results"]["dqo"]["steps"][step]
        assert (now["peak"], now["breakdown"]) == (then["peak"], then["breakdown"]), (
            f"DQO's {step} step traces to {now['peak'] / 1e9:.3f} GB now, {then['peak'] / 1e9:.3f} GB in "
            f"{os.path.relpath(mt.RESULTS, ROOT)} (traced with {stored.get('versions')}, here {versions}): "
            f"run `{mt.REGENERATE}`")


def _increase(m: dict) -> int:
    return m["peak"]["Total"] - m["start"]["Total"]


def test_the_scripts_own_loops_use_the_memory_the_fake_trace_finds(tmp_path):
    """The trace's micro-batch is a copy of the six scripts' training loops, and its `decode` stands in for
    `common.generate_batch`. tests/memory_trace_driver.py runs each script's own main through the shipped FSDP2 launch
    (2 CPU processes, real tensors) on rows of fixed lengths and measures its first micro-batch with the trace's
    tracker, then a generate call and the offline-data scoring; the trace measures the same at the same sizes with fake
    tensors. Per script: the same trained networks (sharded weights at the start), the bytes the micro-batch adds at
    its peak within 1% (they agree to the byte here; SPO's loop holds one (B,) flag more), and the same gradients left
    (sharded, fp32). The scoring's peak within 1% (to the byte here), the generate call's within 3%: `decode` leaves
    out generate's bookkeeping (the (B, L) token ids it grows each step, its copies of the step's scores), 1.3% here,
    where the KV cache, most of the peak as at 7B, is 1 KB a token (458 KB at 7B: there the bookkeeping is far less).
    A change to a script's loop or to the trace's copy that moves memory fails here; one that does not move memory
    does not change what the trace finds."""
    from memory_trace_driver import SETTINGS

    algos = list(mt.ALGOS)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    driver = os.path.join(ROOT, "tests", "memory_trace_driver.py")
    with open(tmp_path / "fake.log", "w") as log:  # the fake trace meanwhile, in a process of its own
        fake_run = subprocess.Popen([sys.executable, driver, "--fake", str(tmp_path), *algos], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            real_run = subprocess.run([*launch("--config_file", os.path.join(ROOT, "configs", "fsdp.yaml"),
                                               mixed_precision=None), os.path.join(ROOT, "tests", "fsdp_cpu_shim.py"),
                                       driver, str(tmp_path), *algos], cwd=ROOT, capture_output=True, text=True,
                                      timeout=600, env=env)
            fake_run.wait(timeout=600)
        finally:
            if fake_run.poll() is None:
                fake_run.kill()
    assert real_run.returncode == 0, real_run.stdout[-3000:] + real_run.stderr[-6000:]
    assert fake_run.returncode == 0, (tmp_path / "fake.log").read_text()[-6000:]
    real, fake = (json.loads((tmp_path / f"{side}.json").read_text()) for side in ("real", "fake"))
    assert SETTINGS["grad_accum"] > 1  # the measured micro-batch is not the step's last: no optimizer step in it
    grads = ("Sharded Grad", "Unsharded Grad")
    wrong = []  # every disagreement, so that one run names them all
    for algo in algos:
        r, f = real[algo], fake[algo]
        if r["start"]["Sharded Param"] != f["start"]["Sharded Param"]:
            wrong.append(f"{algo}: other trained networks ({r['start']} in {algo}.py, {f['start']} in the trace)")
        if _increase(f) != pytest.approx(_increase(r), rel=0.01):
            wrong.append(f"{algo}: the trace's micro-batch adds {_increase(f)} bytes at its peak, {algo}.py's own loop "
                         f"{_increase(r)} (at its peak {r['peak']}; the trace {f['peak']})")
        if {k: r["end"].get(k, 0) for k in grads} != {k: f["end"].get(k, 0) for k in grads}:
            wrong.append(f"{algo}: gradients left after the micro-batch {r['end']} in {algo}.py, {f['end']} in the trace")
    for step, rel in (("generate", 0.03), ("score", 0.01)):
        if _increase(fake[step]) != pytest.approx(_increase(real[step]), rel=rel):
            wrong.append(f"{step}: the trace's peak {_increase(fake[step])} bytes over its start, the scripts' code "
                         f"{_increase(real[step])} ({real[step]['peak']}; the trace {fake[step]['peak']})")
    assert not wrong, ("benchmarks/memory_trace.py no longer computes what the scripts do:\n" + "\n".join(wrong))
