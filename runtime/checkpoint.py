"""Checkpoints, resume, preemption and saved models. Every save is atomic (written aside, renamed into place) and verified
(sizes and CRC-32 in its manifest), so a kill at any point leaves a checkpoint that loads. SIGTERM or SIGUSR1: every
process finishes its optimizer step, the run checkpoints and exits EXIT_RESUME (75). Under `accelerate launch` torch's
elastic agent forwards the signal (SIGUSR1 only if in PET_SIGNALS_TO_HANDLE) and exits 128 + it: docs/scale-out.md."""

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from common import merge_lora
from runtime.cli import ArgumentError
from runtime.files import failpoint, file_hashes, on_main, write_atomic, write_json_atomic, writing
from runtime.memory import param_count
from runtime.sharding import full_state_dict

CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")  # the current one, the one before, the one being saved
EXIT_RESUME = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal after a checkpoint (or before training): --resume me
_RUN = {"signal": None, "training": False, "last_save": 0.0}  # the signal received; past step 1; the clock at a save
_SIZES_PRINTED: set[str] = set()
# accelerate's "Removed shared tensor {'lm_head.weight'} while saving" says nothing a user can act on: a tied output
# projection (the tiny model's, Gemma's) is stored once on purpose and tied again on load
logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())


def stop_on_signals() -> None:
    """SIGTERM and SIGUSR1 stop the run at the next optimizer step (`checkpoint_due`); before the first one they exit
    EXIT_RESUME at once (what loading, the offline dataset and the reference evaluation finished is cached)."""
    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if not _RUN["training"]:
            print(f"{name} before training began: exiting {EXIT_RESUME}; rerun with --resume", file=sys.stderr, flush=True)
            sys.exit(EXIT_RESUME)
        if _RUN["signal"] is None:
            print(f"{name}: checkpointing after this optimizer step, then exiting {EXIT_RESUME}", file=sys.stderr, flush=True)
        _RUN["signal"] = name

    _RUN.update(signal=None, training=False)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)


def checkpoint_due(accelerator: Accelerator, args, step: int) -> str | None:
    """On every process after each optimizer step: "preempted" if any process got SIGTERM/SIGUSR1, "cadence" after
    --save_every steps or --save_every_minutes on the main process's clock, else None. One all-reduce of two numbers:
    every process decides the same at the same step."""
    if not _RUN["training"]:
        _RUN.update(training=True, last_save=time.monotonic())  # the clock runs from the first step
    wait = os.environ.get("PREEMPT_TEST_WAIT_AT_STEP") == str(step) and accelerator.is_main_process  # tests: wait for a
    for _ in range(1200 if wait else 0):  # signal (60 s at most) here, so that it comes at a known step
        time.sleep(0 if _RUN["signal"] else 0.05)
    late = args.save_every_minutes and time.monotonic() - _RUN["last_save"] >= 60 * args.save_every_minutes
    flags = torch.tensor([_RUN["signal"] is not None, accelerator.is_main_process and bool(late)], dtype=torch.float32)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), "sum").cpu()
    if flags[0] > 0:
        return "preempted"
    return "cadence" if flags[1] > 0 or (args.save_every and step % args.save_every == 0) else None


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: dict, why: str = "cadence") -> None:
    """Atomic: accelerate's state (models, optimizers, schedulers, RNG) plus `state` goes to checkpoint.tmp, renamed
    checkpoint/ (`_rotate_checkpoints`) after its manifest trainer_state.json: every file's size and CRC-32 (each
    process hashes a share). The first save prints its size, seconds and rate. `why` "preempted": then exit 75."""
    tmp, t0 = os.path.join(output_dir, "checkpoint.tmp"), time.monotonic()
    lost = "The checkpoint was not written; the previous one, if any, is untouched"
    if accelerator.is_main_process:
        if os.path.isfile(os.path.join(tmp, "trainer_state.json")):  # a complete save whose rotation was cut off:
            with writing(output_dir, consequence="The checkpoint rotation failed"):  # the newest, so it is kept
                _rotate_checkpoints(output_dir)
        shutil.rmtree(tmp, ignore_errors=True)  # a save cut off before its manifest: never trusted, so never kept
        with writing(tmp, consequence=lost):
            os.makedirs(tmp)  # before any process writes into it: under FSDP every process saves its own shards
    accelerator.wait_for_everyone()
    with writing(tmp, cleanup=tmp, consequence=lost):
        accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process has written its part (shards, its own RNG state) before the hashing
    names = on_main(accelerator, lambda: sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp)
                                                for f in fs))
    sizes = [os.path.getsize(os.path.join(tmp, n)) for n in names]
    crcs = _shared_hashes(accelerator, [os.path.join(tmp, n) for n in names], sizes)
    if accelerator.is_main_process:
        failpoint("checkpoint.save.before_manifest")
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), dict(state, files={
            n: {"bytes": b, "crc32": h} for n, b, h in zip(names, sizes, crcs)}))
        failpoint("checkpoint.save.after_manifest")
        with writing(output_dir, consequence="The checkpoint rotation failed; --resume picks the newest one that verifies"):
            _rotate_checkpoints(output_dir)
        if output_dir not in _SIZES_PRINTED:
            _SIZES_PRINTED.add(output_dir)
            size, s = sum(sizes), time.monotonic() - t0
            print(f"checkpoint: {_size(size)} in {s:.1f} s ({size / 1e6 / max(s, 1e-6):.0f} MB/s, hashes included) in "
                  f"{os.path.join(output_dir, 'checkpoint')} (one is kept, plus the one being written)")
    accelerator.wait_for_everyone()
    _RUN["last_save"] = time.monotonic()
    if why == "preempted":
        accelerator.print(f"{_RUN['signal'] or 'a signal on another process'}: checkpoint at step {state.get('step')} in "
                          f"{output_dir}; exiting {EXIT_RESUME}: rerun the same command with --resume", flush=True)
        sys.exit(EXIT_RESUME)


def _shared_hashes(accelerator: Accelerator | None, paths: list[str], sizes: list[int]) -> list[str]:
    """CRC-32 of `paths` (the same list on every process), each process hashing a share (the largest files dealt round
    the processes in turn): a sharded checkpoint is hashed at every process's disk speed at once. All get all."""
    world = accelerator.num_processes if accelerator else 1
    if world == 1:
        return file_hashes(paths)
    mine = sorted(range(len(paths)), key=lambda i: -sizes[i])[accelerator.process_index::world]
    shares = gather_object([dict(zip(mine, file_hashes([paths[i] for i in mine])))])  # one dict per process
    found = {i: h for share in shares for i, h in share.items()}
    return [found[i] for i in range(len(paths))]


_size = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _rotate_checkpoints(output_dir: str) -> None:
    """checkpoint.tmp (complete) becomes checkpoint/, the old one goes to checkpoint.old and is removed. Whatever a kill
    leaves holds a checkpoint that verifies (checkpoint/; checkpoint.old/ and checkpoint.tmp/; checkpoint.tmp/). A
    leftover checkpoint.old is older than checkpoint.tmp and is removed first (renaming onto a full folder fails)."""
    final, tmp, old = (os.path.join(output_dir, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    failpoint("checkpoint.rotate.between_renames")
    os.replace(tmp, final)
    failpoint("checkpoint.rotate.after_rename")
    if os.path.exists(old):
        if first := min((os.path.join(d, f) for d, _, names in os.walk(old) for f in names), default=None):
            os.remove(first)  # removing a folder is not atomic: rmtree removes file by file
        failpoint("checkpoint.rotate.removing_old")
        shutil.rmtree(old)


def checkpoint_path(output_dir: str, hashes: bool = True, quiet: bool = False, accelerator=None) -> str | None:
    """The newest of CHECKPOINTS in `output_dir` that verifies (sizes, then CRC-32 if `hashes`), None if none is
    complete; a damaged newest is named and an older one used; ArgumentError if none verifies. With `accelerator`, on
    every process: the main one reads the folder, each hashes a share (`_shared_hashes`), all decide alike."""
    def candidates() -> list[tuple]:  # (step, path, files, problem found without hashing), newest first
        found = []
        for path in (os.path.join(output_dir, n) for n in CHECKPOINTS):
            if not os.path.isfile(manifest := os.path.join(path, "trainer_state.json")):
                continue
            try:
                with open(manifest) as f:
                    state = json.load(f)
                found.append((state.get("step", 0), path, state.get("files", {}), None))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                found.append((-1, path, {}, f"{manifest} is damaged ({e})"))
        return [(st, p, fs, pr or _size_problem(p, fs)) for st, p, fs, pr in sorted(found, key=lambda f: -f[0])]

    problems = []
    for step, path, files, problem in on_main(accelerator, candidates) if accelerator else candidates():
        crcs = {os.path.join(path, rel): w for rel, w in files.items() if isinstance(w, dict)} if hashes else {}
        found = _shared_hashes(accelerator, list(crcs), [w["bytes"] for w in crcs.values()]) if not problem else []
        problem = problem or next((f"{file} does not match the CRC-32 saved with it: the checkpoint is damaged"
                                   for (file, w), h in zip(crcs.items(), found) if h != w["crc32"]), None)
        if problem is None:
            if problems and not quiet:
                print(f"--resume: {problems[0]}; falling back to {path} (step {step}), which verifies", file=sys.stderr)
            return path
        problems.append(problem)
    if problems:
        raise ArgumentError(f"--resume: {'; '.join(problems)}")
    return None


def _size_problem(path: str, files: dict) -> str | None:
    for rel, want in files.items():
        file, size = os.path.join(path, rel), want if isinstance(want, int) else want["bytes"]
        if not os.path.isfile(file):
            return f"the checkpoint is incomplete: {file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, {size} when it was saved: the checkpoint is damaged"
    return None


def load_checkpoint(accelerator: Accelerator, output_dir: str) -> dict | None:
    """Restore the newest checkpoint that verifies; its trainer state (step, epoch, batch, results), or None: the run
    stopped before its first one and starts again in place. metrics.jsonl and results.json are cut back to it."""
    state, path = None, checkpoint_path(output_dir, accelerator=accelerator, quiet=not accelerator.is_main_process)
    if path is None:
        accelerator.print(f"--resume: {output_dir} has no checkpoint yet (the run stopped before its first save): "
                          "starting fresh in place")
    else:
        try:
            accelerator.load_state(path)
        except Exception as e:
            raise RuntimeError(f"--resume: the checkpoint in {path} cannot be loaded: {type(e).__name__}: {e}") from e
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        accelerator.print(f"resumed from {path} at step {state['step']}")
    if accelerator.is_main_process:
        if path == os.path.join(output_dir, "checkpoint"):  # the others are older or partial
            for name in ("checkpoint.old", "checkpoint.tmp"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        _truncate_metrics(os.path.join(output_dir, "metrics.jsonl"), state["step"] if state else 0)
        if os.path.exists(results := os.path.join(output_dir, "results.json")):  # results after the checkpoint: gone
            write_json_atomic(results, state["results"]) if state else os.remove(results)
    accelerator.wait_for_everyone()
    return state


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (the resumed run logs the later ones again); drop a cut-off line."""
    def kept(line: str) -> bool:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return json.loads(line)["step"] <= step
        return False

    if os.path.exists(path):
        with open(path) as f:
            write_atomic(path, [line for line in f if kept(line)])


def disk_preflight(name: str, terms: dict, config: dict, precision: str, lora_r: int, epochs: int, folder: str,
                   free_bytes: int, skip: bool) -> str:
    """The disk --output_dir needs for what trains (`terms`): two checkpoints (the kept one and the one being written;
    12 bytes per trained parameter: fp32 weights and Adam's two moments; LoRA: the frozen base) and the saved models
    (each epoch's policy, a value network) in the load dtype. ArgumentError if `free_bytes` is less, unless `skip`."""
    params, nets, w = param_count(config)[0], terms.get("networks", 1), 2 if precision == "bf16" else 4
    checkpoint, models = nets * params * (w if lora_r else 12), max(epochs, 1) + nets - 1
    need = 2 * checkpoint + models * w * params
    text = (f"{folder} needs {_size(need)} (2 checkpoints of {_size(checkpoint)}, {models} saved model"
            f"{'s' * (models > 1)} of {_size(w * params)}) and has {_size(free_bytes)} free")
    if need <= free_bytes or skip:
        return f"disk: {text}" + ("" if need <= free_bytes else " (too little: --skip_memory_check)")
    raise ArgumentError(f"{name}: --output_dir {text}: free some space or choose another --output_dir; "
                        "--skip_memory_check runs it anyway")


def save_model(accelerator: Accelerator, model, tokenizer, path: str, final: bool = True) -> None:
    """save_pretrained (safetensors, tokenizer included), consolidated, in the model's load dtype (`load_dtype`), to
    `path`.tmp-PID renamed into place. A final save merges LoRA (`merge_lora`), so the format is the same with or
    without --lora_r; a save during training (`final=False`) writes a LoRA model's adapters and leaves the model."""
    accelerator.wait_for_everyone()
    state_dict, unwrapped = full_state_dict(accelerator, model), accelerator.unwrap_model(model)
    dtype = load_dtype(unwrapped)
    merged = merge_lora(unwrapped) if final else None  # on every process, so that all keep the same model after the save
    if merged is not None:  # LoRA: save the merged model, loadable without peft (the state dict has adapter keys)
        unwrapped, state_dict = merged, None
    if accelerator.is_main_process:
        state_dict = unwrapped.state_dict() if state_dict is None else state_dict
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp, cleanup=tmp, consequence=_what_is_lost(path)):
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if dtype is not None:  # save_pretrained records the parameters' dtype (fp32 masters), not the tensors'
                getattr(unwrapped, "backbone", unwrapped).config.dtype = dtype
                with open(os.path.join(tmp, "config.json")) as f:
                    config = json.load(f)
                with open(os.path.join(tmp, "config.json"), "w") as f:  # in the temp folder: atomic with it
                    json.dump(dict(config, dtype=str(dtype).removeprefix("torch.")), f, indent=2, sort_keys=True)
            failpoint("model.save.partial")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            failpoint("model.save.before_rename")
            if os.path.exists(path):  # a model left by an interrupted final save of this run: replaced
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        failpoint("model.save.after_rename")
    accelerator.wait_for_everyone()


def load_dtype(model) -> torch.dtype | None:
    """The dtype a model (a value model: its backbone) was loaded in, from its config (kept when training upcasts)."""
    dtype = getattr(getattr(getattr(model, "backbone", model), "config", None), "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _what_is_lost(path: str) -> str:
    """For a failed save of `path`: what is lost, and what a rerun can resume from."""
    output_dir, steps = os.path.dirname(os.path.abspath(path)), []
    for folder in (os.path.join(output_dir, name) for name in CHECKPOINTS):
        with contextlib.suppress(OSError, ValueError, KeyError), open(os.path.join(folder, "trainer_state.json")) as f:
            steps.append((json.load(f)["step"], folder))
    kept = (f"the checkpoint at step {max(steps)[0]} ({max(steps)[1]}) is intact: free some space and rerun with --resume "
            "to go on from there" if steps else "there is no checkpoint (--save_every 0, or none saved yet): the training "
            "of this run is lost; rerun with --resume to train again in place")
    return f"{path} was not saved (nothing half-written was kept); {kept}"
