"""The run's machinery: what keeps a run safe and launchable. A reader need not open it to understand or copy an
algorithm (that is the algorithm file and common.py).

    cli.py         the shared flags (Base), parsing, validation, defaults that depend on the model
    launch.py      start(): the one call that starts a run; the accelerator, precision, output-folder claim, run.json
    memory.py      the memory plan of a launch and its preflights (GPU memory, host RAM)
    checkpoint.py  checkpoints, resume and saving models
    files.py       atomic writes, verified files, cache keys, the chunked cache, crash-test points
    sharding.py    full parameters to generate from under FSDP; consolidated state dicts
    mathverify.py  math-verify in helper processes, with a timeout that holds

Nothing here imports an algorithm file or benchmarks/. files.py, sharding.py and mathverify.py import nothing of the
project (common.py uses them); the others read tasks, data files and the model code through common.py.
"""
