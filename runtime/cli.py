"""The command line: the flags every algorithm shares (`Base`), parsing, the defaults that depend on the model, and
validation. Nothing here writes a file, takes a lock or loads a model: runtime.launch.start does those, in plain sight."""

import argparse
import difflib
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
    max_new_tokens: int | None = arg(None, "generation length (default per task: arith 64, gsm8k 512, math 1024)")
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
    save_every: int = arg(50, "write a resumable checkpoint every N optimizer steps (0: never)")
    save_every_minutes: float = arg(60, "also save N min after the last (0: off); 60: a 7B save is 1-6 min; a kill loses ≤1 h")
    report_to: str = arg("tensorboard", "accelerate tracker (tensorboard, wandb, ...; empty for none)")
    max_steps: int | None = arg(None, "stop after this many optimizer steps (0: run all epochs)")
    lora_r: int = arg(0, "LoRA rank for a single-GPU run (needs peft); 0 trains all weights")

    def memory_terms(self) -> dict:
        """What this algorithm holds and makes while it trains, for the memory plan (runtime/memory.py): `networks`
        trained (2 with a value network), `frozen_reference` (a frozen copy of the reference), `rollout_policy` (a
        frozen copy of the policy that generates during training), `online_rows` (rows it generates and scores per
        micro-batch), `rows_per_example` (2 for pairs). An algorithm file overrides what differs."""
        return dict(networks=1, frozen_reference=False, rollout_policy=False, online_rows=0, rows_per_example=1)


# Defaults every algorithm shares: the embedded experiment's, and the paper's (any --model but tiny)
RUN_DEFAULTS = {
    "tiny": dict(task="arith", n_samples=8, gen_batch_size=256, eval_seeds=1, max_steps=0, warmup_steps=0),
    # the DQO paper: GSM8K; 20 samples per prompt (Table 8: 150000 = 7500 x 20); sampled accuracy as mean ± std over 5
    # seeds. The generation batch is each algorithm's (PAPER): what fits an 80 GB GPU at 7B
    "paper": dict(task="gsm8k", n_samples=20, eval_seeds=5, max_steps=0, warmup_steps=0),
}


def resolve_defaults(args, tiny: dict, paper: dict) -> None:
    """Fill the fields left at None: with `--model tiny` the embedded experiment's values (`tiny`, RUN_DEFAULTS["tiny"]),
    otherwise the paper's (`paper`, RUN_DEFAULTS["paper"])."""
    which = "tiny" if args.model == "tiny" else "paper"
    for k, v in {**RUN_DEFAULTS[which], **(tiny if which == "tiny" else paper)}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.max_new_tokens is None and args.task in TASKS:
        args.max_new_tokens = TASK_MAX_NEW_TOKENS[args.task]


def _default_note(name: str, default, tiny: dict | None, paper: dict | None) -> str:
    """What --help says a flag defaults to: both values when the model decides (None in Args, filled by
    `resolve_defaults`), else the one default; nothing for a switch."""
    if default is None and tiny is not None:
        t = {**RUN_DEFAULTS["tiny"], **tiny}.get(name)
        p = {**RUN_DEFAULTS["paper"], **(paper or {})}.get(name)
        t, p = (f"{v:.4g}" if isinstance(v, float) else v for v in (t, p))
        if t is not None and t == p:
            return f"default: {t}"
        if t is not None or p is not None:
            return f"tiny: {'unset' if t is None else t}, paper: {'unset' if p is None else p}"
    if default is None or isinstance(default, bool):
        return ""
    return f"default: {default!r}" if isinstance(default, str) else f"default: {default:.4g}" if isinstance(
        default, float) else f"default: {default}"


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
    """The command line of a dataclass of `arg` fields: booleans are switches (`--resume`, not `--resume True`), and
    each flag's help ends with its default, or its two defaults (`tiny: ..., paper: ...`) when the model decides."""
    parser = _ArgParser(prog=os.path.basename(sys.argv[0]), allow_abbrev=False,
                        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=32, width=120))
    for f in fields(Args):
        help_text = f.metadata.get("help", "")
        note = "" if "default" in help_text else _default_note(f.name, f.default, tiny, paper)  # one note, not two
        help_text = f"{help_text} ({note})" if note else help_text
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # `int | None` -> int
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text.replace("%", "%%"))
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, metavar=kind.__name__.upper(),
                                help=help_text.replace("%", "%%"))
    return parser

def one_line_errors(kind, value, tb) -> None:
    """A sys.excepthook: bad data found once the run is going (no pairs, too few examples, a hub dataset out of reach)
    ends as one `error:` line, like a bad flag, not a traceback; any other exception keeps its traceback."""
    if issubclass(kind, DataError):
        print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


def parse_args(Args, tiny: dict | None = None, paper: dict | None = None):
    """Parse the command line into `Args` and fill the model-dependent defaults (`resolve_defaults`; eval.py passes no
    `tiny`/`paper`). Remembers which settings differ from the file's defaults, for `describe_run`."""
    args = Args(**vars(build_parser(Args, tiny, paper).parse_args()))
    if tiny is not None:
        base = Args(model=args.model, task=args.task)  # the defaults this model and task get
        resolve_defaults(args, tiny, paper)
        resolve_defaults(base, tiny, paper)
    else:
        base = Args()
    args._changed = {k: v for k, v in vars(args).items() if not k.startswith("_") and getattr(base, k, None) != v}
    return args

def describe_run(args, extra: str = "") -> None:
    """One line, on the first process, of what the run is: model, task, data source, and the settings given that
    differ from the file's defaults."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    data = getattr(args, "offline_data", None)
    source = f"imported from {data}" if data else "self-sampled by the reference" if hasattr(args, "n_samples") else None
    changed = [f"--{k}" if v is True else f"--{k} {v!r}" if isinstance(v, str) else f"--{k} {v}"
               for k, v in getattr(args, "_changed", {}).items() if k not in ("model", "task")]
    print(f"run: model {args.model}, task {args.task}" + (f", offline data {source}" if source else "") + extra
          + ("; settings changed from the defaults: " + ", ".join(changed) if changed else "; every other setting at its "
             "default"), flush=True)



# Rules for validate_args: flag -> (test of its value, what it must be)
def at_least(lo, unset_ok: bool = False) -> tuple:
    return (lambda v: (unset_ok and v is None) or (isinstance(v, int | float) and v >= lo),
            f"≥ {lo}" + (" (or unset)" if unset_ok else ""))


def positive(unset_ok: bool = False) -> tuple:
    return (lambda v: (unset_ok and v is None) or (isinstance(v, int | float) and math.isfinite(v) and v > 0),
            "> 0" + (" (or unset)" if unset_ok else ""))


def between(lo, hi, lo_open: bool = False) -> tuple:
    return (lambda v: isinstance(v, int | float) and (lo < v if lo_open else lo <= v) and v <= hi,
            f"in {'(' if lo_open else '['}{lo}, {hi}]")


def one_of(*choices) -> tuple:
    return (lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))


SHARED_RULES = {
    "task": one_of(*TASKS), "n_train_prompts": at_least(1, unset_ok=True), "n_test": at_least(1, unset_ok=True),
    "seed": at_least(0), "n_samples": at_least(1), "temperature": positive(), "top_p": between(0, 1, lo_open=True),
    "top_k": at_least(0), "max_new_tokens": at_least(1), "gen_batch_size": at_least(1), "epochs": at_least(1, True),
    "lr": positive(), "warmup_steps": at_least(0), "per_device_batch_size": at_least(1),
    "global_batch_size": at_least(1, True), "grad_accum": at_least(1, True), "max_grad_norm": positive(),
    "eval_every": at_least(0), "eval_seeds": at_least(0), "save_every": at_least(0), "max_steps": at_least(0),
    "lora_r": at_least(0), "beta": positive(), "save_every_minutes": at_least(0),
}


class ArgumentError(SystemExit):
    """A bad flag or input file, found before any work: the process prints "error: ..." and exits with status 1."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")

def validate_args(args, rules: dict | None = None) -> None:
    """Check every flag right after parsing, before anything is loaded or written: `rules` (flag -> (test, what it must
    be)) are the file's own, over SHARED_RULES; then the batch sizes, the model, the input files, the tracker and the
    cache dir (`check_*`). Raises ArgumentError naming the flag, the value and what it must be. Changes nothing."""
    check_rules(args, {**SHARED_RULES, **(rules or {})})
    if not args.epochs and not args.max_steps:
        raise ArgumentError("--epochs or --max_steps must be set: nothing to train")
    grad_accum(args)
    check_model_arg(args.model)
    check_task_files(args)
    check_offline_data(args)
    check_report_to(args.report_to)
    check_writable_dir("--cache_dir", args.cache_dir)


def grad_accum(args) -> int:
    """The accumulation steps the flags give: --grad_accum, else --global_batch_size over one micro-batch on every
    process (ArgumentError if it is not a whole number of them), else 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch and torchrun
    per_step = args.per_device_batch_size * world  # one micro-batch on every process
    if args.global_batch_size is None:
        return args.grad_accum or 1
    if args.global_batch_size % per_step or (args.grad_accum and args.grad_accum != args.global_batch_size // per_step):
        raise ArgumentError(f"--global_batch_size {args.global_batch_size} must equal --per_device_batch_size "
                            f"{args.per_device_batch_size} x {world} processes x --grad_accum"
                            f"{f' {args.grad_accum}' if args.grad_accum else ' (a whole number)'}")
    return args.global_batch_size // per_step


def check_rules(args, rules: dict) -> None:
    """Each flag of `args` named in `rules` (flag -> (test, what it must be)) passes its test, test(value). A file
    without the flag skips its rule. Rules that relate two flags are the algorithm file's own small checks."""
    for name, (ok, want) in rules.items():
        if hasattr(args, name) and not ok(getattr(args, name)):
            raise ArgumentError(f"--{name} {getattr(args, name)!r}: must be {want}")


def check_model_arg(model: str) -> None:
    if model == "tiny":
        return
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ArgumentError(f"--model {model}: the folder has no config.json (a save_pretrained folder is expected)")
    elif os.path.exists(path):
        raise ArgumentError(f"--model {model}: a file; a model is a save_pretrained folder or a hub id")
    elif path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise ArgumentError(f"--model {model}: no such folder, and not a hub id (ORG/NAME, e.g. google/gemma-1.1-7b-it)")


def check_task_files(args) -> None:
    """Local data files fit the task: each is read and parsed now (errors name the file and row), not after hours."""
    for split, path, limit in (("train", getattr(args, "train_file", None), getattr(args, "n_train_prompts", None)),
                               ("test", args.test_file, args.n_test)):
        if path is None:
            continue
        if args.task == "arith":
            raise ArgumentError(f"--{split}_file {path}: task arith generates its own problems; pass --task gsm8k, "
                                "math or aime24 with a data file")
        try:
            problems = load_task(args.task, split, path)
        except (DataError, ValueError) as e:
            raise ArgumentError(f"--{split}_file: {e}") from None
        if not problems:
            raise ArgumentError(f"--{split}_file {path}: no problems in the file")


def check_offline_data(args) -> None:
    """--offline_data is read and checked row by row now (`read_offline_data`); --save_offline_data can be written and
    is not the file being imported."""
    path, save = getattr(args, "offline_data", None), getattr(args, "save_offline_data", None)
    if path:
        try:
            read_offline_data(path)
        except DataError as e:
            raise ArgumentError(f"--offline_data: {e}") from None
    if save:
        if os.path.isdir(save):
            raise ArgumentError(f"--save_offline_data {save}: a folder; a .jsonl file path is expected")
        if path and os.path.abspath(save) == os.path.abspath(path):
            raise ArgumentError(f"--save_offline_data {save}: the file --offline_data reads; choose another path")
        check_writable_dir("--save_offline_data", os.path.dirname(os.path.abspath(save)))


def check_writable_dir(flag: str, path: str) -> None:
    """`path` is a folder this process can write in, or one it can create: its nearest existing ancestor is a writable
    folder. Nothing is created here."""
    if not path:
        raise ArgumentError(f"{flag} is empty")
    probe = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ArgumentError(f"{flag} {path}: cannot be created, {probe} is a file")
    try:  # a real write, removed at once: permission bits say nothing to root, or of a read-only or virtual file system
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-probe-"))
    except OSError as e:
        raise ArgumentError(f"{flag} {path}: cannot be {'written' if probe == os.path.abspath(path) else 'created'}: "
                            f"{probe}: {e.strerror}") from None


TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab")  # = their packages


def check_report_to(report_to: str) -> None:
    import importlib.util

    for tracker in filter(None, (t.strip() for t in (report_to or "").split(","))):
        if tracker not in TRACKERS:
            raise ArgumentError(f"--report_to {tracker}: unknown tracker ({', '.join(TRACKERS)}; empty for none)")
        if importlib.util.find_spec(tracker) is None:
            raise ArgumentError(f"--report_to {tracker}: the {tracker} package is not installed (pip install {tracker}), "
                                "or pass --report_to '' for no tracker")
