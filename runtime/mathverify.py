"""math-verify in helper processes killed at a timeout (sympy on 10^{10^{10^{10}}} holds the GIL in one C call: no
thread or signal.alarm bounds it); each call has a helper of a small pool to itself."""

import atexit
import json
import os
import select
import subprocess
import sys
import threading

_MATH_HELPER = r"""
import json, signal, sys
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
configs = [LatexExtractionConfig(), ExprExtractionConfig()]
signal.signal(signal.SIGALRM, signal.SIG_DFL)  # SIGALRM then ends this process even inside a C call that holds the GIL
out, sys.stdout = sys.stdout, sys.stderr  # only replies go to our parent; a library's prints must not look like one
print("ready", file=out, flush=True)
for line in sys.stdin:  # ends when the parent closes the pipe, or exits
    pred, ref, timeout_s = json.loads(line)
    signal.setitimer(signal.ITIMER_REAL, timeout_s + 1.0)  # our parent kills us at timeout_s; this covers its death
    try:
        gold, guess = (parse("$" + s + "$", extraction_config=configs, parsing_timeout=None) for s in (ref, pred))
        ok = bool(gold and guess and verify(gold, guess, timeout_seconds=None))
    except Exception:
        ok = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(int(ok), file=out, flush=True)
"""
HELPER_START_TIMEOUT_S = 300.0  # importing sympy and math-verify takes about a second; much longer on a loaded machine
MAX_IDLE_HELPERS = 4  # helpers kept between calls, about 60 MB each; more start when more threads grade at once
_helpers = {"idle": [], "live": set(), "lock": threading.Lock()}


def _forget_helpers_after_fork() -> None:  # the child's own helpers; the parent's still see EOF when it exits
    for proc in _helpers["live"]:
        proc.stdin.close()
        proc.stdout.close()
    _helpers.update(idle=[], live=set(), lock=threading.Lock())


def _stop_helper(proc) -> None:
    proc.kill()
    proc.wait()  # reaped: no zombie
    with _helpers["lock"]:
        _helpers["live"].discard(proc)


def _stop_all_helpers() -> None:
    _helpers["idle"].clear()
    for proc in list(_helpers["live"]):  # busy ones too: their calls then return 0.0
        _stop_helper(proc)


os.register_at_fork(after_in_child=_forget_helpers_after_fork)
atexit.register(_stop_all_helpers)


def _readline(proc, timeout_s: float) -> bytes:
    """A line from the helper, or b"" after `timeout_s` or at its exit (poll, unlike select, takes any fd number)."""
    poller = select.poll()
    poller.register(proc.stdout, select.POLLIN)
    return proc.stdout.readline() if poller.poll(timeout_s * 1000) else b""


def _checkout_helper():
    """An idle helper, or a fresh one (None if it does not start)."""
    with _helpers["lock"]:
        while _helpers["idle"]:
            proc = _helpers["idle"].pop()
            if proc.poll() is None:
                return proc
            _helpers["live"].discard(proc)  # it died while idle; poll() reaped it
    proc = subprocess.Popen([sys.executable, "-c", _MATH_HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=0)  # raw pipes: poll sees all, no buffer lock at a fork
    with _helpers["lock"]:
        _helpers["live"].add(proc)
    if _readline(proc, HELPER_START_TIMEOUT_S) != b"ready\n":
        _stop_helper(proc)
        return None
    return proc


def math_equal(pred: str, ref: str, timeout_s: float = 5.0) -> bool:
    """math-verify's equivalence of two answers; False after `timeout_s` (from when the helper has them)."""
    proc = _checkout_helper()
    if proc is None:
        return False
    try:
        proc.stdin.write((json.dumps([pred, ref, timeout_s]) + "\n").encode())
        reply = _readline(proc, timeout_s)
    except OSError:  # it died before reading the answer
        reply = b""
    with _helpers["lock"]:
        if keep := reply in (b"0\n", b"1\n") and len(_helpers["idle"]) < MAX_IDLE_HELPERS:
            _helpers["idle"].append(proc)
    if not keep:  # timed out, died, out of step, or one too many
        _stop_helper(proc)
    return reply == b"1\n"
