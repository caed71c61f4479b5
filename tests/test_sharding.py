"""Sharding on CPU: torch FSDP1 and FSDP2 over two gloo processes give the unsharded results, and the headline launch
runs its own configuration.

- `fsdp_rollout_driver.py` (torchrun, the model wrapped directly with torch FSDP1/FSDP2): `common.rollout`, `evaluate`
  and `build_offline_dataset` give the unsharded tokens and log-probs.
- dqo.py under accelerate's own FSDP1 path in fp32 (`accelerate launch --config_file ...` and `accelerator.prepare`,
  through tests/fsdp_cpu_shim.py): the reference evaluation, the offline dataset, the per-step losses of policy and
  value model, the consolidated weights after training and the final evaluation equal one unsharded process; the saved
  models load with plain `from_pretrained`.
- dqo.py through configs/fsdp.yaml as shipped (FSDP2, its bf16 mixed precision) with grad_accum 2 and a sharded
  checkpoint every step: losses and weights match one process at the same precision and grad_accum; each rank holds
  only sharded gradients during accumulation (torch's FSDPMemTracker); a kill after a sharded checkpoint resumes to the
  same weights, bit for bit.
  What accelerate cannot do on CPU and the shim stands in for: setting distributed_type FSDP on a gloo CPU state, and
  FSDP1's device_id. Not covered: NCCL, CUDA kernels and allocator, fsdp_sync_module_states and
  fsdp_cpu_ram_efficient_loading (accelerate's FSDP1 plugin needs a GPU for both).
- Without the shim, an FSDP config on this CPU machine is a clear error, never a silent data-parallel run.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, SMOKE_ARGS, free_port, launch, run_script

import common

FSDP_CONFIG = os.path.join(ROOT, "configs", "fsdp.yaml")
SHIM = os.path.join(ROOT, "tests", "fsdp_cpu_shim.py")
# Enough rows that some of the 3 x 32 trained responses are correct, so that the losses and the update are not zero.
# Both lrs are the tiny defaults / 10: Adam turns float noise in a near-zero gradient into a step of up to lr (its sign
# can differ between reduction orders), and the weights are compared to 1e-5 after 3 steps.
DQO_ARGS = ["--n_train_prompts", "32", "--n_samples", "8", "--n_test", "8", "--max_steps", "3", "--lr", "5e-6",
            "--value_lr", "1e-4"]


def _config(version: int, tmp_path, **overrides) -> str:
    """configs/fsdp.yaml (FSDP2) as shipped, or turned into its FSDP1 equivalent."""
    with open(FSDP_CONFIG) as f:
        cfg = yaml.safe_load(f)
    if version == 1:
        fsdp = {k: v for k, v in cfg["fsdp_config"].items() if k != "fsdp_reshard_after_forward"}
        cfg["fsdp_config"] = dict(fsdp, fsdp_version=1, fsdp_sharding_strategy="FULL_SHARD", fsdp_use_orig_params=True,
                                  fsdp_backward_prefetch="BACKWARD_PRE", fsdp_sync_module_states=False)
    cfg["fsdp_config"].update(overrides)
    path = str(tmp_path / f"fsdp{version}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_rollout_evaluate_offline_dataset_match_unsharded(version, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           os.path.join(ROOT, "tests", "fsdp_rollout_driver.py"), str(version), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"FSDP{version}: sharded rollout, evaluate and offline dataset equal unsharded" in proc.stdout


def _fresh_cache(tiny_cache, path) -> str:
    """An empty cache: the run builds its own offline dataset and reference evaluation (`--model tiny` is assets/tiny)."""
    os.makedirs(path, exist_ok=True)
    return str(path)


def _offline_rows(cache: str) -> list[dict]:
    (root,) = [os.path.join(cache, "offline", d) for d in os.listdir(os.path.join(cache, "offline"))]
    return [json.loads(line) for c in sorted(f for f in os.listdir(root) if f.startswith("chunk-"))
            for line in open(os.path.join(root, c))]


@pytest.fixture(scope="module")
def dqo_unsharded(tiny_cache, tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("dqo1"), _fresh_cache(tiny_cache, tmp_path_factory.mktemp("cache1"))
    results, metrics = run_script("dqo.py", cache, str(out), *DQO_ARGS, "--per_device_batch_size", "32")
    return str(out), cache, results, metrics


@pytest.mark.parametrize("version", [1])
def test_dqo_under_accelerate_fsdp_matches_one_process(version, dqo_unsharded, tiny_cache, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM


    one_dir, one_cache, one_results, one_metrics = dqo_unsharded
    out, cache = str(tmp_path / "run"), _fresh_cache(tiny_cache, tmp_path / "cache")
    results, metrics = run_script("dqo.py", cache, out, *DQO_ARGS, "--per_device_batch_size", "16",
                                  launcher=(*launch("--config_file", _config(version, tmp_path)), SHIM))
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["world_size"] == 2

    # generation from the sharded policy: the offline dataset and both evaluations, token for token
    for a, b in zip(_offline_rows(one_cache), _offline_rows(cache), strict=True):
        assert a["response_ids"] == b["response_ids"] and a["reward"] == b["reward"]
        assert b["ref_logps"] == pytest.approx(a["ref_logps"], abs=1e-5)
    for name in ("reference", "final"):
        same = lambda r: {k: v for k, v in r.items() if k != "peak_memory_mb"}  # noqa: E731
        assert same(results[name]) == same(one_results[name]), name

    # training: the same losses at every step, some of them non-zero
    assert [m["step"] for m in metrics] == [m["step"] for m in one_metrics] == [1, 2, 3]
    for a, b in zip(one_metrics, metrics):
        for k in ("losses/policy", "losses/value"):
            assert b[k] == pytest.approx(a[k], rel=2e-4, abs=2e-5), (a["step"], k)
    assert any(m["losses/policy"] > 0 for m in one_metrics), "no correct response in 3 batches: nothing was trained"

    # the consolidated weights after the steps (within 1e-5, and far closer to each other than to where they started),
    # and the saves load as plain models
    start = load_file(os.path.join(common.TINY_SHIPPED, "model.safetensors"))
    for sub, prefix in (("model", ""), ("value_model", "model.")):  # the value backbone is the LM without its head
        a, b = (load_file(os.path.join(d, sub, "model.safetensors")) for d in (one_dir, out))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"{sub}: {k}")
        between = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
        update = sum(((a[k] - start[prefix + k]) ** 2).sum() for k in a) ** 0.5
        assert update > 0 and between < 1e-3 * update, (sub, between, update)
    one, two = (AutoModelForCausalLM.from_pretrained(os.path.join(d, "model")) for d in (one_dir, out))
    for (n, p), q in zip(two.named_parameters(), one.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=n)
    value_one, value_two = (common.ValueModel.from_pretrained(os.path.join(d, "value_model")) for d in (one_dir, out))
    for p, q in zip(value_two.parameters(), value_one.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_config_without_gpus_is_a_clear_error(version, tmp_path):
    """Plain `accelerate launch --config_file configs/fsdp.yaml` on this machine: accelerate would run each process as
    plain data parallel (FSDP2) or refuse with "no available devices" (FSDP1 with sync_module_states). Either way the
    script stops at once, before loading anything, and says what to run instead."""
    config = _config(version, tmp_path, **({"fsdp_sync_module_states": True} if version == 1 else {}))
    cmd = [*launch("--config_file", config), os.path.join(ROOT, "rs.py"), "--output_dir", str(tmp_path / "run"),
           "--cache_dir", str(tmp_path / "cache"), "--report_to", ""]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "asks for FSDP, which needs GPUs" in proc.stderr and "--multi_gpu --num_processes N" in proc.stderr
    assert time.time() - start < 60 and not os.path.exists(tmp_path / "cache")


# The headline launch as configs/fsdp.yaml has it: FSDP2 with the config's own mixed precision (bf16 parameters for
# compute, fp32 master weights and gradient reduction), gradient accumulation over 2 micro-batches, a sharded
# checkpoint every step. Only the process count (2 gloo processes) and the device (CPU) differ from a GPU node.
LAUNCH_ARGS = ["--n_train_prompts", "32", "--n_samples", "8", "--n_test", "8", "--max_steps", "3", "--lr", "5e-6",
               "--value_lr", "1e-4", "--grad_accum", "2", "--save_every", "1"]


def _shipped_fsdp2() -> tuple:
    """The launcher of dqo.py through the shipped configs/fsdp.yaml, its mixed precision included, on 2 gloo processes."""
    return (*launch("--config_file", FSDP_CONFIG, mixed_precision=None), SHIM)


def _copy_cache(cache: str, path) -> str:
    """A copy of a cache that holds an offline dataset and reference evaluation: a run on it trains on the same rows.
    In bf16, sampling is not reproducible across numerically different forwards (autocast vs FSDP2's bf16 parameters
    pick different tokens once two logits round differently), so the runs compared share one dataset."""
    import shutil

    shutil.copytree(cache, path)
    return str(path)


@pytest.fixture(scope="module")
def launch_runs(tiny_cache, tmp_path_factory):
    """The one-process run at the launch's precision and grad_accum, and the shipped FSDP2 launch on its dataset."""
    tmp = tmp_path_factory.mktemp("launch")
    one, two, cache = str(tmp / "one"), str(tmp / "two"), _fresh_cache(tiny_cache, tmp / "cache")
    one_results, one_metrics = run_script("dqo.py", cache, one, *LAUNCH_ARGS, "--per_device_batch_size", "16",
                                          "--precision", "bf16")
    two_results, two_metrics = run_script("dqo.py", _copy_cache(cache, tmp / "cache-two"), two, *LAUNCH_ARGS,
                                          "--per_device_batch_size", "8", launcher=_shipped_fsdp2())
    return (one, one_results, one_metrics), (two, two_results, two_metrics, cache)


def _run_json(out: str) -> dict:
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)


def test_shipped_fsdp2_launch_matches_one_process_in_bf16(launch_runs, tiny_cache):
    from safetensors.torch import load_file

    (one, _, one_metrics), (two, _, two_metrics, _) = launch_runs
    assert {k: _run_json(two)[k] for k in ("precision", "sharding", "world_size", "grad_accum")} == dict(
        precision="bf16", sharding="FSDP2", world_size=2, grad_accum=2)
    assert {k: _run_json(one)[k] for k in ("precision", "sharding", "world_size", "grad_accum")} == dict(
        precision="bf16", sharding="none", world_size=1, grad_accum=1 * 2)
    # Losses: one process runs bf16 autocast (matmuls in bf16, norms and softmax in fp32), FSDP2 casts every parameter
    # to bf16 (norm weights included). Both keep fp32 log-probs and losses, so they agree to bf16's resolution:
    # 2^-8 relative on each logit, a few 1e-3 on a sum of squared residuals over tokens.
    assert [m["step"] for m in one_metrics] == [m["step"] for m in two_metrics] == [1, 2, 3]
    for a, b in zip(one_metrics, two_metrics):
        for k in ("losses/policy", "losses/value"):
            assert b[k] == pytest.approx(a[k], rel=2e-2, abs=1e-3), (a["step"], k)
    assert any(m["losses/policy"] > 0 for m in one_metrics), "no correct response in 3 batches: nothing was trained"
    # Weights after 3 Adam steps: Adam moves each weight by about lr per step whatever its gradient's size, so where the
    # two precisions' gradients differ in sign (gradients near 0) the weights differ by up to 2 lr per step; elsewhere
    # they move together. Bound: 3 steps x 2 lr, and the two runs much closer to each other than to the start.
    start = load_file(os.path.join(common.TINY_SHIPPED, "model.safetensors"))
    lrs = {"model": 5e-6, "value_model": 1e-4}
    for sub, prefix in (("model", ""), ("value_model", "model.")):
        a, b = (load_file(os.path.join(d, sub, "model.safetensors")) for d in (one, two))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=3 * 2 * lrs[sub] * 1.01, msg=f"{sub}: {k}")
        between = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
        update = sum(((a[k] - start[prefix + k]) ** 2).sum() for k in a) ** 0.5
        assert update > 0 and between < 0.5 * update, (sub, between, update)


def test_shipped_fsdp2_launch_resumes_exactly_after_a_kill(launch_runs, tiny_cache, tmp_path):
    """Kill the sharded launch right after its step-2 sharded checkpoint is complete (the main process dies at the
    failpoint `checkpoint.save.after_manifest`, as a SIGKILL would leave it; the launcher then ends the other rank),
    then --resume: the final weights are the uninterrupted launch's, bit for bit (same processes, same reduction order)."""
    from safetensors.torch import load_file

    (_, _, _), (two, two_results, two_metrics, built) = launch_runs
    out, cache = str(tmp_path / "killed"), _copy_cache(built, tmp_path / "cache")
    cmd = [*_shipped_fsdp2(), os.path.join(ROOT, "dqo.py"),
           "--cache_dir", cache, "--output_dir", out, *SMOKE_ARGS, *LAUNCH_ARGS, "--per_device_batch_size", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FAILPOINT="checkpoint.save.after_manifest@2"))
    assert proc.returncode != 0, "the failpoint did not stop the launch"
    with open(os.path.join(out, "checkpoint.tmp", "trainer_state.json")) as f:
        killed_at = json.load(f)["step"]
    assert killed_at == 2
    results, metrics = run_script("dqo.py", cache, out, *LAUNCH_ARGS, "--per_device_batch_size", "8", "--resume",
                                  launcher=_shipped_fsdp2())
    assert metrics[-1]["step"] == 3 and results["final"]["greedy"] == two_results["final"]["greedy"]
    for sub in ("model", "value_model"):
        a, b = (load_file(os.path.join(d, sub, "model.safetensors")) for d in (two, out))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k, killed_at)


def _grad_memory(built: str, tmp_path, no_sync_each_batch: bool) -> list[dict]:
    path = str(tmp_path / "grad-memory")
    env = {"SHIM_GRAD_MEMORY": path, "SHIM_NO_SYNC_EACH_BATCH": "1" if no_sync_each_batch else "0"}
    out, cache = str(tmp_path / "run"), _copy_cache(built, tmp_path / "cache")
    cmd = [*_shipped_fsdp2(), os.path.join(ROOT, "dqo.py"),
           "--cache_dir", cache, "--output_dir", out, *SMOKE_ARGS, *LAUNCH_ARGS, "--per_device_batch_size", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [[json.loads(line) for line in open(f"{path}.{rank}")] for rank in (0, 1)]


def test_shipped_fsdp2_launch_never_holds_unsharded_gradients(launch_runs, tmp_path):
    """torch's FSDPMemTracker (every storage, by category) around the first two steps' 4 micro-batches, on each rank.
    At the end of a micro-batch that does not step, the gradients alive are the sharded fp32 ones, 1/world of each
    trained network (the value model's, not instrumented by the tracker, count as "Temp"), and no unsharded ones.
    Control: with accelerate's no_sync between micro-batches, the configuration before the fix, the same measure
    holds every gradient unsharded: world (2) times as much, which is what costs 34 GB per GPU at 7B."""
    world, built = 2, launch_runs[1][3]
    for rows in _grad_memory(built, tmp_path / "fixed", no_sync_each_batch=False):
        assert [r["sync"] for r in rows] == [False, True, False, True]
        for r in rows:
            if not r["sync"]:
                cur = r["current"]
                assert cur["Unsharded Grad"] == 0 and cur["Sharded Grad"] == 4 * r["params"] // world
                sharded = 4 * (r["params"] + r["other_params"]) / world  # fp32 sharded gradients of both networks
                # "Temp" also holds the step's small tensors (the batch, losses): 2.5% of the gradients at this size
                assert sharded <= cur["Sharded Grad"] + cur["Temp"] <= 1.05 * sharded
    for rows in _grad_memory(built, tmp_path / "control", no_sync_each_batch=True):
        r = rows[0]
        assert not r["sync"] and r["current"]["Sharded Grad"] == 0
        unsharded = 4 * (r["params"] + r["other_params"])  # every gradient of both networks, full size, fp32
        assert unsharded <= r["current"]["Unsharded Grad"] + r["current"]["Temp"] <= 1.05 * unsharded
