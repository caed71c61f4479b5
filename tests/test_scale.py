"""Scale-out: two gloo processes give the same per-step losses as one process with the same global batch; the offline
dataset is identical row for row whatever the process count; a killed run resumes onto the same loss trajectory;
checkpoints are atomic; the shipped accelerate configs parse."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SMOKE_ARGS, launch, run_script

import runtime.checkpoint  # noqa: E402
import runtime.cli  # noqa: E402
import runtime.launch  # noqa: E402

SCRIPTS = ["rs.py", "dpo.py", "kto.py", "dro.py", "dqo.py", "spo.py"]
DDP_CONFIG = os.path.join(ROOT, "configs", "ddp.yaml")  # the shipped config, with 2 processes and fp32 on this CPU
STEPS = 3  # optimizer steps compared
EQUIV_ARGS = ["--max_steps", str(STEPS), "--n_test", "8"]
SCRIPT_ARGS = {
    "rs.py": ["--data", "gold"],  # the quick test reference has few correct samples
    # SPO's fresh rollouts are sampled by each process on its own share, so their tokens (not the mix) depend on the
    # process count (spo.py's docstring); the exact comparison covers its offline path.
    "spo.py": ["--online_fraction", "0"],
}


def _world_size(output_dir) -> int:
    with open(os.path.join(output_dir, "run.json")) as f:
        return json.load(f)["world_size"]


def _losses(metrics: list[dict]) -> dict[int, dict]:
    """The last logged row for each step (a resumed run logs the replayed steps again), losses/* only."""
    out = {}
    for row in metrics:
        out[row["step"]] = {k: v for k, v in row.items() if k.startswith("losses/")}
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_match_one(script, tiny_cache, tmp_path):
    if not os.path.exists(os.path.join(ROOT, script)):
        pytest.skip(f"{script} not written yet")
    one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
    extra = EQUIV_ARGS + SCRIPT_ARGS.get(script, [])
    _, one = run_script(script, tiny_cache, one_dir, *extra, "--per_device_batch_size", "8")
    _, two = run_script(script, tiny_cache, two_dir, *extra, "--per_device_batch_size", "4",
                        launcher=launch("--config_file", DDP_CONFIG))
    assert _world_size(one_dir) == 1
    assert _world_size(two_dir) == 2, "the launcher did not start two processes"
    one, two = _losses(one), _losses(two)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert one[step].keys() == two[step].keys() and one[step], f"{script}: step {step} logs no losses/*"
        for k in one[step]:
            assert two[step][k] == pytest.approx(one[step][k], rel=2e-4, abs=2e-5), f"{script} step {step} {k}"


def test_offline_dataset_same_for_any_process_count(tiny_cache, tmp_path):
    """Build the offline dataset with one and with two processes in fresh caches: the rows are identical."""
    rows = {}
    for world, launcher in ((1, ()), (2, launch())):
        cache = tmp_path / f"cache{world}"
        out = str(tmp_path / f"run{world}")
        run_script("rs.py", str(cache), out, "--max_steps", "1", "--n_test", "8", "--n_train_prompts", "24",
                   "--gen_batch_size", "16", launcher=launcher)  # 24 prompts x 4 samples in 6 chunks of 16
        assert _world_size(out) == world
        (root,) = [os.path.join(cache, "offline", d) for d in os.listdir(cache / "offline")]
        chunks = sorted(f for f in os.listdir(root) if f.startswith("chunk-"))
        assert len(chunks) >= 4  # enough chunks that both ranks sampled some
        rows[world] = [json.loads(line) for c in chunks for line in open(os.path.join(root, c))]
    assert len(rows[1]) == len(rows[2]) == 24 * 4
    for a, b in zip(rows[1], rows[2]):
        assert a["response_ids"] == b["response_ids"] and a["reward"] == b["reward"]
        assert a["ref_logps"] == pytest.approx(b["ref_logps"], abs=1e-5)


def test_kill_and_resume_continues_exactly(tiny_cache, tmp_path):
    args = ["--max_steps", "12", "--save_every", "3", "--n_test", "8", "--per_device_batch_size", "4", "--epochs", "2",
            "--data", "gold"]
    full_dir, killed_dir = str(tmp_path / "full"), str(tmp_path / "killed")
    _, full = run_script("rs.py", tiny_cache, full_dir, *args)
    full = _losses(full)
    assert len(full) == 12

    # Start the same run, SIGKILL it once it has logged step 7 (a checkpoint exists at step 6), then resume.
    cmd = [sys.executable, os.path.join(ROOT, "rs.py"), "--cache_dir", tiny_cache, "--output_dir", killed_dir,
           *SMOKE_ARGS, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_path = os.path.join(killed_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_path) and sum(1 for _ in open(metrics_path)) >= 7:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    with open(os.path.join(killed_dir, "checkpoint", "trainer_state.json")) as f:
        assert json.load(f)["step"] in (6, 9)
    _, resumed = run_script("rs.py", tiny_cache, killed_dir, *args, "--resume")
    resumed = _losses(resumed)
    assert sorted(resumed) == sorted(full)
    for step in full:
        assert resumed[step]["losses/policy"] == pytest.approx(full[step]["losses/policy"], rel=1e-5, abs=1e-6), step


def test_checkpoint_swap_is_atomic(tmp_path):
    """A crash while saving leaves the last good checkpoint loadable: a half-written temp dir is ignored, and a crash
    between the two renames falls back to checkpoint.old."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(3, 1))
    with torch.no_grad():
        model.weight.fill_(1.0)
    runtime.checkpoint.save_checkpoint(acc, str(tmp_path), {"step": 1})
    with torch.no_grad():
        model.weight.fill_(2.0)
    os.makedirs(tmp_path / "checkpoint.tmp")  # a save killed half-way
    (tmp_path / "checkpoint.tmp" / "model.safetensors").write_bytes(b"garbage")
    assert runtime.checkpoint.load_checkpoint(acc, str(tmp_path))["step"] == 1
    assert torch.all(model.weight == 1.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")  # killed between the two renames
    assert runtime.checkpoint.load_checkpoint(acc, str(tmp_path))["step"] == 1
    assert torch.all(model.weight == 1.0)
    with torch.no_grad():
        model.weight.fill_(4.0)
    runtime.checkpoint.save_checkpoint(acc, str(tmp_path), {"step": 2})  # the next save cleans up and wins
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert runtime.checkpoint.load_checkpoint(acc, str(tmp_path))["step"] == 2


@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml"])
def test_accelerate_configs_parse(config):
    """The YAML as accelerate reads it. ddp.yaml and fsdp.yaml also run for real on CPU: ddp.yaml in
    test_two_processes_match_one, fsdp.yaml in tests/test_sharding.py (FSDP2 is the supported sharding)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(os.path.join(ROOT, "configs", config))
    assert cfg.mixed_precision == "bf16" and cfg.num_processes == 8
    if config == "fsdp.yaml":
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_reshard_after_forward"] is True
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert cfg.fsdp_config["fsdp_activation_checkpointing"] is True


def test_precision_follows_the_launch(monkeypatch):
    """An accelerate launch's mixed_precision is never overridden; without one, hub models default to bf16."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert runtime.launch.resolve_precision("tiny", None) == "fp32"
    assert runtime.launch.resolve_precision("google/gemma-1.1-7b-it", None) == "bf16"
    assert runtime.launch.resolve_precision("google/gemma-1.1-7b-it", "fp32") == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --config_file configs/fsdp.yaml` sets
    assert runtime.launch.resolve_precision("tiny", None) == "bf16"
    with pytest.raises(runtime.cli.ArgumentError, match="--precision fp32 contradicts the accelerate launch's mixed_prec"):
        runtime.launch.resolve_precision("tiny", "fp32")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert runtime.launch.resolve_precision("google/gemma-1.1-7b-it", None) == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(runtime.cli.ArgumentError, match="only bf16 or no"):
        runtime.launch.resolve_precision("tiny", None)


def test_bf16_launch_on_one_process_records_it(tiny_cache, tmp_path, monkeypatch):
    """`ACCELERATE_MIXED_PRECISION=bf16 python dqo.py ...` runs bf16 autocast over fp32 master weights, and says so.
    On the cache every test shares: its bf16 samples and reference log-probs are cached under a key that names the
    precision, so no fp32 run of the same settings reads them (tests/test_offline_data.py's round trip compares
    cached log-probs with fp32 ones to 1e-5)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = str(tmp_path / "run")
    run_script("dqo.py", tiny_cache, out, "--max_steps", "2", "--n_train_prompts", "8", "--n_test", "8")
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    assert (run["precision"], run["sharding"], run["world_size"]) == ("bf16", "none", 1)
    keys = []
    for d in os.listdir(os.path.join(tiny_cache, "offline")):
        if os.path.exists(key := os.path.join(tiny_cache, "offline", d, "key.json")):
            with open(key) as f:
                keys.append(json.load(f))
    bf16 = [k for k in keys if k["model"] == runtime.files.model_key("tiny", precision="bf16") and k.get("n_prompts") == 8]
    assert len(bf16) == 1 and runtime.files.model_key("tiny", precision="bf16") == runtime.files.model_key("tiny") + "@bf16"


def test_fsdp2_needs_the_tested_versions():
    runtime.launch.check_versions("FSDP", 2, {"torch": "2.13.0+cu128", "accelerate": "1.16.0"})
    with pytest.raises(runtime.cli.ArgumentError, match="FSDP1 is not supported"):  # whatever the versions
        runtime.launch.check_versions("FSDP", 1, {"torch": "2.13.0", "accelerate": "1.16.0"})
    runtime.launch.check_versions(None, 0, {"torch": "2.5.1", "accelerate": "1.10.0"})
    with pytest.raises(runtime.cli.ArgumentError, match=r"FSDP2 \(configs/fsdp.yaml\) needs torch >= 2.13 .* found 2.9.1"):
        runtime.launch.check_versions("FSDP", 2, {"torch": "2.9.1", "accelerate": "1.16.0"})
    with pytest.raises(runtime.cli.ArgumentError, match="needs accelerate >= 1.16"):
        runtime.launch.check_versions("FSDP", 2, {"torch": "2.13.0", "accelerate": "1.12.0"})


def test_a_cache_written_by_another_run_mid_launch_is_read_by_all_processes_or_none(tmp_path):
    """Two runs share a cache. The reference evaluation is missing when this launch's main process looks for it, and
    another run writes it before process 1 looks. Every process must make the same choice (evaluate, whose results are
    gathered across processes, or read the file): a process that read it would skip the gather and leave the others
    waiting for it until the process-group timeout."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"""import json, os, sys, time
from types import SimpleNamespace
sys.path.insert(0, {ROOT!r})
import common
import runtime.files
import runtime.launch
from transformers import AutoModelForCausalLM, AutoTokenizer
runtime.launch.asdict = vars  # a namespace stands in for the Args dataclass
args = SimpleNamespace(model="tiny", precision=None, grad_accum=1, report_to="", output_dir={str(tmp_path / "out")!r},
                       seed=1, dist_timeout=60, cache_dir={str(tmp_path / "cache")!r}, task="arith", test_file=None,
                       max_new_tokens=16, eval_seeds=0, gen_batch_size=4)
acc, _ = runtime.launch.setup_accelerator(args, "probe")
model = AutoModelForCausalLM.from_pretrained(common.TINY_SHIPPED)
tokenizer = AutoTokenizer.from_pretrained(common.TINY_SHIPPED)
read = common.read_chunk

def racing_read(root, c, n_rows=None):  # the other run's write lands between the two processes' reads
    if acc.process_index == 0:
        found = read(root, c, n_rows)
        os.makedirs(root, exist_ok=True)
        runtime.files.write_chunk(root, c, [{{"greedy": -1.0, "written_by": "another run"}}])
        return found
    while runtime.files.chunk_problem(root, c) is not None:
        time.sleep(0.01)
    return read(root, c, n_rows)

common.read_chunk = racing_read
out = common.evaluate_reference(model, tokenizer, common.load_task("arith", "test", limit=4), acc, args.model, args.cache_dir,
                               task="arith", max_new_tokens=16, seed=1, sampled_seeds=0, gen_batch_size=4)
with open(os.path.join({str(tmp_path)!r}, f"rank{{acc.process_index}}.json"), "w") as f:
    json.dump(out, f)
""")
    (tmp_path / "cache" / "eval").mkdir(parents=True)
    proc = subprocess.run([*launch(), str(driver)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out0, out1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert "written_by" not in out0 and "written_by" not in out1  # both evaluated, neither read the other run's file
    assert out0["greedy"] == out1["greedy"] and out0["samples"] == out1["samples"] and out0["n_problems"] == 4


def test_dist_timeout_reaches_the_process_group(tmp_path):
    """--dist_timeout is the process group's timeout (NCCL's default, 10 minutes, is shorter than sampling the offline
    dataset at paper size, during which processes make no collective call)."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"""import sys
from types import SimpleNamespace
import torch, torch.distributed as dist
sys.path.insert(0, {ROOT!r})
import common  # noqa: F401
import runtime.launch
runtime.launch.asdict = vars  # a namespace stands in for the Args dataclass
args = SimpleNamespace(model="tiny", precision=None, grad_accum=1, report_to="", output_dir={str(tmp_path / "out")!r},
                       seed=1, dist_timeout=1234)
acc, _ = runtime.launch.setup_accelerator(args, "probe")
t = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()
sys.stdout.write(f"timeout {{acc.process_index}} {{t}}\\n")  # one write: both processes share the launcher's stdout
sys.stdout.flush()
""")
    proc = subprocess.run([*launch(), str(driver)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # matched anywhere in a line: the other process's output may still land beside it
    assert sorted(re.findall(r"timeout (\d) ([\d.]+)", proc.stdout)) == [("0", "1234.0"), ("1", "1234.0")], proc.stdout
