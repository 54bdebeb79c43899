"""studio.display_check decides from the environment and the dynamic loader whether Qt can open a window; the loader
is replaced here, so no real library has to be missing."""

from __future__ import annotations

import sys

import pytest

from studio import display_check

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the display check is for Linux")


def loader_without(*absent: str, broken: dict[str, str] | None = None):
    """A stand-in for ctypes.CDLL: raises like the real loader for `absent` sonames; `broken` maps a present library
    to one of its own dependencies that is missing."""
    def load(soname: str):
        if soname in absent:
            raise OSError(f"{soname}: cannot open shared object file: No such file or directory")
        if broken and soname in broken:
            raise OSError(f"{broken[soname]}: cannot open shared object file: No such file or directory")
        return object()
    return load


X11 = {"DISPLAY": ":0"}


def test_everything_present_means_no_message():
    assert display_check.check_display(X11, loader=loader_without()) is None


def test_missing_xcb_libraries_give_one_line_with_apt_and_dnf_commands():
    message = display_check.check_display(X11, loader=loader_without("libxcb-icccm.so.4", "libxcb-keysyms.so.1",
                                                                     "libxcb-cursor.so.0"))
    assert "\n" not in message
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1" in message or "libxcb-cursor.so.0" in message
    assert "`sudo apt install libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1`" in message, message
    assert "`sudo dnf install xcb-util-cursor xcb-util-wm xcb-util-keysyms`" in message, message


def test_a_library_whose_own_dependency_is_missing_names_that_dependency():
    message = display_check.check_display(X11, loader=loader_without(
        broken={"libxcb-cursor.so.0": "libxcb-render-util.so.0"}))
    assert "needs libxcb-render-util.so.0, which is not installed" in message
    assert "sudo apt install libxcb-render-util0`" in message and "xcb-util-renderutil" in message


@pytest.mark.parametrize("platform", ["offscreen", "minimal", "vnc", "offscreen:size=800x600", "eglfs"])
def test_a_platform_the_user_chose_that_needs_no_display_is_honoured(platform):
    everything_missing = loader_without(*display_check.system_libraries(display_check.find_plugin("xcb", {})))
    assert display_check.check_display({"QT_QPA_PLATFORM": platform}, loader=everything_missing) is None


def test_no_display_at_all_points_to_the_command_line():
    message = display_check.check_display({}, loader=loader_without())
    assert message == display_check.NO_DISPLAY
    assert "`lora-studio train JOB.toml`" in message and "`lora-studio demo`" in message
    assert "QT_QPA_PLATFORM=offscreen" in message


def test_xcb_requested_without_display_is_the_no_display_message():
    assert display_check.check_display({"QT_QPA_PLATFORM": "xcb"}, loader=loader_without()) == display_check.NO_DISPLAY


def test_wayland_session_works_without_the_xcb_libraries():
    xcb_only = [name for name in display_check.system_libraries(display_check.find_plugin("xcb", {}))
                if name.startswith("libxcb")]
    env = {"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}
    assert display_check.check_display(env, loader=loader_without(*xcb_only)) is None


def test_wayland_only_session_missing_its_library_says_so():
    message = display_check.check_display({"WAYLAND_DISPLAY": "wayland-0"},
                                          loader=loader_without("libwayland-cursor.so.0"))
    assert "wayland platform plugin needs libwayland-cursor.so.0" in message
    assert "sudo apt install libwayland-cursor0" in message and "sudo dnf install libwayland-cursor" in message


def test_when_both_fail_the_xcb_commands_are_given():
    env = {"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"}
    message = display_check.check_display(env, loader=loader_without("libwayland-cursor.so.0", "libxcb-icccm.so.4"))
    assert "xcb platform plugin needs libxcb-icccm.so.4" in message


def test_a_plugin_folder_without_the_plugin_is_reported(tmp_path):
    env = {"DISPLAY": ":0", "QT_QPA_PLATFORM": "xcb", "QT_QPA_PLATFORM_PLUGIN_PATH": str(tmp_path)}
    found = display_check.find_plugin("xcb", env)
    assert found is not None and found.parent != tmp_path  # falls back to PySide6's own, as Qt does


def test_off_linux_nothing_is_checked():
    assert display_check.check_display({}, platform="win32", loader=loader_without("anything")) is None


def test_unknown_libraries_get_debian_rule_and_dnf_provides_names():
    apt, dnf = display_check.install_commands(["libxcb-xinerama.so.0", "libfoo-x11.so.0", "libbar.so.3"])
    assert apt == "sudo apt install libxcb-xinerama0 libfoo-x11-0 libbar3"
    assert dnf == "sudo dnf install libxcb 'libfoo-x11.so.0()(64bit)' 'libbar.so.3()(64bit)'"


def test_not_an_elf_file_is_refused(tmp_path):
    fake = tmp_path / "libqxcb.so"
    fake.write_text("not a library")
    with pytest.raises(ValueError, match="not an ELF file"):
        display_check.dynamic_section(fake)
