"""GUI event-loop stalls during a real tiny training run: the worst gap between ticks per run phase, and why.

Opens the real main window off-screen, sets up the job the way tests/ui/test_ui_real_engine.py's responsiveness test
does (tiny random SD1 model and four 64 px images dropped on their pages, 4 steps, previews every 2 steps), and
trains with the real engine while a 10 ms QTimer on the GUI thread records every gap between its ticks. Per gap it
keeps the phase the page showed when the gap began and when it ended, the process's CPU time, and each thread's CPU
time and run-queue wait (``/proc/self/task/*/schedstat``), so a gap reads as one of:

- the GUI thread computing (its own CPU time fills the gap: a slot, a repaint),
- the GUI thread waiting for the GIL (it hardly ran, was not queued for a core, and the worker ran meanwhile),
- the GUI thread starved of a core (its run-queue wait fills the gap: other programs, or our own threads).

Gaps are counted as the test counts them: only those in which this process computed for at least half the gap, and
one that began, ended or saw "Loading model" counts under "Loading model" (the tokenizer build holds the GIL there).

With ``--stacks`` every stall longer than 50 ms also gets the Python stacks of all threads, sampled every 2 ms by a
thread of its own. A sample that came late (the sampler waited for the GIL) shows what its holder did next, marked
with how long the sampler waited.

    python -m benchmarks.gui_stalls --repeats 5 [--burn 1] [--stacks] [--json out.json]

``--burn N`` runs N busy-looping processes alongside (``--burn-nice`` raises their nice value above this process's,
default 0: level with the window), to imitate a CI machine whose cores are busy with other work. The first run in a process also imports torch, diffusers and
transformers; it is reported as ``cold`` and left out of the summary unless ``--count-cold``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as tests/conftest.py sets it

LOADING = "Loading model"
STACK_AFTER_S = 0.05
TICK_MS = 10


BURN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100_000):\n        pass\n"



class ThreadClock:
    """CPU time and run-queue wait of every thread of this process, in seconds, from /proc/self/task/*/schedstat."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}

    def read(self) -> dict[int, tuple[float, float]]:
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as fh:
                    run_ns, wait_ns, _ = fh.read().split()
            except (OSError, ValueError):
                continue
            t = int(tid)
            out[t] = (int(run_ns) / 1e9, int(wait_ns) / 1e9)
            if t not in self.names:
                try:
                    with open(f"/proc/self/task/{tid}/comm") as fh:
                        self.names[t] = fh.read().strip()
                except OSError:
                    self.names[t] = tid
        return out


class Sampler(threading.Thread):
    """Every ~2 ms: the innermost Python frames of every other thread, with the time and how late the sample was."""

    def __init__(self, frames: int = 7):
        super().__init__(name="stall-sampler", daemon=True)
        self.frames = frames
        self.samples: list[tuple[float, float, dict[str, list[str]]]] = []
        self.running = True

    def run(self) -> None:
        names = {}
        me = threading.get_ident()
        last = time.perf_counter()
        while self.running:
            time.sleep(0.002)
            now = time.perf_counter()
            stacks = {}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                if ident not in names:
                    t = threading._active.get(ident)
                    names[ident] = t.name if t is not None else str(ident)
                rows = []
                while frame is not None and len(rows) < self.frames:
                    code = frame.f_code
                    rows.append(f"{shorten(code.co_filename)}:{frame.f_lineno} {code.co_name}")
                    frame = frame.f_back
                stacks[names[ident]] = rows
            self.samples.append((now, now - last, stacks))
            last = now

    def between(self, start: float, end: float) -> list:
        return [s for s in self.samples if start <= s[0] <= end + 0.003]


def shorten(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    return filename.replace(str(Path(__file__).resolve().parent.parent) + "/", "")


def build_inputs(root: Path) -> tuple[Path, Path]:
    from PIL import Image, ImageDraw

    from studio.engine.tiny import save_tiny_model

    model = save_tiny_model(root / "tiny-sd1", "sd1", "epsilon")
    data = root / "data"
    data.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):  # tests/fixtures_data.py's make_dataset
        img = Image.new("RGB", (64, 64), (40 * i, 200 - 30 * i, 90))
        ImageDraw.Draw(img).ellipse([16, 16, 48, 48], fill=colour)
        img.save(data / f"img_{i:02d}.png")
        (data / f"img_{i:02d}.txt").write_text(f"a {colour} circle", encoding="utf-8")
    return model, data


def drop(widget, path: Path) -> None:
    import warnings

    from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
    from PySide6.QtGui import QDragEnterEvent, QDropEvent
    from PySide6.QtWidgets import QApplication

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    pos = QPointF(widget.width() / 2, widget.height() / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        enter = QDragEnterEvent(pos.toPoint(), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(widget, enter)
    QApplication.sendEvent(widget, QDropEvent(pos, Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier))


def wait_until(app, condition, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the run did not end in time")
        app.processEvents()
        time.sleep(0.002)


def one_run(app, model: Path, data: Path, out: Path, *, stacks: bool, profile=None) -> list[dict]:
    from PySide6.QtCore import QEventLoop, QTimer

    from studio.ui.main_window import MainWindow

    window = MainWindow(None, restore=False, detect_device=False)
    window.show()
    window.go_to("model")
    drop(window.model_page.drop, model)
    window.go_to("dataset")
    drop(window.dataset_page.drop, data)
    window.go_to("settings")
    s = window.settings_page
    s.advanced.setChecked(True)
    s.editor("lora.rank").input.setValue(4)
    s.editor("lora.alpha").input.setValue(4.0)
    s.editor("training.steps").input.setValue(4)
    s.editor("dataset.resolution").input.setValue(64)
    s.editor("sampling.every").input.setValue(2)
    s.editor("sampling.steps").input.setValue(2)
    s.editor("sampling.prompts").input.setPlainText("a red circle")
    s.editor("training.cache_to_disk").input.setChecked(False)
    edit = s.editor("output.dir").input
    edit.clear()
    edit.setText(str(out))
    edit.textEdited.emit(str(out))
    assert window.model.errors() == [], window.model.errors()
    page = window.train_page
    clock = ThreadClock()
    gui_tid = threading.get_native_id()
    gaps: list[dict] = []
    sampler = Sampler() if stacks else None
    if sampler:
        sampler.start()
    last = {"t": time.perf_counter(), "cpu": time.process_time(), "threads": clock.read(),
            "phase": page.phase.label.text()}

    def tick() -> None:
        now, cpu, threads = time.perf_counter(), time.process_time(), clock.read()
        phase = page.phase.label.text()
        wall = now - last["t"]
        gap = {"wall": wall, "cpu": cpu - last["cpu"], "phase_before": last["phase"], "phase": phase,
               "at": now}
        per = {}
        for tid, (run, wait) in threads.items():
            r0, w0 = last["threads"].get(tid, (run, wait))
            if run - r0 > 0.002 or wait - w0 > 0.002 or tid == gui_tid:
                per["gui" if tid == gui_tid else f"{clock.names.get(tid, tid)}:{tid}"] = (run - r0, wait - w0)
        gap["threads"] = per
        if sampler is not None:
            if wall > STACK_AFTER_S:
                gap["stacks"] = sampler.between(last["t"], now)
            sampler.samples.clear()
        gaps.append(gap)
        last.update(t=now, cpu=cpu, threads=threads, phase=phase)

    loading_shown: list[float] = []

    def on_event(event) -> None:
        from studio.engine.events import StatusChanged

        if isinstance(event, StatusChanged) and event.phase.startswith(LOADING):
            loading_shown.append(time.perf_counter())

    window.controller.event_received.connect(on_event)
    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(tick)
    timer.start()
    try:
        if profile is not None:
            profile.enable()  # this (the GUI) thread only
        window.start_training()
        wait_until(app, lambda: page.run_state in ("finished", "failed") and not window.controller.running, 600)
    finally:
        timer.stop()
        if profile is not None:
            profile.disable()
        if sampler is not None:
            sampler.running = False
            sampler.join()
    for g in gaps:  # as the responsiveness test counts them; see its comments
        start = g["at"] - g["wall"]
        g["loading"] = g["phase_before"].startswith(LOADING) or g["phase"].startswith(LOADING) or any(
            start <= t <= g["at"] + 0.02 for t in loading_shown)
        g["bucket"] = LOADING if g["loading"] else g["phase"]
    state = page.run_state
    window.shutdown()
    window.deleteLater()
    app.processEvents(QEventLoop.AllEvents, 100)
    if state != "finished":
        raise RuntimeError(f"the run {state}: {page.banner.text.text()}")
    return gaps


def counted(gaps: list[dict]) -> list[dict]:
    """The gaps the responsiveness test counts: the app itself computed for at least half of the gap."""
    return [g for g in gaps if g["cpu"] >= 0.5 * g["wall"]]


def worst_per_phase(gaps: list[dict]) -> dict[str, float]:
    """Per phase: the longest counted gap; a gap touching "Loading model" counts there (the test's rule)."""
    worst: dict[str, float] = {}
    for g in counted(gaps):
        worst[g["bucket"]] = max(worst.get(g["bucket"], 0.0), g["wall"])
    return worst


def worst_felt(gaps: list[dict]) -> dict[str, float]:
    """Per phase: the longest gap of all, counted or not (what a person at the window would feel)."""
    worst: dict[str, float] = {}
    for g in gaps:
        worst[g["bucket"]] = max(worst.get(g["bucket"], 0.0), g["wall"])
    return worst


def describe(g: dict) -> str:
    threads = ", ".join(f"{k} run {r * 1000:.0f} wait {w * 1000:.0f}" for k, (r, w) in
                        sorted(g["threads"].items(), key=lambda kv: -kv[1][0]))
    head = (f"{g['wall'] * 1000:5.0f} ms (cpu {g['cpu'] * 1000:4.0f}) [{g['phase_before']!r} -> {g['phase']!r}] "
            f"{threads}")
    return head


def short_stacks(samples: list) -> str:
    """The samples of one gap: each thread's stack once per change, with the sampler's lateness."""
    lines, previous = [], {}
    for _, late, stacks in samples:
        changed = {name: rows for name, rows in stacks.items() if previous.get(name) != rows and rows
                   and not name.startswith(("Thread-", "stall-"))}
        previous = stacks
        if not changed and late < 0.02:
            continue
        lines.append(f"  -- sample{f' (sampler waited {late * 1000:.0f} ms)' if late >= 0.02 else ''}")
        for name, rows in changed.items():
            lines.append(f"    {name}: " + "  <  ".join(rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--burn", type=int, default=0, help="busy-looping processes to run alongside")
    parser.add_argument("--burn-nice", type=int, default=0)
    parser.add_argument("--stacks", action="store_true", help="Python stacks of all threads in stalls over 50 ms")
    parser.add_argument("--show", type=float, default=0.1, help="print each counted gap longer than this (s)")
    parser.add_argument("--work-nice", type=int, help="nice steps the training thread runs below the window "
                        "(studio.ui.worker.WORK_NICE; default: the app's)")
    parser.add_argument("--count-cold", action="store_true", help="count the first (importing) run too")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the GUI thread (cProfile) over the counted runs; print the top N by cumulative time")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from studio.ui import worker
    from studio.ui.app import create_app

    if args.work_nice is not None:
        worker.WORK_NICE = args.work_nice

    app = create_app([])
    # Separate processes (not forks of this one, which has Qt's threads); each ends when this process does.
    burners = [subprocess.Popen([sys.executable, "-c", BURN], preexec_fn=lambda: os.nice(args.burn_nice))
               for _ in range(args.burn)]
    results = []
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
    try:
        with tempfile.TemporaryDirectory(prefix="gui-stalls-") as tmp:
            root = Path(tmp)
            os.environ.setdefault("LORA_STUDIO_CACHE", str(root / "cache"))
            os.environ.setdefault("LORA_STUDIO_DATA", str(root / "user-data"))
            model, data = build_inputs(root)
            for i in range(args.repeats + (0 if args.count_cold else 1)):
                cold = i == 0 and not args.count_cold
                gaps = one_run(app, model, data, root / "runs" / f"r{i}", stacks=args.stacks,
                               profile=None if cold else profile)
                worst = worst_per_phase(gaps)
                label = "cold" if cold else f"run {len(results) + 1}"
                print(f"\n== {label}: {len(gaps)} ticks; worst counted gap per phase (ms): "
                      + ", ".join(f"{p or '(none)'} {w * 1000:.0f}" for p, w in sorted(worst.items(), key=lambda kv: -kv[1])),
                      flush=True)
                for g in sorted(counted(gaps), key=lambda g: -g["wall"]):
                    if g["wall"] < args.show:
                        break
                    print("  " + describe(g))
                    if g.get("stacks"):
                        print(short_stacks(g["stacks"]))
                felt = worst_felt(gaps)
                print("   worst gap of all (counted or not) per phase (ms): "
                      + ", ".join(f"{p or '(none)'} {w * 1000:.0f}" for p, w in sorted(felt.items(), key=lambda kv: -kv[1])))
                if not cold:
                    results.append({"ticks": len(gaps), "worst": worst, "felt": felt,
                                    "gaps_over_100ms": [{k: v for k, v in g.items() if k != "stacks"}
                                                        for g in gaps if g["wall"] > 0.1]})
    finally:
        for p in burners:
            p.kill()
    if profile is not None:
        import pstats

        print(f"\nGUI thread, top {args.profile} by cumulative time over the counted runs:")
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)
    phases = sorted({p for r in results for p in r["worst"]})
    print(f"\nworst counted gap per phase over {len(results)} run(s), ms (max / median of per-run worst):")
    summary = {}
    for p in phases:
        values = sorted(r["worst"].get(p, 0.0) for r in results)
        summary[p] = {"max_ms": values[-1] * 1000, "median_ms": values[len(values) // 2] * 1000}
        print(f"  {p or '(none)':<28} {values[-1] * 1000:6.0f} / {values[len(values) // 2] * 1000:6.0f}")
    for key, what in (("worst", "counted"), ("felt", "all gaps")):
        outside = [w for r in results for p, w in r[key].items() if not p.startswith(LOADING)]
        loading = [w for r in results for p, w in r[key].items() if p.startswith(LOADING)]
        print(f"  {what}: outside loading {max(outside, default=0) * 1000:.0f} ms, loading "
              f"{max(loading, default=0) * 1000:.0f} ms (per-run worst outside loading: "
              + " ".join(f"{max((w for p, w in r[key].items() if not p.startswith(LOADING)), default=0) * 1000:.0f}"
                         for r in results) + ")")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cores": os.cpu_count(),
                                         "nice": os.nice(0),
                                         "summary": summary, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
