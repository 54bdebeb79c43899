"""The window says so when the run it would resume is being trained by another process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PySide6.QtCore import Qt

from test_ui_real_engine import RUN_TIMEOUT_MS, set_up_job, wait_until_done

pytestmark = pytest.mark.real_engine

HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1], timeout=0)
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_resuming_a_run_another_process_trains_shows_why_it_cannot(qtbot, make_window, tiny_sd1, tiny_dataset, tmp_path):
    window = make_window()
    run_dir = tmp_path / "runs" / "circles"
    set_up_job(window, tiny_sd1, tiny_dataset, run_dir, steps=6, sample_every=0)
    page = window.train_page
    qtbot.mouseClick(page.start_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: page.step >= 2, timeout=RUN_TIMEOUT_MS)
    window.stop_training()
    wait_until_done(qtbot, window, "cancelled", "failed")
    qtbot.waitUntil(lambda: page.resume_banner.isVisible(), timeout=30_000)

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / ".lora-studio.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        qtbot.mouseClick(page.resume_run_button, Qt.LeftButton)
        wait_until_done(qtbot, window, "finished", "failed")
        assert page.run_state == "failed"
        text = page.banner.text.text()
        assert "is being trained by another LoRA Studio process right now" in text and "circles" in text, text
        assert not (run_dir / "my-lora.safetensors").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
