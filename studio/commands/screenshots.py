"""`lora-studio screenshots DIR`: render every page of the window to DIR/<page>.png after the demo run."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PAGE_FILES = {"model": "model", "dataset": "dataset", "settings": "settings", "train": "train",
              "export": "try_and_export"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "screenshots", help="render every page of the window to PNG files",
        description="Opens the window off-screen with the demo model and images, trains a short demo run with the "
                    "real engine, tries the result, and saves each page as DIR/<page>.png. Your settings, presets "
                    "and runs are not touched.")
    p.add_argument("dir", help="folder for the PNG files (created if missing)")
    p.add_argument("--theme", choices=("light", "dark"), default="light", help="colour scheme (default light)")
    p.add_argument("--size", default="1280x820", help="window size in pixels, WIDTHxHEIGHT (default 1280x820)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of the demo run (default: the demo's own, about a minute on a CPU)")
    p.add_argument("--no-train", action="store_true", help="skip the demo run (pages show their empty states)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"--size must look like 1280x820, got {args.size!r}", file=sys.stderr)
        return 2
    out = Path(args.dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # Off-screen unless asked otherwise, and nothing of the user's is read or changed.
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["LORA_STUDIO_THEME"] = args.theme
    from studio.engine.offline import force_offline

    force_offline()
    with tempfile.TemporaryDirectory(prefix="lora-studio-shots-") as tmp:
        os.environ["LORA_STUDIO_DATA"] = str(Path(tmp) / "data")
        return _render(out, Path(tmp), width, height, args.steps, train=not args.no_train)


def _render(out: Path, tmp: Path, width: int, height: int, steps: int, train: bool) -> int:
    from PySide6.QtCore import QSettings

    QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, str(tmp / "settings"))
    from studio.engine.demo import DEMO_STEPS, demo_job
    from studio.ui.app import create_app
    from studio.ui.main_window import MainWindow

    app = create_app([])
    window = MainWindow(restore=False)
    window.resize(width, height)
    window.show()

    def pump(until: Callable[[], bool], timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            app.processEvents()
            if until():
                return True
            time.sleep(0.01)
        return until()

    job = demo_job(tmp / "runs" / "demo", steps or DEMO_STEPS)
    window.model.replace(job)
    page = window.train_page
    if train:
        window.start_training()
        if not pump(lambda: page.run_state in ("finished", "failed") and not window.controller.running, 600):
            print("the demo run did not finish in 10 minutes; capturing the pages as they are", file=sys.stderr)
        if page.run_state == "failed":
            print(f"the demo run failed: {page.banner.text.text()}", file=sys.stderr)
        export = window.export_page
        if export.selected_lora() is not None:
            export.prompt.setText(job.sampling.prompts[0])
            export.steps.setValue(job.sampling.steps)
            export.generate()
            pump(lambda: not export.tasks.is_running("generate"), 300)
            # The Compare steps grid: every saved step at 0, 0.5 and 1× (what `lora-studio grid` draws).
            export.try_tabs.setCurrentIndex(1)
            export.grid.render_grid()
            pump(lambda: not export.grid.rendering, 300)
            export.try_tabs.setCurrentIndex(0)
    dataset = window.dataset_page
    pump(lambda: not dataset.scanning and not dataset.tasks.is_running("thumbs"), 60)
    settings = window.settings_page
    saved = []
    for key, name in PAGE_FILES.items():
        window.go_to(key)
        if key == "settings":
            settings.refresh_estimate()
            pump(lambda: not settings.tasks.is_running("estimate"), 120)
        pump(lambda: False, 0.3)  # let layouts and repaints settle
        path = out / f"{name}.png"
        window.grab().save(str(path))
        saved.append(path)
        if key == "export" and train and window.export_page.grid.grid is not None:
            saved.append(_render_grid_tab(window, out, pump))
    saved += _render_captioning(window, out, pump)
    saved.append(_render_queue(window, out, pump))
    window.shutdown()
    window.close()
    for path in saved:
        print(path)
    return 0


def _render_grid_tab(window, out: Path, pump: Callable) -> Path:
    """Try & Export with its Compare steps grid showing (try_and_export.png shows the side-by-side tab)."""
    export = window.export_page
    export.try_tabs.setCurrentIndex(1)
    pump(lambda: False, 0.3)
    path = out / "grid.png"
    window.grab().save(str(path))
    export.try_tabs.setCurrentIndex(0)
    return path


def _render_captioning(window, out: Path, pump: Callable) -> list[Path]:
    """The Dataset page's Tags tab and its Caption… dialog (with no model downloaded: what a new user sees)."""
    page = window.dataset_page
    window.go_to("dataset")
    page.tabs.setCurrentWidget(page.tag_panel)
    pump(lambda: False, 0.3)
    tags = out / "dataset_tags.png"
    window.grab().save(str(tags))
    page.tabs.setCurrentIndex(0)
    dialog = page.open_caption_dialog()
    if dialog is None:
        return [tags]
    pump(lambda: not dialog.tasks.is_running("caption-models") and bool(dialog.entries), 60)
    pump(lambda: False, 0.3)
    path = out / "caption_dialog.png"
    dialog.grab().save(str(path))
    dialog.close()
    return [tags, path]



def _render_queue(window, out: Path, pump: Callable) -> Path:
    """The job queue beside the Train page: the demo run that finished, and two more jobs waiting."""
    queue = window.queue_panel.queue
    run_dir = window.train_page.run_dir
    window.add_to_queue()
    if run_dir is not None:
        queue.entries[-1].state, queue.entries[-1].run_dir = "finished", str(run_dir)
    for name in ("demo-lora-rank8", "demo-lora-long"):
        window.model.set_value("output.name", name)
        window.add_to_queue()
    window.queue_panel.refresh()
    window.go_to("train")
    pump(lambda: False, 0.3)
    path = out / "queue.png"
    window.grab().save(str(path))
    return path
