"""Sharding on CPU: torch FSDP1 and FSDP2 over two gloo processes give the unsharded results.

- `fsdp_rollout_driver.py` (torchrun, the model wrapped directly with torch FSDP1/FSDP2): `common.rollout`, `evaluate`
  and `build_offline_dataset` give the unsharded tokens and log-probs.
- dqo.py under accelerate's own FSDP path (`accelerate launch --config_file ...` and `accelerator.prepare`, through
  tests/fsdp_cpu_shim.py): the reference evaluation, the offline dataset, the per-step losses of policy and value model,
  the consolidated weights after training and the final evaluation equal one unsharded process; the saved models load
  with plain `from_pretrained`.
  What accelerate cannot do on CPU and the shim stands in for: setting distributed_type FSDP on a gloo CPU state, and
  FSDP1's device_id. Not covered: NCCL, bf16 mixed precision, fsdp_sync_module_states and
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
from conftest import ROOT, free_port, launch, run_script

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
    """A cache holding only the tiny test reference: the run builds its own offline dataset and reference evaluation."""
    import shutil

    os.makedirs(os.path.dirname(common.tiny_dir(str(path))))
    shutil.copytree(common.tiny_dir(tiny_cache), common.tiny_dir(str(path)))
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


@pytest.mark.parametrize("version", [1, 2])
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
    start = load_file(os.path.join(common.tiny_dir(tiny_cache), "model.safetensors"))
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
