"""The run's machinery: what keeps a run safe and launchable. A reader need not open it to understand or copy an
algorithm (that is the algorithm file and common.py).

    cli.py         the shared flags (Base), parsing, validation, defaults that depend on the model
    launch.py      start(): the one call that starts a run; the accelerator, precision, output-folder claim, run.json
    memory.py      the memory plan of a launch and its preflights (GPU memory, host RAM)
    checkpoint.py  checkpoints, resume and saving models
    files.py       atomic writes, verified files, cache keys, the chunked cache, locks, crash-test points
    mathverify.py  math-verify in helper processes, with a timeout that holds

Nothing here imports an algorithm file, common.py or benchmarks/, except cli.py and launch.py, which read the task
list and data files through common.py.
"""
