"""Shared fixtures and helpers: a session temp cache, the tiny reference, arith batches, and running a script."""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

# Cores ÷ workers math-library threads per pytest worker (1 with `-n 2` on 2 cores), set before torch is first imported
# (below, through common), so the warm runner and every script a test starts inherit it. torch otherwise gives each
# process as many threads as the machine has cores: with `-n 2` on 2 cores that is 4 busy threads on 2 cores, and their
# OpenMP threads spin while they wait for each other. Measured from fresh clones on 2 cores: the suite took 10-11 min
# (19-21 min of CPU) that way, 6 min 43 s to 7 min 15 s (12-13 min of CPU) with one thread per worker. A value you set
# yourself is kept; the one xdist's controller sets here, before it knows the worker count, is set again in each
# worker (which inherits it).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if not os.environ.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS_FROM_CONFTEST"):
    os.environ["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS_FROM_CONFTEST"] = str(max(1, CORES // WORKERS))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import runtime.files  # noqa: E402
from common import encode_response  # noqa: E402,F401  (responses from text, as rs.py --data gold encodes them)

DATA = os.environ.get("SHARED_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")  # GSM8K, MATH500, AIME24
# Tests on the real data files: they run wherever the project sits beside shared/ (CI does); a clone elsewhere skips
# them with this reason rather than failing on a path that is not there.
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"the real data is not at {DATA}: set SHARED_DATA")


# The files that take longest (15 s or more each with one thread per worker on 2 cores; test_sharding.py and
# test_scale.py about 150 s), longest first. CI runs the suite on 2 pytest-xdist workers with --dist loadfile: each
# worker takes whole files from one queue as it frees up. xdist orders that queue by the number of tests in a file,
# which put the few long script runs (test_embedded.py, test_memory_trace.py) last, and one worker ran them alone at the
# end. Here the queue is these files first, then the rest in collection order: the many short files fill in at the end
# on whichever worker frees up first.
LONG_FILES = ("test_sharding.py", "test_scale.py", "test_embedded.py", "test_memory_trace.py", "test_spo.py",
              "test_lora.py", "test_cli.py", "test_grading.py", "test_bad_input.py", "test_common.py", "test_crash.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order of pytest_collection_modifyitems
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = os.path.basename(str(item.fspath))
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: a file's own tests keep their order


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache dir for the runs' offline datasets and evaluations; `--model tiny` itself loads assets/tiny, the same
    weights on every machine. If the recipe changed and assets/tiny was not rebuilt, the session stops: a reference
    SFT'd on the host would make the tests depend on this CPU."""
    from benchmarks.tiny_reference import tiny_recipe

    with open(os.path.join(common.TINY_SHIPPED, "recipe.json")) as f:
        if json.load(f) != tiny_recipe():
            pytest.exit(f"error: --model tiny: {common.TINY_SHIPPED} was built from another recipe than "
                        "benchmarks/tiny_reference.py's: rebuild it with "
                        "`python benchmarks/tiny_reference.py --build assets/tiny --force`", returncode=1)
    if os.environ.get("TEST_CACHE_DIR"):  # set it to reuse across runs
        return os.environ["TEST_CACHE_DIR"]
    # One cache for both pytest-xdist workers (the session's base temp dir is per worker, its parent is shared): a
    # dataset or evaluation that tests on both need is built once. Runs share a cache safely: a lock per chunk, files
    # written atomically and verified (tests/test_crash.py runs two on one cold cache), and a launch's processes agree on
    # what is cached (tests/test_scale.py::test_a_cache_written_by_another_run_mid_launch_is_read_by_all_processes_or_none).
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tiny_cache, tmp_path_factory):
    """A copy of assets/tiny, for tests that load the tiny model by path: a run may write reports beside its model."""
    path = str(tmp_path_factory.mktemp("model") / "tiny")
    shutil.copytree(common.TINY_SHIPPED, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(common.TINY_SHIPPED), AutoTokenizer.from_pretrained(common.TINY_SHIPPED)


def arith_ops(spec: str) -> tuple[int, list]:
    """An arith answer spec, "15;+7;*2", as (15, [("+", 7), ("*", 2)])."""
    start, *steps = spec.split(";")
    return int(start), [(s[0], int(s[1:])) for s in steps]


def arith_rows(tokenizer, problems: list[dict], slips: tuple = (None,), rng=None) -> list[dict]:
    """Offline-dataset rows for arith `problems`, one per problem and entry of `slips`: None the gold solution, i a slip
    at step i (-1: the last step; `rng` picks how far off it is). Each row has prompt and response ids, the response
    text, the answer, and the response's grade as its reward."""
    rows = []
    for i, p in enumerate(problems):
        start, ops = arith_ops(p["answer"])
        for slip in slips:
            text, _ = common.arith_solution(start, ops, None if slip is None else slip % len(ops), rng)
            rows.append({"prompt_idx": i, "prompt_ids": common.encode_prompt(tokenizer, p["question"], "arith"),
                         "response_ids": encode_response(tokenizer, text), "response": text, "answer": p["answer"],
                         "reward": common.grade(text, p["answer"], "arith"), "truncated": False})
    return rows


@pytest.fixture(scope="session")
def reference_greedy(tiny_model):
    """reference_greedy(n): the tiny reference's greedy accuracy on the first n arith test problems, evaluated here in
    process (no accelerate, no cache): what a run's results["reference"]["greedy"] must equal."""
    model, tokenizer = tiny_model
    memo = {}

    def accuracy(n: int) -> float:
        if n not in memo:
            problems = common.load_task("arith", "test", limit=n)
            memo[n] = common.evaluate(model, tokenizer, problems, "arith", max_new_tokens=64, sampled_seeds=0)["greedy"]
        return memo[n]

    return accuracy


def assert_accuracy(value: float, n: int, seeds: int = 1) -> None:
    """`value` is an accuracy over n problems (averaged over `seeds` seeds): a whole number of correct answers out of
    n x seeds, not just any number in [0, 1]."""
    correct = value * n * seeds
    assert 0 <= value <= 1 and correct == pytest.approx(round(correct), abs=1e-6), (value, n, seeds)


SMOKE_ARGS = ["--n_train_prompts", "48", "--n_test", "32", "--n_samples", "4", "--epochs", "1",
              "--per_device_batch_size", "8", "--report_to", "", "--save_every", "0"]


class WarmRunner:
    """tests/warm_runner.py, started once per test process (`warm_runner()`): it has imported torch, transformers,
    accelerate and common, and runs each command in a forked child, so a one-process run does not pay an interpreter
    start (about 6 s of CPU). Several commands can start at the same moment (`together`): two runs into one folder, two
    runs sharing a cold cache. A command may stop at a failpoint or under a file-size limit."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "warm_runner.py")], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == "ready\n", "tests/warm_runner.py did not start"

    def together(self, *cmds: dict) -> list[tuple[int, str, str]]:
        """Each command (dict(argv=[script, *flags], env=..., fsize=None)) in a child of its own, all started at the same
        moment; (exit status as `subprocess` gives it, stdout, stderr) of each, in order."""
        logs = [[tempfile.mkstemp(suffix=f".{s}")[1] for s in ("out", "err")] for _ in cmds]
        reqs = [dict(argv=c["argv"], env=c["env"], fsize=c.get("fsize"), stdout=o, stderr=e) for c, (o, e) in zip(cmds, logs)]
        self.proc.stdin.write(json.dumps(reqs) + "\n")
        self.proc.stdin.flush()
        codes = json.loads(self.proc.stdout.readline())
        results = []
        for code, paths in zip(codes, logs, strict=True):
            results.append((code, *(open(p).read() for p in paths)))
            for p in paths:
                os.remove(p)
        return results

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_WARM: dict = {}


def warm_runner() -> WarmRunner:
    """This test process's WarmRunner, started on first use."""
    if "runner" not in _WARM:
        _WARM["runner"] = runner = WarmRunner()
        atexit.register(runner.close)
    return _WARM["runner"]


def run_command(argv: list, env: dict | None = None, timeout: int = 600) -> tuple[int, str, str]:
    """`python *argv` from the repository root, as a user starts it: (exit status, stdout, stderr). It runs in a child
    forked from the warm runner (COLD_RUNS=1: a fresh interpreter)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {}))
    argv = [os.path.join(ROOT, argv[0]), *argv[1:]]
    if os.environ.get("COLD_RUNS") == "1":
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        return proc.returncode, proc.stdout, proc.stderr
    return warm_runner().together(dict(argv=argv, env=env))[0]


def run_script(script: str, cache: str, output_dir: str, *extra: str, launcher: tuple = (), timeout: int = 600):
    """Run `script` on the tiny default with small settings; returns (results.json, metrics.jsonl rows).
    Raises with the script's output on failure. Without a launcher the script runs in a child forked from the warm
    runner (COLD_RUNS=1: a fresh interpreter each time, as a user starts it)."""
    flags = ["--cache_dir", cache, "--output_dir", output_dir, *SMOKE_ARGS, *extra]
    if launcher:
        cmd = [*launcher, os.path.join(ROOT, script), *flags]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        cmd = [script, *flags]
        code, out, err = run_command(cmd, timeout=timeout)
    if code != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {code}\n{out[-4000:]}\n{err[-6000:]}")
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    metrics = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
    return results, metrics


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(*options: str, num_processes: int = 2, mixed_precision: str | None = "no") -> tuple:
    """`accelerate launch` with `options` (e.g. a --config_file) for `num_processes` processes on this CPU machine:
    no dynamo, a free port, fp32 unless `mixed_precision` says otherwise (None: the config's own). Without a config,
    --multi_gpu: on a CPU-only machine that starts gloo ranks (`--cpu --num_processes 2` silently starts ONE process)."""
    precision = ("--mixed_precision", mixed_precision) if mixed_precision else ()
    return (sys.executable, "-m", "accelerate.commands.launch", *(options or ("--multi_gpu",)), "--num_processes",
            str(num_processes), "--num_machines", "1", *precision, "--dynamo_backend", "no",
            "--main_process_port", free_port())


def gradient_step_lowers(loss_fn, params, step: float = 1e-3) -> tuple[float, float]:
    """A plain gradient step of length `step` (in parameter space) on `params` lowers `loss_fn()` by the first-order
    prediction step * |grad| (within 30%). That holds on any CPU, unlike an Adam step, which moves every weight by about
    its learning rate whatever its gradient. The parameters are left moved. Returns (loss before, loss after)."""
    import torch

    params = [p for p in params if p.requires_grad]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    assert norm > 0, "the loss has no gradient"
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(step / norm * g)
        after = loss_fn().item()
    assert loss.item() - after == pytest.approx(step * norm, rel=0.3), (loss.item(), after, step * norm)
    return loss.item(), after


# ---------------------------------------------------------------------------------------------------------------------
# Direction checks for the smoke runs: what a run's loss targets, on the rows it trained on, moved the right way
# ---------------------------------------------------------------------------------------------------------------------
def response_logps(model, rows: list[dict]):
    """(N,) float64: each row's response log-prob (the sum over its response tokens, EOS included) under `model`, a
    loaded causal LM or a saved model's folder, in eval mode, by common.score_rows (common.token_logprobs)."""
    import torch

    if isinstance(model, str):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    scored = [dict(prompt_ids=r["prompt_ids"], response_ids=r["response_ids"]) for r in rows]  # copies: rows stay as they are
    with torch.no_grad():
        common.score_rows(model, scored, model.config.pad_token_id or 0)
    return torch.tensor([sum(r["logps"]) for r in scored], dtype=torch.float64)


_REFERENCE_LOGPS: dict = {}  # rows' ids -> their log-probs under the reference: the scripts share one offline dataset


def log_ratios(model_dir: str, rows: list[dict]):
    """(N,) float64: log π/π_ref of each row's response, π the model saved in `model_dir`, π_ref the shipped tiny
    reference (assets/tiny, what `--model tiny` trains from), both scored by the same code on the same rows: exactly 0
    for a model that did not move."""
    key = runtime.files.cache_key([[r["prompt_ids"], r["response_ids"]] for r in rows])
    if key not in _REFERENCE_LOGPS:
        _REFERENCE_LOGPS[key] = response_logps(common.TINY_SHIPPED, rows)
    return response_logps(model_dir, rows) - _REFERENCE_LOGPS[key]


def correct_minus_failed(values, rows: list[dict]) -> list[float]:
    """Paired comparisons within a prompt: for each prompt with both a correct (reward 1) and a failed row, the mean of
    `values` over its correct rows minus the mean over its failed ones (= the mean over all its (correct, failed)
    pairs of the difference). Prompts are told apart by their prompt ids."""
    groups: dict = {}
    for r, v in zip(rows, values.tolist(), strict=True):
        groups.setdefault(tuple(r["prompt_ids"]), ([], []))[0 if r["reward"] == 1 else 1].append(v)
    return [sum(c) / len(c) - sum(f) / len(f) for c, f in groups.values() if c and f]


def assert_rises(diffs, what: str, z: float = 2.0) -> None:
    """`diffs`, paired differences (after minus before, or correct minus failed within a prompt), rise on average by more
    than `z` standard errors of their mean: a direction, clear of the rows' own spread (a run that learns nothing, or
    moves at random, fails), not a threshold on this machine's floats. The smoke runs measure 3.2 (RS after its first
    epoch) to 8.8 standard errors; another CPU's rounding moves them by a few hundredths (SPO with 2 threads against 1:
    3.51 against 3.49 standard errors, half online, where the rollouts' sampled tokens can differ)."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    assert len(d) >= 2, f"{what}: {len(d)} paired differences; nothing to compare"
    mean, sem = d.mean(), d.std(ddof=1) / np.sqrt(len(d))
    assert mean > z * sem, (f"{what}: mean {mean:.4g} over {len(d)} paired differences, standard error {sem:.3g}: "
                            f"not {z} standard errors above 0 ({np.mean(d > 0):.0%} of them positive)")
