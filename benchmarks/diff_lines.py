"""How far each algorithm file is from rs.py, the template, and from its neighbour: the lines `diff` shows.

    python benchmarks/diff_lines.py

Changed lines are `diff A B | grep -c '^[<>]'`. They are measured, not capped: a cap rewards moving an algorithm's code
out of its file. tests/test_layout.py checks instead that common.py holds only what two entry points use
(benchmarks/common_usage.py), and that no algorithm file exceeds MAX_LINES.
"""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = (("rs.py", "dpo.py"), ("rs.py", "kto.py"), ("rs.py", "dro.py"), ("rs.py", "spo.py"), ("rs.py", "dqo.py"),
         ("dro.py", "dqo.py"))
MAX_LINES = 450  # per algorithm file


def lines(name: str) -> list[str]:
    with open(os.path.join(ROOT, name)) as f:
        return f.read().splitlines()


def changed(a: str, b: str) -> int:
    """The lines `diff a b` marks with < or > (GNU diff: the measure the README states)."""
    out = subprocess.run(["diff", a, b], cwd=ROOT, capture_output=True, text=True).stdout
    return sum(line.startswith(("<", ">")) for line in out.splitlines())


def table() -> str:
    out = ["| pair | changed lines | lines only in the second | file sizes |", "| --- | --- | --- | --- |"]
    for a, b in PAIRS:
        out.append(f"| {a[:-3]} / {b[:-3]} | {changed(a, b)} | {changed_in(a, b)} | {len(lines(a))} / {len(lines(b))} |")
    return "\n".join(out)


def changed_in(a: str, b: str) -> int:
    """The lines `diff a b` marks with > (what b has that a does not)."""
    out = subprocess.run(["diff", a, b], cwd=ROOT, capture_output=True, text=True).stdout
    return sum(line.startswith(">") for line in out.splitlines())


if __name__ == "__main__":
    print(table())
