"""UI test fixtures: offscreen and strict, settings in a temp folder, no QThread left running, engine fakes."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from PySide6.QtCore import QSettings, QThread

from ui_fakes import stepping_run


@pytest.fixture(autouse=True, scope="session")
def _themed(qapp):
    """The app's real look (Fusion, palette, style sheet), as users get it from studio.ui.app.create_app."""
    from studio.ui.app import create_app

    create_app([])


@pytest.fixture(autouse=True)
def _fresh_settings(tmp_path, monkeypatch):
    """QSettings and the user data folder (presets, default run folder) belong to this test alone."""
    QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, str(tmp_path / "settings"))
    monkeypatch.setenv("LORA_STUDIO_DATA", str(tmp_path / "user-data"))
    yield


@pytest.fixture(autouse=True)
def _dangling_qthreads(monkeypatch, qapp):
    """Fail a test that leaves a QThread running (napari's guard): the window must end what it starts."""
    started: list[tuple[QThread, str]] = []
    real_start = QThread.start

    def recording_start(self, *args):
        started.append((self, "".join(traceback.format_stack(limit=6)[:-1])))
        real_start(self, *args)

    monkeypatch.setattr(QThread, "start", recording_start)
    yield
    running = []
    for thread, where in started:
        try:
            if thread.isRunning():
                running.append((thread, where))
        except RuntimeError:  # the C++ object is gone: it finished and was deleted
            continue
    for thread, _ in running:
        thread.wait(30_000)  # do not let the leak break the tests after this one
    if running:
        names = "\n".join(f"- {t.objectName() or t}, started at:\n{where}" for t, where in running)
        pytest.fail(f"{len(running)} QThread(s) still running after the test:\n{names}")


@pytest.fixture(autouse=True)
def _quick_backend(monkeypatch, request):
    """The slow or machine-dependent engine calls get quick stand-ins, except in tests marked real_engine."""
    from studio.ui import backend

    if "real_engine" in request.keywords:
        return
    monkeypatch.setattr(backend, "estimate", lambda job: None)
    monkeypatch.setattr(backend, "find_models", lambda stop=None: [])
    monkeypatch.setattr(backend, "detect_device", lambda: "CPU (test)")
    # Importing torch, diffusers and transformers up front takes seconds; scripted tests do not need it.
    monkeypatch.setattr(backend, "warm_up_engine", lambda: None)


def pytest_configure(config):
    config.addinivalue_line("markers", "real_engine: the real engine behind every window call (no stand-ins)")


@pytest.fixture
def make_images():
    """Simple captioned test images (tests/fixtures_data.py's make_dataset)."""
    from fixtures_data import make_dataset

    return make_dataset


@pytest.fixture
def make_window(qtbot, tmp_path):
    """Build MainWindows with a given run function; each is shut down (threads joined) after the test."""
    from studio.ui.main_window import MainWindow

    windows = []

    def make(run_fn=None, **kwargs):
        kwargs.setdefault("detect_device", False)
        window = MainWindow(run_fn, **kwargs)
        window.model.set_value("output.dir", str(tmp_path / "runs" / "my-lora"))
        qtbot.addWidget(window)
        window.show()
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.shutdown()


@pytest.fixture
def window(make_window, tmp_path):
    """A window whose training is a scripted 20-step fake run."""
    return make_window(stepping_run(tmp_path / "run", total=20, delay=0.002))
