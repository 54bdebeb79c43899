"""The job queue in the window: add the current job, reorder, remove, run one after another, survive a restart."""

from __future__ import annotations

from PySide6.QtCore import Qt

from studio.engine.job_queue import JobQueue
from studio.paths import queue_file
from ui_fakes import stepping_run


def test_queue_add_reorder_run_in_order_and_reopen(qtbot, make_window, tiny_dataset, tmp_path):
    ran: list[str] = []
    fake = stepping_run(tmp_path / "run", total=3, delay=0.002)

    def run(job, stop=None, pause=None):
        ran.append(job.output.name)
        yield from fake(job, stop, pause)

    window = make_window(run)
    window.model.set_value("dataset.path", str(tiny_dataset))
    panel = window.queue_panel
    for name in ("first", "second", "third"):
        window.model.set_value("output.name", name)
        qtbot.mouseClick(panel.add_button, Qt.LeftButton)
    assert window.queue_dock.isVisible() and panel.list.count() == 3
    panel.list.setCurrentRow(2)
    qtbot.mouseClick(panel.up_button, Qt.LeftButton)  # third before second
    panel.list.setCurrentRow(0)
    qtbot.mouseClick(panel.remove_button, Qt.LeftButton)  # first is gone
    assert [e.name for e in JobQueue.load(queue_file()).entries] == ["third", "second"]  # saved at once

    qtbot.mouseClick(panel.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: [e.state for e in panel.queue.entries] == ["finished", "finished"]
                    and not window.controller.running, timeout=20_000)
    assert ran == ["third", "second"]
    assert "finished" in panel.list.item(0).text()

    # One click from a finished job to its Try & Export.
    panel.list.setCurrentRow(0)
    assert panel.open_button.isEnabled()
    qtbot.mouseClick(panel.open_button, Qt.LeftButton)
    assert window.current_page() == "export"

    # A restart finds the queue as it was.
    again = make_window(run)
    assert [again.queue_panel.list.item(i).text() for i in range(2)] == ["third — finished", "second — finished"]


def test_a_failed_job_does_not_stop_the_queue(qtbot, make_window, tiny_dataset, tmp_path):
    fake_ok = stepping_run(tmp_path / "ok", total=2, delay=0.002)
    fake_bad = stepping_run(tmp_path / "bad", total=4, delay=0.002, fail_at=2)

    def run(job, stop=None, pause=None):
        yield from (fake_bad if job.output.name == "bad" else fake_ok)(job, stop, pause)

    window = make_window(run)
    window.model.set_value("dataset.path", str(tiny_dataset))
    for name in ("bad", "good"):
        window.model.set_value("output.name", name)
        window.add_to_queue()
    window.run_queue()
    qtbot.waitUntil(lambda: [e.state for e in window.queue_panel.queue.entries] == ["failed", "finished"]
                    and not window.controller.running, timeout=20_000)
    assert "out of memory" in window.queue_panel.queue.entries[0].message


def test_the_run_menu_reaches_the_hidden_queue(qtbot, make_window, tiny_dataset):
    """With an empty queue the dock starts hidden; the Run menu shows it and adds the current job to it."""
    window = make_window()
    window.show()
    assert not window.queue_dock.isVisible()
    window.queue_show_action.trigger()
    assert window.queue_dock.isVisible()
    window.queue_show_action.trigger()
    assert not window.queue_dock.isVisible()
    window.model.set_value("dataset.path", str(tiny_dataset))
    window.model.set_value("output.name", "from-the-menu")
    window.queue_add_action.trigger()
    assert window.queue_dock.isVisible()
    assert [e.name for e in window.queue_panel.queue.entries] == ["from-the-menu"]
