"""`lora-studio` with no arguments, run as a user runs it (the installed entry point, in its own process): the window
opens offscreen; on Linux without a display or without an xcb library it says why in one line and exits 1."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from studio import display_check

ENTRY = Path(sys.executable).with_name("lora-studio.exe" if os.name == "nt" else "lora-studio")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the display check is for Linux")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The real environment minus anything display-related, with the user's folders in tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM", "QT_QPA_PLATFORM_PLUGIN_PATH", "XDG_SESSION_TYPE")}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               LORA_STUDIO_DATA=str(tmp_path / "data"), LORA_STUDIO_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def _run(env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    assert ENTRY.is_file(), f"{ENTRY} is missing: install the project (pip install -e .)"
    return subprocess.run([str(ENTRY)], env=env, capture_output=True, text=True, timeout=timeout)


def test_lora_studio_opens_the_window_offscreen(tmp_path):
    result = _run(_env(tmp_path, QT_QPA_PLATFORM="offscreen", LORA_STUDIO_EXIT_AFTER_SHOW="1"), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LoRA Studio: the window opened" in result.stdout and "offscreen" in result.stdout, result.stdout
    assert "QThread: Destroyed while thread" not in result.stderr, result.stderr
    # It closed the normal way: the window state was saved under the (temporary) user config folder.
    assert list((tmp_path / "config").rglob("*.ini")), "closeEvent did not run"


@linux_only
def test_no_display_points_to_the_command_line(tmp_path):
    result = _run(_env(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [display_check.NO_DISPLAY], result.stderr
    assert "lora-studio train" in lines[0] and "QT_QPA_PLATFORM=offscreen" in lines[0]


@pytest.fixture
def plugin_missing_a_library(tmp_path) -> tuple[Path, str]:
    """A copy of the real libqxcb.so whose DT_NEEDED names an xcb library no system has: the same as removing
    libxcb-icccm4, without touching a real library. Qt's own libraries stay reachable through its RUNPATH."""
    real = display_check.find_plugin("xcb", {})
    assert real is not None, "PySide6 ships libqxcb.so on Linux"
    qt_lib = real.parents[2] / "lib"
    platforms = tmp_path / "qt" / "plugins" / "platforms"
    platforms.mkdir(parents=True)
    (tmp_path / "qt" / "lib").symlink_to(qt_lib, target_is_directory=True)  # $ORIGIN/../../lib
    data = real.read_bytes()
    assert data.count(b"libxcb-icccm.so.4\0") == 1
    gone = "libxcb-icccX.so.4"  # same length: the ELF stays valid
    (platforms / "libqxcb.so").write_bytes(data.replace(b"libxcb-icccm.so.4\0", gone.encode() + b"\0"))
    return platforms, gone


@linux_only
def test_a_missing_xcb_library_prints_the_install_command_and_exits_1(tmp_path, plugin_missing_a_library):
    platforms, gone = plugin_missing_a_library
    result = _run(_env(tmp_path, DISPLAY=":97", QT_QPA_PLATFORM_PLUGIN_PATH=str(platforms)))
    assert result.returncode == 1, (result.returncode, result.stderr)  # not -6 (SIGABRT) from Qt
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert gone in lines[0] and "sudo apt install" in lines[0] and "sudo dnf install" in lines[0], lines[0]
    assert "xcb platform plugin" in lines[0]


@linux_only
def test_the_gui_path_never_imports_qt_when_the_check_fails(tmp_path):
    code = ("import sys; from studio.cli import main; rc = main([]); "
            "assert not [m for m in sys.modules if m.startswith('PySide6.')], sorted(sys.modules); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr


@linux_only
def test_the_real_plugin_needs_are_what_ldd_sees(tmp_path):
    """The ELF reader against the system's own tool: every library it reports as the system's is one ldd resolves
    outside PySide6 (or cannot find), and none of Qt's shipped libraries is reported."""
    ldd = shutil.which("ldd")
    assert ldd, "ldd comes with glibc (libc-bin)"
    plugin = display_check.find_plugin("xcb", {})
    ours = display_check.system_libraries(plugin)
    qt_lib = (plugin.parents[2] / "lib").resolve()
    listing = subprocess.run([ldd, str(plugin)], capture_output=True, text=True, timeout=60).stdout
    resolved = {}
    for line in listing.splitlines():
        name, _, where = line.strip().partition(" => ")
        if where:
            where = where.split(" (")[0]
            resolved[name] = where if where == "not found" else str(Path(where).resolve())
    assert {"libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxkbcommon-x11.so.0"} <= set(ours)
    assert not [name for name in ours if name.startswith("libQt6")], ours
    for name in ours:
        if name in resolved:
            assert resolved[name] == "not found" or not resolved[name].startswith(str(qt_lib)), (name, resolved[name])
    shipped = [name for name, where in resolved.items() if where.startswith(str(qt_lib))]
    assert shipped and not set(shipped) & set(ours)


@linux_only
def test_readme_system_package_line_matches_what_the_plugin_needs():
    """The README's apt and dnf lines name packages for libraries the installed xcb plugin really needs (read from
    its ELF), the same libraries on both lines, and include the xcb-util ones that desktops often lack."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    apt = re.search(r"`sudo apt install ([^`]+)`", readme).group(1).split()
    dnf = re.search(r"`sudo dnf install ([^`]+)`", readme).group(1).split()
    needed = display_check.system_libraries(display_check.find_plugin("xcb", {}))
    by_debian = {display_check.install_commands([lib])[0].split()[-1]: lib for lib in needed}
    assert set(apt) <= set(by_debian), set(apt) - set(by_debian)
    libraries = [by_debian[package] for package in apt]
    assert display_check.install_commands(libraries) == (f"sudo apt install {' '.join(apt)}",
                                                          f"sudo dnf install {' '.join(dnf)}")
    often_missing = {"libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxcb-image.so.0",
                     "libxcb-render-util.so.0", "libxkbcommon-x11.so.0"}
    assert often_missing <= set(libraries), often_missing - set(libraries)
