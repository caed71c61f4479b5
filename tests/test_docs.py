"""The README is a five-minute read with the quick start first, and no figure in it or in docs/ can go stale unseen:
every relative link resolves, the results figures are those compare.py wrote (benchmarks/results/), the tiny
reference's are those its build wrote (assets/tiny/), and the file map names functions that exist. The memory and time
tables are checked by tests/test_memory_plan.py and tests/test_time_plan.py, the example rows by
tests/test_offline_data.py."""

import glob
import json
import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
RESULTS_MD = os.path.join(ROOT, "benchmarks", "results", "results.md")
RESULTS_JSON = os.path.join(ROOT, "benchmarks", "results", "results.json")
TINY = os.path.join(ROOT, "assets", "tiny")
NUMBER = re.compile(r"\d+(?:\.\d+)?")  # unsigned: the docs write − where results.md writes -
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n") + len(heading) + 1
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text[start:], re.M)]
    return text[start:start + ends[0]] if ends else text[start:]


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
        out.add(slug.replace(" ", "-"))
    return out


def test_readme_is_short_with_the_quick_start_first():
    text = read(README)
    assert len(text) <= 15_000, f"README.md has {len(text)} characters: move material to docs/"
    head = text[:2500]
    assert "pip install" in head and "python dqo.py" in head, "the quick start must be within the first 2,500 characters"
    ci = [line.strip() for line in read(os.path.join(ROOT, ".ci", "run")).splitlines() if "pytest" in line]
    assert ci and ci[-1] in head, f"the quick start's test command must be CI's: {ci}"
    order = ["## Quick start", "## Files", "## Results", "## Real models and multi-GPU", "## Reading and diffing the files"]
    at = [text.index(h + "\n") for h in order]
    assert at == sorted(at), order


def test_every_relative_link_resolves():
    checked = 0
    for md in [README, *DOCS]:
        text = read(md)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(md), path)) if path else md
            assert os.path.exists(dest), f"{os.path.relpath(md, ROOT)}: {target} does not resolve"
            if anchor:
                assert dest.endswith(".md") and anchor in anchors(read(dest)), f"{os.path.relpath(md, ROOT)}: {target}"
            checked += 1
    assert checked >= 10  # the README and docs/ link to each other and to the results


def results_md_lines() -> set[str]:
    return set(read(RESULTS_MD).splitlines())


def test_readme_results_table_is_compare_py_s():
    """The README's six rows are results.md's, line for line, and the reference it quotes is results.md's."""
    results = section(read(README), "## Results")
    rows = [line for line in results.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["RS", "DPO", "KTO", "DRO", "SPO", "DQO"]
    assert set(rows) <= results_md_lines(), set(rows) - results_md_lines()
    method_table = "\n\n".join(read(RESULTS_MD).split("\n\n")[:2])  # its header paragraph and the methods' table
    prose = "\n".join(line for line in results.splitlines() if not line.startswith("|"))
    unknown = set(NUMBER.findall(prose)) - set(NUMBER.findall(method_table))
    assert not unknown, f"figures in the README's results that results.md's table does not hold: {unknown}"
    assert "The reference scores 40.3 greedy and 45.5 sampled." in prose and "| reference | 8 | 40.3 ± 0.0" in method_table


def intervals(text: str) -> list[tuple]:
    """Every `m [lo, hi]` and `m ± sd [lo, hi]` as (m, lo, hi) floats; a bare interval `[lo, hi]` as (None, lo, hi)."""
    text = re.sub(r"\s+", " ", text.replace("−", "-"))
    num = r"[-+]?\d+(?:\.\d+)?"
    found = re.findall(rf"(?:({num})(?: ± {num})? )?\[({num}), ({num})\]", text)
    return [(float(m) if m else None, float(lo), float(hi)) for m, lo, hi in found]


def curve_means(method: str) -> list[str]:
    """Greedy accuracy (%) at each evaluation along training, mean over seeds, as compare.py's plot draws it."""
    with open(RESULTS_JSON) as f:
        runs = json.load(f)[method].values()
    n = min(len(r["curve"]) for r in runs)
    return [f"{100 * np.mean([r['curve'][i][1] for r in runs]):.1f}" for i in range(n)]


def test_docs_results_figures_are_compare_py_s():
    """Every table row of docs/results.md is a row of results.md, and every other figure is in results.md, is a point of
    the mean curves in results.json, or is the reference's failure share in assets/tiny/quality.json."""
    text = read(os.path.join(ROOT, "docs", "results.md"))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "|---" not in line]
    assert len(rows) >= 40 and set(rows) <= results_md_lines(), set(rows) - results_md_lines()
    with open(os.path.join(TINY, "quality.json")) as f:
        quality = json.load(f)
    known = set(NUMBER.findall(read(RESULTS_MD))) | {f"{100 * quality['slip_share']:.1f}", str(quality["n_problems"])}
    known |= set(curve_means("DQO")) | set(curve_means("DRO"))
    prose = "\n".join(line for line in text.splitlines() if not line.startswith("|"))
    prose = re.sub(r"`[^`]*`", "", prose)  # flags and commands (`--lam 0.95`) are settings, not figures
    unknown = sorted(set(NUMBER.findall(prose)) - known, key=float)
    assert not unknown, f"figures in docs/results.md that no results file holds: {unknown}"
    # each "mean [low, high]" the prose quotes is one of results.md's, or its negation (a difference read the other way)
    stated = set(intervals(read(RESULTS_MD)))
    stated |= {(None, lo, hi) for _, lo, hi in stated}
    for m, lo, hi in intervals(prose):
        assert (m, lo, hi) in stated or (None if m is None else -m, -hi, -lo) in stated, f"docs/results.md: {m} [{lo}, {hi}]"
    # the peaks the prose names are the curves' maxima, and the ends are results.md's means
    assert "DQO: 68.9 at a third of its epoch, 61.5 at the end" in prose and max(curve_means("DQO"), key=float) == "68.9"
    assert "DRO: 72.8 at two thirds, 71.4 at the end" in prose and max(curve_means("DRO"), key=float) == "72.8"


def test_tiny_default_figures_are_the_shipped_reference_s():
    text = read(os.path.join(ROOT, "docs", "tiny-default.md"))
    cfg, recipe, quality = (json.loads(read(os.path.join(TINY, n))) for n in ("config.json", "recipe.json", "quality.json"))
    assert (f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads"
            + (", tied embeddings" if cfg["tie_word_embeddings"] else "")) in text
    assert f"SFT'd for {recipe['sft']['steps']} steps" in text
    assert f"with probability {recipe['sft']['carry_slip']}" in text
    f = quality["greedy_failures"]
    measured = (f"Measured on {quality['n_problems']} test problems ([quality.json](../assets/tiny/quality.json)): "
                f"{100 * quality['greedy']:.1f}% greedy, {100 * quality['sampled']:.1f}% sampled. "
                f"{100 * f['slip']:.1f}% of greedy failures are that slip, {100 * f['copy']:.1f}% a wrong copied operand "
                f"and {100 * f['arith']:.1f}% other arithmetic")
    assert measured in re.sub(r"\s+", " ", text), measured


def test_file_map_names_the_loss_and_paper_in_each_file():
    """Each row of the README's file map: the file defines the loss function it names, and its header line links the
    paper the row links."""
    rows = [line for line in section(read(README), "## Files").splitlines() if re.match(r"\| \w.* \| `\w+\.py` \|", line)]
    assert len(rows) == 6
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        file, losses = cells[1].strip("`"), re.findall(r"`(\w+)`", cells[2])
        paper = re.search(r"\((https://[^)]+)\)", cells[3])
        source = read(os.path.join(ROOT, file))
        for loss in losses:
            assert f"\ndef {loss}(" in source, (file, loss)
        assert paper and paper.group(1) in source.splitlines()[0], (file, cells[3])


def test_quick_start_output_starts_from_the_recorded_reference():
    """The quick start's output evaluates the same reference as compare.py's seed 1 of DQO (the reference does not train,
    so its accuracy does not depend on the thread count that changes the final line)."""
    with open(RESULTS_JSON) as f:
        reference = json.load(f)["DQO"]["1"]["reference"]
    line = f"reference{reference['greedy']:>15.4f}{reference['sampled']:>12.4f}"
    assert line in section(read(README), "## Quick start"), line


def test_the_mutant_report_is_the_mutants_benchmark_s_and_kills_every_one():
    """docs/mutants.txt holds a verdict for every mutant benchmarks/mutants.py defines, each killed, with the test that
    failed; docs/testing.md gives their number. A mutant added without a run, or one that survived, fails here."""
    from benchmarks import mutants

    names = [m[0] for m in mutants.MUTANTS]
    rows = [line.split() for line in read(os.path.join(ROOT, "docs", "mutants.txt")).splitlines()
            if line and not line.startswith(("#", "mutant ")) and not re.match(r"\d+ killed", line)]
    verdicts = {row[0]: row[2] for row in rows if len(row) >= 5}
    assert sorted(verdicts) == sorted(names) and len(rows) == len(names), (sorted(verdicts), names)
    assert set(verdicts.values()) == {"killed"}, verdicts
    assert f"plants {len(names)} plausible" in read(os.path.join(ROOT, "docs", "testing.md"))
