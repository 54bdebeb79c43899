"""Train page with scripted event streams: progress, plot, samples, pause/resume/stop, failures, odd events."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

from studio.engine.events import LogMessage, RunFinished, RunStarted, StatusChanged, StepCompleted
from ui_fakes import scripted_run, stepping_run, write_lora_stub


@pytest.fixture
def ready(tiny_dataset):
    """Makes a window's job startable (a dataset folder is the one thing a new job lacks)."""

    def prepare(window):
        window.model.set_value("dataset.path", str(tiny_dataset))
        assert window.model.errors() == []
        return window

    return prepare


def wait_for_state(qtbot, window, *states, timeout=10_000):
    qtbot.waitUntil(lambda: window.train_page.run_state in states and not window.controller.running, timeout=timeout)


def test_start_is_blocked_until_the_job_is_complete(qtbot, window):
    page = window.train_page
    window.go_to("train")
    assert not page.start_button.isEnabled()
    assert "Before training can start" in page.checklist.text()
    assert "Image folder" in page.checklist.text() and "go to Dataset" in page.checklist.text()
    with qtbot.assertNotEmitted(window.controller.running_changed):
        window.start_action.trigger()  # Ctrl+Return does nothing but show what is missing
    page.checklist.linkActivated.emit("dataset")
    assert window.current_page() == "dataset"


def test_a_full_run_fills_progress_plot_and_gallery(qtbot, make_window, ready, tmp_path):
    window = ready(make_window(stepping_run(tmp_path / "run", total=12, delay=0.002, sample_every=4)))
    page = window.train_page
    qtbot.mouseClick(page.start_button, Qt.LeftButton)
    assert window.current_page() == "train"
    wait_for_state(qtbot, window, "finished")
    assert page.progress.text() == "step 12 / 12 — done"
    assert page.loss_plot.point_count == 12
    assert page.gallery.count == 3
    assert page.banner.kind == "success" and "fake.safetensors" in page.banner.text.text()
    assert window.rail_state("train") == "done"
    assert window.run_label.text() == "Finished"
    # The LoRA is offered on Try & Export, with the steps saved on the way.
    export = window.export_page
    assert export.selected_lora() == tmp_path / "run" / "fake.safetensors"
    assert export.stack.currentIndex() == 1


def test_progress_speed_and_eta_read_like_people_talk(qtbot, make_window, ready, tmp_path):
    events = [
        RunStarted(tmp_path, 1500, "sd1", "CPU", 4),
        StatusChanged("Caching latents", "2 / 4 images", 0.5),
        StepCompleted(340, 1500, 0.12, 1e-4, 190.0, 1.83, 200.0),
        LogMessage("warning", "img_03.png is small"),
    ]
    window = ready(make_window(scripted_run(events + [lambda: __import__("time").sleep(0.3)])))
    page = window.train_page
    window.start_training()
    qtbot.waitUntil(lambda: page.step == 340, timeout=5000)
    assert page.progress.text() == "step 340 / 1500"
    assert page.rate_label.text() == "1.8 it/s"
    assert page.eta_label.text() == "ETA 3 min 20 s"
    assert "Caching latents — 2 / 4 images (50%)" in page.log_view.toPlainText()
    assert "⚠ img_03.png is small" in page.log_view.toPlainText()
    wait_for_state(qtbot, window, "failed")  # the script ends without a terminal event
    assert "ended without saying" in page.banner.text.text()


def test_pause_resume_and_stop(qtbot, make_window, ready, tmp_path, monkeypatch):
    window = ready(make_window(stepping_run(tmp_path / "run", total=100_000, delay=0.002)))
    page = window.train_page
    window.start_training()
    qtbot.waitUntil(lambda: page.step >= 3, timeout=10_000)

    qtbot.mouseClick(page.pause_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: page.run_state == "paused", timeout=5000)
    assert page.resume_button.isVisible() and page.resume_button.isEnabled()
    held = page.step
    qtbot.wait(100)
    assert page.step == held  # paused means no steps
    assert window.controller.running  # the run (and its model) is still there

    qtbot.mouseClick(page.resume_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: page.run_state == "running" and page.step > held + 2, timeout=5000)

    # Esc asks first; saying no keeps training.
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.No)
    window.stop_action.trigger()
    qtbot.wait(50)
    assert page.run_state == "running"
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    window.stop_action.trigger()
    wait_for_state(qtbot, window, "cancelled")
    assert page.progress.text().startswith("stopped at step")
    assert "saved as" in page.banner.text.text()
    assert window.export_page.selected_lora() is not None  # the partial LoRA can be tried


def test_stop_while_paused(qtbot, make_window, ready, tmp_path):
    window = ready(make_window(stepping_run(tmp_path / "run", total=100_000, delay=0.002)))
    window.start_training()
    qtbot.waitUntil(lambda: window.train_page.step >= 1, timeout=10_000)
    window.pause_training()
    qtbot.waitUntil(lambda: window.train_page.run_state == "paused", timeout=5000)
    window.stop_training()
    wait_for_state(qtbot, window, "cancelled")


def test_engine_failure_event_is_readable_and_the_window_stays_usable(qtbot, make_window, ready, tmp_path):
    window = ready(make_window(stepping_run(tmp_path / "run", total=10, delay=0.001, fail_at=4)))
    page = window.train_page
    window.start_training()
    wait_for_state(qtbot, window, "failed")
    assert page.banner.kind == "error"
    assert page.banner.text.text().startswith("The GPU ran out of memory.")
    assert page.banner.details.isHidden()
    qtbot.mouseClick(page.banner.details_button, Qt.LeftButton)
    assert page.banner.details.isVisible() and "fake OOM" in page.banner.details.toPlainText()
    assert window.rail_state("train") == "attention"
    # Usable afterwards: settings still edit, and another run starts and finishes.
    window.model.set_value("lora.rank", 4)
    window.controller.run_fn = stepping_run(tmp_path / "run2", total=3, delay=0.001)
    assert page.start_button.isEnabled()
    qtbot.mouseClick(page.start_button, Qt.LeftButton)
    wait_for_state(qtbot, window, "finished")


def test_exception_inside_the_engine_becomes_a_readable_error(qtbot, make_window, ready, tmp_path):
    window = ready(make_window(stepping_run(tmp_path / "run", total=10, delay=0.001, raise_at=2)))
    page = window.train_page
    window.start_training()
    wait_for_state(qtbot, window, "failed")
    assert "unexpected error: simulated crash inside the engine" in page.banner.text.text()
    assert "Traceback" in page.banner.details.toPlainText() and "RuntimeError" in page.banner.details.toPlainText()
    assert window.isEnabled() and page.start_button.isEnabled()


def test_exception_before_the_first_event(qtbot, make_window, ready):
    def run(job, stop=None, pause=None):
        raise ImportError("No module named 'studio.engine.trainer'")

    window = ready(make_window(run))
    window.start_training()
    wait_for_state(qtbot, window, "failed")
    assert "not available in this installation" in window.train_page.banner.text.text()


def test_unknown_events_are_logged_not_fatal(qtbot, make_window, ready, tmp_path):
    class FutureEvent:
        pass

    lora = write_lora_stub(tmp_path / "x.safetensors")
    window = ready(make_window(scripted_run([RunStarted(tmp_path, 1, "sd1", "CPU", 1), FutureEvent(),
                                             RunFinished(tmp_path, lora, 1, 0.1)])))
    window.start_training()
    wait_for_state(qtbot, window, "finished")
    assert len(window.unknown_events) == 1
    assert "Unknown event from the engine: FutureEvent" in window.train_page.log_view.toPlainText()


def test_sample_click_enlarges(qtbot, make_window, ready, tmp_path):
    window = ready(make_window(stepping_run(tmp_path / "run", total=2, delay=0.001, sample_every=1)))
    window.start_training()
    wait_for_state(qtbot, window, "finished")
    gallery = window.train_page.gallery
    assert gallery.count == 2
    assert gallery._layout.itemAt(1).widget().property("step") == 2  # newest first
    assert [b.text() for b in gallery.buttons] == ["a red circle"] * 2  # each preview says its prompt
    assert all(b.toolButtonStyle() == Qt.ToolButtonTextUnderIcon for b in gallery.buttons)
    qtbot.mouseClick(gallery.buttons[0], Qt.LeftButton)
    from studio.ui.widgets.gallery import ImageDialog

    dialogs = window.train_page.findChildren(ImageDialog)
    assert dialogs and "a red circle" in dialogs[-1].findChildren(type(window.run_label))[-1].text()
    dialogs[-1].close()


def test_closing_while_training_asks_and_stops_the_thread(qtbot, make_window, ready, tmp_path, monkeypatch):
    window = ready(make_window(stepping_run(tmp_path / "run", total=100_000, delay=0.002)))
    window.start_training()
    qtbot.waitUntil(lambda: window.train_page.step >= 1, timeout=10_000)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.No)
    assert not window.close()
    assert window.controller.running
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    assert not window.close()  # it does not block: the run stops first, then the window closes by itself
    assert window.controller.stopping
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=10_000)
    assert not window.controller.running
    assert window.train_page.run_state == "cancelled"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread nice values are a Linux feature")
def test_the_training_thread_runs_below_the_window_once_set_up(qtbot, make_window, ready, tmp_path):
    """Set-up (loading, caching, injecting) runs at the window's rank: it holds the GIL for long stretches, and a GIL
    holder ranked below other programs freezes the window while it waits for a core. From the first step the work
    thread is WORK_NICE steps below the GUI thread, counted from the app's own nice value (an app started with
    `nice`, like this test run often is, must still leave its window the higher priority)."""
    from studio.ui.worker import WORK_NICE

    seen = {}

    def run(job, stop=None, pause=None):
        me = threading.get_native_id()
        seen["setting up"] = os.getpriority(os.PRIO_PROCESS, me)
        for event in stepping_run(tmp_path / "run", total=2, delay=0.002)(job, stop, pause):
            yield event
            if isinstance(event, RunStarted):
                seen["training"] = os.getpriority(os.PRIO_PROCESS, me)

    window = ready(make_window(run))
    window.start_training()
    wait_for_state(qtbot, window, "finished")
    gui = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == {"setting up": gui, "training": min(19, gui + WORK_NICE)}, f"GUI thread nice {gui}"
