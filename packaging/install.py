"""Install LoRA Studio from a checkout with the right torch build for this computer.

    python packaging/install.py [--gpu auto|cuda|cpu] [--dev] [--dry-run]

torch first, from packaging/requirements/<platform>.txt, then the app with packaging/locks/<platform>.txt as
constraints: pip keeps the torch that is already there because it satisfies the app's `torch>=...` and the lock's
`torch==X`, so the build chosen here is the one that stays, and every other package gets the version tested with it.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import shutil
import subprocess
import sys
from pathlib import Path



def _sibling(name: str):
    """packaging/<name>.py by path: putting packaging/ on sys.path would let its scripts shadow real modules."""
    spec = importlib.util.spec_from_file_location(f"lora_studio_packaging_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and friends look modules up by name
    spec.loader.exec_module(module)
    return module


_lockfile = _sibling("lockfile")
REQUIREMENTS, ROOT, lock_for_requirements = _lockfile.REQUIREMENTS, _lockfile.ROOT, _lockfile.lock_for_requirements


def choose_requirements(system: str, machine: str, has_nvidia: bool, gpu: str = "auto") -> Path:
    """The torch requirements file for a platform.system() / platform.machine() pair.

    gpu: "auto" uses CUDA when an NVIDIA driver is present (nvidia-smi), "cuda"/"cpu" force it."""
    if system == "Darwin":
        if machine != "arm64":
            raise SystemExit("Intel Macs are not supported: torch has no x86_64 macOS build for this version.")
        if gpu == "cuda":
            raise SystemExit("There is no CUDA on macOS; Apple silicon GPUs are used through MPS automatically.")
        return REQUIREMENTS / "macos.txt"  # one build: MPS when available, CPU otherwise
    if system not in ("Linux", "Windows"):
        raise SystemExit(f"No torch build is listed for {system}; install torch yourself, then `pip install .`.")
    cuda = has_nvidia if gpu == "auto" else gpu == "cuda"
    return REQUIREMENTS / f"{system.lower()}-{'cuda' if cuda else 'cpu'}.txt"


def pip_commands(requirements: Path, dev: bool) -> list[list[str]]:
    app = ["-e", f"{ROOT}[test]"] if dev else [str(ROOT)]
    return [
        [sys.executable, "-m", "pip", "install", "-r", str(requirements)],
        [sys.executable, "-m", "pip", "install", "-c", str(lock_for_requirements(requirements)), *app],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA if an NVIDIA driver is installed (Linux, Windows)")
    parser.add_argument("--dev", action="store_true", help="editable install with the test tools")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
    args = parser.parse_args(argv)
    requirements = choose_requirements(platform.system(), platform.machine(), shutil.which("nvidia-smi") is not None,
                                       args.gpu)
    print(f"torch build: {requirements.relative_to(ROOT)}")
    for command in pip_commands(requirements, args.dev):
        print("$ " + subprocess.list2cmdline(command))
        if not args.dry_run:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
