"""The algorithm files stay diffable against rs.py and each other (the README's "Reading and diffing" targets), keep
the section order of STYLE.md, and share their common blocks line for line."""


import pytest

from benchmarks import diff_lines

ALGOS = ["rs.py", "dpo.py", "kto.py", "dro.py", "dqo.py", "spo.py"]


@pytest.mark.parametrize("pair", list(diff_lines.TARGETS), ids=lambda p: f"{p[0]}-{p[1]}")
def test_diff_targets(pair):
    assert diff_lines.changed(*pair) <= diff_lines.TARGETS[pair], diff_lines.table()


@pytest.mark.parametrize("name", ALGOS)
def test_size_and_section_order(name):
    text = "\n".join(diff_lines.lines(name))
    assert len(diff_lines.lines(name)) <= diff_lines.MAX_LINES.get(name, diff_lines.MAX_LINES["*"])
    markers = ["\nclass Args:", "\n    # Algorithm-specific arguments", "\n# ALGO LOGIC: loss\ndef ",
               "\ndef main():", "    # setup\n", "    # models\n", "    # data\n", "    # ALGO LOGIC: data\n",
               "    # training loop\n", "                # ALGO LOGIC: loss\n", "    # evaluate and save\n",
               '\nif __name__ == "__main__":\n    main()']
    positions = [text.find(m) for m in markers]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), dict(zip(markers, positions))


def test_shared_args_are_identical():
    """Every shared flag has the same name, type, default and help in every file (the output dir aside)."""
    def shared(name):
        lines = diff_lines.lines(name)
        start, end = lines.index("class Args:"), lines.index("    # Algorithm-specific arguments")
        return [ln for ln in lines[start:end] if not ln.startswith(("    output_dir:", "    beta:"))]

    for name in ALGOS[1:]:
        assert shared(name) == shared("rs.py"), name
