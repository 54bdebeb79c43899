"""Before Qt starts on Linux: is there a display, and can Qt's platform plugin load there? One line saying why not.

Without this, Qt aborts the process (SIGABRT) when its xcb plugin lacks a system library, naming only the first
one. Imports no Qt: it reads the plugin's ELF dynamic section (the libraries it needs, following the Qt libraries
shipped next to it) and asks the dynamic loader for each system library, so it sees what Qt's loader will see.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

# Debian/Ubuntu and Fedora packages for the system libraries Qt 6's xcb and wayland plugins need (read from the
# plugins' DT_NEEDED and those of libQt6XcbQpa/libQt6Gui/libQt6Core/libQt6WaylandClient). Any other library falls
# back to Debian's naming rule and to dnf's "provides" syntax, which names the file itself.
PACKAGES = {
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb"),
    "libX11.so.6": ("libx11-6", "libX11"),
    "libGL.so.1": ("libgl1", "libglvnd-glx"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl"),
    "libOpenGL.so.0": ("libopengl0", "libglvnd-opengl"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig"),
    "libfreetype.so.6": ("libfreetype6", "freetype"),
    "libglib-2.0.so.0": ("libglib2.0-0", "glib2"),
    "libgthread-2.0.so.0": ("libglib2.0-0", "glib2"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs"),
    "libwayland-client.so.0": ("libwayland-client0", "libwayland-client"),
    "libwayland-cursor.so.0": ("libwayland-cursor0", "libwayland-cursor"),
    "libwayland-egl.so.1": ("libwayland-egl1", "libwayland-egl"),
    "libz.so.1": ("zlib1g", "zlib"),
}
# Platforms whose plugin talks to a display server and needs its client libraries; every other platform
# (offscreen, minimal, vnc, eglfs, linuxfb, ...) is the user's explicit choice and needs nothing checked here.
_CHECKED = re.compile(r"xcb|wayland.*")

_DT_NEEDED, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 1, 5, 15, 29
_PT_LOAD, _PT_DYNAMIC = 1, 2

Loader = Callable[[str], object]


def dynamic_section(path: Path) -> tuple[list[str], list[str]]:
    """(DT_NEEDED sonames, DT_RUNPATH/DT_RPATH folders) of an ELF shared library, read as the loader reads them:
    program headers -> PT_DYNAMIC -> string table mapped through the PT_LOAD segments.

    Hand-written (60 lines of struct) rather than a dependency: it runs before anything else at every start."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if wide:
        phoff, phentsize, phnum = struct.unpack_from(order + "Q", data, 32)[0], *struct.unpack_from(order + "HH", data, 54)
        phdr, dyn = order + "IIQQQQQQ", order + "qQ"
    else:
        phoff, phentsize, phnum = struct.unpack_from(order + "I", data, 28)[0], *struct.unpack_from(order + "HH", data, 42)
        phdr, dyn = order + "IIIIIIII", order + "iI"
    loads, dynamic = [], None
    for index in range(phnum):
        fields = struct.unpack_from(phdr, data, phoff + index * phentsize)
        if wide:
            kind, _, offset, vaddr, _, filesz = fields[:6]
        else:
            kind, offset, vaddr, _, filesz = fields[:5]
        if kind == _PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif kind == _PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return [], []  # a static binary needs nothing
    entries, step = [], struct.calcsize(dyn)
    for at in range(dynamic[0], dynamic[0] + dynamic[1], step):
        tag, value = struct.unpack_from(dyn, data, at)
        if tag == 0:
            break
        entries.append((tag, value))
    strtab_vaddr = next(value for tag, value in entries if tag == _DT_STRTAB)
    strtab = next(offset + strtab_vaddr - vaddr for vaddr, offset, size in loads if vaddr <= strtab_vaddr < vaddr + size)

    def string(at: int) -> str:
        return data[strtab + at: data.index(b"\0", strtab + at)].decode("utf-8", "replace")

    needed = [string(value) for tag, value in entries if tag == _DT_NEEDED]
    paths = [folder for tag, value in entries if tag in (_DT_RPATH, _DT_RUNPATH) for folder in string(value).split(":")]
    return needed, paths


def system_libraries(plugin: Path) -> list[str]:
    """The sonames a Qt plugin needs from the system: its DT_NEEDED, following every library that is found in its
    own RUNPATH (Qt's libraries shipped with PySide6 or in a frozen bundle) and listing the rest, in order."""
    seen: set[str] = set()
    system: list[str] = []
    queue = [Path(plugin)]
    while queue:
        library = queue.pop(0)
        needed, runpath = dynamic_section(library)
        folders = [Path(folder.replace("$ORIGIN", str(library.parent)).replace("${ORIGIN}", str(library.parent)))
                   for folder in runpath if folder]
        for soname in needed:
            if soname in seen:
                continue
            seen.add(soname)
            shipped = next((folder / soname for folder in folders if (folder / soname).is_file()), None)
            if shipped is not None:
                queue.append(shipped.resolve())
            else:
                system.append(soname)
    return system


def missing_libraries(sonames: list[str], loader: Loader = ctypes.CDLL) -> list[str]:
    """The sonames the dynamic loader cannot open. When a library is there but one of its own dependencies is not,
    the loader's message names that one, and that is the one reported."""
    missing: list[str] = []
    for soname in sonames:
        try:
            loader(soname)
        except OSError as exc:
            named = re.match(r"([^:\s]+\.so[.\d]*): cannot open", str(exc))
            culprit = named.group(1) if named else soname
            if culprit not in missing:
                missing.append(culprit)
    return missing


def _debian_name(soname: str) -> str:
    """Debian's library package rule: libfoo.so.3 -> libfoo3, libfoo-x11.so.0 -> libfoo-x11-0."""
    stem, _, version = soname.partition(".so.")
    stem = stem.lower()
    return f"{stem}-{version.split('.')[0]}" if stem[-1:].isdigit() else f"{stem}{version.split('.')[0]}"


def install_commands(sonames: list[str]) -> tuple[str, str]:
    """(`sudo apt install ...`, `sudo dnf install ...`) that provide these libraries."""
    bits = "()(64bit)" if sys.maxsize > 2**32 else "()"
    debian, fedora = [], []
    for soname in sonames:
        deb, rpm = PACKAGES.get(soname) or (_debian_name(soname), "libxcb" if soname.startswith("libxcb") else
                                            f"'{soname}{bits}'")
        debian += [deb] if deb not in debian else []
        fedora += [rpm] if rpm not in fedora else []
    return "sudo apt install " + " ".join(debian), "sudo dnf install " + " ".join(fedora)


def plugin_folders(env: Mapping[str, str]) -> list[Path]:
    """Where Qt looks for platform plugins, in its order: QT_QPA_PLATFORM_PLUGIN_PATH, QT_PLUGIN_PATH/platforms,
    then the plugins shipped with PySide6 (also inside a PyInstaller bundle)."""
    folders = [Path(env["QT_QPA_PLATFORM_PLUGIN_PATH"])] if env.get("QT_QPA_PLATFORM_PLUGIN_PATH") else []
    folders += [Path(p) / "platforms" for p in env.get("QT_PLUGIN_PATH", "").split(os.pathsep) if p]
    spec = importlib.util.find_spec("PySide6")  # finds the package without importing Qt
    for location in (spec.submodule_search_locations or []) if spec else []:
        folders.append(Path(location) / "Qt" / "plugins" / "platforms")
    return folders


def find_plugin(name: str, env: Mapping[str, str]) -> Path | None:
    files = [f"libq{name}.so"] + (["libqwayland.so"] if name.startswith("wayland") else [])  # Qt 6.7 merged them
    return next((folder / file for folder in plugin_folders(env) for file in files if (folder / file).is_file()), None)


def requested_platforms(env: Mapping[str, str]) -> list[str]:
    """The platforms Qt will try, in its order: QT_QPA_PLATFORM when set ("wayland;xcb", "offscreen:size=..."),
    else Wayland when the session is Wayland, then xcb when there is an X display (XWayland included)."""
    if env.get("QT_QPA_PLATFORM", "").strip():
        return [entry.split(":")[0].strip() for entry in env["QT_QPA_PLATFORM"].split(";") if entry.strip()]
    platforms = ["wayland"] if env.get("WAYLAND_DISPLAY") else []
    return platforms + (["xcb"] if env.get("DISPLAY") else [])


NO_DISPLAY = ("LoRA Studio cannot open its window: there is no display (neither DISPLAY nor WAYLAND_DISPLAY is "
              "set, as over ssh or in CI). Without a window use the command line: `lora-studio train JOB.toml` "
              "or `lora-studio demo` (`lora-studio --help` lists them); for screenshots set QT_QPA_PLATFORM=offscreen.")


def check_display(env: Mapping[str, str] | None = None, platform: str | None = None,
                  loader: Loader = ctypes.CDLL) -> str | None:
    """None when Qt can start its window here; otherwise the one line that says why not and what to do."""
    env = os.environ if env is None else env
    if not (platform or sys.platform).startswith("linux"):
        return None  # Windows and macOS plugins ship everything they need
    platforms = requested_platforms(env)
    if not platforms:
        return NO_DISPLAY
    missing_by_platform: dict[str, list[str]] = {}
    no_plugin = []
    for name in platforms:
        if not _CHECKED.fullmatch(name):
            return None  # offscreen, minimal, vnc, ...: the user chose it and it needs no display libraries
        if not env.get("WAYLAND_DISPLAY" if name.startswith("wayland") else "DISPLAY"):
            continue  # Qt would skip it too
        plugin = find_plugin(name, env)
        if plugin is None:
            no_plugin.append(name)
            continue
        missing = missing_libraries(system_libraries(plugin), loader)
        if not missing:
            return None
        missing_by_platform[name] = missing
    if missing_by_platform:
        # xcb first when both failed: it is the one that works on X11 and on Wayland (through XWayland).
        name = "xcb" if "xcb" in missing_by_platform else next(iter(missing_by_platform))
        missing = missing_by_platform[name]
        apt, dnf = install_commands(missing)
        return (f"LoRA Studio cannot open its window: Qt's {name} platform plugin needs {', '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not installed. Install with `{apt}` (Debian, Ubuntu) or "
                f"`{dnf}` (Fedora), then start lora-studio again.")
    if no_plugin:
        return (f"LoRA Studio cannot open its window: PySide6 has no '{no_plugin[0]}' platform plugin here; "
                "reinstall it (`pip install --force-reinstall PySide6-Essentials`).")
    return NO_DISPLAY
