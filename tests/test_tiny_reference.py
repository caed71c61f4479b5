"""The shipped tiny reference: it is what `--model tiny` loads, it matches the recipe, and the recipe still builds a
reference of the same quality on this machine (a band, not the bytes: SFT on another CPU lands on other weights)."""

import json
import os

import pytest

import common
import runtime.files  # noqa: E402
from benchmarks import tiny_reference


def test_failure_kinds():
    spec = "15;+7;*2"  # 15+7=22 needs a carry; 22*2=44
    assert tiny_reference.arith_failure_kind("15+7=22\n\n22*2=44\n\n#### 44", spec) is None
    assert tiny_reference.arith_failure_kind("15+7=12\n\n12*2=24\n\n#### 24", spec) == "slip"  # the forgotten carry
    assert tiny_reference.arith_failure_kind("15+6=21\n\n21*2=42\n\n#### 42", spec) == "copy"  # wrong operand
    assert tiny_reference.arith_failure_kind("14+7=21\n\n21*2=42\n\n#### 42", spec) == "copy"  # wrong start value
    assert tiny_reference.arith_failure_kind("15+7=23\n\n23*2=46\n\n#### 46", spec) == "arith"
    assert tiny_reference.arith_failure_kind("15+7=22\n\n22*2=43\n\n#### 43", spec) == "arith"  # 22*2 has no carry to forget
    assert tiny_reference.arith_failure_kind("15+7=22\n\n22*2=44\n\n#### 45", spec) == "format"
    assert tiny_reference.arith_failure_kind("15+7=22", spec) == "format"
    assert tiny_reference.arith_failure_kind("18-9+2", "18;-9;+2") == "format"
    assert tiny_reference.arith_failure_kind("18-9=19\n\n19+2=21\n\n#### 21", "18;-9;+2") == "slip"  # the forgotten borrow


def test_shipped_reference_is_the_default(monkeypatch):
    """`--model tiny` loads assets/tiny, whose recipe.json (beside the weights: the run reads its key from there, and
    imports nothing from benchmarks/) is the recipe benchmarks/tiny_reference.py holds now; the caches' key for tiny is
    that recipe's hash, so a changed recipe is a stale assets/tiny here, and new keys after a rebuild."""
    rebuild = "python benchmarks/tiny_reference.py --build assets/tiny --force"
    with open(os.path.join(common.TINY_SHIPPED, "recipe.json")) as f:
        assert json.load(f) == tiny_reference.tiny_recipe(), f"assets/tiny is stale: {rebuild}"
    key = runtime.files.cache_key(tiny_reference.tiny_recipe())
    assert runtime.files.model_key("tiny") == f"tiny/shipped-{key}"
    monkeypatch.setitem(tiny_reference.TINY_SFT, "steps", tiny_reference.TINY_SFT["steps"] + 1)
    assert runtime.files.cache_key(tiny_reference.tiny_recipe()) != key  # what the key is recomputed from changes it
    monkeypatch.undo()
    with open(os.path.join(common.TINY_SHIPPED, "quality.json")) as f:
        assert tiny_reference.in_band(json.load(f))  # what the shipped one measured when it was built


@pytest.mark.skipif(not os.environ.get("SLOW_TESTS"), reason="rebuilds the tiny reference from its recipe (700 SFT steps, "
                    "2.5 to 4 minutes on 2 cores): SLOW_TESTS=1 python -m pytest tests/test_tiny_reference.py")
def test_recipe_builds_a_reference_in_the_band(tmp_path):
    """The full recipe (700 SFT steps, about 2.5 minutes on 2 cores) on this machine: greedy accuracy and the share
    of failures at the planted slip within tiny_reference.QUALITY_BAND, like the shipped reference."""
    path = str(tmp_path / "tiny")
    tiny_reference.build_tiny_reference(path)
    with open(os.path.join(path, "recipe.json")) as f:
        assert json.load(f) == tiny_reference.tiny_recipe()
    quality = tiny_reference.measure(path, n=500, sampled=False)  # the band is on greedy accuracy
    assert tiny_reference.in_band(quality), quality
