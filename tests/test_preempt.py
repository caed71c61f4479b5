"""Preemption, checkpoint cadence, disk and the process count. SIGTERM mid-training (one process; and to the launcher of
a 2-process FSDP2 launch through configs/fsdp.yaml, as a scheduler sends it) leaves a checkpoint at the step the run was
on and exit status 75; --resume then ends bitwise equal to an uninterrupted run. SIGTERM inside a DQO accumulation
window (--grad_accum 2, two networks) finishes that step first, and both networks resume bitwise. A checkpoint is
refused, in one line naming both counts, under another number of processes. Every process hashes a share of a
checkpoint. The disk preflight refuses a folder too small for two checkpoints and the models."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, SMOKE_ARGS, launch, run_command

import runtime.checkpoint
import runtime.launch
from runtime.cli import ArgumentError
from runtime.files import file_hashes
from runtime.memory import param_count, read_model_config

# rs on gold solutions: no offline dataset to sample, 5 steps of 4 examples per process
ARGS = ["--data", "gold", "--max_steps", "5", "--n_test", "4", "--per_device_batch_size", "4"]
SHIPPED_FSDP2 = (*launch("--config_file", os.path.join(ROOT, "configs", "fsdp.yaml"), mixed_precision=None),
                 os.path.join(ROOT, "tests", "fsdp_cpu_shim.py"))


def _flags(cache, out, *extra) -> list[str]:
    return ["--cache_dir", cache, "--output_dir", str(out), *SMOKE_ARGS, *ARGS, *extra]


def _preempted(cmd: list, out, step: int, sig=signal.SIGTERM, env: dict | None = None) -> tuple[int, str, str]:
    """Start `cmd`, which stops at optimizer step `step` until a signal comes (PREEMPT_TEST_WAIT_AT_STEP); once
    metrics.jsonl logs that step, send `sig` to the process started (under accelerate launch: the launcher, as a
    scheduler would). (exit status, stdout, stderr)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PREEMPT_TEST_WAIT_AT_STEP=str(step), **(env or {}))
    with tempfile.TemporaryFile("w+") as o, tempfile.TemporaryFile("w+") as e:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e, text=True)
        metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 300
        while not (os.path.exists(metrics) and f'"step": {step},' in open(metrics).read()):
            assert proc.poll() is None and time.time() < deadline, f"step {step} never logged"
            time.sleep(0.1)
        proc.send_signal(sig)
        code = proc.wait(timeout=300)
        o.seek(0), e.seek(0)
        return code, o.read(), e.read()


def _trainer_state(out) -> dict:
    with open(os.path.join(out, "checkpoint", "trainer_state.json")) as f:
        return json.load(f)


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def _weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model", "model.safetensors"))


def _assert_same_weights(out, ref) -> None:
    a, b = _weights(out), _weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# The fast unit checks first: a mutant they catch stops `pytest -x` before the launches below
def test_a_stop_on_any_process_stops_every_process(monkeypatch):
    """The two flags are all-reduced: a process with no signal and no clock of its own (not the main one) stops or saves
    when the other process's flags say so (a stand-in all-reduce adds them), and goes on when neither does."""
    monkeypatch.setattr(runtime.checkpoint, "_RUN", dict(signal=None, training=True, last_save=0.0, sizes_printed=set()))
    args = SimpleNamespace(save_every=0, save_every_minutes=0)
    for other, want in (([1.0, 0.0], "preempted"), ([0.0, 1.0], "cadence"), ([0.0, 0.0], None)):
        acc = _Accelerator(num_processes=2, is_main_process=False, reduce=lambda t, op, o=other: t + torch.tensor(o))
        assert runtime.checkpoint.checkpoint_due(acc, args, 1) == want, other


def test_disk_preflight_counts_a_resumed_runs_files_as_free(tmp_path, monkeypatch):
    """--resume replaces the run's own checkpoints: with 1 MB free, 20 MB of them make room for RS's 15.1 MB at tiny
    size; the same disk refuses a fresh run."""
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "checkpoint.old", "wb") as f:
        f.truncate(20 * 10**6)  # sparse: its size counts, its blocks cost nothing
    monkeypatch.setattr(runtime.launch.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**6, used=0, free=10**6))
    args = SimpleNamespace(model="tiny", memory_terms=dict, skip_memory_check=False, precision="fp32", lora_r=0, epochs=1,
                           per_device_batch_size=4, gen_batch_size=16, max_new_tokens=64, n_samples=4, output_dir=str(out))
    text = runtime.launch.preflight(SimpleNamespace(**vars(args), resume=True), "rs", _Accelerator(), "none")
    assert f"disk: {out} needs 15.1 MB" in text and "has 21.0 MB free" in text
    with pytest.raises(ArgumentError, match="needs 15.1 MB .* and has 1.0 MB free"):
        runtime.launch.preflight(SimpleNamespace(**vars(args), resume=False), "rs", _Accelerator(), "none")


def test_a_checkpoint_resumes_only_with_its_process_count(tmp_path):
    """run.json records the process count that wrote the checkpoint; another count is refused naming both, the same
    count goes on (the unit behind the launches below)."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": 1, "files": {}}))
    config = {"lr": 1e-5, "seed": 0}
    (tmp_path / "run.json").write_text(json.dumps({"algo": "rs", "world_size": 1, "args": config}))
    with pytest.raises(ArgumentError, match=r"written by 1 process\(es\), this launch has 2: a checkpoint resumes only"):
        runtime.launch.check_same_run(str(tmp_path), "rs", config, 2)
    runtime.launch.check_same_run(str(tmp_path), "rs", config, 1)


def test_sigterm_checkpoints_the_step_it_was_on_and_resume_is_bitwise_equal(tiny_cache, tmp_path):
    """One process: SIGTERM while it is at step 2 of 5 -> a checkpoint at step 2, exit 75, the first save's size, seconds
    and rate printed; a 2-process resume of it is refused naming both counts; --resume ends byte for byte equal to the
    uninterrupted run. The checkpoint's size is what the disk preflight counts (12 bytes per trained parameter)."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    code, _, err = run_command(["rs.py", *_flags(tiny_cache, ref)])
    assert code == 0, err[-3000:]
    code, stdout, stderr = _preempted([sys.executable, "rs.py", *_flags(tiny_cache, out)], out, 2,
                                      env={"PYTORCH_CUDA_ALLOC_CONF": "backend:native"})
    assert code == runtime.checkpoint.EXIT_RESUME == 75, stderr[-3000:]
    assert f"SIGTERM: checkpoint at step 2 in {out}; exiting 75: rerun the same command with --resume" in stdout
    assert "SIGTERM: checkpointing after this optimizer step, then exiting 75" in stderr
    assert _trainer_state(out)["step"] == 2 and _steps(out) == [1, 2]
    size = sum(f["bytes"] for f in _trainer_state(out)["files"].values())
    line = next(line for line in stdout.splitlines() if line.startswith("checkpoint: "))
    assert line.startswith(f"checkpoint: {size / 1e6:.1f} MB in ") and " MB/s, hashes included) in " in line, line
    assert size == pytest.approx(12 * param_count(read_model_config("tiny"))[0], rel=0.02)
    with open(out / "run.json") as f:
        assert json.load(f)["cuda_alloc_conf"] == "backend:native"  # the user's, kept
    with open(ref / "run.json") as f:
        assert json.load(f)["cuda_alloc_conf"] == "expandable_segments:True"

    proc = subprocess.run([*SHIPPED_FSDP2, "rs.py", *_flags(tiny_cache, out, "--resume")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and (f"error: --resume: the checkpoint in {out} was written by 1 process(es), this launch "
                                     "has 2: a checkpoint resumes only with the process count that wrote it") in proc.stderr
    code, _, err = run_command(["rs.py", *_flags(tiny_cache, out, "--resume")])
    assert code == 0, err[-3000:]
    _assert_same_weights(out, ref)
    assert _steps(out) == [1, 2, 3, 4, 5]


def test_sigterm_to_the_launcher_of_a_2_process_fsdp2_launch(tiny_cache, tmp_path):
    """The shipped FSDP2 config (bf16) on 2 gloo processes. SIGTERM to `accelerate launch` while rank 0 is at step 2:
    torch's elastic agent forwards it to both workers, they agree (one all-reduce) to stop after step 2, save, exit 75;
    the launcher exits 128 + SIGTERM. The manifest both processes hashed equals the CRC-32 of every file, and with a
    shard's bytes flipped a 2-process --resume refuses it; a 1-process resume is refused naming both counts;
    a 2-process --resume ends with the uninterrupted launch's weights, bit for bit."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    proc = subprocess.run([*SHIPPED_FSDP2, "rs.py", *_flags(tiny_cache, ref)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, stdout, stderr = _preempted([*SHIPPED_FSDP2, "rs.py", *_flags(tiny_cache, out)], out, 2)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert f"SIGTERM: checkpoint at step 2 in {out}; exiting 75" in stdout
    assert stderr.count("SIGTERM: checkpointing after this optimizer step") == 2  # each worker got it from the agent
    state = _trainer_state(out)
    assert state["step"] == 2 and _steps(out) == [1, 2]
    names = sorted(state["files"])
    assert any(n.endswith(".distcp") for n in names)  # sharded: each process wrote its own shards
    paths = [os.path.join(out, "checkpoint", n) for n in names]
    assert [state["files"][n] for n in names] == [{"bytes": os.path.getsize(p), "crc32": h}
                                                  for p, h in zip(paths, file_hashes(paths))]
    shard = out / "checkpoint" / max((n for n in names if n.endswith(".distcp")), key=lambda n: state["files"][n]["bytes"])
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-64] + bytes(b ^ 0xFF for b in intact[-64:]))  # same size: only the CRC-32 tells
    proc = subprocess.run([*SHIPPED_FSDP2, "rs.py", *_flags(tiny_cache, out, "--resume")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # verified by both processes, each hashing a share
    shard.write_bytes(intact)
    assert proc.returncode != 0 and f"error: --resume: {shard} does not match the CRC-32 saved with it" in proc.stderr

    code, _, err = run_command(["rs.py", *_flags(tiny_cache, out, "--resume")])
    assert code != 0 and err.count("\n") <= 2 and (f"error: --resume: the checkpoint in {out} was written by 2 process(es), "
                                                    "this launch has 1") in err, err[-3000:]
    proc = subprocess.run([*SHIPPED_FSDP2, "rs.py", *_flags(tiny_cache, out, "--resume")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_weights(out, ref)
    assert _steps(out) == [1, 2, 3, 4, 5]


# dqo (a policy and a value network) with --grad_accum 2: 4 optimizer steps of 2 micro-batches of 4 rows each
DQO_ARGS = ["--max_steps", "4", "--n_test", "4", "--per_device_batch_size", "4", "--grad_accum", "2"]
# runs dqo.py as a user does, with SIGTERM sent to the process from inside its `micro_batch`-th training forward
# (token_logprobs with gradients: every micro-batch calls it once, nothing else does), so it lands mid-window
SIGNAL_IN_MICRO_BATCH = """
import os, runpy, signal, sys
import torch
sys.path.insert(0, os.getcwd())  # the repository root (a fresh interpreter puts this file's folder first)
import common
calls, inner = [0], common.token_logprobs
def token_logprobs(*args, **kwargs):
    calls[0] += torch.is_grad_enabled()
    if torch.is_grad_enabled() and calls[0] == int(os.environ["SIGNAL_IN_MICRO_BATCH"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return inner(*args, **kwargs)
common.token_logprobs = token_logprobs  # dqo.py's `from common import token_logprobs` takes this one
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _networks(out) -> dict:
    """Every tensor the run saved for its policy (model/) and its value network (value_model/), by file and name."""
    from safetensors.torch import load_file

    return {(sub, f, k): v for sub in ("model", "value_model") for f in sorted(os.listdir(os.path.join(out, sub)))
            if f.endswith(".safetensors") for k, v in load_file(os.path.join(out, sub, f)).items()}


def test_sigterm_inside_a_dqo_accumulation_window_finishes_the_step_and_resumes_both_networks_bitwise(tiny_cache,
                                                                                                       tmp_path):
    """dqo.py, one process, --grad_accum 2: SIGTERM during the first micro-batch of step 3 (the 5th of 8) -> the run
    finishes step 3 (its second micro-batch and the optimizer steps of both networks), checkpoints there, at the end
    of an accumulation window (6 micro-batches consumed), and exits 75; --resume ends with the uninterrupted run's
    policy and value network, byte for byte (both optimizers, schedulers and the data position restored)."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    wrapper = tmp_path / "signal_in_micro_batch.py"
    wrapper.write_text(SIGNAL_IN_MICRO_BATCH)
    flags = lambda d, *extra: ["--cache_dir", tiny_cache, "--output_dir", str(d), *SMOKE_ARGS, *DQO_ARGS, *extra]
    code, _, err = run_command(["dqo.py", *flags(ref)])
    assert code == 0, err[-3000:]
    code, stdout, stderr = run_command([str(wrapper), "dqo.py", *flags(out)], env={"SIGNAL_IN_MICRO_BATCH": "5"})
    assert code == runtime.checkpoint.EXIT_RESUME == 75, stderr[-3000:]
    assert "SIGTERM: checkpointing after this optimizer step, then exiting 75" in stderr
    assert f"SIGTERM: checkpoint at step 3 in {out}; exiting 75: rerun the same command with --resume" in stdout
    state = _trainer_state(out)
    assert (state["step"], state["epoch"], state["batch"]) == (3, 0, 6) and _steps(out) == [1, 2, 3]
    assert not (out / "model").exists()
    code, _, err = run_command(["dqo.py", *flags(out, "--resume")])
    assert code == 0, err[-3000:]
    assert _steps(out) == [1, 2, 3, 4]
    got, want = _networks(out), _networks(ref)
    assert {sub for sub, _, _ in want} == {"model", "value_model"} and got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


class _Accelerator(SimpleNamespace):
    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cpu")


def test_checkpoint_cadence_by_steps_minutes_and_signals(monkeypatch):
    """--save_every counts steps; --save_every_minutes the main process's clock since the first step or the last save
    (another process's clock decides nothing: the all-reduce carries the main process's); SIGUSR1 and SIGTERM stop at
    the next step once training began, and before it exit 75 at once."""
    due = runtime.checkpoint.checkpoint_due
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    clock = [1000.0]
    monkeypatch.setattr(runtime.checkpoint.time, "monotonic", lambda: clock[0])
    try:
        runtime.checkpoint.stop_on_signals()
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        assert e.value.code == 75
        runtime.checkpoint.stop_on_signals()
        args, acc = SimpleNamespace(save_every=3, save_every_minutes=60), _Accelerator()
        assert [due(acc, args, s) for s in (1, 2, 3, 4)] == [None, None, "cadence", None]
        clock[0] += 60 * 60 - 1
        assert due(acc, args, 5) is None
        clock[0] += 1
        assert due(acc, args, 5) == "cadence" and due(_Accelerator(is_main_process=False), args, 5) is None
        assert due(acc, SimpleNamespace(save_every=3, save_every_minutes=0), 5) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert due(acc, args, 7) == "preempted"
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_every_process_hashes_a_share(monkeypatch, tmp_path):
    """Two processes, four files: each hashes two (largest dealt first), and each gets all four CRC-32s, in order."""
    paths = []
    for i, size in enumerate((10, 4000, 300, 20)):
        paths.append(str(tmp_path / f"f{i}"))
        with open(paths[-1], "wb") as f:
            f.write(bytes(range(256)) * (size // 256) + bytes(size % 256))
    hashed, sizes, full = [], [os.path.getsize(p) for p in paths], file_hashes(paths)
    monkeypatch.setattr(runtime.checkpoint, "file_hashes", lambda ps: hashed.append(ps) or file_hashes(ps))

    def gather(obj):  # what all_gather_object gives: this process's share, and the other's (hashed by it)
        return [obj[0], {i: h for i, h in enumerate(full) if i not in obj[0]}]

    monkeypatch.setattr(runtime.checkpoint, "gather_object", gather)
    got = [runtime.checkpoint._shared_hashes(_Accelerator(num_processes=2, process_index=r), paths, sizes) for r in (0, 1)]
    assert hashed == [[paths[1], paths[3]], [paths[2], paths[0]]]
    assert got == [full, full]


GEMMA_7B = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=16, head_dim=256, tie_word_embeddings=True)


def test_disk_preflight_counts_two_checkpoints_and_the_models(tmp_path):
    """DQO at 7B (8.54e9 parameters, two trained networks, 5 epochs, bf16): two checkpoints of 12 bytes per trained
    parameter, 2 x 204.9 GB, and 6 bf16 models (5 epochs' policies, the value network) of 17.1 GB: 512.3 GB."""
    params = param_count(GEMMA_7B)[0]
    assert params == pytest.approx(8.538e9, rel=1e-3)
    check = runtime.checkpoint.disk_preflight
    dqo = dict(networks=2)
    with pytest.raises(ArgumentError) as e:
        check("dqo", dqo, GEMMA_7B, "bf16", 0, 5, "/scratch/run", int(500e9), skip=False)
    assert str(e.value.code) == ("error: dqo: --output_dir /scratch/run needs 512.3 GB (2 checkpoints of 204.9 GB, 6 saved "
                                 "models of 17.1 GB) and has 500.0 GB free: free some space or choose another "
                                 "--output_dir; --skip_memory_check runs it anyway")
    assert check("dqo", dqo, GEMMA_7B, "bf16", 0, 5, "/s", int(513e9), skip=False).startswith("disk: /s needs 512.3 GB")
    assert "too little: --skip_memory_check" in check("dqo", dqo, GEMMA_7B, "bf16", 0, 5, "/s", int(1e9), skip=True)
    # RS trains one network: 2 x 102.5 GB + 5 models
    assert "needs 290.3 GB (2 checkpoints of 102.5 GB, 5 saved models" in check("rs", {}, GEMMA_7B, "bf16", 0, 5, "/s",
                                                                              int(1e12), skip=False)


def test_disk_preflight_stops_a_real_run_in_one_line(tiny_cache, tmp_path):
    """rs.py with the free space reported as 1 MB (shutil.disk_usage patched, then the script run as a user runs it):
    one error line naming the folder, the need and the free space, before any weights load."""
    out = tmp_path / "run"
    code = ("import runpy, shutil, sys; from types import SimpleNamespace as N; "
            "shutil.disk_usage = lambda p: N(total=10**6, used=0, free=10**6); "
            f"sys.argv = {['rs.py', *_flags(tiny_cache, out)]!r}; runpy.run_path('rs.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[-1:] == [f"error: rs: --output_dir {out} needs 15.1 MB (2 checkpoints of 6.5 MB, 1 "
                                             "saved model of 2.2 MB) and has 1.0 MB free: free some space or choose "
                                             "another --output_dir; --skip_memory_check runs it anyway"], proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "run.json").exists()


def test_peak_allocated_and_reserved_memory_per_phase(monkeypatch, tmp_path):
    """On CUDA each step's metrics carry the peak allocated and reserved GB since the last step, and run.json the peak
    of each phase; the peaks are reset after each reading. On CPU nothing is read."""
    peaks, resets = iter([(5e9, 6e9), (3e9, 7e9), (4e9, 4e9)]), []
    reading = {}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: reading.update(zip("ar", next(peaks))) or reading["a"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: reading["r"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: resets.append(d))
    monkeypatch.setattr(runtime.launch, "_PEAKS", {})
    with open(tmp_path / "run.json", "w") as f:
        json.dump({"algo": "rs"}, f)
    cuda = _Accelerator(device=SimpleNamespace(type="cuda"))
    got = [runtime.launch.memory_peaks(cuda, phase, str(tmp_path)) for phase in ("start to step 1", "training", "training")]
    assert got == [{"memory/allocated_gb": 5.0, "memory/reserved_gb": 6.0}, {"memory/allocated_gb": 3.0,
                   "memory/reserved_gb": 7.0}, {"memory/allocated_gb": 4.0, "memory/reserved_gb": 4.0}]
    assert len(resets) == 3
    with open(tmp_path / "run.json") as f:
        assert json.load(f) == {"algo": "rs", "memory": {"start to step 1": {"memory/allocated_gb": 5.0, "memory/reserved_gb":
                                6.0}, "training": {"memory/allocated_gb": 4.0, "memory/reserved_gb": 7.0}}}
    assert runtime.launch.memory_peaks(_Accelerator(), "training", str(tmp_path)) == {}
