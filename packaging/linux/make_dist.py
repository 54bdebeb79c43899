"""Turn the PyInstaller folder into Linux downloads: a tarball with install.sh, and/or an AppDir for appimagetool.

    python packaging/linux/make_dist.py --bundle dist/lora-studio --out dist [--tarball] [--appdir]

Both carry the .desktop file, AppStream metainfo and icon under share/, named by the app id from app_info.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from studio import app_info, display_check  # noqa: E402

LINUX_DIR = ROOT / "packaging" / "linux"
ICON_SOURCE = ROOT / "resources" / "icons" / "app.svg"


def _share_files() -> dict[str, Path]:
    """Relative path under a prefix -> source file, the same for the tarball and the AppDir."""
    return {
        f"share/applications/{app_info.APP_ID}.desktop": LINUX_DIR / f"{app_info.APP_ID}.desktop",
        f"share/metainfo/{app_info.APP_ID}.metainfo.xml": LINUX_DIR / f"{app_info.APP_ID}.metainfo.xml",
        f"share/icons/hicolor/scalable/apps/{app_info.APP_ID}.svg": ICON_SOURCE,
    }


def _check_bundle(bundle: Path) -> None:
    executable = bundle / app_info.APP_EXECUTABLE
    if not (executable.is_file() and os.access(executable, os.X_OK)):
        raise SystemExit(f"{bundle} is not a PyInstaller bundle: no executable {executable.name} in it")


# Libraries that come with PySide6 (Qt and its ICU): a user's system is not expected to have them, so the bundle must.
_SHIPPED_WITH_QT = re.compile(r"lib(Qt6|icu|pyside6|shiboken6)")


def check_platform_plugin(bundle: Path) -> list[str]:
    """`ldd` on the bundle's xcb platform plugin, with the library path PyInstaller's bootloader sets (_internal/):
    every Qt library it needs must resolve inside the bundle. Returns the system libraries it takes from the build
    machine (what users must have, as the README and studio.display_check say); raises SystemExit otherwise."""
    internal = bundle / "_internal"
    plugins = sorted(internal.rglob("platforms/libqxcb.so"))
    if not plugins:
        raise SystemExit(f"{bundle} has no Qt xcb platform plugin (platforms/libqxcb.so): the window could not open")
    ldd = shutil.which("ldd")
    if ldd is None:
        raise SystemExit("ldd is needed to check the bundled Qt plugin (it comes with glibc: libc-bin)")
    env = {**os.environ, "LD_LIBRARY_PATH": str(internal)}
    listing = subprocess.run([ldd, str(plugins[0])], capture_output=True, text=True, env=env, timeout=120).stdout
    problems, system = [], []
    for line in listing.splitlines():
        name, _, where = line.strip().partition(" => ")
        where = where.split(" (")[0]
        if not where:
            continue
        # normpath, not resolve(): a library the bundle holds as a symlink still ships with it
        inside = where != "not found" and Path(os.path.normpath(where)).is_relative_to(internal.absolute())
        if _SHIPPED_WITH_QT.match(name) and not inside:
            problems.append(f"{name} {'is missing' if where == 'not found' else f'comes from {where}'}")
        elif not inside:
            system.append(name)
    if problems:
        raise SystemExit(f"the bundled {plugins[0].relative_to(bundle)} needs Qt libraries the bundle lacks: "
                         + "; ".join(problems))
    known = set(display_check.system_libraries(plugins[0]))
    print(f"platform plugin OK; from the user's system it needs {len(system)} libraries, "
          f"{len(known & set(system))} of them named by the display check: {', '.join(sorted(known & set(system)))}")
    return system


def dist_name() -> str:
    return f"{app_info.APP_EXECUTABLE}-{app_info.VERSION}-linux-{platform.machine()}"


def make_tree(bundle: Path, out: Path) -> Path:
    """out/<dist_name>/ with the bundle, share/ and install.sh; returns that folder."""
    _check_bundle(bundle)
    tree = out / dist_name()
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(bundle, tree / app_info.APP_EXECUTABLE, symlinks=True)
    for relative, source in _share_files().items():
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, tree / relative)
    shutil.copy2(LINUX_DIR / "install.sh", tree / "install.sh")
    (tree / "install.sh").chmod(0o755)
    # install.sh is plain sh without Python; it reads the identity from these two files.
    (tree / "APP_ID").write_text(app_info.APP_ID + "\n", encoding="utf-8")
    (tree / "APP_EXECUTABLE").write_text(app_info.APP_EXECUTABLE + "\n", encoding="utf-8")
    return tree


def make_tarball(tree: Path) -> Path:
    archive = tree.with_name(tree.name + ".tar.gz")
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:  # 6: most of 9's ratio at a fraction of the time
        tar.add(tree, arcname=tree.name)
    return archive


def make_appdir(bundle: Path, out: Path) -> Path:
    """An AppDir (https://docs.appimage.org/reference/appdir.html): `appimagetool <AppDir>` turns it into an AppImage."""
    _check_bundle(bundle)
    appdir = out / f"{app_info.APP_NAME.replace(' ', '_')}.AppDir"
    if appdir.exists():
        shutil.rmtree(appdir)
    usr = appdir / "usr"
    shutil.copytree(bundle, usr / "lib" / app_info.APP_EXECUTABLE, symlinks=True)
    (usr / "bin").mkdir(parents=True)
    (usr / "bin" / app_info.APP_EXECUTABLE).symlink_to(Path("..") / "lib" / app_info.APP_EXECUTABLE / app_info.APP_EXECUTABLE)
    for relative, source in _share_files().items():
        (usr / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, usr / relative)
    # appimagetool wants the .desktop file and icon at the top as well, and AppRun as the entry point.
    # The PyInstaller bootloader finds its _internal folder through /proc/self/exe, so symlinks are enough.
    desktop = f"{app_info.APP_ID}.desktop"
    (appdir / desktop).symlink_to(Path("usr") / "share" / "applications" / desktop)
    icon = f"{app_info.APP_ID}.svg"
    (appdir / icon).symlink_to(Path("usr") / "share" / "icons" / "hicolor" / "scalable" / "apps" / icon)
    (appdir / ".DirIcon").symlink_to(icon)
    (appdir / "AppRun").symlink_to(Path("usr") / "bin" / app_info.APP_EXECUTABLE)
    return appdir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "dist" / app_info.APP_EXECUTABLE,
                        help="the PyInstaller output folder (default: dist/lora-studio)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where to write (default: dist/)")
    parser.add_argument("--tarball", action="store_true", help="write <name>.tar.gz (the default without --appdir)")
    parser.add_argument("--no-archive", action="store_true", help="with --tarball: the folder only, no .tar.gz")
    parser.add_argument("--appdir", action="store_true", help="write an AppDir for appimagetool")
    args = parser.parse_args(argv)
    check_platform_plugin(args.bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tarball or not args.appdir:
        tree = make_tree(args.bundle, args.out)
        print(f"wrote {tree}")
        if not args.no_archive:
            print(f"wrote {make_tarball(tree)}")
    if args.appdir:
        print(f"wrote {make_appdir(args.bundle, args.out)}  (next: appimagetool it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
