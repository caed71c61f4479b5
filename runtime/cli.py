"""The command line: the shared flags (`Base`), parsing, the defaults that depend on the model, and validation."""

import argparse
import difflib
import importlib.util
import math
import os
import re
import sys
import tempfile
import typing
from dataclasses import dataclass, field, fields

from common import TASK_MAX_NEW_TOKENS, TASKS, DataError, load_task, read_offline_data


def arg(default, help: str):
    """A dataclass field with a one-line doc that --help shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class Base:
    """The flags every algorithm file shares; each file's `Args(Base)` adds its own and sets its --output_dir."""

    model: str = arg("tiny", "hub id or local save_pretrained dir of the reference policy; `tiny` = the embedded default")
    task: str | None = arg(None, "arith (embedded), gsm8k, math or aime24 (default: arith with --model tiny, else gsm8k)")
    train_file: str | None = arg(None, "local JSONL with the hub dataset's fields, instead of the hub train split")
    test_file: str | None = arg(None, "local JSONL with the hub dataset's fields, instead of the hub test split")
    n_train_prompts: int | None = arg(None, "number of training prompts (default: all; arith: 1000)")
    n_test: int | None = arg(None, "number of test problems (default: all; arith: 1000)")
    seed: int = arg(1, "seed for sampling, data order and initialisation")
    output_dir: str = arg("runs/run", "where checkpoints, the final model, metrics and results go")
    cache_dir: str = arg(".cache", "where offline datasets, reference evaluations and file digests are cached")
    offline_data: str | None = arg(None, "your samples (JSONL/Parquet: question, response, answer[, reward]); no sampling")
    save_offline_data: str | None = arg(None, "write the offline dataset here, JSONL (default: offline.jsonl in its cache)")
    resume: bool = arg(False, "resume from output_dir/checkpoint: model, optimizer, scheduler, RNG and data position")
    n_samples: int | None = arg(None, "reference samples per training prompt in the offline dataset")
    temperature: float = arg(0.9, "offline-dataset sampling temperature (paper: 0.9)")
    top_p: float = arg(0.9, "offline-dataset sampling top_p (paper: 0.9)")
    top_k: int = arg(16, "offline-dataset sampling top_k (paper: 16)")
    max_new_tokens: int | None = arg(None, "generation length (default per task: arith 64, gsm8k 512, math 1024, aime24 2048)")
    gen_batch_size: int | None = arg(None, "sequences per generate call (paper: sized for 80 GB GPUs)")
    epochs: int | None = arg(None, "passes over the training data (a model is saved and evaluated after each)")
    lr: float | None = arg(None, "policy learning rate")
    warmup_steps: int | None = arg(None, "linear warmup steps, then constant")
    per_device_batch_size: int | None = arg(None, "micro-batch per process")
    global_batch_size: int | None = arg(None, "examples per optimizer step over all processes; sets --grad_accum")
    grad_accum: int | None = arg(None, "accumulation steps (default: global_batch_size / (per_device_batch_size x processes))")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    precision: str | None = arg(None, "fp32 or bf16 (default: the launch's mixed_precision; else tiny fp32, others bf16)")
    dist_timeout: int = arg(43200, "seconds a process waits at a collective (12 h: sampling the offline dataset has none)")
    skip_memory_check: bool = arg(False, "start even if the memory preflight says a step will not fit the GPU")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    eval_every: int = arg(0, "evaluate every N optimizer steps (0: only at epoch ends)")
    eval_seeds: int | None = arg(None, "sampled-accuracy seeds per evaluation, reported as mean ± std")
    save_every: int | None = arg(None, "also save every N optimizer steps (0: never; at the paper's scale the minutes decide)")
    save_every_minutes: float = arg(60, "also save N min after the last (0: off); 60: a 7B save is 1-6 min; a kill loses ≤1 h")
    report_to: str = arg("tensorboard", "accelerate tracker (tensorboard, wandb, ...; empty for none)")
    max_steps: int | None = arg(None, "stop after this many optimizer steps (0: run all epochs)")
    lora_r: int = arg(0, "LoRA rank for a single-GPU run (needs peft); 0 trains all weights")

    def memory_terms(self) -> dict:
        """What the algorithm trains, keeps frozen and generates while training, for the memory plan (runtime/memory.py)."""
        return dict(networks=1, frozen_reference=False, rollout_policy=False, online_rows=0, rows_per_example=1)


# Defaults every algorithm shares: the embedded experiment's, and the paper's (any --model but tiny)
RUN_DEFAULTS = {
    "tiny": dict(task="arith", n_samples=8, gen_batch_size=256, eval_seeds=1, max_steps=0, warmup_steps=0, save_every=50),
    # the DQO paper: GSM8K, 20 samples per prompt (Table 8: 150000 = 7500 x 20), accuracy over 5 seeds; gen batch: PAPER's
    "paper": dict(task="gsm8k", n_samples=20, eval_seeds=5, max_steps=0, warmup_steps=0, save_every=0),
}


def resolve_defaults(args, tiny: dict, paper: dict) -> None:
    """Fill the fields left at None with the embedded experiment's values (`--model tiny`) or else the paper's."""
    which = "tiny" if args.model == "tiny" else "paper"
    for k, v in {**RUN_DEFAULTS[which], **(tiny if which == "tiny" else paper)}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.max_new_tokens is None and args.task in TASKS:
        args.max_new_tokens = TASK_MAX_NEW_TOKENS[args.task]


def _default_note(name: str, default, tiny: dict | None, paper: dict | None) -> str:
    """What --help says a flag defaults to: both values when the model decides (None in Args), else its one default."""
    show = lambda v: "unset" if v is None else f"{v:.4g}" if isinstance(v, float) else v
    if default is None and tiny is not None:
        t, p = (show({**RUN_DEFAULTS[w], **(d or {})}.get(name)) for w, d in (("tiny", tiny), ("paper", paper)))
        if t == p != "unset":
            return f"default: {t}"
        if (t, p) != ("unset", "unset"):
            return f"tiny: {t}, paper: {p}"
    if default is None or isinstance(default, bool):
        return ""
    return f"default: {default!r}" if isinstance(default, str) else f"default: {show(default)}"


class _ArgParser(argparse.ArgumentParser):
    """argparse, with a near miss named in the error: `unrecognized argument --lrr (did you mean --lr?)`, exit 2."""

    def parse_args(self, argv=None, namespace=None):
        ns, unknown = self.parse_known_args(argv, namespace)
        if unknown:
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            bad = next((u for u in unknown if u.startswith("-")), unknown[0])
            near = difflib.get_close_matches(bad.split("=")[0], flags, n=1, cutoff=0.6)
            self.error(f"unrecognized argument {bad}" + (f" (did you mean {near[0]}?)" if near else ""))
        return ns


def build_parser(Args, tiny: dict | None = None, paper: dict | None = None):
    """The command line of a dataclass of `arg` fields: booleans are switches; each help ends with its default(s)."""
    doc = " ".join((sys.modules[Args.__module__].__doc__ or "").split("\n\n")[0].split()).split(". ")[0].rstrip(".")
    parser = _ArgParser(prog=os.path.basename(sys.argv[0]), allow_abbrev=False, description=f"{doc}. See README.md.",
                        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=32, width=120))
    for f in fields(Args):
        help_text = f.metadata.get("help", "")
        note = "" if "default" in help_text else _default_note(f.name, f.default, tiny, paper)  # one note, not two
        help_text = (f"{help_text} ({note})" if note else help_text).replace("%", "%%")
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # `int | None` -> int
        how = dict(action="store_true") if kind is bool else dict(type=kind, default=f.default, metavar=kind.__name__.upper())
        parser.add_argument(f"--{f.name}", help=help_text, **how)
    return parser


def one_line_errors(kind, value, tb) -> None:
    """A sys.excepthook: bad data found once the run is going (a DataError) ends as one `error:` line, not a traceback."""
    if issubclass(kind, DataError):
        print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


def parse_args(Args, tiny: dict | None = None, paper: dict | None = None):
    """The command line as `Args`, model-dependent defaults filled (with `tiny`), and `_changed` for `describe_run`."""
    args = Args(**vars(build_parser(Args, tiny, paper).parse_args()))
    base = Args(model=args.model, task=args.task) if tiny is not None else Args()  # the defaults this model gets
    for a in (args, base) if tiny is not None else ():
        resolve_defaults(a, tiny, paper)
    args._changed = {k: v for k, v in vars(args).items() if not k.startswith("_") and getattr(base, k, None) != v}
    return args


def describe_run(args) -> None:
    """One line, on the first process: model, task, data source, and the settings that differ from the defaults."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    data = getattr(args, "offline_data", None)
    source = f"imported from {data}" if data else "self-sampled by the reference" if hasattr(args, "n_samples") else None
    changed = [f"--{k}" if v is True else f"--{k} {v!r}" if isinstance(v, str) else f"--{k} {v}"
               for k, v in getattr(args, "_changed", {}).items() if k not in ("model", "task")]
    print(f"run: model {args.model}, task {args.task}" + (f", offline data {source}" if source else "")
          + ("; settings changed from the defaults: " + ", ".join(changed) if changed else "; every other setting at its "
             "default"), flush=True)


# Rules for validate_args: flag -> (test of its value, what it must be)
def _number(test, want: str, unset_ok: bool = False) -> tuple:
    return (lambda v: (unset_ok and v is None) or (isinstance(v, int | float) and test(v)),
            want + (" (or unset)" if unset_ok else ""))


at_least = lambda lo, unset_ok=False: _number(lambda v: v >= lo, f"≥ {lo}", unset_ok)
positive = lambda unset_ok=False: _number(lambda v: math.isfinite(v) and v > 0, "> 0", unset_ok)
between = lambda lo, hi, lo_open=False: _number(lambda v: (lo < v if lo_open else lo <= v) and v <= hi,
                                                f"in {'(' if lo_open else '['}{lo}, {hi}]")
one_of = lambda *choices: (lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))

SHARED_RULES = {
    "task": one_of(*TASKS), "n_train_prompts": at_least(1, unset_ok=True), "n_test": at_least(1, unset_ok=True),
    "seed": at_least(0), "n_samples": at_least(1), "temperature": positive(), "top_p": between(0, 1, lo_open=True),
    "top_k": at_least(0), "max_new_tokens": at_least(1), "gen_batch_size": at_least(1), "epochs": at_least(1, True),
    "lr": positive(), "warmup_steps": at_least(0), "per_device_batch_size": at_least(1),
    "global_batch_size": at_least(1, True), "grad_accum": at_least(1, True), "max_grad_norm": positive(),
    "eval_every": at_least(0), "eval_seeds": at_least(0), "save_every": at_least(0), "max_steps": at_least(0),
    "lora_r": at_least(0), "beta": positive(), "save_every_minutes": at_least(0),
}
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab")  # = their packages


class ArgumentError(SystemExit):
    """A bad flag or input file, found before any work: the process prints "error: ..." and exits with status 1."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def validate_args(args, rules: dict | None = None) -> None:
    """Every flag before anything loads: its rule (`rules` over SHARED_RULES), batch sizes, model, input files, trackers."""
    for name, (ok, want) in {**SHARED_RULES, **(rules or {})}.items():
        if hasattr(args, name) and not ok(getattr(args, name)):
            raise ArgumentError(f"--{name} {getattr(args, name)!r}: must be {want}")
    if hasattr(args, "epochs") and not args.epochs and not args.max_steps:  # eval.py has no schedule
        raise ArgumentError("--epochs or --max_steps must be set: nothing to train")
    if hasattr(args, "epochs"):
        grad_accum(args)
    model, path = args.model, os.path.expanduser(args.model)
    if model != "tiny" and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ArgumentError(f"--model {model}: the folder has no config.json (a save_pretrained folder is expected)")
    if model != "tiny" and os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentError(f"--model {model}: a file; a model is a save_pretrained folder or a hub id")
    if model != "tiny" and not os.path.exists(path) and (path.startswith((".", "/", "~")) or not re.fullmatch(
            r"[\w.-]+/[\w.-]+", model)):
        raise ArgumentError(f"--model {model}: no such folder, and not a hub id (ORG/NAME, e.g. google/gemma-1.1-7b-it)")
    for split, path in (("train", getattr(args, "train_file", None)), ("test", args.test_file)):
        if path and args.task == "arith":
            raise ArgumentError(f"--{split}_file {path}: task arith generates its own problems; pass --task gsm8k, "
                                "math or aime24 with a data file")
        try:
            if path and not load_task(args.task, split, path):
                raise ArgumentError(f"--{split}_file {path}: no problems in the file")
        except (DataError, ValueError) as e:
            raise ArgumentError(f"--{split}_file: {e}") from None
    data, save = getattr(args, "offline_data", None), getattr(args, "save_offline_data", None)
    try:
        if data:
            read_offline_data(data)
    except DataError as e:
        raise ArgumentError(f"--offline_data: {e}") from None
    if save and os.path.isdir(save):
        raise ArgumentError(f"--save_offline_data {save}: a folder; a .jsonl file path is expected")
    if save and data and os.path.abspath(save) == os.path.abspath(data):
        raise ArgumentError(f"--save_offline_data {save}: the file --offline_data reads; choose another path")
    for tracker in filter(None, (t.strip() for t in (args.report_to or "").split(","))):
        if tracker not in TRACKERS:
            raise ArgumentError(f"--report_to {tracker}: unknown tracker ({', '.join(TRACKERS)}; empty for none)")
        if importlib.util.find_spec(tracker) is None:
            raise ArgumentError(f"--report_to {tracker}: the {tracker} package is not installed (pip install {tracker}), "
                                "or pass --report_to '' for no tracker")


def grad_accum(args) -> int:
    """The accumulation steps: --grad_accum, else --global_batch_size over a micro-batch on every process, else 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch and torchrun
    per_step = args.per_device_batch_size * world  # one micro-batch on every process
    if args.global_batch_size is None:
        return args.grad_accum or 1
    if args.global_batch_size % per_step or (args.grad_accum and args.grad_accum != args.global_batch_size // per_step):
        raise ArgumentError(f"--global_batch_size {args.global_batch_size} must equal --per_device_batch_size "
                            f"{args.per_device_batch_size} x {world} processes x --grad_accum"
                            f"{f' {args.grad_accum}' if args.grad_accum else ' (a whole number)'}")
    return args.global_batch_size // per_step


def probe_writable(args) -> None:
    """--cache_dir and --save_offline_data's folder can be written: an empty folder made and removed (not permission bits)."""
    if not args.cache_dir:
        raise ArgumentError("--cache_dir is empty")
    save = getattr(args, "save_offline_data", None)
    for flag, path in (("--cache_dir", args.cache_dir), ("--save_offline_data", save and os.path.dirname(
            os.path.abspath(save)))):
        if not path:
            continue
        probe = os.path.abspath(os.path.expanduser(path))
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise ArgumentError(f"{flag} {path}: cannot be created, {probe} is a file")
        try:
            os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-probe-"))
        except OSError as e:
            raise ArgumentError(f"{flag} {path}: cannot be {'written' if probe == os.path.abspath(path) else 'created'}: "
                                f"{probe}: {e.strerror}") from None
