"""Pause/Stop latency in the real window: steps and milliseconds between a click and the run (and the button) reacting.

Opens the main window off-screen with the real engine on the demo job (tiny model, previews off), clicks Pause or
Stop once the page shows step ``--at``, and reports, per click:

- ``shown``: the step the page showed when the button was clicked (what the user saw),
- ``engine``: the step the engine had emitted by then (the page lags behind it when events queue up),
- ``held``: the step at which the run paused or stopped,
- ``steps_late``: held - shown (what the user perceives), and its two parts: ``backlog`` (engine - shown) and
  ``engine_late`` (held - engine),
- ``button_ms``: time from the click until the button showed the reaction (disabled, "Pausing…"/"Stopping…").

    python -m benchmarks.pause_latency --repeats 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def _recording_run(shared: dict):
    from studio.engine.events import StepCompleted
    from studio.engine.trainer import run_training

    def run(job, stop=None, pause=None, **kwargs):
        # What the window's worker does before the real engine (it skips this for a given run function).
        from studio.ui.backend import warm_up_engine
        from studio.ui.worker import leave_a_core_for_the_window

        warm_up_engine()
        leave_a_core_for_the_window()
        for event in run_training(job, stop, pause, **kwargs):
            if isinstance(event, StepCompleted):
                shared["engine_step"] = event.step
            yield event

    return run


def measure_once(app, kind: str, at: int, steps: int, folder: Path, resolution: int = 64) -> dict:
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QMessageBox

    from studio.commands.demo import demo_job
    from studio.engine.events import RunCancelled, StatusChanged, StepCompleted
    from studio.ui.main_window import MainWindow

    QMessageBox.question = staticmethod(lambda *a, **k: QMessageBox.Yes)  # the Stop confirmation: answered at once
    shared: dict = {"engine_step": 0}
    window = MainWindow(_recording_run(shared), restore=False, detect_device=False)
    window.resize(1280, 820)
    window.show()
    job = demo_job(folder, steps)
    job.sampling.every = 0
    job.dataset.resolution = resolution
    job.training.cache_to_disk = False
    window.model.replace(job)
    page = window.train_page
    result: dict = {"kind": kind}
    button = page.pause_button if kind == "pause" else page.stop_button

    def on_event(event):
        if isinstance(event, StepCompleted) and event.step == 1:
            result["none_refs_at_step_1"] = sys.getrefcount(None)
        if isinstance(event, StepCompleted) and "shown" not in result and page.step >= at:
            # PySide6 6.12 on Python 3.11 drops a reference to None per void call (None is immortal from 3.12).
            result["none_refs_lost_per_step"] = (result["none_refs_at_step_1"] - sys.getrefcount(None)) / max(page.step - 1, 1)
            result["shown"] = page.step
            result["engine"] = shared["engine_step"]
            result["clicked"] = time.perf_counter()
            QTest.mouseClick(button, Qt.LeftButton)
            result["reacted_in_click"] = not button.isEnabled()
        if isinstance(event, StatusChanged) and event.phase == "Paused" and "held" not in result:
            result["held"] = page.step
            window.controller.stop()  # end the run; the pause is what was measured
        if isinstance(event, RunCancelled) and "held" not in result:
            result["held"] = event.step

    window.controller.event_received.connect(on_event)

    def button_reacted() -> bool:
        return "clicked" in result and not button.isEnabled()

    window.start_training()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (window.controller.running or page.busy):
        app.processEvents()
        if "button_ms" not in result and button_reacted():
            result["button_ms"] = (time.perf_counter() - result["clicked"]) * 1000
        time.sleep(0.001)
    window.shutdown()
    window.close()
    window.deleteLater()
    app.processEvents()
    result.pop("clicked", None)
    if "shown" not in result:
        raise RuntimeError(f"the run ended ({page.run_state}) before step {at}: {page.banner.text.text()}")
    result["backlog"] = result["engine"] - result["shown"]
    result["engine_late"] = result["held"] - result["engine"]
    result["steps_late"] = result["held"] - result["shown"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--at", type=int, default=15, help="click once the page shows this step")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--resolution", type=int, default=64, help="training resolution (the demo model's is 64)")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    with tempfile.TemporaryDirectory(prefix="pause-latency-") as tmp:
        os.environ["LORA_STUDIO_DATA"] = str(Path(tmp) / "data")
        os.environ.setdefault("LORA_STUDIO_CACHE", str(Path(tmp) / "cache"))
        from PySide6.QtCore import QSettings

        QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, str(Path(tmp) / "settings"))
        from studio.engine.offline import force_offline
        from studio.ui.app import create_app

        force_offline()
        app = create_app([])
        results = []
        for i in range(args.repeats):
            for kind in ("pause", "stop"):
                r = measure_once(app, kind, args.at, args.steps, Path(tmp) / "runs" / f"{kind}-{i}",
                                 args.resolution)
                print(json.dumps(r), flush=True)
                results.append(r)
    for kind in ("pause", "stop"):
        rs = [r for r in results if r["kind"] == kind]
        print(f"{kind}: steps late median {statistics.median(r['steps_late'] for r in rs)} "
              f"(backlog {statistics.median(r['backlog'] for r in rs)}, engine {statistics.median(r['engine_late'] for r in rs)}), "
              f"button reaction median {statistics.median(r.get('button_ms', float('nan')) for r in rs):.0f} ms, "
              f"reacted within the click: {sum(r['reacted_in_click'] for r in rs)}/{len(rs)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": threading.active_count(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
