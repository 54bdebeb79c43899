"""The dependency locks: one per torch build, each inside pyproject.toml's ranges, this environment installed from
one of them with `pip check` clean, and the README, .ci/run, install.py and the requirement files all using them."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version
from packaging_helpers import PACKAGING, ROOT, load_script

lockfile = load_script("lockfile.py")
TARGETS = sorted(lockfile.TARGETS)


def _requirements() -> list[tuple[Requirement, str | None]]:
    """(requirement, extra it belongs to) for the app, every extra, and the frozen-build tools."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    found = [(Requirement(text), None) for text in project["dependencies"]]
    found += [(Requirement(text), extra) for extra, texts in project.get("optional-dependencies", {}).items()
              for text in texts]
    build = lockfile.REQUIREMENTS / "build.txt"
    found += [(Requirement(line), "build") for line in build.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith(("#", "-"))]
    return found


def _marker_environment(target: str, extra: str | None) -> dict[str, str]:
    settings = lockfile.TARGETS[target]
    system = {"linux": "Linux", "win32": "Windows", "darwin": "Darwin"}[settings["sys_platform"]]
    env = default_environment()
    env.update(sys_platform=settings["sys_platform"], platform_system=system,
               platform_machine=settings["platform_machine"], os_name="nt" if system == "Windows" else "posix",
               python_version=lockfile.PYTHON_VERSION, python_full_version=f"{lockfile.PYTHON_VERSION}.0",
               implementation_name="cpython", platform_python_implementation="CPython", extra=extra or "")
    return env


def test_one_lock_per_torch_requirements_file():
    torch_files = {p.stem for p in lockfile.REQUIREMENTS.glob("*.txt") if p.name != "build.txt"}
    assert torch_files == {p.stem for p in lockfile.LOCKS.glob("*.txt")} == set(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_lock_satisfies_every_requirement_of_pyproject(target):
    pins = lockfile.read_pins(lockfile.lock_path(target))
    problems = []
    for requirement, extra in _requirements():
        if requirement.marker and not requirement.marker.evaluate(_marker_environment(target, extra)):
            continue
        name = lockfile.canonical(requirement.name)
        if name not in pins:
            problems.append(f"{requirement} ({extra or 'app'}) is not pinned")
        elif not requirement.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{requirement} ({extra or 'app'}): the lock pins {pins[name]}")
    assert not problems, problems


@pytest.mark.parametrize("target", TARGETS)
def test_lock_pins_the_torch_of_its_requirements_file(target):
    requirements = lockfile.REQUIREMENTS / f"{target}.txt"
    assert lockfile.read_pins(lockfile.lock_path(target))["torch"] == lockfile.torch_pin(requirements)
    # The requirements file installs torch under the same lock, so torch's own dependencies are locked too.
    assert f"-c ../locks/{target}.txt" in requirements.read_text(encoding="utf-8").splitlines()


def test_pyproject_excludes_the_known_broken_pair():
    """transformers >= 5.24 refuses peft < 0.22 in add_adapter (MIN_PEFT_VERSION), which text-encoder LoRA uses."""
    specs = {lockfile.canonical(r.name): r.specifier for r, extra in _requirements() if extra is None}
    peft_allows_old = any(specs["peft"].contains(v) for v in ("0.21.0", "0.21.2"))
    assert not (peft_allows_old and specs["transformers"].contains("5.24.0")), (specs["peft"], specs["transformers"])


def _this_target() -> str:
    return lockfile.target_for_torch(platform.system(), metadata.version("torch"))


def test_this_environment_is_installed_from_its_lock():
    """Every installed distribution is pinned, at the installed version: nothing resolved outside the lock."""
    target = _this_target()
    installed = {dist.metadata["Name"]: dist.version for dist in metadata.distributions()}
    problems = lockfile.mismatches(lockfile.read_pins(lockfile.lock_path(target)), installed,
                                   ignore=("pip", "lora-studio"))
    assert not problems, (f"this environment differs from packaging/locks/{target}.txt (reinstall with the README's "
                          f"command, or run packaging/update_lock.py if the lock should move): {problems}")


def test_pip_check_is_clean():
    # In a subprocess: even find_spec("pip") here would make setuptools' distutils shim stand down for the rest of
    # this process (test_packaging_wheel imports setuptools).
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    if "No module named pip" in result.stderr:  # a venv made by uv has no pip; uv checks the same metadata
        uv = shutil.which("uv")
        assert uv, "neither pip nor uv is available to check this environment"
        result = subprocess.run([uv, "pip", "check", "--python", sys.executable], capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _readme_setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and "pip install" in line]


def test_readme_has_two_setup_commands_and_both_use_the_lock():
    commands = _readme_setup_commands()
    assert len(commands) == 2, commands
    app, tests = commands
    for command in commands:
        assert command.startswith("pip install torch==2.13.0 && pip install -c packaging/locks/linux-cpu.txt -e ")
        assert lockfile.read_pins(lockfile.lock_path("linux-cpu"))["torch"] == "2.13.0"
    assert app.endswith("&& lora-studio") and tests.endswith("&& python -m pytest") and "[test]" in tests


def test_ci_runs_the_readme_test_command_verbatim_in_a_new_venv():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _readme_setup_commands()[1] in ci.splitlines(), "the README's test command must be a line of .ci/run"
    assert re.search(r"^python3? -m venv ", ci, re.M) and "rm -rf" in ci, "a brand-new venv for every run"


def test_install_py_installs_the_app_under_the_lock(capsys):
    install = load_script("install.py")
    assert install.main(["--dry-run", "--gpu", "cpu"] if sys.platform != "darwin" else ["--dry-run"]) == 0
    out = capsys.readouterr().out
    chosen = re.search(r"requirements[\\/](\S+)\.txt", out).group(1)
    assert re.search(rf"pip install -c \S*locks[\\/]{chosen}\.txt ", out), out


def test_update_lock_smoke_tests_exist():
    update_lock = load_script("update_lock.py")
    for node in update_lock.SMOKE_TESTS:
        path, _, name = node.partition("::")
        source = (ROOT / path).read_text(encoding="utf-8")
        assert f"def {name.split('[')[0]}(" in source, node
    assert (PACKAGING / "README.md").read_text(encoding="utf-8").count("update_lock.py") >= 2


def test_update_lock_reports_the_run_error_behind_a_failed_assertion():
    update_lock = load_script("update_lock.py")
    output = """\
________________ test_each_family_trains_exports_and_loads_in_diffusers[tiny_sd1-True] ________________
tests/engine/test_trainer.py:160: in test_each_family_trains_exports_and_loads_in_diffusers
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
E   AssertionError: Traceback (most recent call last):
E       raise ValueError(
E     ValueError: The version of PEFT you are using is not compatible, please use a version >= 0.22.0
=========================== short test summary info ============================
FAILED tests/engine/test_trainer.py::test_each_family_trains_exports_and_loads_in_diffusers[tiny_sd1-True] - AssertionError: Traceback (most recent call last):
"""
    node = "tests/engine/test_trainer.py::test_each_family_trains_exports_and_loads_in_diffusers[tiny_sd1-True]"
    assert update_lock.root_cause(output, node) == (
        "ValueError: The version of PEFT you are using is not compatible, please use a version >= 0.22.0")
    assert update_lock.root_cause(output, "tests/x.py::test_other") is None


def test_update_lock_probes_every_upper_bound_of_pyproject():
    update_lock = load_script("update_lock.py")
    probes = {name: (bound, beyond) for name, bound, beyond in update_lock.upper_bound_probes()}
    assert probes["transformers"] == ("transformers<5.24", "transformers>=5.24")
    assert probes["peft"] == ("peft<0.22", "peft>=0.22")
    assert "torch" not in probes  # torch moves by hand, with the torch files and the README


def test_update_lock_lists_what_moved():
    update_lock = load_script("update_lock.py")
    assert update_lock.moved({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "2.1", "d": "4"}) == [
        ("b", "2", "2.1"), ("c", "3", None), ("d", None, "4")]
