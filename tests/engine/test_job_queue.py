"""The job queue file: add, reorder, remove, survive a restart, a damaged file named, a running job waits again."""

from __future__ import annotations

import pytest

from studio.engine.job_queue import JobQueue
from studio.engine.jsonfile import JsonFileError
from studio.paths import queue_file


def test_the_queue_survives_a_restart_in_the_app_data_folder(tmp_path):
    path = queue_file()
    queue = JobQueue.load(path)
    assert queue.entries == []
    for name in ("a", "b", "c"):
        queue.add(tmp_path / f"{name}.toml")
    queue.move(2, 0)
    queue.remove(1)
    queue.entries[0].state = "running"
    queue.entries[1].state, queue.entries[1].run_dir = "finished", str(tmp_path / "runs" / "b")
    queue.save()
    again = JobQueue.load(path)
    assert [e.name for e in again.entries] == ["c", "b"]
    assert again.entries[0].state == "waiting"  # was running when the app ended
    assert again.entries[1].state == "finished" and again.entries[1].run_dir.endswith("b")
    assert again.next_waiting().name == "c"
    assert not list(path.parent.glob("*.tmp*"))  # written atomically, nothing left beside it


def test_a_damaged_queue_file_is_named(tmp_path):
    path = tmp_path / "queue.json"
    path.write_text('{"jobs": [{"name": "no file"}]}')
    with pytest.raises(JsonFileError, match="queue.json"):
        JobQueue.load(path)
