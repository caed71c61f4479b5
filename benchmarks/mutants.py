"""Mutation testing of the glue: plausible one-line bugs in how each script feeds its loss, and in the shared code
around it, each applied to a copy of the project; the test suite must fail on every one.

    python benchmarks/mutants.py                 # every mutant (about 1-2 min each on 2 cores when killed early)
    python benchmarks/mutants.py --only dqo_is_flags_swapped dro_value_read_moved
    python benchmarks/mutants.py --list
    python benchmarks/mutants.py --out docs/mutants.txt   # also write the report there

Each mutant replaces one exact string (it must occur exactly once in its file, or the mutant is reported stale) in a
copy of the working tree (tracked and untracked, not ignored files), then runs the README's test command, read from
.ci/run, with `-x` so a killed mutant stops at its first failing test. To get there sooner, the test files named
with the mutant are run first, with the same command; only if they pass does the whole suite run. A mutant is
"killed" when the command fails, "survived" when the whole suite passes on it. The real data is found through
SHARED_DATA, as in the project's own checkout. This is a benchmark, not part of CI: it takes tens of minutes.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, file, old, new, test files tried first). Bugs a careless edit could make, each in the glue between a script
# and its loss, in the shared data path or in the run's machinery, none in a pure loss (the loss unit tests guard those).
MUTANTS = [
    ("dqo_is_flags_swapped", "dqo.py", "not args.no_is_policy,\n                                         not args.no_is_value",
     "not args.no_is_value,\n                                         not args.no_is_policy", ["tests/test_wiring.py"]),
    ("dqo_behavior_ignored", "dqo.py", 'behavior_logps=r[f"{args.behavior}_logps"]', 'behavior_logps=r["ref_logps"]',
     ["tests/test_wiring.py"]),
    ("dqo_is_clip_ignored", "dqo.py", "args.is_clip or None", "math.e", ["tests/test_wiring.py"]),
    ("dqo_lam_ignored", "dqo.py", "args.beta, args.lam,", "args.beta, 1.0,", ["tests/test_wiring.py"]),
    ("dqo_process_rewards_dropped", "dqo.py", 'token_rewards(len(r["response_ids"]), r["reward"], sc)',
     'token_rewards(len(r["response_ids"]), r["reward"], None)', ["tests/test_wiring.py"]),
    ("dqo_value_never_steps", "dqo.py", "                value_optimizer.step()\n", "", ["tests/test_dqo.py"]),
    ("dro_value_read_moved", "dro.py", "values.gather(1, mask.argmax(1, keepdim=True))",
     "values.gather(1, mask.cumsum(1).argmax(1, keepdim=True))", ["tests/test_wiring.py"]),
    ("dro_rewards_flipped", "dro.py", 'values, batch["reward"], batch["mask"]', 'values, 1 - batch["reward"], batch["mask"]',
     ["tests/test_wiring.py"]),
    ("dpo_chosen_rejected_swapped", "dpo.py", "[[c, w] for c in correct for w in incorrect]",
     "[[w, c] for c in correct for w in incorrect]", ["tests/test_wiring.py", "tests/test_dpo_kto_dro.py"]),
    ("dpo_pair_cap_ignored", "dpo.py", "build_pairs(rows, args.max_pairs_per_prompt, args.seed)",
     "build_pairs(rows, 10**9, args.seed)", ["tests/test_dpo_kto_dro.py", "tests/test_wiring.py"]),
    ("kto_desirable_is_incorrect", "kto.py", 'batch["reward"] == 1', 'batch["reward"] == 0',
     ["tests/test_wiring.py", "tests/test_dpo_kto_dro.py"]),
    ("rs_keeps_truncated", "rs.py", 'r["reward"] == 1.0 and not r["truncated"]', 'r["reward"] == 1.0',
     ["tests/test_wiring.py"]),
    ("rs_keeps_incorrect", "rs.py", 'r["reward"] == 1.0 and not r["truncated"]', 'not r["truncated"]',
     ["tests/test_wiring.py", "tests/test_embedded.py"]),
    ("spo_q0_from_the_wrong_beta", "spo.py", "q0 = estimate_q0(rows + more, args.beta)",
     "q0 = estimate_q0(rows + more, 1.0)", ["tests/test_wiring.py"]),
    ("spo_q0_without_the_extra_samples", "spo.py", "q0 = estimate_q0(rows + more, args.beta)",
     "q0 = estimate_q0(rows, args.beta)", ["tests/test_wiring.py", "tests/test_spo.py"]),
    ("common_mask_covers_the_prompt", "common.py", "mask[i, p : p + n] = 1", "mask[i, 1 : p + n] = 1",
     ["tests/test_common.py"]),
    ("common_mask_misses_the_stop_token", "common.py", "mask[i, p : p + n] = 1", "mask[i, p : p + n - 1] = 1",
     ["tests/test_common.py"]),
    ("common_logprobs_shifted", "common.py", "index_copy(1, flat + 1, lps)", "index_copy(1, flat, lps)",
     ["tests/test_logprobs.py"]),
    ("common_same_order_every_epoch", "common.py", "manual_seed(seed * 7919 + epoch)", "manual_seed(seed * 7919)",
     ["tests/test_common.py", "tests/test_wiring.py"]),
    ("scheduler_not_checkpointed", "dqo.py", "    accelerator.register_for_checkpointing(value_scheduler)\n", "",
     ["tests/test_crash.py"]),
    ("grad_clip_ignored", "dro.py", "accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)",
     "accelerator.clip_grad_norm_(model.parameters(), 1e9)", ["tests/test_wiring.py", "tests/test_dpo_kto_dro.py"]),
    ("beta_not_passed", "kto.py", "args.beta", "0.1", ["tests/test_wiring.py"]),
    ("runtime_stop_flag_not_all_reduced", "runtime/checkpoint.py",
     'flags = accelerator.reduce(flags.to(accelerator.device), "sum").cpu()', "flags = flags.to(accelerator.device).cpu()",
     ["tests/test_preempt.py"]),
    ("runtime_disk_ignores_resumed_files", "runtime/launch.py", "shutil.disk_usage(folder).free + used",
     "shutil.disk_usage(folder).free", ["tests/test_preempt.py"]),
    ("runtime_world_size_change_not_refused", "runtime/launch.py", 'run.get("world_size", world)',
     'run.get("num_processes", world)', ["tests/test_preempt.py", "tests/test_crash.py"]),
    ("runtime_bf16_reduction", "runtime/launch.py", "param_dtype=torch.bfloat16, reduce_dtype=torch.float32)",
     "param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)", ["tests/test_sharding.py"]),
]


# Fails on any edit to the code the memory trace runs, whatever the edit does: it would kill every mutant there for no
# behaviour of its own, so it is left out here (the other memory tests, which re-trace and measure, stay in).
FINGERPRINT_TEST = "tests/test_memory_plan.py::test_the_stored_trace_is_what_this_code_traces"


def test_command() -> list[str]:
    """The README's test command, as .ci/run runs it, with -x: stop at the first failure."""
    for line in open(os.path.join(ROOT, ".ci", "run")):
        if line.strip().startswith("python -m pytest"):
            words = shlex.split(line.strip())
            # -rfEs: the summary names each failing test (the README's -rs alone lists only the skips)
            return [sys.executable, *words[1:-1], "-x", "-rfEs", "-p", "no:cacheprovider", "--deselect", FINGERPRINT_TEST], \
                words[-1]
    raise SystemExit(".ci/run has no `python -m pytest` line")


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p))]


def copy_project(dest: str) -> None:
    for p in project_files():
        os.makedirs(os.path.dirname(os.path.join(dest, p)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, p), os.path.join(dest, p))


def first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return m.group(1) if m else "(no test named: see the log)"


def run(cmd: list[str], cwd: str, env: dict) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--keep_logs", help="write each mutant's test output into this folder")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m[0] in args.only]
    if args.list:
        for name, path, old, new, first in mutants:
            print(f"{name:40s} {path}")
        return
    base_cmd, test_dir = test_command()
    env = dict(os.environ, SHARED_DATA=os.environ.get("SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data")))
    env.pop("TEST_CACHE_DIR", None)  # every mutant builds its own cache: a cached dataset would hide a data-path bug
    report = [f"{'mutant':40s} {'file':21s} {'verdict':9s} {'seconds':>7s}  first failing test"]
    print(report[0], flush=True)
    counts = {"killed": 0, "survived": 0, "stale": 0}
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "project")
        copy_project(copy)
        for name, path, old, new, first in mutants:
            target = os.path.join(copy, path)
            original = open(target).read()
            t0 = time.time()
            if old is None or original.count(old) != 1:
                verdict, where = "stale", f"the string occurs {0 if old is None else original.count(old)} times"
            else:
                open(target, "w").write(original.replace(old, new))
                code, out = run([*base_cmd, *[f for f in first if os.path.exists(os.path.join(copy, f))]], copy, env)
                if code == 0:
                    code, out = run([*base_cmd, test_dir], copy, env)
                verdict = "survived" if code == 0 else "killed"
                where = first_failure(out) if code else ""
                if args.keep_logs:
                    os.makedirs(args.keep_logs, exist_ok=True)
                    open(os.path.join(args.keep_logs, f"{name}.log"), "w").write(out)
                open(target, "w").write(original)
            counts[verdict] += 1
            line = f"{name:40s} {path:21s} {verdict:9s} {time.time() - t0:7.0f}  {where}"
            report.append(line)
            print(line, flush=True)
    summary = f"{counts['killed']} killed, {counts['survived']} survived, {counts['stale']} stale, of {len(mutants)}"
    report.append(summary)
    print(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report) + "\n")
    sys.exit(0 if counts["survived"] == counts["stale"] == 0 else 1)


if __name__ == "__main__":
    main()
