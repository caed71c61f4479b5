"""The shipped tiny reference: it is what `--model tiny` loads, it matches the recipe, and the recipe still builds a
reference of the same quality on this machine (a band, not the bytes: SFT on another CPU lands on other weights)."""

import json
import os
import sys

from conftest import ROOT

import common

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import tiny_reference  # noqa: E402


def test_failure_kinds():
    spec = "15;+7;*2"  # 15+7=22 needs a carry; 22*2=44
    assert common.arith_failure_kind("15+7=22\n\n22*2=44\n\n#### 44", spec) is None
    assert common.arith_failure_kind("15+7=12\n\n12*2=24\n\n#### 24", spec) == "slip"  # the forgotten carry
    assert common.arith_failure_kind("15+6=21\n\n21*2=42\n\n#### 42", spec) == "copy"  # wrong operand
    assert common.arith_failure_kind("14+7=21\n\n21*2=42\n\n#### 42", spec) == "copy"  # wrong start value
    assert common.arith_failure_kind("15+7=23\n\n23*2=46\n\n#### 46", spec) == "arith"
    assert common.arith_failure_kind("15+7=22\n\n22*2=43\n\n#### 43", spec) == "arith"  # 22*2 has no carry to forget
    assert common.arith_failure_kind("15+7=22\n\n22*2=44\n\n#### 45", spec) == "format"
    assert common.arith_failure_kind("15+7=22", spec) == "format"
    assert common.arith_failure_kind("18-9+2", "18;-9;+2") == "format"
    assert common.arith_failure_kind("18-9=19\n\n19+2=21\n\n#### 21", "18;-9;+2") == "slip"  # the forgotten borrow


def test_shipped_reference_is_the_default(tmp_path):
    """`--model tiny` loads assets/tiny while its recipe.json is the current recipe, and falls back to a build in
    the cache as soon as the recipe changes."""
    with open(os.path.join(common.TINY_SHIPPED, "recipe.json")) as f:
        assert json.load(f) == common.tiny_recipe(), "assets/tiny is stale: rebuild it with benchmarks/tiny_reference.py"
    assert common.tiny_path(str(tmp_path)) == common.TINY_SHIPPED
    old = dict(common.TINY_SFT)
    try:
        common.TINY_SFT["steps"] += 1
        assert common.tiny_path(str(tmp_path)) == common.tiny_dir(str(tmp_path)) != common.TINY_SHIPPED
    finally:
        common.TINY_SFT.clear()
        common.TINY_SFT.update(old)
    with open(os.path.join(common.TINY_SHIPPED, "quality.json")) as f:
        assert tiny_reference.in_band(json.load(f))  # what the shipped one measured when it was built


def test_recipe_builds_a_reference_in_the_band(tmp_path):
    """The full recipe (700 SFT steps, about 2.5 minutes on 2 cores) on this machine: greedy accuracy and the share
    of failures at the planted slip within tiny_reference.QUALITY_BAND, like the shipped reference."""
    path = str(tmp_path / "tiny")
    common.build_tiny_reference(path)
    with open(os.path.join(path, "recipe.json")) as f:
        assert json.load(f) == common.tiny_recipe()
    quality = tiny_reference.measure(path, n=500, sampled=False)  # the band is on greedy accuracy
    assert tiny_reference.in_band(quality), quality
