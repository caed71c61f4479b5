"""Runs algorithm scripts' real main() and records what each hands its loss, for tests/test_wiring.py.

    python tests/wiring_driver.py RUNS.json      # [{"record": "a.pt", "argv": ["dqo.py", "--cache_dir", ...]}, ...]

The scripts are imported once (transformers' optimization module, which they import, costs seconds of CPU), then each
run goes in a forked child of its own, as tests/warm_runner.py runs scripts, its output in RECORD.log; this process
exits 1 if any run failed. In the child the script's module has its globals wrapped before main() runs: Python looks
names up in a module's globals when a function runs, so main() calls the wrappers, which call the real functions and
note what went in and out. Nothing in the script changes. What is recorded (torch.save, read back with weights_only=True):
    calls:   one entry per loss call: `args`, the loss's arguments bound BY NAME (inspect.signature), so a later change of
             their order does not break the tests; `collate`, the rows each collate() call since the previous loss call
             was given and the tensors it made; `logprobs`, token_logprobs' outputs; `values`, the value model's (B, T)
             outputs; `metrics`, what the loss returned.
    offline: the offline dataset as build_offline_dataset returned it, each row tagged with its index `_row` (the tag
             travels with the rows into batches, so a test can find each batch row's source row).
    examples: the `_row` tags (None for a row without one) of the examples main() hands iterate_batches first: its
             training set.
    q0_extra: SPO's extra reference samples for Ŝ_0 (--q0_samples), the second build_offline_dataset call.
    clips:   each accelerator.clip_grad_norm_ call: the number of parameters and max_norm.
    scores:  DQO's process scores (build_process_scores), in offline-row order; absent without --process_rewards.
The evaluations are replaced by stand-ins (the reference's and the trained policy's accuracy are not what is tested
here, and they cost most of a short run); everything between the data and the last optimizer step is the script's own.
"""

import atexit
import functools
import importlib
import inspect
import json
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

LOSSES = {"dqo": ["dqo_loss"], "dro": ["dro_loss"], "dpo": ["dpo_loss"], "kto": ["kto_loss"], "spo": ["spo_loss"],
          "rs": ["rs_loss"]}


def plain(x):
    """A copy of `x` that torch.load(weights_only=True) reads back: tensors detached on the CPU, containers rebuilt."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return repr(x)


def record_run(record_path: str, script: str, *flags: str) -> None:
    """Run `script`'s main() with `flags`, wrapped as the module docstring says; save the record to `record_path`."""
    name = os.path.splitext(os.path.basename(script))[0]
    module = importlib.import_module(name)
    record = {"calls": [], "offline": None, "examples": None}
    pending = {"collate": [], "logprobs": [], "values": []}  # seen since the last loss call

    def wrap(attr, after):
        real = getattr(module, attr)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            after(real, args, kwargs, out)
            return out

        setattr(module, attr, wrapper)

    def on_loss(real, args, kwargs, out):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        metrics = out[-1]  # every loss returns its loss(es), then its metrics
        record["calls"].append(dict(args=plain(dict(bound.arguments)), metrics=plain(metrics), **plain(pending)))
        for v in pending.values():
            v.clear()

    for loss in LOSSES[name]:
        wrap(loss, on_loss)
    wrap("collate", lambda real, args, kwargs, out: pending["collate"].append(dict(rows=plain(args[0]), out=plain(out))))
    wrap("token_logprobs", lambda real, args, kwargs, out: pending["logprobs"].append(plain(out)))

    def on_offline(real, args, kwargs, out):
        if record["offline"] is None:  # SPO's extra Q̂_0 samples (--q0_samples) come second
            for i, r in enumerate(out):
                r["_row"] = i
            record["offline"] = plain(out)
        else:
            record["q0_extra"] = plain(out)

    wrap("build_offline_dataset", on_offline)

    def on_batches(real, args, kwargs, out):
        if record["examples"] is None:  # main's own loop comes first (SPO's rollout windows call it again)
            record["examples"] = [r.get("_row") if isinstance(r, dict) else [p.get("_row") for p in r] for r in args[0]]

    wrap("iterate_batches", on_batches)
    if hasattr(module, "build_process_scores"):
        wrap("build_process_scores", lambda real, args, kwargs, out: record.update(scores=plain(out)))
    if hasattr(module, "ValueModel"):
        real_value_model = module.ValueModel

        def value_model(*args, **kwargs):  # the real one, with a hook that notes each forward's (B, T) output
            vm = real_value_model(*args, **kwargs)
            vm.register_forward_hook(lambda mod, inputs, out: pending["values"].append(plain(out)))
            return vm

        module.ValueModel = value_model
    # every gradient clip: which parameters (by their count) and at what norm, in call order
    import accelerate

    real_clip = accelerate.Accelerator.clip_grad_norm_

    def clip(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        record.setdefault("clips", []).append(dict(n_params=len(parameters), max_norm=max_norm))
        return real_clip(self, parameters, max_norm, *args, **kwargs)

    accelerate.Accelerator.clip_grad_norm_ = clip
    # stand-ins for the evaluations: main() still reads and logs a result of the usual shape
    module.evaluate_reference = module.evaluate_run = lambda *a, **k: {"greedy": 0.0}

    sys.argv = [script, *flags]
    module.main()
    torch.save(record, record_path)


def main():
    with open(sys.argv[1]) as f:
        runs = json.load(f)
    for name in LOSSES:  # imported before any fork, so each child starts with them; no torch op runs here
        importlib.import_module(name)
    failed = 0
    for run in runs:
        pid = os.fork()
        if pid == 0:  # the child: output to RECORD.log, exit status as a script's (atexit handlers release its locks)
            log = os.open(run["record"] + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 0
            try:
                record_run(run["record"], *run["argv"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
            except BaseException:
                traceback.print_exc()
                code = 1
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print(f"{' '.join(run['argv'][:1])}: exit {code} (output: {run['record']}.log)", flush=True)
        failed += code != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
