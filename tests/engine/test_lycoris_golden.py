"""Golden LyCORIS key lists (LoHa, LoKr) of the full-size SD1.5 and SDXL architectures, built on the meta device."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


def _load(name: str):
    sys.path.insert(0, str(GOLDEN))
    try:
        spec = importlib.util.spec_from_file_location(f"golden_{name}", GOLDEN / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(GOLDEN))


make_golden = _load("make_golden")
arch = _load("architectures")


@pytest.mark.parametrize("name", make_golden.LYCORIS_ARCHITECTURES)
@pytest.mark.parametrize("algorithm", list(make_golden.LYCORIS_GOLDEN))
def test_lycoris_keys_of_full_size_models_match_the_golden_lists(name, algorithm):
    golden = make_golden.lycoris_golden_path(name, algorithm).read_text(encoding="utf-8").split()
    keys = make_golden.lycoris_golden_keys(name, algorithm)
    assert keys == golden
    # The same modules as kohya's LoCon ('+conv'), each with its algorithm's factors and an alpha.
    modules = sorted({k.partition(".")[0] for k in keys})
    assert modules == arch.golden_path(name, "+conv").read_text(encoding="utf-8").split()
    suffixes = {k.partition(".")[2] for k in keys}
    expected = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}}[algorithm]
    assert suffixes == expected
    assert len(keys) == len(modules) * len(expected) and len(modules) == {"sd1": 350, "sdxl": 1052}[name]
