"""A non-editable install finds its resources: the wheel carries resources/ as studio/_resources, and
paths.resource_path() resolves there when no checkout is around. Builds a real wheel (~3 s, no network)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging_helpers import ROOT

NEEDED = ("tokenizers/clip/vocab.json", "tokenizers/clip/merges.txt", "tokenizers/clip/tokenizer_config.json",
          "model_configs/sd1/model_index.json", "model_configs/sd2-v/scheduler/scheduler_config.json",
          "model_configs/sdxl/unet/config.json", "demo/dataset/shape_00.png", "demo/dataset/shape_00.txt",
          "icons/app.svg", "presets/balanced.toml", "style.qss")


def _source_resources() -> set[str]:
    """What should ship: every file under resources/ except generator scripts and caches."""
    return {p.relative_to(ROOT / "resources").as_posix() for p in (ROOT / "resources").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


def _can_build_here() -> bool:
    """setuptools in this environment builds wheels by itself from 70.1 on (older ones need the `wheel` package)."""
    try:
        from importlib.metadata import version

        import setuptools  # noqa: F401
    except ImportError:
        return False
    major, minor = (int(part) for part in re.findall(r"\d+", version("setuptools"))[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources, and a stale build/lib in
    # someone's checkout could leak old files into the wheel under test.
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    for name in ("studio", "resources"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(out)]
    if _can_build_here():
        command += ["--no-build-isolation", "--no-index"]  # ~3 s, offline
    # else pip fetches pyproject's build requirements into an isolated environment (needs the package index).
    result = subprocess.run(command, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("lora_studio-*.whl")
    return built


def test_wheel_contains_the_resources(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("studio/_resources/") for n in names if n.startswith("studio/_resources/")}
    missing = [n for n in NEEDED if n not in shipped]
    assert not missing, f"not in the wheel: {missing}"
    assert shipped == _source_resources(), "the wheel must ship exactly resources/ minus generator scripts"
    assert not [n for n in names if n.startswith("resources/")], "no top-level 'resources' package in site-packages"
    assert "studio/ui/app.py" in names and "studio/engine/trainer.py" in names and "studio/commands/train.py" in names


def test_installed_wheel_resolves_resource_path(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -S: no site-packages, so neither the editable install nor the checkout can answer instead of the wheel.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from studio.paths import resource_path; "
            "p = resource_path('tokenizers', 'clip', 'vocab.json'); print(p); assert p.is_file(), p; "
            "assert resource_path('demo', 'dataset', 'shape_00.png').is_file()")
    result = subprocess.run([sys.executable, "-S", "-c", code, str(site)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(site / "studio" / "_resources")
