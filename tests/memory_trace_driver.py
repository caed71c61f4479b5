"""Run by tests/test_memory_trace.py: each algorithm script's OWN training loop, measured on real tensors by the memory
trace's tracker, for comparison with the fake-tensor trace (benchmarks/memory_trace.py), whose micro-batch is a copy of
those loops. Under the shipped FSDP2 launch on 2 CPU processes:

    accelerate launch --config_file configs/fsdp.yaml --num_processes 2 tests/fsdp_cpu_shim.py \\
        tests/memory_trace_driver.py OUT_DIR rs dpo kto dro dqo spo

Each named script runs as a user starts it (its `main`, through runpy, with the flags of `flags`), one after another
in the same two processes (imports paid once). Nothing of a script is copied or edited: before they start, some of
common's functions that they import are replaced:
  - `build_offline_dataset` returns `rows()` (SETTINGS' lengths, every row full length) and `evaluate_reference`
    nothing: no sampling before training;
  - `setup_accelerator` first waits for every process (from the second script on), as a fresh launch's processes
    meet when the process group starts: after each checked the output dir, before the main one writes there;
  - `iterate_batches`: the script's first micro-batch (from collating its rows to the backward; the first of
    SETTINGS' grad_accum, so no optimizer step) runs under benchmarks/memory_trace.py's tracker, on the script's prepared
    networks, optimizers and frozen copies (`frozen_copy`, recorded). Its last row is a token shorter: the batch is
    padded as real batches are, which is what the trace assumes (it cannot read the attention mask, so it builds the
    causal mask a padded batch needs). Then the run stops;
  - after the first script's micro-batch, the same tracker measures `common.generate_batch` (the scripts' generation,
    which the trace's `decode` stands in for) of gen_batch_size prompts for max_new_tokens, every row to the end
    (`stop_token_ids` gives an id the model cannot sample), and `common.score_rows` on the trace's score chunk, both
    under `unsharded` as the trace's "generate" and "score" steps.
Rank 0 writes OUT_DIR/real.json: {algo: {"start", "peak", "end"}, "generate": {"start", "peak"}, "score": ...}, each
{category: bytes}.

    python tests/memory_trace_driver.py --fake OUT_DIR rs dpo kto dro dqo spo

writes OUT_DIR/fake.json, the same measures from the fake-tensor trace at the same sizes (`fake`).
"""

import json
import os
import runpy
import sys
from types import SimpleNamespace

import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import runtime.launch  # noqa: E402
import runtime.sharding  # noqa: E402
from benchmarks import memory_trace as mt  # noqa: E402

# The fake trace runs at the same sizes (tests/test_memory_trace.py): the tiny model's own architecture, a micro-batch
# long enough that activations and attention, not weights, make most of its peak, and short prompts with long
# responses, so that the KV cache makes most of a generate call's peak, as at 7B (not the prompt's forward pass)
SETTINGS = dict(world=2, per_device_batch_size=8, grad_accum=2, prompt_tokens=16, max_new_tokens=80, gen_batch_size=32)
OVERRIDES = {"spo": {"online_fraction": 0.0}}  # SPO's offline micro-batch: its online rollouts are the "rollout" step
with open(os.path.join(common.TINY_SHIPPED, "config.json")) as f:
    TINY_CONFIG = json.load(f)


class Measured(Exception):
    """Stops a script once its micro-batch is measured."""


def rows() -> list[dict]:
    """16 prompts x 4 responses of SETTINGS' lengths, correct and incorrect alternating (DPO pairs them, RS keeps the
    correct ones), with every field a script reads from the offline dataset."""
    p, n = SETTINGS["prompt_tokens"], SETTINGS["max_new_tokens"]
    return [dict(prompt_idx=i // 4, prompt_ids=[5] * p, response_ids=[6] * n, ref_logps=[-1.0] * n, sampler_logps=[-1.0] * n,
                 reward=float(i % 2), truncated=False, answer="0", response="") for i in range(64)]


def shorter(row: dict) -> dict:
    """The row with its response a token shorter (and every per-token field with it)."""
    n = len(row["response_ids"])
    return {k: v[:-1] if isinstance(v, list) and len(v) == n else v for k, v in row.items()}


def flags(algo: str, output_dir: str) -> list[str]:
    return ["--output_dir", output_dir, "--cache_dir", os.path.join(output_dir, "cache"), "--report_to", "", "--save_every",
            "0", "--max_steps", "1", "--n_train_prompts", "16", "--n_test", "4", "--per_device_batch_size",
            str(SETTINGS["per_device_batch_size"]), "--grad_accum", str(SETTINGS["grad_accum"])] + [
            f"--{k}={v}" for k, v in OVERRIDES.get(algo, {}).items()]


def fake(algos: list[str]) -> dict:
    """The trace (fake tensors, one process standing for rank 0 of SETTINGS' world) of each algorithm's first
    micro-batch, and of the first one's "generate" and "score" steps, at the sizes `main` runs the scripts at."""
    out = {}
    for algo in algos:
        steps = ("train", "generate", "score") if not out else ("train",)
        result = mt.trace(algo, config=TINY_CONFIG, steps=steps, overrides=OVERRIDES.get(algo), traced_micro_batches=1,
                          **SETTINGS)
        out[algo] = result["first_micro_batch"]
        for step in ("generate", "score"):
            if step in result["steps"]:
                out[step] = {"start": {"Total": result["steps"][step]["start"]}, "peak": result["steps"][step]["breakdown"]}
    return out


def main():
    if sys.argv[1] == "--fake":
        with open(os.path.join(sys.argv[2], "fake.json"), "w") as f:
            json.dump(fake(sys.argv[3:]), f)
        return
    out_dir, algos = sys.argv[1], sys.argv[2:]
    iterate_batches, frozen_copy = common.iterate_batches, common.frozen_copy
    setup_accelerator = runtime.launch.setup_accelerator
    frozen, result = [], {}

    def synced_setup_accelerator(*args, **kwargs):
        # A launch's processes meet when the process group starts, after each checked the output dir (validate_args)
        # and before the main one writes run.json there. From the second script on the group exists: meet here instead
        if dist.is_initialized():
            dist.barrier()
        return setup_accelerator(*args, **kwargs)

    def recorded_frozen_copy(*args, **kwargs):
        frozen.append(frozen_copy(*args, **kwargs))
        return frozen[-1]

    def measured_batches(examples, per_device_batch_size, grad_accum, seed, epoch, accelerator, start=0):
        batches = iterate_batches(examples, per_device_batch_size, grad_accum, seed, epoch, accelerator, start)
        b, batch_rows = next(batches)
        last = [*batch_rows[-1][:-1], shorter(batch_rows[-1][-1])] if isinstance(batch_rows[-1], list) else shorter(
            batch_rows[-1])  # DPO's rows are [chosen, rejected] pairs
        trained = list(accelerator._models)  # what `prepare` wrapped, in order: the policy first
        tracker = mt.make_tracker(trained, [SimpleNamespace(opt=o.optimizer) for o in accelerator._optimizers], frozen)
        tracker.__enter__()
        mt.begin_step(tracker)
        start_bytes = mt.snapshot(tracker, "current")
        yield b, batch_rows[:-1] + [last]
        result[algo] = dict(start=start_bytes, peak=mt.snapshot(tracker), end=mt.snapshot(tracker, "current"))
        assert all(p.grad is not None for m in trained for p in m.parameters()), f"{algo}.py: no backward in its micro-batch"
        if "generate" not in result:
            generate_and_score(algo, trained[0], tracker)
        tracker.__exit__(None, None, None)
        raise Measured

    def generate_and_score(algo, model, tracker):
        s = mt.paper_settings(algo)  # the sampling and score chunk of the trace of `algo`
        sampling = dict(temperature=s["args"].temperature, top_p=s["args"].top_p, top_k=s["args"].top_k)
        p, n, gen = SETTINGS["prompt_tokens"], SETTINGS["max_new_tokens"], SETTINGS["gen_batch_size"]
        prompts = [[5] * p] * (gen - 1) + [[5] * (p - 1)]  # one shorter: left-padded, as a batch of questions is
        tokenizer = SimpleNamespace(pad_token_id=0, decode=lambda ids, **kw: "")
        stop_token_ids = common.stop_token_ids
        common.stop_token_ids = lambda model, tokenizer: {TINY_CONFIG["vocab_size"] + 1}  # never sampled
        try:
            mt.begin_step(tracker)
            start_bytes = mt.snapshot(tracker, "current")
            with runtime.sharding.unsharded(model) as policy, common.reference_mode(policy):
                outs = common.generate_batch(policy, tokenizer, prompts, max_new_tokens=n, **sampling)
            assert all(len(o["response_ids"]) == n for o in outs)
            result["generate"] = dict(start=start_bytes, peak=mt.snapshot(tracker))
        finally:
            common.stop_token_ids = stop_token_ids
        chunk = max(1, gen // s["n_samples"]) * s["n_samples"]
        chunk_rows = rows()[: chunk - 1] + [shorter(rows()[0])]  # padded, as above
        mt.begin_step(tracker)
        start_bytes = mt.snapshot(tracker, "current")
        with runtime.sharding.unsharded(model) as policy, common.reference_mode(policy):
            common.score_rows(policy, chunk_rows, 0, warp=sampling)
        result["score"] = dict(start=start_bytes, peak=mt.snapshot(tracker))

    common.build_offline_dataset = lambda *args, **kwargs: rows()
    common.evaluate_reference = lambda *args, **kwargs: {}
    common.iterate_batches, common.frozen_copy = measured_batches, recorded_frozen_copy
    runtime.launch.setup_accelerator = synced_setup_accelerator  # what runtime.launch.start calls
    for algo in algos:
        frozen.clear()
        sys.argv = [os.path.join(ROOT, f"{algo}.py"), *flags(algo, os.path.join(out_dir, algo))]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except Measured:
            pass
        else:
            raise AssertionError(f"{algo}.py ended without training a micro-batch")
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "real.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
