"""Linux downloads from a stand-in PyInstaller folder: tarball layout, install.sh into a prefix and back out, AppDir
links. A real bundle is GBs; the layout logic is the same for a folder with one executable script."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from packaging_helpers import load_script

from studio import app_info

needs_sh = pytest.mark.skipif(shutil.which("sh") is None, reason="install.sh needs a POSIX shell")


@pytest.fixture(scope="module")
def make_dist():
    return load_script("linux/make_dist.py")


@pytest.fixture
def bundle(tmp_path) -> Path:
    folder = tmp_path / "dist" / app_info.APP_EXECUTABLE
    (folder / "_internal" / "resources").mkdir(parents=True)
    (folder / "_internal" / "resources" / "style.qss").write_text("/* stand-in */", encoding="utf-8")
    exe = folder / app_info.APP_EXECUTABLE
    exe.write_text(f"#!/bin/sh\necho '{app_info.APP_NAME} {app_info.VERSION}'\n", encoding="utf-8")
    exe.chmod(0o755)
    return folder


def test_tarball_layout(make_dist, bundle, tmp_path):
    tree = make_dist.make_tree(bundle, tmp_path / "out")
    archive = make_dist.make_tarball(tree)
    names = set(tarfile.open(archive).getnames())
    top = tree.name
    assert top.startswith(f"{app_info.APP_EXECUTABLE}-{app_info.VERSION}-linux-")
    for member in (f"{app_info.APP_EXECUTABLE}/{app_info.APP_EXECUTABLE}", "install.sh", "APP_ID",
                   f"{app_info.APP_EXECUTABLE}/_internal/resources/style.qss",
                   f"share/applications/{app_info.APP_ID}.desktop",
                   f"share/metainfo/{app_info.APP_ID}.metainfo.xml",
                   f"share/icons/hicolor/scalable/apps/{app_info.APP_ID}.svg"):
        assert f"{top}/{member}" in names, member
    assert os.access(tree / "install.sh", os.X_OK)


def test_refuses_a_folder_that_is_not_a_bundle(make_dist, tmp_path):
    with pytest.raises(SystemExit, match="not a PyInstaller bundle"):
        make_dist.make_tree(tmp_path, tmp_path / "out")


@needs_sh
def test_install_sh_installs_and_uninstalls_into_a_prefix(make_dist, bundle, tmp_path):
    tree = make_dist.make_tree(bundle, tmp_path / "out")
    prefix = tmp_path / "prefix"
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    subprocess.run(["sh", str(tree / "install.sh"), str(prefix)], check=True, env=env, capture_output=True, timeout=60)

    binary = prefix / "bin" / app_info.APP_EXECUTABLE
    assert subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.strip() == \
        f"{app_info.APP_NAME} {app_info.VERSION}"
    desktop = (prefix / "share" / "applications" / f"{app_info.APP_ID}.desktop").read_text(encoding="utf-8")
    assert f"Exec={binary}\n" in desktop  # absolute: ~/.local/bin may not be on the session's PATH
    assert (prefix / "share" / "metainfo" / f"{app_info.APP_ID}.metainfo.xml").is_file()
    assert (prefix / "share" / "icons" / "hicolor" / "scalable" / "apps" / f"{app_info.APP_ID}.svg").is_file()
    if shutil.which("desktop-file-validate"):
        result = subprocess.run(["desktop-file-validate", str(prefix / "share" / "applications" / f"{app_info.APP_ID}.desktop")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr

    subprocess.run(["sh", str(tree / "install.sh"), "--uninstall", str(prefix)], check=True, env=env,
                   capture_output=True, timeout=60)
    left = [p for p in prefix.rglob("*") if p.is_file() or p.is_symlink()]
    assert not left, left


def test_appdir_links_resolve(make_dist, bundle, tmp_path):
    appdir = make_dist.make_appdir(bundle, tmp_path / "out")
    for link in ("AppRun", f"{app_info.APP_ID}.desktop", f"{app_info.APP_ID}.svg", ".DirIcon"):
        assert (appdir / link).is_symlink() and (appdir / link).resolve().is_file(), link
    result = subprocess.run([str(appdir / "AppRun")], capture_output=True, text=True, check=True)
    assert app_info.VERSION in result.stdout


def _bundle_with_plugin(bundle: Path, with_qt: bool) -> Path:
    """The real PySide6 xcb plugin where PyInstaller puts it, with (a link to) the real Qt libraries or without."""
    from studio import display_check

    real = display_check.find_plugin("xcb", {})
    qt = bundle / "_internal" / "PySide6" / "Qt"
    (qt / "plugins" / "platforms").mkdir(parents=True)
    shutil.copy2(real, qt / "plugins" / "platforms" / "libqxcb.so")
    if with_qt:
        (qt / "lib").symlink_to(real.parents[2] / "lib", target_is_directory=True)
    return bundle


def test_the_bundled_platform_plugin_finds_qt_inside_the_bundle(make_dist, bundle):
    system = make_dist.check_platform_plugin(_bundle_with_plugin(bundle, with_qt=True))
    assert "libxcb.so.1" in system and not [name for name in system if name.startswith("libQt6")]


def test_a_bundle_without_qt_libraries_is_refused(make_dist, bundle):
    with pytest.raises(SystemExit, match=r"needs Qt libraries the bundle lacks: .*libQt6XcbQpa\.so\.6 is missing"):
        make_dist.check_platform_plugin(_bundle_with_plugin(bundle, with_qt=False))


def test_a_bundle_without_the_plugin_is_refused(make_dist, bundle):
    with pytest.raises(SystemExit, match="no Qt xcb platform plugin"):
        make_dist.main(["--bundle", str(bundle), "--out", str(bundle.parent / "out")])
