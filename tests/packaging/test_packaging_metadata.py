"""The app's identity agrees everywhere: app_info, the .desktop file, AppStream metainfo, the GUI, pyproject.

The pure-Python checks always run. desktop-file-validate / appstreamcli add the freedesktop validators' rules when
they are installed (apt-get install desktop-file-utils appstream); without them those two tests are skipped with a
reason in the summary, never silently.
"""

from __future__ import annotations

import ast
import configparser
import datetime
import re
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET

import pytest

from studio import __version__, app_info
from packaging_helpers import ROOT

DESKTOP = ROOT / "packaging" / "linux" / f"{app_info.APP_ID}.desktop"
METAINFO = ROOT / "packaging" / "linux" / f"{app_info.APP_ID}.metainfo.xml"
ICON = ROOT / "resources" / "icons" / "app.svg"


def test_app_id_is_reverse_dns_of_the_github_owner():
    assert re.fullmatch(r"[a-z][a-z0-9]*(\.[a-z0-9_-]+)+\.[A-Za-z][A-Za-z0-9_]*", app_info.APP_ID), app_info.APP_ID
    owner = re.match(r"https://github\.com/([^/]+)/", app_info.HOMEPAGE + "/").group(1)
    # Flathub (and AppStream's developer id) verify io.github.<owner> against the code's real home.
    assert app_info.APP_ID.startswith(f"io.github.{owner.lower()}."), (app_info.APP_ID, app_info.HOMEPAGE)
    assert app_info.DEVELOPER_ID == f"io.github.{owner.lower()}"


def test_version_and_releases_agree():
    assert app_info.VERSION == __version__
    assert app_info.RELEASES[0][0] == app_info.VERSION, "add the new version at the top of app_info.RELEASES"
    dates = [datetime.date.fromisoformat(date) for _, date in app_info.RELEASES]
    assert dates == sorted(dates, reverse=True), "app_info.RELEASES is newest first"
    assert len({version for version, _ in app_info.RELEASES}) == len(app_info.RELEASES)


def test_checked_in_metadata_is_what_generate_py_writes(generate):
    stale = [str(path.relative_to(ROOT)) for path in generate.stale_outputs()]
    assert not stale, f"out of date: {stale}; run `python packaging/generate.py` and commit the result"


def test_desktop_file_agrees_with_app_info():
    entry = configparser.ConfigParser(interpolation=None, strict=True)
    entry.optionxform = str  # keys are case-sensitive
    entry.read_string(DESKTOP.read_text(encoding="utf-8"))
    d = entry["Desktop Entry"]
    assert DESKTOP.name == f"{app_info.APP_ID}.desktop"  # = setDesktopFileName and <launchable>
    assert d["Type"] == "Application"
    assert d["Name"] == app_info.APP_NAME
    assert d["Comment"] == app_info.SUMMARY
    assert d["Exec"].split()[0] == app_info.APP_EXECUTABLE
    assert d["Icon"] == app_info.APP_ID
    assert d["Terminal"] == "false"
    assert d["Categories"].endswith(";") and d["Categories"].split(";")[0] == app_info.CATEGORIES[0]


def test_metainfo_agrees_with_app_info():
    root = ET.parse(METAINFO).getroot()
    assert root.tag == "component" and root.get("type") == "desktop-application"
    assert root.findtext("id") == app_info.APP_ID
    assert root.findtext("name") == app_info.APP_NAME
    assert root.findtext("summary") == app_info.SUMMARY
    assert root.findtext("metadata_license") == app_info.METADATA_LICENSE
    assert root.findtext("project_license") == app_info.LICENSE
    developer = root.find("developer")
    assert developer.get("id") == app_info.DEVELOPER_ID and developer.findtext("name") == app_info.DEVELOPER_NAME
    assert [p.text for p in root.findall("description/p")] == list(app_info.DESCRIPTION)
    launchable = root.find("launchable")
    assert launchable.get("type") == "desktop-id" and launchable.text == DESKTOP.name
    assert root.findtext("provides/binary") == app_info.APP_EXECUTABLE
    assert root.find("url[@type='homepage']").text == app_info.HOMEPAGE
    releases = root.findall("releases/release")
    assert releases[0].get("version") == app_info.VERSION
    assert [(r.get("version"), r.get("date")) for r in releases] == [tuple(r) for r in app_info.RELEASES]
    assert root.find("content_rating").get("type") == "oars-1.1"
    shots = root.findall("screenshots/screenshot")
    assert shots and shots[0].get("type") == "default"
    assert all(s.findtext("image").startswith("https://") and s.findtext("caption") for s in shots)


def test_screenshots_are_files_the_screenshots_command_writes():
    from studio.commands.screenshots import PAGE_FILES  # light: the command imports Qt only when it runs

    written = {f"{stem}.png" for stem in PAGE_FILES.values()}
    assert {name for name, _ in app_info.SCREENSHOTS} <= written, written


def test_project_license_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = pyproject["project"]["license"]
    declared = declared["text"] if isinstance(declared, dict) else declared
    assert declared == app_info.LICENSE


def test_app_icon_is_a_square_svg():
    svg = ET.parse(ICON).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    _, _, width, height = (float(v) for v in svg.get("viewBox").split())
    assert width == height  # hicolor/scalable icons are square


def test_gui_announces_the_app_id_as_desktop_file_name():
    """Wayland and docks match a window to its .desktop file through QGuiApplication.desktopFileName()."""
    calls = []
    for path in (ROOT / "studio" / "ui").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "setDesktopFileName":
                calls.append(ast.unparse(node.args[0]) if node.args else "")
    assert calls, "studio/ui must call QGuiApplication.setDesktopFileName(app_info.APP_ID)"
    assert all(call.endswith("APP_ID") for call in calls), calls


def _run_validator(command: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed; the pure-Python metadata checks ran, the validator did not "
                    f"(apt-get install desktop-file-utils appstream)")
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_desktop_file_validate():
    result = _run_validator(["desktop-file-validate", str(DESKTOP)])
    output = result.stdout + result.stderr
    print(output)  # hints are fine; they show with -s
    assert result.returncode == 0 and "error:" not in output, output


def test_appstreamcli_validate():
    result = _run_validator(["appstreamcli", "validate", "--no-net", "--explain", str(METAINFO)])
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output
