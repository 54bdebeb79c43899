"""Train page controls: Start/Pause/Stop hold still across run states and react the moment they are clicked."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QRect, Qt
from PySide6.QtWidgets import QApplication, QMessageBox, QPushButton

from ui_fakes import stepping_run


@pytest.fixture
def ready(tiny_dataset):
    def prepare(window):
        window.model.set_value("dataset.path", str(tiny_dataset))
        assert window.model.errors() == []
        return window

    return prepare


def settled(qtbot) -> None:
    """Let pending layout requests and repaints run, as they would before the user's next look."""
    QApplication.processEvents()
    qtbot.wait(20)
    QApplication.processEvents()


def place(page, button: QPushButton) -> QRect:
    return QRect(button.mapTo(page, button.rect().topLeft()), button.size())


def controls(page) -> dict[str, QRect]:
    """Where each control slot is: Pause and Resume share one slot, whichever of them is shown."""
    slot = page.resume_button if page.resume_button.isVisible() else page.pause_button
    return {"start": place(page, page.start_button), "pause/resume": place(page, slot),
            "stop": place(page, page.stop_button)}


def test_buttons_keep_size_and_place_in_every_run_state(qtbot, make_window, ready, tmp_path, monkeypatch):
    window = ready(make_window(stepping_run(tmp_path / "run", total=100_000, delay=0.002)))
    window.resize(1100, 760)
    window.go_to("train")
    page = window.train_page
    settled(qtbot)
    seen = {"ready": controls(page)}

    qtbot.mouseClick(page.start_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: page.run_state == "running" and page.step >= 2, timeout=10_000)
    assert page.phase.isVisible()  # the spinner and its sentence share the row with the buttons
    settled(qtbot)
    seen["running"] = controls(page)

    qtbot.mouseClick(page.pause_button, Qt.LeftButton)
    settled(qtbot)
    seen["pausing"] = controls(page)
    qtbot.waitUntil(lambda: page.run_state == "paused", timeout=5000)
    settled(qtbot)
    assert page.resume_button.isVisible() and not page.pause_button.isVisible()
    seen["paused"] = controls(page)

    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    qtbot.mouseClick(page.stop_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: page.run_state == "cancelled" and not window.controller.running, timeout=10_000)
    settled(qtbot)
    seen["stopped"] = controls(page)

    reference = seen["ready"]
    for state, rects in seen.items():
        for name, rect in rects.items():
            assert rect == reference[name], f"{name} is at {rect} when {state}, at {reference[name]} when ready"
    # And nothing overlaps: the widest texts ("Start training", "Pausing…", "Stopping…") fit their slots.
    assert reference["start"].right() < reference["pause/resume"].left() < reference["stop"].left()
    for button in (page.start_button, page.pause_button, page.resume_button, page.stop_button):
        for text in page.BUTTON_TEXTS["pause" if button in (page.pause_button, page.resume_button) else
                                       "start" if button is page.start_button else "stop"]:
            assert button.fontMetrics().horizontalAdvance(text) < button.width()


def test_pause_and_stop_show_their_effect_in_the_click(qtbot, make_window, ready, tmp_path, monkeypatch):
    window = ready(make_window(stepping_run(tmp_path / "run", total=100_000, delay=0.002)))
    page = window.train_page
    window.start_training()
    qtbot.waitUntil(lambda: page.run_state == "running" and page.step >= 2, timeout=10_000)

    qtbot.mouseClick(page.pause_button, Qt.LeftButton)
    # No event processed yet: what the user sees right after the click.
    assert page.pause_button.text() == "Pausing…" and not page.pause_button.isEnabled()
    assert window.run_label.text().startswith("Pausing…")
    assert page.stop_button.isEnabled()  # stopping while the pause lands stays possible
    qtbot.waitUntil(lambda: page.run_state == "paused", timeout=5000)

    qtbot.mouseClick(page.resume_button, Qt.LeftButton)
    assert page.run_state == "running" and page.pause_button.isVisible() and page.pause_button.text() == "Pause"
    qtbot.waitUntil(lambda: page.step > 5, timeout=5000)

    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    qtbot.mouseClick(page.stop_button, Qt.LeftButton)
    assert page.stop_button.text() == "Stopping…" and not page.stop_button.isEnabled()
    assert not page.pause_button.isEnabled()
    qtbot.waitUntil(lambda: page.run_state == "cancelled" and not window.controller.running, timeout=10_000)


def test_the_run_holds_while_the_stop_question_is_open(qtbot, make_window, ready, tmp_path, monkeypatch):
    """Answering takes a person a few seconds; the run must not train on meanwhile, whatever the answer."""
    engine = {"step": 0}  # the step the run has reached (the page may show an older one while it repaints)
    fake = stepping_run(tmp_path / "run", total=100_000, delay=0.01)

    def run(job, stop=None, pause=None):
        for event in fake(job, stop, pause):
            engine["step"] = getattr(event, "step", engine["step"])
            yield event

    window = ready(make_window(run))
    page = window.train_page
    window.start_training()
    qtbot.waitUntil(lambda: page.run_state == "running" and page.step >= 2, timeout=10_000)
    asked_at = []

    def reads_then(answer):
        def question(*args, **kwargs):
            asked_at.append(engine["step"])
            qtbot.wait(500)  # 50 steps' worth of reading at this fake run's pace
            return answer
        return question

    monkeypatch.setattr(QMessageBox, "question", reads_then(QMessageBox.No))
    window.request_stop()
    assert engine["step"] <= asked_at[-1] + 1, f"asked at step {asked_at[-1]}, the run went on to {engine['step']}"
    qtbot.waitUntil(lambda: page.run_state == "running" and page.step > asked_at[-1] + 3, timeout=10_000)  # "No": on

    monkeypatch.setattr(QMessageBox, "question", reads_then(QMessageBox.Yes))
    window.request_stop()
    qtbot.waitUntil(lambda: page.run_state == "cancelled" and not window.controller.running, timeout=10_000)
    assert page.step <= asked_at[-1] + 1, f"asked at step {asked_at[-1]}, stopped at {page.step}"
