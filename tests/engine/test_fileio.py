"""Atomic writes: all or nothing under the final name, with ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from studio.engine.fileio import atomic_write_bytes, atomic_write_with


def test_a_failing_writer_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_with(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_new_files_get_umask_permissions_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "x", b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o644


def test_replacing_keeps_the_existing_mode(tmp_path):
    target = tmp_path / "x"
    target.write_bytes(b"0")
    target.chmod(0o640)
    atomic_write_bytes(target, b"1")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_bytes() == b"1"
