"""benchmarks/gpu_check.py in its reduced CPU form, as the suite runs it: every line it prints on a GPU is printed,
and the run's own memory, counted by the tracker memory_trace.py uses, is within 5% of the fake-tensor trace of the
same model and sizes (the comparison a GPU makes against max_memory_allocated)."""

import os
import re

from conftest import run_command

LINES = ("gpu_check on CPU", "CPU form, REDUCED", "model: Gemma-1.1-7B-shaped, 1 of 28 layers", "decode: ",
         "memory generate: ", "memory score: ", "memory train: ", "step 1: charts/is_weight ", "optimizer step: ",
         "checkpoint: ", "memory within 5% of the trace: ")


def test_gpu_check_cpu_form_prints_every_line_and_matches_the_trace():
    code, stdout, stderr = run_command([os.path.join("benchmarks", "gpu_check.py"), "--device", "cpu", "--layers", "1"])
    assert code == 0, stderr[-4000:]
    lines = stdout.splitlines()
    for start in LINES:
        assert sum(line.startswith(start) for line in lines) == 1, (start, stdout)
    for phase in ("generate", "score", "train"):
        line = next(line for line in lines if line.startswith(f"memory {phase}: "))
        measured, traced, ratio = (float(x) for x in re.search(
            r"allocated ([\d.]+) GB \| traced ([\d.]+) GB \| measured/traced ([\d.]+)", line).groups())
        assert measured > 0 and traced > 0 and abs(ratio - 1) <= 0.05 and "within 5%: yes" in line, line
        assert "reserved n/a on CPU" in line
    assert "3 of 3 phases" in stdout
    step1 = next(line for line in lines if line.startswith("step 1: "))
    weight, kl = (float(x) for x in re.search(r"is_weight ([\d.]+) .* rewards/kl ([-+\d.]+)", step1).groups())
    assert 0.5 < weight <= 1.0 and abs(kl) < 1.0, step1  # the ratio of two forwards of the same weights
    checkpoint = next(line for line in lines if line.startswith("checkpoint: "))
    assert float(re.search(r"checkpoint: ([\d.]+) GB written at ([\d.]+) GB/s", checkpoint)[2]) > 0
