"""The algorithm files keep the section order that the README's "Reading and diffing the files" states, share their
common blocks line for line, and common.py holds only shared plumbing: every top-level definition in it is used by at
least two of the seven entry points (the six algorithm files and eval.py; benchmarks and tests do not count)."""

import pytest

from benchmarks import common_usage, diff_lines

ALGOS = ["rs.py", "dpo.py", "kto.py", "dro.py", "dqo.py", "spo.py"]


def test_common_holds_only_what_two_entry_points_use():
    """A definition that one entry point uses belongs in that file (a diff against rs.py then shows it); one that only
    benchmarks or tests use belongs there. Uses through other definitions of common.py count."""
    used = common_usage.usage()
    lonely = {name: [e[:-3] for e in entries] for name, entries in used.items() if len(entries) < 2}
    assert not lonely, f"used by fewer than two entry points: {lonely}"


def test_usage_counts_what_an_entry_point_reaches():
    """The check above can fail: a name only spo.py imports, and one that nothing uses, are found."""
    refs, _ = common_usage.definitions()
    assert "_arith_walk" in refs["grade_arith"]  # a private helper is reached through the definitions that call it
    used = common_usage.usage()
    assert used["grade_arith"] == list(common_usage.ENTRY_POINTS)  # every entry point grades
    assert "ValueModel" in common_usage.imported_names("dqo.py") and "ValueModel" not in common_usage.imported_names("rs.py")
    assert sorted(used["ValueModel"]) == ["dqo.py", "dro.py", "eval.py"]


@pytest.mark.parametrize("name", ALGOS)
def test_size_and_section_order(name):
    text = "\n".join(diff_lines.lines(name))
    assert len(diff_lines.lines(name)) <= diff_lines.MAX_LINES
    markers = ["\nclass Args(Base):", "\n# ALGO LOGIC: loss\ndef ",
               "\ndef main():", "    # setup\n", "    # models\n", "    # data\n", "    # ALGO LOGIC: data\n",
               "    # training loop\n", "                # ALGO LOGIC: loss\n", "    # evaluate and save\n",
               '\nif __name__ == "__main__":\n    main()']
    positions = [text.find(m) for m in markers]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), dict(zip(markers, positions))


def test_each_args_lists_only_what_its_algorithm_adds_or_sets_differently():
    """The shared flags live in one base dataclass (runtime.cli.Base); each file's Args subclasses it and redeclares a
    shared flag only to set it differently (its --output_dir), so `diff rs.py dqo.py` starts with DQO's own flags."""
    import dataclasses
    import importlib

    from runtime.cli import Base

    shared = {f.name: f for f in dataclasses.fields(Base)}
    for name in ALGOS:
        Args = importlib.import_module(name[:-3]).Args
        assert issubclass(Args, Base) and Args.__bases__ == (Base,), name
        lines = diff_lines.lines(name)
        own = [line.split(":")[0].strip() for line in lines[lines.index("class Args(Base):"):]
               if line.startswith("    ") and ": " in line and " = arg(" in line]
        for field in own:
            if field in shared:  # redeclared: it must differ from the shared one
                f = next(f for f in dataclasses.fields(Args) if f.name == field)
                assert (f.default, f.metadata) != (shared[field].default, shared[field].metadata), (name, field)
        assert {f.name for f in dataclasses.fields(Args)} >= shared.keys()  # every shared flag, as --help shows it
