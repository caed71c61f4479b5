"""Starting a run (`start`), the accelerator and precision, the output folder's lock, the schedule, logs and reports."""

import atexit
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from common import plan_steps
from runtime.checkpoint import checkpoint_path, disk_preflight, stop_on_signals
from runtime.cli import ArgumentError, describe_run, grad_accum, one_line_errors, parse_args, probe_writable, validate_args
from runtime.files import OUTPUTS, clean_orphans, read_json, write_json_atomic, writing
from runtime.memory import MEMORY_MARGIN_BYTES, host_ram_preflight, memory_preflight, read_model_config

RUN_FILES = ("run.json", "metrics.jsonl", "results.json", "checkpoint", "checkpoint.old", "model")
RESUME_MAY_CHANGE = ("resume", "max_steps", "epochs", "save_every", "save_every_minutes", "eval_every", "report_to",
                     "dist_timeout", "skip_memory_check")  # how long and how often, not what: a resume may change these
PRECISIONS = {"no": "fp32", "fp32": "fp32", "bf16": "bf16"}  # accelerate's mixed_precision names -> ours
FSDP2_TESTED = {"torch": (2, 13), "accelerate": (1, 16)}  # whose FSDP2 internals `unsharded` reads (requirements.txt)
_CLAIMS: dict[str, int] = {}  # lock path -> the open file descriptor holding it
_PEAKS: dict[str, dict] = {}  # phase -> this process's peak GB in it
_config = lambda args: {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in asdict(args).items()}


def start(Args, tiny: dict, paper: dict, rules: dict | None = None, check=None) -> tuple:
    """Start a training run; returns (args, accelerator). In order, it:
      1. parses the command line into `Args` with the model's defaults (`tiny`, `paper`); makes a DataError one `error:` line;
         sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless set; makes SIGTERM and SIGUSR1 checkpoint and stop;
      2. validates every flag and input file (`check(args)`, `rules`) and probes that --cache_dir can be written;
      3. on the first process, claims --output_dir (a lock; temp files of killed runs removed);
      4. sets up the accelerator (precision, FSDP, process group, seeds, trackers);
      5. checks a resumed run is the same run, runs the preflights (GPU memory, host RAM, disk); 6. writes run.json."""
    args = parse_args(Args, tiny, paper)
    sys.excepthook = one_line_errors
    alloc = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "expandable_segments:True"
    # before CUDA starts: a KV cache growing each decode step extends one segment, leaving no freed blocks of every size
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = alloc
    stop_on_signals()
    if check:
        check(args)
    validate_args(args, rules)
    probe_writable(args)
    main = os.environ.get("RANK", "0") == "0"  # accelerate launch and torchrun set it; only the first process claims
    check_output_dir(args.output_dir, args.resume, quiet=not main)
    args.grad_accum = grad_accum(args)
    args.global_batch_size = args.per_device_batch_size * int(os.environ.get("WORLD_SIZE", "1")) * args.grad_accum
    if main:
        claim_output_dir(args.output_dir, args.resume)
    describe_run(args)
    name = os.path.splitext(os.path.basename(sys.modules[Args.__module__].__file__))[0]  # the algorithm file's name
    accelerator, launch = setup_accelerator(args, name)
    if args.resume:  # before run.json is written again: only the run that wrote it goes on
        check_same_run(args.output_dir, name, _config(args), accelerator.num_processes)
    accelerator.print(preflight(args, name, accelerator, launch["sharding"]))
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json_atomic(os.path.join(args.output_dir, "run.json"), {"algo": name, **launch, "args": _config(args),
                                                                      "cuda_alloc_conf": alloc})
    return args, accelerator


def preflight(args, name: str, accelerator: Accelerator, sharding: str) -> str:
    """The memory plan on the GPUs and host RAM, and the disk --output_dir needs (a resumed run's files count as free)."""
    config, terms, skip = read_model_config(args.model), args.memory_terms(), args.skip_memory_check
    sharding = None if sharding == "none" else "FSDP"
    device_bytes = torch.cuda.mem_get_info(accelerator.device)[1] if accelerator.device.type == "cuda" else None
    gpu = memory_preflight(name, terms, config, accelerator.num_processes, sharding, args.precision,
                           args.per_device_batch_size, args.gen_batch_size, args.max_new_tokens, args.lora_r, device_bytes,
                           skip, n_samples=args.n_samples)
    host = host_ram_preflight(name, terms, config, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
                              sharding, args.precision, args.lora_r, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                              skip)
    folder = os.path.abspath(args.output_dir)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.output_dir) for f in fs) if args.resume else 0
    disk = disk_preflight(name, terms, config, args.precision, args.lora_r, args.epochs or 1, args.output_dir,
                          shutil.disk_usage(folder).free + used, skip)
    margin = (f" ({MEMORY_MARGIN_BYTES / 1e9:.0f} GB of each GPU is kept for what the plan cannot trace: CUDA context, "
              "NCCL buffers, allocator fragmentation)") if device_bytes else ""
    return f"{gpu}{margin}\n{host}\n{disk}"


def setup_accelerator(args, name: str) -> tuple[Accelerator, dict]:
    """The Accelerator this launch asked for, checked, with trackers and per-rank seeds, and what was launched; sets
    `args.precision`. FSDP reduce-scatters every micro-batch (no_sync keeps a whole model of unsharded gradients)."""
    from datetime import timedelta

    from accelerate.utils import FullyShardedDataParallelPlugin, GradientAccumulationPlugin, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))  # gloo on CPU needs cpu=True, or each process runs a world of one
    # set by configs/fsdp.yaml; without GPUs accelerate quietly runs plain data parallel instead
    sharding = "FSDP" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else None
    fsdp_version = int(os.environ.get("FSDP_VERSION", "1")) if sharding else 0  # accelerate's default: 1
    args.precision = resolve_precision(args.model, args.precision)
    check_versions(sharding, fsdp_version)
    no_sharding = ("the accelerate config asks for FSDP, which needs GPUs: accelerate does not shard on CPU processes. "
                   "On a CPU machine run `python SCRIPT.py` (one process) or `accelerate launch --multi_gpu "
                   "--num_processes N SCRIPT.py` (N gloo processes, data parallel); configs/fsdp.yaml is for GPU nodes")
    kwargs = {}
    if sharding and args.precision == "bf16":  # the plugin's other settings come from the env
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(mixed_precision_policy=dict(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    accumulation = GradientAccumulationPlugin(num_steps=getattr(args, "grad_accum", 1) or 1,
                                              sync_each_batch=sharding == "FSDP", sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=accumulation, log_with=args.report_to or None,
                              mixed_precision="bf16" if args.precision == "bf16" else "no", project_dir=args.output_dir,
                              cpu=not torch.cuda.is_available() and world > 1, **kwargs,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))])
    if sharding and accelerator.distributed_type.name != sharding:
        raise ArgumentError(f"{no_sharding} (accelerate set up {accelerator.distributed_type.name} instead)")
    if accelerator.num_processes != world:
        raise RuntimeError(f"{world} processes were launched, but accelerate runs a world of {accelerator.num_processes}")
    set_seed(args.seed + accelerator.process_index)
    torch.use_deterministic_algorithms(False)
    if args.report_to:
        accelerator.init_trackers(name, config=_config(args))
    launch = dict(precision=args.precision, world_size=accelerator.num_processes,
                  sharding="FSDP2" if sharding else "none", **{k: getattr(args, k, None) for k in (
                      "per_device_batch_size", "grad_accum", "global_batch_size")},
                  threads=torch.get_num_threads())  # float results reproduce exactly only at the same thread count
    accelerator.print(f"{name}: {accelerator.num_processes} process(es), device {accelerator.device}, "
                      + ", ".join(f"{k} {v}" for k, v in launch.items() if k != "world_size" and v is not None))
    return accelerator, launch


def fit_to_data(n_examples: int, args, accelerator: Accelerator) -> tuple[int, int]:
    """(steps per epoch, steps in all); sets args.epochs; data short of one global batch shrinks it, with a warning."""
    plan = plan_steps(n_examples, args.per_device_batch_size, accelerator.num_processes, args.grad_accum, args.epochs,
                      args.max_steps)
    if (plan["per_device_batch_size"], plan["grad_accum"]) != (args.per_device_batch_size, args.grad_accum):
        per_step = plan["per_device_batch_size"] * accelerator.num_processes
        accelerator.print(f"warning: {n_examples} training examples are less than one global batch of "
                          f"{args.global_batch_size}: each step takes {plan['grad_accum'] * per_step} "
                          f"({plan['grad_accum']} accumulation steps of {plan['per_device_batch_size']} per process)")
        args.per_device_batch_size, args.grad_accum = plan["per_device_batch_size"], plan["grad_accum"]
        accelerator.gradient_accumulation_steps = plan["grad_accum"]
        if accelerator.is_main_process:
            _update_run_json(args.output_dir, effective={"grad_accum": plan["grad_accum"],
                                                         "global_batch_size": plan["grad_accum"] * per_step})
    args.epochs = plan["epochs"]
    return plan["steps_per_epoch"], plan["total_steps"]


def _update_run_json(output_dir: str, **fields) -> None:
    path = os.path.join(output_dir, "run.json")
    write_json_atomic(path, dict(read_json(path, {}), **fields))


def check_output_dir(output_dir: str, resume: bool, quiet: bool = False) -> None:
    """A fresh run needs a folder with no run in it; --resume a checkpoint there, or the run.json of a run that stopped
    before its first one."""
    if not output_dir or (os.path.exists(output_dir) and not os.path.isdir(output_dir)):
        raise ArgumentError(f"--output_dir {output_dir}: a file, not a folder" if output_dir else "--output_dir is empty")
    if resume and checkpoint_path(output_dir, hashes=False, quiet=quiet) is None:
        run = read_json(os.path.join(output_dir, "run.json"))
        if not (isinstance(run, dict) and "algo" in run and "args" in run):
            raise ArgumentError(f"--resume: no complete checkpoint in {output_dir} (expected "
                                f"{os.path.join(output_dir, 'checkpoint', 'trainer_state.json')}) and no run.json of a "
                                "run to start again in place; drop --resume for a fresh run in a new --output_dir")
        if os.path.exists(os.path.join(output_dir, "model")) and "final" in read_json(os.path.join(output_dir,
                                                                                                   "results.json"), {}):
            raise ArgumentError(f"--resume: the run in {output_dir} has finished (model/ and the final results are "
                                "there) and kept no checkpoint; choose a new --output_dir")
    elif not resume and os.path.isdir(output_dir) and (found := [f for f in RUN_FILES
                                                                 if os.path.exists(os.path.join(output_dir, f))]):
        raise ArgumentError(f"--output_dir {output_dir} holds another run ({', '.join(found)}): pass --resume to go on "
                            "with it, or choose a new --output_dir")


def claim_output_dir(output_dir: str, resume: bool) -> None:
    """An exclusive flock on `.lock`, naming its holder (the kernel drops a dead one's: taken over, with a note); then
    `check_output_dir` again under the lock, and the temp files of killed runs are removed."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(output_dir, ".lock"))
    if path not in _CLAIMS:  # this process claimed it already (e.g. two runs in one test process, one after the other)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArgumentError(f"--output_dir {output_dir} is in use by another run ({holder or 'starting'}, see "
                                f"{path}): wait until it ends, or choose a new --output_dir") from None
        except OSError as e:  # a filesystem without locks (some NFS mounts): go on, unprotected, and say so
            print(f"warning: cannot lock {path} ({e.strerror}): nothing stops a second launch into {output_dir}",
                  file=sys.stderr)
        if holder:  # the lock was free but not emptied: its holder died without its exit handler
            print(f"{output_dir}: the run that held it ({holder}) is gone; taking it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(sys.argv)}\n".encode(), 0)
        _CLAIMS[path] = fd
        atexit.register(release_output_dir, path)
    check_output_dir(output_dir, resume, quiet=True)
    for removed in clean_orphans(output_dir):
        print(f"removed {removed}, left by a killed run")


def release_output_dir(path: str) -> None:
    if (fd := _CLAIMS.pop(path, None)) is not None:
        os.ftruncate(fd, 0)  # empty: the next run takes it without a note
        os.close(fd)  # releases the lock


def check_same_run(output_dir: str, algo: str, config: dict, world: int | None = None) -> None:
    """--resume goes on only with this algorithm, these flags (but RESUME_MAY_CHANGE) and `world` processes."""
    if (run := read_json(os.path.join(output_dir, "run.json"))) is None:
        return
    if world and (there := run.get("world_size", world)) != world and checkpoint_path(output_dir, False, quiet=True):
        raise ArgumentError(f"--resume: the checkpoint in {output_dir} was written by {there} process(es), this launch "
                            f"has {world}: a checkpoint resumes only with the process count that wrote it; relaunch with "
                            f"{there}, or choose a new --output_dir")
    diff = [f"the algorithm ({run.get('algo')} there, {algo} here)"] if run.get("algo") != algo else []
    old = run.get("args", {})
    diff += [f"--{k} ({old.get(k, 'unset')!r} there, {config.get(k, 'unset')!r} here)" for k in sorted(set(old) | set(config))
             if k not in RESUME_MAY_CHANGE and old.get(k) != config.get(k)]
    if diff:
        raise ArgumentError(f"--resume: {os.path.join(output_dir, 'run.json')} is another run's: {', '.join(diff)} "
                            "differ; resume with that run's flags, or choose a new --output_dir")


def resolve_precision(model: str, precision: str | None) -> str:
    """fp32 or bf16: the launch's mixed_precision, which --precision may only repeat; else --precision; else by model."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision is not None and precision not in ("fp32", "bf16"):
        raise ArgumentError(f"--precision {precision!r}: must be one of 'fp32', 'bf16'")
    if launched and launched not in PRECISIONS:
        raise ArgumentError(f"the accelerate launch asks for mixed_precision {launched}: only bf16 or no (fp32) is "
                            "supported (fp16 needs loss scaling, which these scripts do not do)")
    if launched and precision is not None and precision != PRECISIONS[launched]:
        raise ArgumentError(f"--precision {precision} contradicts the accelerate launch's mixed_precision {launched}: "
                            f"drop --precision, or launch with --mixed_precision {'no' if precision == 'fp32' else precision}")
    return PRECISIONS[launched] if launched else precision or ("fp32" if model == "tiny" else "bf16")


def check_versions(sharding: str | None, fsdp_version: int, versions: dict | None = None) -> None:
    """FSDP1 (a config without fsdp_version: 2) stops at start, as does FSDP2 on older torch or accelerate than
    FSDP2_TESTED (private internals `unsharded` reads)."""
    if sharding != "FSDP":
        return
    if fsdp_version != 2:
        raise ArgumentError(f"the accelerate config asks for FSDP version {fsdp_version}: FSDP1 is not supported; launch "
                            "with configs/fsdp.yaml (FSDP2, fsdp_version: 2)")
    import accelerate

    for name, version in (versions or {"torch": torch.__version__, "accelerate": accelerate.__version__}).items():
        if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (need := FSDP2_TESTED[name]):
            raise ArgumentError(f"FSDP2 (configs/fsdp.yaml) needs {name} >= {need[0]}.{need[1]} (the version whose FSDP2 "
                                f"internals this code was tested with); found {version}. Upgrade {name}, or launch "
                                "with configs/ddp.yaml and --lora_r")


def log_metrics(accelerator: Accelerator, metrics: dict, step: int, output_dir: str) -> None:
    """Log to the trackers and append a line to metrics.jsonl (main process), with the step's peak memory on CUDA."""
    metrics = {**metrics, **memory_peaks(accelerator, "start to step 1" if step == 1 else "training", output_dir)}
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with writing(path := os.path.join(output_dir, "metrics.jsonl")), open(path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")  # a line cut off by a kill is dropped on resume


def memory_peaks(accelerator, phase: str, output_dir: str) -> dict:
    """On CUDA, the peak allocated and reserved GB since the last call (then reset), each phase's peak to run.json."""
    if accelerator.device.type != "cuda":
        return {}
    now = {f"memory/{k}_gb": getattr(torch.cuda, f"max_memory_{k}")(accelerator.device) / 1e9
           for k in ("allocated", "reserved")}
    torch.cuda.reset_peak_memory_stats(accelerator.device)
    if accelerator.is_main_process and any(v > _PEAKS.get(phase, {}).get(k, 0) for k, v in now.items()):
        _PEAKS[phase] = {k: max(v, _PEAKS.get(phase, {}).get(k, 0)) for k, v in now.items()}
        _update_run_json(output_dir, memory=_PEAKS)
    return now


def report_outputs(accelerator: Accelerator, output_dir: str) -> None:
    """The run's last lines: where every output went (each entry of --output_dir, and the exported offline dataset)."""
    memory_peaks(accelerator, "final evaluation and save", output_dir)
    if accelerator.is_main_process:
        names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
        print("\n".join([f"outputs in {os.path.abspath(output_dir)}:"] + [
            f"  {n}{'/' if os.path.isdir(os.path.join(output_dir, n)) else ''}" for n in names] + [
            f"{what}: {os.path.abspath(path)}" for what, path in dict.fromkeys(OUTPUTS)]), flush=True)
