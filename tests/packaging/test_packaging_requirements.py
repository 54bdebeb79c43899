"""Each platform gets a torch pin, and packaging/install.py picks the right one."""

from __future__ import annotations

import re
import sys

import pytest
from packaging_helpers import PACKAGING

REQUIREMENTS = PACKAGING / "requirements"


@pytest.fixture(scope="module")
def install():
    from packaging_helpers import load_script

    return load_script("install.py")


@pytest.mark.parametrize(("system", "machine", "nvidia", "gpu", "expected"), [
    ("Linux", "x86_64", True, "auto", "linux-cuda.txt"),
    ("Linux", "x86_64", False, "auto", "linux-cpu.txt"),
    ("Linux", "x86_64", True, "cpu", "linux-cpu.txt"),
    ("Windows", "AMD64", True, "auto", "windows-cuda.txt"),
    ("Windows", "AMD64", False, "auto", "windows-cpu.txt"),
    ("Windows", "AMD64", False, "cuda", "windows-cuda.txt"),
    ("Darwin", "arm64", False, "auto", "macos.txt"),
])
def test_choose_requirements(install, system, machine, nvidia, gpu, expected):
    chosen = install.choose_requirements(system, machine, nvidia, gpu)
    assert chosen.name == expected and chosen.is_file()


@pytest.mark.parametrize(("system", "machine", "gpu"), [("Darwin", "x86_64", "auto"), ("Darwin", "arm64", "cuda"),
                                                         ("FreeBSD", "amd64", "auto")])
def test_unsupported_combinations_say_why(install, system, machine, gpu):
    with pytest.raises(SystemExit):
        install.choose_requirements(system, machine, False, gpu)


def test_every_file_pins_one_torch_build():
    """Exact pins, and a local version (+cpu, +cu130) wherever an extra index is used, so PyPI cannot win."""
    for path in REQUIREMENTS.glob("*.txt"):
        if path.name == "build.txt":
            continue
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
        pins = [ln for ln in lines if ln.startswith("torch")]
        assert len(pins) == 1 and re.fullmatch(r"torch==\d+\.\d+\.\d+(\+\w+)?", pins[0]), (path.name, pins)
        index = [ln for ln in lines if ln.startswith("--extra-index-url")]
        if index:
            assert "+" in pins[0] and index[0].endswith(pins[0].split("+")[1]), (path.name, index, pins)


def test_pins_agree_with_each_other():
    versions = set()
    for path in REQUIREMENTS.glob("*.txt"):
        versions |= set(re.findall(r"^torch==(\d+\.\d+\.\d+)", path.read_text(encoding="utf-8"), re.M))
    assert len(versions) == 1, versions


def test_dry_run_prints_the_pip_commands(install, capsys):
    assert install.main(["--dry-run", "--gpu", "cpu"] if sys.platform != "darwin" else ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pip install -r" in out and "torch build:" in out
