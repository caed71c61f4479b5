"""A warm launcher for the crash tests: it imports what the scripts import once, then runs each command it reads from
stdin (a JSON list a line, each command an object: argv, env, stdout, stderr, fsize) in forked children, started
together, and answers with their exit statuses as `subprocess` gives them (137 for a failpoint). A chain of
kill-and-resume runs then pays one interpreter start (about 6 s of CPU here), not one per run. The parent never runs
a torch op, so the children fork without thread pools."""

import atexit
import json
import os
import resource
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import accelerate  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers.models.llama.modeling_llama  # noqa: E402, F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402, F401

import common  # noqa: E402, F401



def child(req: dict) -> None:
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.environ.clear()
    os.environ.update(req["env"])
    if req.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], resource.RLIM_INFINITY))  # SIGXFSZ: python ignores it
    os.chdir(ROOT)
    sys.argv = req["argv"]
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:  # as the interpreter reports it: a message goes to stderr, status 1
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # os._exit skips them; a normal exit runs them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


print("ready", flush=True)
for line in sys.stdin:  # a list of commands, started together; the answer lists their exit statuses
    pids = []
    for req in json.loads(line):
        pid = os.fork()
        if pid == 0:
            child(req)
        pids.append(pid)
    print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]), flush=True)
