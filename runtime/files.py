"""Files a kill cannot leave half-written, cache keys, and the one chunked, locked, verified cache every cache uses."""

import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress

from tqdm.auto import tqdm

OUTPUTS: list[tuple[str, str]] = []  # (what, path) of outputs written outside --output_dir, for `report_outputs`
_FAILPOINT_HITS: dict[str, int] = {}
_DIGESTS: dict[str, str] = {}  # "path:size:ctime:inode" -> CRC-32, for `content_digest`
REPORT_FILES = re.compile(r"eval-.*\.json|quality\.json")  # written into a model folder after it was saved


def failpoint(name: str) -> None:
    """Crash tests: with FAILPOINT=<name>[@<n>] the process dies here the n-th time (exit 137, no cleanup, no flush)."""
    want, _, nth = os.environ.get("FAILPOINT", "").partition("@")
    if want == name:
        _FAILPOINT_HITS[name] = _FAILPOINT_HITS.get(name, 0) + 1
        if _FAILPOINT_HITS[name] == int(nth or 1):
            os._exit(137)


def file_hashes(paths: list[str]) -> list[str]:
    """CRC-32 of each file as 8 hex digits, several at once (zlib releases the GIL): fast enough to run at every save."""
    def crc(path: str) -> str:
        value = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                value = zlib.crc32(block, value)
        return f"{value:08x}"

    with ThreadPoolExecutor(max_workers=min(8, len(paths) or 1, os.cpu_count() or 1)) as pool:
        return list(pool.map(crc, paths))


class WriteError(SystemExit):
    """A failed write (disk full, file-size limit, permissions) as one line naming the file and the free space there."""

    def __init__(self, path: str, e: BaseException, consequence: str = ""):
        code = re.search(r"os error (\d+)|code: (\d+)", str(e))  # safetensors and torch wrap the OSError in their own
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else os.strerror(int(code.group(1) or code.group(2)))
                  if code else (str(e).strip().splitlines() or [""])[0] or type(e).__name__)
        if not isinstance(e, OSError) and (limit := resource.getrlimit(resource.RLIMIT_FSIZE)[0]) != resource.RLIM_INFINITY:
            reason += f" (this process may write files of at most {limit} bytes: ulimit -f)"
        d = os.path.abspath(path)  # the nearest existing folder, not a temp folder that the failed write removes
        while (not os.path.isdir(d) or ".tmp" in os.path.basename(d)) and os.path.dirname(d) != d:
            d = os.path.dirname(d)
        try:
            free = f"{shutil.disk_usage(d).free / 1e9:.1f} GB free on {d}"
        except OSError:
            free = f"free space on {d} unknown"
        super().__init__(f"error: cannot write {path}: {reason}; {free}" + (f". {consequence}" if consequence else ""))


@contextmanager
def writing(path: str, cleanup: str | None = None, consequence: str = ""):
    """A failure inside becomes a WriteError naming `path` (a folder: the file in it), after `cleanup` is removed."""
    try:
        yield
    except (WriteError, KeyboardInterrupt):
        raise
    except Exception as e:
        if os.path.isdir(path):  # the innermost traceback frame's path under it, else its newest file
            tb, found = e.__traceback__, None
            while tb is not None:
                found = next((str(v) for v in tb.tb_frame.f_locals.values() if isinstance(v, str | os.PathLike)
                              and str(v).startswith(path + os.sep)), found)
                tb = tb.tb_next
            files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
            path = found or (max(files, key=os.path.getmtime) if files else path)
        err = WriteError(path, e, consequence)  # before the cleanup: the file it names may be inside it
        if cleanup and os.path.exists(cleanup):
            shutil.rmtree(cleanup, ignore_errors=True) if os.path.isdir(cleanup) else os.remove(cleanup)
        raise err from None


def write_atomic(path: str, lines) -> None:
    """Write `lines` (strings, streamed) to a temp file and rename it into place: a kill never leaves a truncated file."""
    with writing(path, cleanup=(tmp := f"{path}.tmp-{os.getpid()}")):
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    write_atomic(path, [json.dumps(obj)])


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    write_atomic(path, (json.dumps(r) + "\n" for r in rows))


def read_json(path: str, default=None):
    """The JSON in `path`, or `default` if it is missing or unreadable."""
    with suppress(OSError, ValueError), open(path) as f:
        return json.load(f)
    return default


def clean_orphans(folder: str, prefix: str | tuple = "") -> list[str]:
    """Remove and return the temp files (`<prefix>*.tmp-PID`) killed writers left in `folder` (the caller holds its lock)."""
    removed = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith(prefix)
               and re.search(r"\.tmp-\d+$", n) and not n.endswith(f".tmp-{os.getpid()}")]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return removed


def cache_key(obj) -> str:
    """A short stable hash of a JSON-able description (model, task, sampling, ...): the name of a cache folder."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_digest(path: str | None, cache_dir: str | None = None) -> str | None:
    """A file's or folder's identity in cache keys: `cache_key` of its files' CRC-32s, each remembered by (path, size,
    ctime, inode) in `cache_dir/file-crc32.json`, so a 17 GB model is read once."""
    if path is None:
        return None
    memo_path = cache_dir and os.path.join(cache_dir, "file-crc32.json")
    memo = {**_DIGESTS, **(read_json(memo_path, {}) if memo_path else {})}
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names if not REPORT_FILES.fullmatch(f))
    keys = [f"{os.path.abspath(f)}:{st.st_size}:{st.st_ctime_ns}:{st.st_ino}" for f, st in ((f, os.stat(f)) for f in files)]
    new = [(f, k) for f, k in zip(files, keys) if k not in memo]  # any write or utime changes a file's ctime
    _DIGESTS.update(zip([k for _, k in new], file_hashes([f for f, _ in new])))
    if memo_path and new:
        os.makedirs(cache_dir, exist_ok=True)
        write_json_atomic(memo_path, {**memo, **_DIGESTS})
    return cache_key([[os.path.relpath(f, path), {**memo, **_DIGESTS}[k]] for f, k in zip(files, keys)])


def model_key(model: str, cache_dir: str | None = None, precision: str = "fp32") -> str:
    """The reference's identity in cache keys: tiny, its recipe's hash; a hub id; a folder, its digest; "@bf16" for bf16."""
    if model == "tiny":
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny",
                               "recipe.json")) as f:
            key = f"tiny/shipped-{cache_key(json.load(f))}"  # "shipped-": the key the shipped weights have always had
    else:
        key = f"local:{content_digest(path, cache_dir)}" if os.path.isdir(path := os.path.expanduser(model)) else model
    return key if precision == "fp32" else f"{key}@{precision}"


def chunk_problem(root: str, c: int, n_rows: int | None = None) -> str | None:
    """Why chunk `c` cannot be used ("missing"; rows or CRC-32 not those of its check file), or None if it verifies."""
    path, check = os.path.join(root, f"chunk-{c:05d}.jsonl"), os.path.join(root, f"check-{c:05d}.json")
    if not os.path.exists(check):
        return "missing" if not os.path.exists(path) else f"{path} has no check file (its write was cut off)"
    try:
        with open(check) as f:
            want = json.load(f)
        with open(path, "rb") as f:
            rows = sum(1 for _ in f)
        if rows != want["rows"] or rows != (want["rows"] if n_rows is None else n_rows):
            return f"{path} has {rows} rows, {want['rows']} when it was written ({n_rows} expected)"
        if file_hashes([path])[0] != want["crc32"]:
            return f"{path}: its bytes do not match the CRC-32 written with it"
    except FileNotFoundError:
        return f"{path} is missing"
    except (ValueError, KeyError, TypeError) as e:
        return f"{check} is damaged ({type(e).__name__}: {e})"
    return None


def write_chunk(root: str, c: int, rows: list[dict], point: str = "dataset.chunk.before_check") -> None:
    """Chunk `c` (atomic), then its check file; the failpoint `point` between the two."""
    write_jsonl_atomic(path := os.path.join(root, f"chunk-{c:05d}.jsonl"), rows)
    failpoint(point)
    write_json_atomic(os.path.join(root, f"check-{c:05d}.json"), {"rows": len(rows), "crc32": file_hashes([path])[0]})


def read_chunk(root: str, c: int, n_rows: int | None = None) -> list[dict] | None:
    """The rows of chunk `c` if it verifies, else None (a damaged one is named: it must be built again)."""
    if (problem := chunk_problem(root, c, n_rows)) is None:
        with open(os.path.join(root, f"chunk-{c:05d}.jsonl")) as f:
            return [json.loads(line) for line in f]
    if problem != "missing":
        print(f"warning: {problem}: computing it again", file=sys.stderr)
    return None


def cached_chunks(accelerator, parent: str, key_fields: dict, sizes: list[int], make: Callable[[int], list[dict]],
                  desc: str) -> tuple[list[list[dict]], str]:
    """(rows of each chunk, folder) of the cache `parent/<cache_key(key_fields)>`. Each process builds its share of the
    chunks that do not verify (`make(c)`, sizes[c] rows) under a flock per chunk, so runs sharing the cache split the work
    (a dead holder's lock is dropped by the kernel); then every process reads every chunk, and a damaged one stops the run."""
    root = os.path.join(parent, cache_key(key_fields))
    os.makedirs(root, exist_ok=True)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if rank == 0:
        write_json_atomic(os.path.join(root, "key.json"), key_fields)  # what the key stands for
    mine, todo, waiting, built = range(rank, len(sizes), world), [], [], 0
    for c in mine:
        if (problem := chunk_problem(root, c, sizes[c])) not in (None, "missing"):
            print(f"warning: {desc}: {problem}: sampling it again", file=sys.stderr)
        todo += [c] if problem else []
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc,
               disable=not (accelerator is None or accelerator.is_local_main_process))
    for blocking in (False, True):
        for c in waiting if blocking else todo:
            fd = os.open(os.path.join(root, f"lock-{c:05d}"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                with suppress(OSError):  # a filesystem without locks: no sharing, the chunk is still verified
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                    except BlockingIOError:
                        waiting.append(c)
                        continue
                if chunk_problem(root, c, sizes[c]) is not None:
                    clean_orphans(root, prefix=(f"chunk-{c:05d}.", f"check-{c:05d}."))  # a killed writer's
                    write_chunk(root, c, make(c))
                    built += 1
                    bar.update(1)
            finally:
                os.close(fd)  # releases the lock
    bar.close()
    if todo:  # after the bar is closed: on a line of its own
        print(f"{desc}: built {built} of the {len(todo)} missing chunks here, {len(todo) - built} by another run "
              f"({root})", flush=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if None in (chunks := [read_chunk(root, c, n) for c, n in enumerate(sizes)]):
        raise SystemExit(f"error: {desc}: chunk {chunks.index(None)} in {root} is missing or damaged; run again to "
                         "build it again")
    return chunks, root


def on_main(accelerator, decide: Callable[[], object]) -> object:
    """`decide()` on the main process, sent to every process: a choice all must make alike from files that may change."""
    from accelerate.utils import broadcast_object_list

    found = [decide() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    return found[0]
