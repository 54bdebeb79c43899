"""The PyInstaller spec, run with stand-ins for PyInstaller's classes: CI checks its logic without a multi-GB build
and without PyInstaller installed. What it asserts is what the frozen app needs to start: resources where
paths.resource_path() looks, the ML stack's metadata, identity from app_info, one folder, and the console/windowed
split per platform."""

from __future__ import annotations

import importlib.metadata
import py_compile
import sys
import types
from pathlib import Path

import pytest
from packaging_helpers import PACKAGING, ROOT

from studio import app_info

SPEC = PACKAGING / "pyinstaller" / "lora-studio.spec"


class _Target:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.name = kwargs.get("name")


class FakeAnalysis(_Target):
    def __init__(self, scripts, **kwargs):
        super().__init__(scripts, **kwargs)
        self.inputs = scripts
        # PyInstaller puts its bootstrap and run-time hooks before the user's scripts, in the order given.
        self.scripts = [("pyiboot01_bootstrap", "", "PYSOURCE"), ("pyi_rth_pkgutil", "", "PYSOURCE")]
        self.scripts += [(Path(s).stem, s, "PYSOURCE") for s in scripts]
        self.pure = ["pure"]
        self.binaries = [("libtorch_cpu.so", "/env/site-packages/torch/lib/libtorch_cpu.so", "BINARY"),
                         ("libcudart.so", "/usr/local/cuda-13.0/lib/libcudart.so", "BINARY")]
        self.datas = list(kwargs["datas"])


class FakeEXE(_Target):
    @property
    def script(self):
        return self.args[1][-1][1]


def _fake_hooks():
    hooks = types.ModuleType("PyInstaller.utils.hooks")
    hooks.collect_submodules = lambda package, **kw: [package, f"{package}.fake_submodule"]
    hooks.copy_metadata = lambda dist, **kw: [(f"/site-packages/{dist}.dist-info", f"{dist}.dist-info")]
    package = types.ModuleType("PyInstaller")
    package.__path__ = []
    utils = types.ModuleType("PyInstaller.utils")
    utils.__path__ = []
    return {"PyInstaller": package, "PyInstaller.utils": utils, "PyInstaller.utils.hooks": hooks}


def run_spec(monkeypatch, tmp_path, platform: str) -> dict:
    # Imported before sys.platform is faked: PySide6's own import picks DLL paths by platform.
    import PySide6.QtGui  # noqa: F401
    import PySide6.QtSvg  # noqa: F401

    for name, module in _fake_hooks().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the spec prepends the checkout
    monkeypatch.setattr(sys, "platform", platform)
    namespace = {
        "__file__": str(SPEC), "SPEC": str(SPEC), "SPECPATH": str(SPEC.parent), "specnm": SPEC.stem,
        "DISTPATH": str(tmp_path / "dist"), "workpath": str(tmp_path / "work"), "HOMEPATH": str(tmp_path),
        "WARNFILE": str(tmp_path / "warn.txt"),
        "Analysis": FakeAnalysis, "PYZ": _Target, "EXE": FakeEXE, "COLLECT": _Target, "BUNDLE": _Target,
        "MERGE": _Target, "Tree": _Target, "TOC": list, "Splash": _Target,
    }
    exec(compile(SPEC.read_text(encoding="utf-8"), str(SPEC), "exec"), namespace)
    return namespace


def _bundled_resources(namespace) -> set[str]:
    """Resource files as the bundle will hold them, relative to <bundle>/resources."""
    files = set()
    for source, dest in namespace["a"].datas:
        if dest == "resources" or dest.startswith("resources/"):
            files.add(str(Path(dest, Path(source).name).relative_to("resources").as_posix()))
    return files


def test_linux_one_folder_console_executable_with_resources(monkeypatch, tmp_path):
    ns = run_spec(monkeypatch, tmp_path, "linux")
    analysis, executables, coll = ns["a"], ns["executables"], ns["coll"]
    assert all(Path(script).is_file() for script in analysis.inputs)
    # One folder: the EXE leaves binaries to COLLECT, so torch is never packed into a self-extracting file.
    assert [exe.kwargs["name"] for exe in executables] == [app_info.APP_EXECUTABLE]
    assert executables[0].kwargs["exclude_binaries"] is True and executables[0].kwargs["console"] is True
    assert Path(executables[0].script).name == "cli_entry.py"
    assert coll.name == app_info.APP_EXECUTABLE and executables[0] in coll.args
    assert "app" not in ns  # no BUNDLE off macOS
    # A CUDA runtime from the build machine's /usr/local/cuda stays out; the wheels' libraries stay in.
    assert [name for name, _, _ in analysis.binaries] == ["libtorch_cpu.so"]

    bundled = _bundled_resources(ns)
    for needed in ("tokenizers/clip/vocab.json", "tokenizers/clip/merges.txt", "model_configs/sd1/model_index.json",
                   "model_configs/sdxl/unet/config.json", "demo/dataset/shape_00.png", "demo/dataset/shape_00.txt",
                   "icons/app.svg", "style.qss", "presets/balanced.toml"):
        assert needed in bundled, needed
    assert not [f for f in bundled if f.endswith(".py")], "generator scripts are not resources"
    # Every source it names exists (a renamed resource would otherwise only fail at build time).
    assert all(Path(source).exists() for source, _ in analysis.datas if not source.startswith("/site-packages/"))


def test_spec_copies_metadata_the_ml_stack_reads_at_import(monkeypatch, tmp_path):
    ns = run_spec(monkeypatch, tmp_path, "linux")
    dists = {dest.removesuffix(".dist-info") for _, dest in ns["a"].datas if dest.endswith(".dist-info")}
    assert {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub",
            "tokenizers", "PySide6_Essentials"} <= dists
    hidden = ns["a"].kwargs["hiddenimports"]
    # studio.commands.* are imported by name; diffusers/transformers resolve these classes lazily.
    assert {"studio", "diffusers.schedulers", "transformers.models.clip"} <= set(hidden)
    excludes = ns["a"].kwargs["excludes"]
    assert "torch" not in excludes and "tensorboard" not in excludes  # run folders keep TensorBoard logs


def test_windows_adds_a_windowed_launcher_sharing_the_folder(monkeypatch, tmp_path):
    ns = run_spec(monkeypatch, tmp_path, "win32")
    names = [(exe.kwargs["name"], exe.kwargs["console"], Path(exe.script).name) for exe in ns["executables"]]
    assert names == [(app_info.GUI_EXECUTABLE, False, "gui_entry.py"), (app_info.APP_EXECUTABLE, True, "cli_entry.py")]
    assert all(exe in ns["coll"].args for exe in ns["executables"])
    icon = Path(ns["executables"][0].kwargs["icon"])
    assert icon.suffix == ".png" and icon.stat().st_size > 1000  # rendered from app.svg


def test_macos_bundle_uses_the_app_id_and_the_windowed_executable(monkeypatch, tmp_path):
    ns = run_spec(monkeypatch, tmp_path, "darwin")
    bundle = ns["app"]
    assert bundle.args == (ns["coll"],)
    assert bundle.kwargs["bundle_identifier"] == app_info.APP_ID
    assert bundle.kwargs["version"] == app_info.VERSION
    assert bundle.kwargs["name"] == f"{app_info.APP_NAME}.app"
    plist = bundle.kwargs["info_plist"]
    assert plist["CFBundleExecutable"] == app_info.GUI_EXECUTABLE and plist["LSBackgroundOnly"] is False


@pytest.mark.parametrize("entry", ["cli_entry.py", "gui_entry.py"])
def test_entry_scripts_compile(entry, tmp_path):
    py_compile.compile(str(PACKAGING / "pyinstaller" / entry), cfile=str(tmp_path / "entry.pyc"), doraise=True)


def test_spec_lives_where_the_readme_says():
    readme = (PACKAGING / "README.md").read_text(encoding="utf-8")
    assert str(SPEC.relative_to(ROOT).as_posix()) in readme


def test_spec_builds_only_from_the_locked_set(monkeypatch, tmp_path):
    ns = run_spec(monkeypatch, tmp_path, "linux")
    assert ns["LOCK_TARGET"] in {"linux-cpu", "linux-cuda", "windows-cpu", "windows-cuda", "macos"}
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda dist: "0.0.1" if dist == "diffusers" else real_version(dist))
    with pytest.raises(SystemExit, match=r"not packaging/locks/.*diffusers 0\.0\.1 is installed, the lock pins"):
        run_spec(monkeypatch, tmp_path / "again", "linux")
