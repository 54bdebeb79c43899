"""The dependency locks in packaging/locks/: which file fits a computer, what it pins, and how an install differs.

Standard library only: install.py and the PyInstaller spec use it before (or without) the app's dependencies.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "packaging" / "locks"
REQUIREMENTS = ROOT / "packaging" / "requirements"

# One lock per packaging/requirements/<name>.txt (the torch build), resolved for Python 3.11 on that platform.
# Linux targets glibc 2.34 (Ubuntu 22.04, Debian 12, Fedora 35, RHEL 9): PySide6 6.10 and newer publish no wheel
# for older glibc. macOS: Apple silicon, macOS 14 (torch 2.13's oldest).
PYTHON_VERSION = "3.11"
TARGETS = {
    "linux-cpu": {"python_platform": "x86_64-manylinux_2_34", "sys_platform": "linux", "platform_machine": "x86_64"},
    "linux-cuda": {"python_platform": "x86_64-manylinux_2_34", "sys_platform": "linux", "platform_machine": "x86_64"},
    "windows-cpu": {"python_platform": "x86_64-pc-windows-msvc", "sys_platform": "win32", "platform_machine": "AMD64"},
    "windows-cuda": {"python_platform": "x86_64-pc-windows-msvc", "sys_platform": "win32",
                     "platform_machine": "AMD64"},
    "macos": {"python_platform": "aarch64-apple-darwin", "sys_platform": "darwin", "platform_machine": "arm64",
              "env": {"MACOSX_DEPLOYMENT_TARGET": "14.0"}},
}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    """PEP 503 name: 'PySide6_Essentials' and 'pyside6-essentials' are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_path(target: str) -> Path:
    return LOCKS / f"{target}.txt"


def lock_for_requirements(requirements: Path) -> Path:
    """The lock that goes with a torch requirements file (same name)."""
    return lock_path(Path(requirements).stem)


def read_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} for every `name==version` line of a lock or requirements file."""
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def torch_pin(requirements: Path) -> str:
    """The torch version a requirements file installs, without its build label: 'torch==2.13.0+cpu' -> '2.13.0'."""
    version = read_pins(requirements).get("torch")
    if version is None:
        raise ValueError(f"{requirements} pins no torch")
    return version.split("+")[0]


def target_for_torch(system: str, torch_version: str) -> str:
    """The lock that describes an installation from its platform.system() and its torch version string.

    The build label tells the build apart: '+cpu' on Linux and '+cu130' on Windows come from the PyTorch index;
    PyPI's Linux wheel is the CUDA build and PyPI's Windows wheel the CPU one."""
    label = torch_version.partition("+")[2]
    if system == "Darwin":
        return "macos"
    if system == "Linux":
        return "linux-cpu" if label == "cpu" else "linux-cuda"
    if system == "Windows":
        return "windows-cuda" if label.startswith("cu") else "windows-cpu"
    raise ValueError(f"no lock for {system}")


def same_version(pinned: str, installed: str) -> bool:
    """A pin without a build label matches every build of that version (PEP 440), as `pip install -c` does."""
    return installed == pinned or ("+" not in pinned and installed.split("+")[0] == pinned)


def mismatches(pins: dict[str, str], installed: dict[str, str], ignore: tuple[str, ...] = ()) -> list[str]:
    """Every installed distribution the lock does not pin, or pins at another version, as a readable line."""
    problems = []
    skip = {canonical(name) for name in ignore}
    for name, version in sorted(installed.items()):
        name = canonical(name)
        if name in skip:
            continue
        if name not in pins:
            problems.append(f"{name} {version} is installed but not in the lock")
        elif not same_version(pins[name], version):
            problems.append(f"{name} {version} is installed, the lock pins {pins[name]}")
    return problems
