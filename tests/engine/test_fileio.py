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


def test_concurrent_writes_get_the_umask_mode_and_never_change_the_process_umask(tmp_path, monkeypatch):
    """os.umask is process-wide: reading it by setting it (umask(0) then back) let other threads' files come out
    0666. Writers must never call it; every file must get what a plain open() would give."""
    import threading

    import studio.engine.fileio as fileio
    import studio.engine.state as state

    current = os.umask(0o027)
    os.umask(current)
    expected = 0o666 & ~current

    def forbidden(*args):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(os, "umask", forbidden)
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def write_many(n: int) -> None:
        try:
            barrier.wait()
            for i in range(60):
                atomic_write_bytes(tmp_path / f"t{n}" / f"f{i}.txt", b"x")
                if i % 20 == 0:  # checkpoint folders are built by another path
                    folder = fileio.create_temp_dir(tmp_path / f"t{n}", f"step-{i:06d}")
                    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~current
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write_many, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    modes = {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*.txt")}
    assert len(list(tmp_path.rglob("*.txt"))) == 360 and modes == {expected}
    assert not hasattr(state, "_umask"), "no umask dance left in state.py either"


# ------------------------------------------------------------------------------------------- full disks


def _safetensors_enospc():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


# What each writer raises when the disk fills up (measured on a full tmpfs): safetensors wraps the errno in its
# message, torch.save's zip writer loses it entirely, its legacy writer keeps only the text.
FULL_DISK_ERRORS = {
    "safetensors": (_safetensors_enospc, False),
    "torch.save zip": (lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 598"), True),
    "c++ stream": (lambda: RuntimeError("write(): fd 3 failed with No space left on device"), False),
    "python": (lambda: OSError(28, "No space left on device"), False),
}


@pytest.mark.parametrize("kind", FULL_DISK_ERRORS)
def test_a_full_disk_is_recognised_however_the_writer_reports_it(tmp_path, monkeypatch, kind):
    import shutil
    from collections import namedtuple

    make, needs_free_space = FULL_DISK_ERRORS[kind]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))

    def writer(tmp):
        tmp.write_bytes(b"half")
        raise make()

    with pytest.raises(OSError) as caught:
        atomic_write_with(tmp_path / "x.safetensors", writer)
    assert caught.value.errno == 28 and caught.value.filename == str(tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
    if needs_free_space:  # with room on the disk the same error is not blamed on it
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9))
        with pytest.raises(RuntimeError) as caught:
            atomic_write_with(tmp_path / "x.safetensors", writer)
        assert not isinstance(caught.value, OSError)
