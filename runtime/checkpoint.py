"""Checkpoints and resume, and saving models: every save is atomic (written aside, renamed into place) and verified
(sizes and CRC-32 in its manifest), so a kill at any point leaves a checkpoint that loads."""

import contextlib
import json
import logging
import os
import shutil
import sys

import torch
from accelerate import Accelerator

from common import merge_lora
from runtime.cli import ArgumentError
from runtime.files import failpoint, file_hashes, on_main, write_atomic, write_json_atomic, writing
from runtime.sharding import full_state_dict

CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")  # the current one, the one before, the one being saved

# accelerate's "Removed shared tensor {'lm_head.weight'} while saving", at each checkpoint, says nothing a user can act
# on: a tied output projection (the tiny model's, Gemma's) is stored once on purpose and tied again on load
logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: dict) -> None:
    """Atomic: accelerate's state (models, optimizers, registered schedulers, RNG) plus `state` goes to checkpoint.tmp,
    which becomes checkpoint/ only when complete. trainer_state.json, written last, lists every file's size and CRC-32:
    a folder without it was cut off and is never loaded. One checkpoint is kept, plus the one being written
    (`_rotate_checkpoints`). The first save prints the size."""
    tmp = os.path.join(output_dir, "checkpoint.tmp")
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
    accelerator.wait_for_everyone()  # every process has written its part (shards, its own RNG state) before the rename
    if accelerator.is_main_process:
        failpoint("checkpoint.save.before_manifest")
        paths = sorted(os.path.join(d, f) for d, _, names in os.walk(tmp) for f in names)
        files = {os.path.relpath(p, tmp): {"bytes": os.path.getsize(p), "crc32": h} for p, h in zip(paths, file_hashes(paths))}
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), dict(state, files=files))
        failpoint("checkpoint.save.after_manifest")
        with writing(output_dir, consequence="The checkpoint rotation failed; --resume picks the newest one that verifies"):
            _rotate_checkpoints(output_dir)
        if output_dir not in _SIZES_PRINTED:
            _SIZES_PRINTED.add(output_dir)
            size = sum(f["bytes"] for f in files.values())
            print(f"checkpoint: {size / 1e9:.2f} GB" if size >= 1e9 else f"checkpoint: {size / 1e6:.1f} MB",
                  f"in {os.path.join(output_dir, 'checkpoint')} (one is kept, plus the one being written)")
    accelerator.wait_for_everyone()


_SIZES_PRINTED: set[str] = set()


def _rotate_checkpoints(output_dir: str) -> None:
    """checkpoint.tmp (complete) becomes checkpoint/, the old checkpoint/ goes to checkpoint.old and is removed. Every
    state a kill can leave holds a checkpoint that verifies: checkpoint/; or checkpoint.old/ and the complete
    checkpoint.tmp/; or the complete checkpoint.tmp/ alone. A leftover checkpoint.old (complete or partly removed) is
    older than checkpoint.tmp and is removed first: renaming onto a folder that is not empty fails."""
    final, tmp, old = (os.path.join(output_dir, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    failpoint("checkpoint.rotate.between_renames")
    os.replace(tmp, final)
    failpoint("checkpoint.rotate.after_rename")
    if os.path.exists(old):
        first = min((os.path.join(d, f) for d, _, names in os.walk(old) for f in names), default=None)
        if first:  # removing a folder is not atomic: rmtree removes file by file
            os.remove(first)
        failpoint("checkpoint.rotate.removing_old")
        shutil.rmtree(old)


def _checkpoint_problem(path: str, files: dict, hashes: bool) -> str | None:
    """Why the checkpoint at `path` cannot be loaded (a file it lists is missing, or has another size or CRC-32), or
    None if it verifies. `hashes=False` checks sizes only (quick: at argument validation)."""
    for rel, want in files.items():
        file = os.path.join(path, rel)
        size = want if isinstance(want, int) else want["bytes"]
        if not os.path.isfile(file):
            return f"the checkpoint is incomplete: {file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, {size} when it was saved: the checkpoint is damaged"
    crcs = {os.path.join(path, rel): want["crc32"] for rel, want in files.items() if hashes and isinstance(want, dict)}
    for file, crc, found in zip(crcs, crcs.values(), file_hashes(list(crcs))):
        if found != crc:
            return f"{file} does not match the CRC-32 saved with it: the checkpoint is damaged"
    return None


def checkpoint_path(output_dir: str, hashes: bool = True, quiet: bool = False) -> str | None:
    """The newest checkpoint in `output_dir` that verifies (`_checkpoint_problem`): checkpoint/, or after a cut-off save or
    rotation checkpoint.tmp/ or checkpoint.old/; None if none is complete. A damaged newest is named and an older one
    used; ArgumentError if none verifies."""
    found = []
    for name in CHECKPOINTS:
        path = os.path.join(output_dir, name)
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            continue
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                state = json.load(f)
            found.append((state.get("step", 0), path, state.get("files", {}), None))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            found.append((-1, path, {}, f"{os.path.join(path, 'trainer_state.json')} is damaged ({e})"))
    problems = []
    for step, path, files, problem in sorted(found, key=lambda f: -f[0]):  # stable: checkpoint/ first among equals
        problem = problem or _checkpoint_problem(path, files, hashes)
        if problem is None:
            if problems and not quiet:
                print(f"--resume: {problems[0]}; falling back to {path} (step {step}), which verifies", file=sys.stderr)
            return path
        problems.append(problem)
    if problems:
        raise ArgumentError(f"--resume: {'; '.join(problems)}")
    return None


def load_checkpoint(accelerator: Accelerator, output_dir: str) -> dict | None:
    """Restore the newest checkpoint that verifies (decided on the main process). Returns its trainer state (step, epoch,
    batch, results), or None if the run stopped before its first checkpoint: it starts again in place. metrics.jsonl is
    cut back to the checkpoint's step, so every step is logged once."""
    def find() -> tuple[str | None, str | None]:  # (path, error)
        try:
            return checkpoint_path(output_dir), None
        except ArgumentError as e:
            return None, str(e.code)

    path, error = on_main(accelerator, find)  # decided once, so every process loads the same one
    if error:
        raise ArgumentError(error.removeprefix("error: "))
    state = None
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
    if accelerator.is_main_process and path == os.path.join(output_dir, "checkpoint"):  # the others are older or partial
        for name in ("checkpoint.old", "checkpoint.tmp"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if accelerator.is_main_process:
        _truncate_metrics(os.path.join(output_dir, "metrics.jsonl"), state["step"] if state else 0)
        if os.path.exists(results := os.path.join(output_dir, "results.json")):  # results after the checkpoint: gone
            write_json_atomic(results, state["results"]) if state else os.remove(results)
    accelerator.wait_for_everyone()
    return state


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (a killed run logged the steps after its checkpoint, which the
    resumed run logs again), and drop a line cut off by the kill."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(line)["step"] <= step:
                    keep.append(line)
    write_atomic(path, keep)


def save_model(accelerator: Accelerator, model, tokenizer, path: str, final: bool = True) -> None:
    """save_pretrained (safetensors, tokenizer included), consolidated across processes, in the model's load dtype
    (`load_dtype`: bf16 for a bf16 hub model trained over fp32 masters). Atomic: written to `path`.tmp-PID and renamed
    into place. The final save of a LoRA model merges it first (`merge_lora`), so the format is the same with or without
    --lora_r; a save during training (`final=False`) writes a LoRA model's adapters and leaves the model as it is."""
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    dtype = load_dtype(unwrapped)
    merged = merge_lora(unwrapped) if final else None  # on every process, so that all keep the same model after the save
    if merged is not None:  # LoRA: save the merged model, loadable without peft (the state dict has adapter keys)
        unwrapped, state_dict = merged, None
    if accelerator.is_main_process:
        state_dict = unwrapped.state_dict() if state_dict is None else state_dict
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp, cleanup=tmp, consequence=_what_is_lost(path)):
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if dtype is not None:  # save_pretrained records the parameters' dtype (fp32 masters), not the tensors'
                _set_config_dtype(unwrapped, tmp, dtype)
            failpoint("model.save.partial")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            failpoint("model.save.before_rename")
            if os.path.exists(path):  # a model left by an interrupted final save of this run: replaced
                os.replace(path, f"{path}.old.tmp-{os.getpid()}")
            os.replace(tmp, path)
            shutil.rmtree(f"{path}.old.tmp-{os.getpid()}", ignore_errors=True)
        failpoint("model.save.after_rename")
    accelerator.wait_for_everyone()


def load_dtype(model) -> torch.dtype | None:
    """The dtype a model was loaded in: its config's (for a value model, its backbone's), which stays when training
    upcasts the weights to fp32; None if the config does not say."""
    config = getattr(getattr(model, "backbone", model), "config", None)
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _set_config_dtype(model, path: str, dtype: torch.dtype) -> None:
    """Record `dtype` in the saved config.json and in the live config (save_pretrained set both to the weights' dtype)."""
    getattr(model, "backbone", model).config.dtype = dtype
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:  # in the temp folder: atomic with it
        json.dump(dict(config, dtype=str(dtype).removeprefix("torch.")), f, indent=2, sort_keys=True)


def _what_is_lost(path: str) -> str:
    """For a failed save of `path`: what is lost, and what a rerun can resume from."""
    output_dir = os.path.dirname(os.path.abspath(path))
    steps = []
    for name in CHECKPOINTS:
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(os.path.join(output_dir, name, "trainer_state.json")) as f:
                steps.append((json.load(f)["step"], os.path.join(output_dir, name)))
    kept = (f"the checkpoint at step {max(steps)[0]} ({max(steps)[1]}) is intact: free some space and rerun with --resume "
            "to go on from there" if steps else "there is no checkpoint (--save_every 0, or none saved yet): the training "
            "of this run is lost; rerun with --resume to train again in place")
    return f"{path} was not saved (nothing half-written was kept); {kept}"
