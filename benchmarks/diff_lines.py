"""How far each algorithm file is from rs.py, the template: the lines `diff` shows, against the README's targets.

    python benchmarks/diff_lines.py

Changed lines are `diff A B | grep -c '^[<>]'`. tests/test_layout.py asserts the targets, so they cannot drift.
"""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (A, B) -> the most changed lines `diff A B` may show
# (rs, spo): SPO carries its rollout policy and the refresh-time online rollouts, which are its algorithm
TARGETS = {("rs.py", "dpo.py"): 120, ("rs.py", "kto.py"): 120, ("rs.py", "dro.py"): 120, ("rs.py", "spo.py"): 300,
           ("rs.py", "dqo.py"): 200, ("dro.py", "dqo.py"): 150}
MAX_LINES = {"dqo.py": 350, "*": 400}  # per file


def lines(name: str) -> list[str]:
    with open(os.path.join(ROOT, name)) as f:
        return f.read().splitlines()


def changed(a: str, b: str) -> int:
    """The lines `diff a b` marks with < or > (GNU diff: the measure the README states)."""
    out = subprocess.run(["diff", a, b], cwd=ROOT, capture_output=True, text=True).stdout
    return sum(line.startswith(("<", ">")) for line in out.splitlines())


def table() -> str:
    out = ["| pair | changed lines | target | file sizes |", "| --- | --- | --- | --- |"]
    for (a, b), target in TARGETS.items():
        out.append(f"| {a[:-3]} / {b[:-3]} | {changed(a, b)} | ≤ {target} | {len(lines(a))} / {len(lines(b))} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table())
