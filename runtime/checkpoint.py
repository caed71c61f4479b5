"""Checkpoints, resume, preemption and saved models: every save is written aside, verified (sizes and CRC-32 in a
manifest) and renamed into place, so a kill at any point leaves one that loads; a signal checkpoints and exits EXIT_RESUME."""

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
from tqdm.auto import tqdm

from common import merge_lora
from runtime.cli import ArgumentError
from runtime.files import failpoint, file_hashes, on_main, read_json, write_atomic, write_json_atomic, writing
from runtime.memory import param_count
from runtime.sharding import full_state_dict

CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")  # the current one, the one before, the one being saved
EXIT_RESUME = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal after a checkpoint (or before training): --resume me
_RUN = {"signal": None, "training": False, "last_save": 0.0, "sizes_printed": set()}
# accelerate's "Removed shared tensor" warning: a tied output projection is stored once on purpose and tied again on load
logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())
_size = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def stop_on_signals() -> None:
    """SIGTERM and SIGUSR1 stop at the next optimizer step; before training they exit at once (the rest is cached)."""
    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if not _RUN["training"]:
            print(f"{name} before training began: exiting {EXIT_RESUME}; rerun with --resume", file=sys.stderr, flush=True)
            sys.exit(EXIT_RESUME)
        if _RUN["signal"] is None:
            print(f"\n{name}: checkpointing after this optimizer step, then exiting {EXIT_RESUME}", file=sys.stderr,
                  flush=True)  # on a line of its own, not after the progress bar
        _RUN["signal"] = name

    _RUN.update(signal=None, training=False)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)


def checkpoint_due(accelerator: Accelerator, args, step: int) -> str | None:
    """"preempted" (a signal on any process), "cadence" (--save_every, --save_every_minutes) or None; alike everywhere."""
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
    """accelerate's state plus `state` to checkpoint.tmp, its manifest (each file's size and CRC-32), then renamed
    checkpoint/. The first save prints its size and rate. `why` "preempted": then exit EXIT_RESUME."""
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
        if output_dir not in _RUN["sizes_printed"]:
            _RUN["sizes_printed"].add(output_dir)
            size, s = sum(sizes), time.monotonic() - t0
            tqdm.write(f"checkpoint: {_size(size)} in {s:.1f} s ({size / 1e6 / max(s, 1e-6):.0f} MB/s, hashes included) in "
                       f"{os.path.join(output_dir, 'checkpoint')} (one is kept, plus the one being written)")  # not in the bar
    accelerator.wait_for_everyone()
    _RUN["last_save"] = time.monotonic()
    if why == "preempted":
        accelerator.print(f"\n{_RUN['signal'] or 'a signal on another process'}: checkpoint at step {state.get('step')} in "
                          f"{output_dir}; exiting {EXIT_RESUME}: rerun the same command with --resume", flush=True)
        sys.exit(EXIT_RESUME)


def _shared_hashes(accelerator: Accelerator | None, paths: list[str], sizes: list[int]) -> list[str]:
    """CRC-32 of `paths`, the largest files dealt round the processes: all hash at once, all get all."""
    world = accelerator.num_processes if accelerator else 1
    if world == 1:
        return file_hashes(paths)
    mine = sorted(range(len(paths)), key=lambda i: -sizes[i])[accelerator.process_index::world]
    found = {i: h for share in gather_object([dict(zip(mine, file_hashes([paths[i] for i in mine])))])
             for i, h in share.items()}
    return [found[i] for i in range(len(paths))]


def _rotate_checkpoints(output_dir: str) -> None:
    """checkpoint.tmp becomes checkpoint/, the old one goes; whatever a kill leaves holds one that verifies."""
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


def _manifests(output_dir: str) -> list[tuple]:
    """(step, folder, files, problem found without hashing) of each of CHECKPOINTS with a manifest, newest first."""
    found = []
    for path in (os.path.join(output_dir, n) for n in CHECKPOINTS):
        if os.path.isfile(manifest := os.path.join(path, "trainer_state.json")):
            try:
                with open(manifest) as f:
                    state = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                found.append((-1, path, {}, f"{manifest} is damaged ({e})"))
                continue
            files, problem = state.get("files", {}), None
            for rel, w in files.items():
                file, size = os.path.join(path, rel), w if isinstance(w, int) else w["bytes"]
                if not os.path.isfile(file) or os.path.getsize(file) != size:
                    problem = (f"{file} has {os.path.getsize(file)} bytes, {size} when it was saved: the checkpoint is "
                               "damaged" if os.path.isfile(file) else f"the checkpoint is incomplete: {file} is missing")
                    break
            found.append((state.get("step", 0), path, files, problem))
    return sorted(found, key=lambda f: -f[0])


def checkpoint_path(output_dir: str, hashes: bool = True, quiet: bool = False, accelerator=None) -> str | None:
    """The newest of CHECKPOINTS that verifies (sizes, CRC-32 if `hashes`); None if none has a manifest, ArgumentError if
    none verifies. With `accelerator`, on every process alike."""
    problems = []
    for step, path, files, problem in on_main(accelerator, lambda: _manifests(output_dir)) if accelerator else _manifests(
            output_dir):
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


def load_checkpoint(accelerator: Accelerator, output_dir: str) -> dict | None:
    """Restore the newest checkpoint that verifies and return its trainer state (None: none yet, start in place);
    metrics.jsonl and results.json are cut back to it."""
    state, path = None, checkpoint_path(output_dir, accelerator=accelerator, quiet=not accelerator.is_main_process)
    if path is None:
        accelerator.print(f"--resume: {output_dir} has no checkpoint yet (the run stopped before its first save): "
                          "starting fresh in place")
    else:
        try:
            accelerator.load_state(path)
        except Exception as e:
            raise RuntimeError(f"--resume: the checkpoint in {path} cannot be loaded: {type(e).__name__}: {e}") from e
        state = read_json(os.path.join(path, "trainer_state.json"))
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
    """Two checkpoints (12 bytes per trained parameter; LoRA: the base) and the saved models fit `free_bytes`, or raise."""
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
    """save_pretrained, consolidated, in the load dtype, via `path`.tmp-PID renamed; a final save merges LoRA (`final=False`
    saves adapters)."""
    accelerator.wait_for_everyone()
    state_dict, unwrapped = full_state_dict(accelerator, model), accelerator.unwrap_model(model)
    dtype = load_dtype(unwrapped)
    if (merged := merge_lora(unwrapped) if final else None) is not None:  # on every process, so all keep the same model
        unwrapped, state_dict = merged, None  # loadable without peft (the state dict has adapter keys)
    if accelerator.is_main_process:
        state_dict = unwrapped.state_dict() if state_dict is None else state_dict
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        steps = [(s, p) for s, p, _, _ in _manifests(os.path.dirname(os.path.abspath(path))) if s >= 0]
        kept = (f"the checkpoint at step {steps[0][0]} ({steps[0][1]}) is intact: free some space and rerun with --resume "
                "to go on from there" if steps else "there is no checkpoint (--save_every 0, or none saved yet): the "
                "training of this run is lost; rerun with --resume to train again in place")
        with writing(tmp, cleanup=tmp, consequence=f"{path} was not saved (nothing half-written was kept); {kept}"):
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if dtype is not None:  # save_pretrained records the parameters' dtype (fp32 masters), not the tensors'
                getattr(unwrapped, "backbone", unwrapped).config.dtype = dtype
                config = read_json(os.path.join(tmp, "config.json"))
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
