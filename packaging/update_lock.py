"""Move packaging/locks/ forward safely: resolve the newest versions pyproject.toml allows, smoke-test, then write.

    python packaging/update_lock.py [--dry-run] [--no-check-bounds] [--find-links DIR] [--keep-scratch]

1. `uv pip compile` resolves pyproject.toml (with every extra), packaging/requirements/build.txt (PyInstaller) and the
   torch pin of packaging/requirements/<target>.txt for each target platform (lockfile.TARGETS), into a scratch folder.
2. A brand-new scratch venv installs this computer's candidate lock; `uv pip check` and the smoke tests (SMOKE_TESTS:
   tiny SD1 and SDXL train with the text encoder, export and load back in diffusers; the window opens offscreen) run.
3. Only when they pass are the locks rewritten. When they fail, the packages that moved are held back one at a time
   (direct dependencies first) and the first set that passes is written, with a report of what was held back and why;
   when none passes, the locks stay untouched and the report names what moved and which test broke.
4. Unless --no-check-bounds: every upper bound in pyproject.toml with a newer release beyond it is tried (that
   release alone, everything else as locked) and the report says whether the bound can be lifted yet.

Needs `uv` (https://docs.astral.sh/uv/; `pip install uv`) and the network (PyPI). Moving the lock is a deliberate
commit: review the diff of packaging/locks/ and commit it with the report. See packaging/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path



def _sibling(name: str):
    """packaging/<name>.py by path: putting packaging/ on sys.path would let its scripts shadow real modules."""
    spec = importlib.util.spec_from_file_location(f"lora_studio_packaging_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


install = _sibling("install")  # which torch build this computer takes
lockfile = _sibling("lockfile")

ROOT = lockfile.ROOT
BUILD_REQUIREMENTS = lockfile.REQUIREMENTS / "build.txt"
# The fast subset that proves a set of versions works for a user: text-encoder LoRA training on SD1 and SDXL
# (transformers + peft + diffusers + accelerate + torch), export, load back in diffusers, and the window (PySide6).
SMOKE_TESTS = (
    "tests/engine/test_trainer.py::test_each_family_trains_exports_and_loads_in_diffusers[tiny_sd1-True]",
    "tests/engine/test_trainer.py::test_each_family_trains_exports_and_loads_in_diffusers[tiny_sdxl-True]",
    "tests/cli/test_gui_start.py::test_lora_studio_opens_the_window_offscreen",
)
KEY_PACKAGES = ("torch", "diffusers", "peft", "transformers", "accelerate", "pyside6-essentials")
_NETWORK_ERROR = re.compile(r"error sending request|dns error|Failed to fetch|Could not connect", re.I)


class ResolveError(Exception):
    """uv could not produce a lock; the message is uv's own explanation."""


@dataclasses.dataclass
class Smoke:
    ok: bool
    failures: list[tuple[str, str]]  # (test or step, first line of the error)
    log: Path


def find_uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("update_lock.py needs uv: `pip install uv` (https://docs.astral.sh/uv/).")
    return uv


def pip_find_links() -> list[str]:
    """find-links from pip's configuration and PIP_FIND_LINKS: where a machine keeps local torch wheels."""
    found = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            found += value.strip().strip("'\"").split()
    return list(dict.fromkeys(found))


def torch_source(target: str, find_links: list[str]) -> tuple[str, list[str]]:
    """The torch version a target pins (without build label) and the uv options that find its build."""
    requirements = lockfile.REQUIREMENTS / f"{target}.txt"
    base, _, label = lockfile.read_pins(requirements)["torch"].partition("+")
    if not label:
        return base, []  # PyPI's build for that platform
    for folder in find_links:
        if list(Path(folder).glob(f"torch-{base}+{label}-*.whl")):
            return base, ["--find-links", folder]
    index = re.search(r"^--extra-index-url\s+(\S+)", requirements.read_text(encoding="utf-8"), re.M)
    return base, (["--extra-index-url", index.group(1), "--index-strategy", "unsafe-best-match"] if index else [])


class Resolver:
    """Runs `uv pip compile` per target and turns its output into a lock file."""

    def __init__(self, uv: str, scratch: Path, find_links: list[str]):
        self.uv, self.scratch, self.find_links = uv, scratch, find_links
        self.notes: dict[str, str] = {}  # target -> how its torch build was resolved, when not as asked
        self._runs = 0

    def compile(self, target: str, constraints: list[str] = (), overrides: list[str] = ()) -> Path:
        self._runs += 1
        run = self.scratch / f"resolve-{self._runs}-{target}"
        run.mkdir(parents=True)
        torch_version, source = torch_source(target, self.find_links)
        (run / "torch.in").write_text(f"torch=={torch_version}\n", encoding="utf-8")
        settings = lockfile.TARGETS[target]
        command = [self.uv, "pip", "compile", "--quiet", "--no-header", "--all-extras",
                   "--python-version", lockfile.PYTHON_VERSION, "--python-platform", settings["python_platform"],
                   str(ROOT / "pyproject.toml"), str(BUILD_REQUIREMENTS), str(run / "torch.in"),
                   "--output-file", str(run / "lock.txt")]
        if constraints:
            (run / "hold.txt").write_text("\n".join(constraints) + "\n", encoding="utf-8")
            command += ["--constraint", str(run / "hold.txt")]
        if overrides:
            (run / "override.txt").write_text("\n".join(overrides) + "\n", encoding="utf-8")
            command += ["--override", str(run / "override.txt")]
        env = {**os.environ, **settings.get("env", {})}
        result = subprocess.run(command + source, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        if result.returncode and source and _NETWORK_ERROR.search(result.stderr):
            # The PyTorch index is out of reach (an offline mirror, a firewall): pin the same version from PyPI's
            # build for the platform; `==X` without a build label still admits the +cpu/+cuNNN wheel.
            self.notes[target] = (f"the index in packaging/requirements/{target}.txt was not reachable: torch's own "
                                  f"dependencies are those of PyPI's torch {torch_version} for this platform")
            result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        if result.returncode:
            raise ResolveError(result.stderr.strip() or result.stdout.strip())
        # The torch build label goes (`torch==X` admits +cpu/+cuNNN, and agrees with `pip install torch==X`), and
        # the scratch input is named by the file it stands for, so the next run's output differs only where pins do.
        lock = run / "lock.txt"
        body = re.sub(r"^torch==([^\s+]+)\+\S+", r"torch==\1", lock.read_text(encoding="utf-8"), flags=re.M)
        body = body.replace(f"-r {run / 'torch.in'}", f"packaging/requirements/{target}.txt")
        for name in ("hold.txt", "override.txt"):
            body = body.replace(f"{run / name}", f"update_lock.py {name.removesuffix('.txt')}")
        lock.write_text(body, encoding="utf-8")
        return lock

    def lock_text(self, target: str, compiled: Path) -> str:
        """The compiled lock with a header saying what the file is."""
        body = compiled.read_text(encoding="utf-8")
        settings = lockfile.TARGETS[target]
        header = [
            f"# {target}: every package LoRA Studio installs, at versions tested together (a constraints file).",
            f"# Python {lockfile.PYTHON_VERSION}, {settings['python_platform']}; torch's build comes from "
            f"packaging/requirements/{target}.txt (`torch==X` here admits its +cpu/+cuNNN build).",
            f"#   pip install -r packaging/requirements/{target}.txt && pip install -c packaging/locks/{target}.txt .",
            "# Written by `python packaging/update_lock.py` after its smoke tests passed; do not edit by hand.",
        ]
        if target in self.notes:
            header.append(f"# Note: {self.notes[target]}.")
        return "\n".join(header) + "\n" + body


def smoke(uv: str, lock: Path, target: str, scratch: Path, find_links: list[str], label: str,
          overrides: list[str] = ()) -> Smoke:
    """A brand-new venv from the candidate lock, `uv pip check`, then SMOKE_TESTS in it. `overrides` (a release beyond
    a bound of pyproject.toml) must be given again here, or the project's own requirement refuses it."""
    folder = scratch / f"smoke-{label}"
    log = folder / "log.txt"
    folder.mkdir(parents=True)
    override = []
    if overrides:
        (folder / "override.txt").write_text("\n".join(overrides) + "\n", encoding="utf-8")
        override = ["--override", str(folder / "override.txt")]
    venv = folder / "venv"
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    torch_version, source = torch_source(target, find_links)
    steps = [
        ("create venv", [uv, "venv", "--quiet", "--python", sys.executable, str(venv)]),
        ("install", [uv, "pip", "install", "--quiet", "--python", str(python), "--constraint", str(lock), *override,
                     *source, f"torch=={torch_version}", "-e", f"{ROOT}[test]"]),
    ]
    if not overrides:  # with a bound lifted, pip check rightly reports the project's own requirement; skip it
        steps.append(("pip check", [uv, "pip", "check", "--python", str(python)]))
    # COLUMNS: pytest cuts the short summary ("FAILED node - error") to the terminal width, dropping the error.
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"}
    env.pop("VIRTUAL_ENV", None)
    with log.open("w", encoding="utf-8") as out:
        for name, command in steps:
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
            out.write(f"$ {subprocess.list2cmdline(command)}\n{result.stdout}{result.stderr}\n")
            if result.returncode:
                first = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
                return Smoke(False, [(name, first[-1] if name == "install" else "; ".join(first[:3]))], log)
        tests = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--tb=short", *SMOKE_TESTS]
        result = subprocess.run(tests, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
        out.write(f"$ {subprocess.list2cmdline(tests)}\n{result.stdout}{result.stderr}\n")
    failures = [(node, root_cause(result.stdout, node) or message or "")
                for node, message in re.findall(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", result.stdout, re.M)]
    if result.returncode and not failures:
        failures = [("pytest", (result.stdout + result.stderr).strip().splitlines()[-1])]
    return Smoke(result.returncode == 0, failures, log)


def root_cause(output: str, node: str) -> str | None:
    """The last non-assertion exception line in a failed test's section of pytest's report: a test that asserts
    "the run finished" shows the run's own error (ValueError: ...) there, in the traceback it prints."""
    title = node.rpartition("::")[2]
    sections = re.split(r"^_{3,} (.+?) _{3,}$", output, flags=re.M)
    for name, body in zip(sections[1::2], sections[2::2]):
        if name.strip() == title:
            causes = [m.group(0) for m in re.finditer(r"\b[A-Z]\w*(?:Error|Exception): .+", body)
                      if not m.group(0).startswith("AssertionError")]
            return causes[-1].strip() if causes else None
    return None


def moved(old: dict[str, str], new: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(name, old version or None, new version or None) for every pin that changed."""
    return [(name, old.get(name), new.get(name)) for name in sorted(old.keys() | new.keys())
            if old.get(name) != new.get(name)]


def direct_dependencies() -> list[str]:
    from packaging.requirements import Requirement  # PyPA's, installed with the app's dependencies

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return [Requirement(text) for text in requirements]


def upper_bound_probes() -> list[tuple[str, str, str]]:
    """(name, the bound as written, an override that asks for a release beyond it) per capped dependency."""
    probes = []
    for requirement in direct_dependencies():
        for spec in requirement.specifier:
            if spec.operator in ("<", "<="):
                beyond = f">{spec.version}" if spec.operator == "<=" else f">={spec.version}"
                probes.append((lockfile.canonical(requirement.name), f"{requirement.name}{spec}",
                               f"{requirement.name}{beyond}"))
    return probes


def why_not_newer(resolver: Resolver, target: str, name: str, version: str) -> str | None:
    """uv's reason why no release of `name` newer than `version` resolves (None when none exists)."""
    try:
        resolver.compile(target, overrides=[f"{name}>{version}"])
    except ResolveError as exc:
        causes = [line.strip().removeprefix("cause:").strip() for line in exc.args[0].splitlines()
                  if "depends on" in line or "requires" in line]
        return causes[0] if causes else None
    return None


def describe(failures: list[tuple[str, str]]) -> str:
    return "; ".join(f"{node}: {message}" if message else node for node, message in failures)


def format_moves(changes) -> list[str]:
    return [f"  {name}: {old or '(new)'} -> {new or '(removed)'}" for name, old, new in changes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="resolve and test, write nothing")
    parser.add_argument("--no-check-bounds", dest="check_bounds", action="store_false",
                        help="skip trying the releases beyond pyproject.toml's upper bounds")
    parser.add_argument("--find-links", action="append", default=None, metavar="DIR",
                        help="a folder with local torch wheels (default: pip's configured find-links)")
    parser.add_argument("--max-holds", type=int, default=8, help="at most this many hold-back attempts on failure")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder (venvs, logs)")
    args = parser.parse_args(argv)

    uv = find_uv()
    find_links = args.find_links if args.find_links is not None else pip_find_links()
    host = install.choose_requirements(platform.system(), platform.machine(), shutil.which("nvidia-smi") is not None,
                                       "auto").stem
    scratch = Path(tempfile.mkdtemp(prefix="lora-studio-lock-"))
    resolver = Resolver(uv, scratch, find_links)
    report: list[str] = []
    print(f"scratch folder: {scratch}\nthis computer's lock: {host}")
    try:
        candidates = {target: resolver.compile(target) for target in lockfile.TARGETS}
        current = lockfile.read_pins(lockfile.lock_path(host)) if lockfile.lock_path(host).exists() else {}
        newest = lockfile.read_pins(candidates[host])
        changes = moved(current, newest)
        print(f"resolved the newest allowed set; {len(changes)} pin(s) moved for {host}")
        result = smoke(uv, candidates[host], host, scratch, find_links, "newest")
        hold: list[str] = []
        if not result.ok:
            where = f" (log: {result.log})" if args.keep_scratch else " (--keep-scratch keeps the log)"
            report.append(f"The newest allowed set fails: {describe(result.failures)}{where}")
            report += ["Moved:", *format_moves(changes)]
            direct = {lockfile.canonical(r.name) for r in direct_dependencies()}
            order = [c for c in changes if c[0] in direct and c[1]] + [c for c in changes if c[0] not in direct and c[1]]
            for name, old, new in order[: args.max_holds]:
                print(f"holding back {name} at {old} (newest: {new}) ...")
                try:
                    trial = resolver.compile(host, constraints=[f"{name}=={old}"])
                except ResolveError as exc:
                    report.append(f"  holding {name} at {old}: no resolution ({exc.args[0].splitlines()[-1]})")
                    continue
                attempt = smoke(uv, trial, host, scratch, find_links, f"hold-{name}")
                report.append(f"  holding {name} at {old}: {'passes' if attempt.ok else describe(attempt.failures)}")
                if attempt.ok:
                    hold = [f"{name}=={old}"]
                    candidates = {target: resolver.compile(target, constraints=hold) for target in lockfile.TARGETS}
                    break
            if not hold:
                report.append("No single hold-back passes: the locks are left as they are.")
        wrote = False
        if result.ok or hold:
            final = lockfile.read_pins(candidates[host])
            report.append(("All smoke tests pass on the newest allowed set." if result.ok else
                           f"The newest working set holds {hold[0]} back: pyproject.toml should exclude "
                           f"{hold[0].split('==')[0]} {newest.get(hold[0].split('==')[0])} until it works."))
            report.append("Resolved for " + host + ": " + ", ".join(f"{p} {final.get(p, '-')}" for p in KEY_PACKAGES))
            report += ["Changes against the committed lock:", *(format_moves(moved(current, final)) or ["  none"])]
            if not args.dry_run:
                lockfile.LOCKS.mkdir(parents=True, exist_ok=True)
                for target, compiled in candidates.items():
                    path = lockfile.lock_path(target)
                    partial = path.with_suffix(".txt.partial")
                    partial.write_text(resolver.lock_text(target, compiled), encoding="utf-8")
                    os.replace(partial, path)
                wrote = True
        if args.check_bounds:
            report.append("Upper bounds in pyproject.toml:")
            for name, bound, beyond in upper_bound_probes():
                try:
                    trial = resolver.compile(host, overrides=[beyond])
                except ResolveError:
                    report.append(f"  {bound}: no release beyond it yet")
                    continue
                version = lockfile.read_pins(trial).get(name)
                attempt = smoke(uv, trial, host, scratch, find_links, f"bound-{name}", overrides=[beyond])
                verdict = "passes the smoke tests: the bound can be lifted" if attempt.ok else \
                    f"still fails, keep the bound: {describe(attempt.failures)}"
                report.append(f"  {bound}: {name} {version} {verdict}")
                newer = why_not_newer(resolver, host, name, version)
                if newer:
                    report.append(f"    (a release newer than {version} cannot be installed with the rest: {newer})")
        for target, note in resolver.notes.items():
            report.append(f"Note for {target}: {note}.")
        report.append("Wrote packaging/locks/: review `git diff packaging/locks` and commit it deliberately."
                      if wrote else "packaging/locks/ unchanged.")
        print("\n".join(report))
        return 0 if (wrote or args.dry_run) and (result.ok or hold) else 1
    except ResolveError as exc:
        print(f"uv could not resolve the dependencies; the locks are unchanged:\n{exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep_scratch:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
