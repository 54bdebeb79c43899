"""The real window with the real engine on a tiny model: train, watch, pause/stop, try and export end to end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QFileDialog, QMessageBox

from ui_fakes import drop_paths

pytestmark = pytest.mark.real_engine

BOUND_S = 0.2  # outside loading; see test_window_stays_responsive_while_a_real_run_trains
RUN_TIMEOUT_MS = 240_000  # CPU-only and shared machines: generous, a normal run takes seconds


def set_up_job(window, model: Path, data: Path, out: Path, *, steps: int, sample_every: int) -> None:
    """Everything through the UI a person would use: drops, spin boxes, a line edit."""
    window.go_to("model")
    drop_paths(window.model_page.drop, model)
    window.go_to("dataset")
    drop_paths(window.dataset_page.drop, data)
    window.go_to("settings")
    s = window.settings_page
    s.advanced.setChecked(True)
    s.editor("lora.rank").input.setValue(4)
    s.editor("lora.alpha").input.setValue(4.0)
    s.editor("training.steps").input.setValue(steps)
    s.editor("dataset.resolution").input.setValue(64)
    s.editor("sampling.every").input.setValue(sample_every)
    s.editor("sampling.steps").input.setValue(2)
    s.editor("sampling.prompts").input.setPlainText("a red circle")
    s.editor("training.cache_to_disk").input.setChecked(False)
    out_edit = s.editor("output.dir").input
    out_edit.clear()
    out_edit.setText(str(out))
    out_edit.textEdited.emit(str(out))
    assert window.model.errors() == [], window.model.errors()


def wait_until_done(qtbot, window, *states):
    qtbot.waitUntil(lambda: window.train_page.run_state in states and not window.controller.running,
                    timeout=RUN_TIMEOUT_MS)


def test_train_try_and_export_end_to_end(qtbot, make_window, tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    window = make_window()  # the real trainer
    set_up_job(window, tiny_sd1, tiny_dataset, tmp_path / "runs" / "circles", steps=4, sample_every=2)
    page = window.train_page
    qtbot.mouseClick(page.start_button, Qt.LeftButton)
    wait_until_done(qtbot, window, "finished", "failed")
    assert page.run_state == "finished", page.banner.text.text() + page.banner.details.toPlainText()
    assert page.loss_plot.point_count == 4
    assert page.gallery.count >= 1  # step 0 (the base model), 2 and 4
    assert page.progress.text() == "step 4 / 4 — done"

    export = window.export_page
    window.go_to("export")
    final = export.selected_lora()
    assert final is not None and final.name == "my-lora.safetensors" and final.is_file()
    qtbot.waitUntil(lambda: export.info is not None, timeout=30_000)
    assert export.info["rank"] == 4

    # Try it: base and LoRA side by side, same seed, off the GUI thread.
    export.prompt.setText("a red circle")
    export.steps.setValue(2)
    qtbot.mouseClick(export.generate_button, Qt.LeftButton)
    assert export.generate_busy.active
    qtbot.waitUntil(lambda: export.lora_panel.pixmap is not None and not export.generate_busy.active,
                    timeout=RUN_TIMEOUT_MS)
    assert not export.try_banner.isVisible(), export.try_banner.text.text()
    assert export.base_panel.pixmap is not None

    # Export for A1111/ComfyUI with the metadata typed here.
    export.title_edit.setText("Red circles")
    export.trigger_edit.setText("zzcircle, red")
    export.description_edit.setPlainText("Draws circles.")
    target = tmp_path / "export" / "red-circles.safetensors"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    qtbot.mouseClick(export.export_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: (export.exported is not None or export.export_banner.kind == "error")
                    and not export.tasks.is_running("export"), timeout=60_000)
    assert export.exported == target, export.export_banner.text.text()
    assert window.rail_state("export") == "done"

    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.title"] == "Red circles"
    assert meta["modelspec.trigger_phrase"] == "zzcircle, red"
    assert meta["modelspec.description"] == "Draws circles."
    assert meta["ss_output_name"] == "red-circles"

    # The exported file loads in diffusers as a LoRA, and changes the model.
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, local_files_only=True, safety_checker=None)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        before = pipe.unet(latents, 500, context).sample
        pipe.load_lora_weights(str(target), adapter_name="exported")
        assert pipe.get_list_adapters() == {"unet": ["exported"]}
        after = pipe.unet(latents, 500, context).sample
    assert not torch.equal(before, after)

    # The diffusers layout: a folder that load_lora_weights(folder) reads, with the same effect.
    export.format_buttons["diffusers"].setChecked(True)
    folder = tmp_path / "export" / "diffusers"
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder))
    qtbot.mouseClick(export.export_button, Qt.LeftButton)
    # Wait for this export's result (the task may not have started yet) and for its task to end (the Export
    # button is disabled until then, so the next click would be ignored).
    qtbot.waitUntil(lambda: (export.exported == folder / "pytorch_lora_weights.safetensors"
                             or export.export_banner.kind == "error") and not export.tasks.is_running("export"),
                    timeout=60_000)
    assert export.exported == folder / "pytorch_lora_weights.safetensors", export.export_banner.text.text()
    pipe.unload_lora_weights()
    with torch.no_grad():
        pipe.load_lora_weights(str(folder), adapter_name="diffusers")
        again = pipe.unet(latents, 500, context).sample
    assert torch.allclose(again, after, atol=1e-3)

    # A merged checkpoint, for tools without LoRA support.
    export.format_buttons["merged"].setChecked(True)
    merged = tmp_path / "export" / "merged.safetensors"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(merged), ""))
    qtbot.mouseClick(export.export_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: export.exported == merged or export.export_banner.kind == "error", timeout=120_000)
    assert export.exported == merged and merged.stat().st_size > 1_000_000, export.export_banner.text.text()


def test_pause_resume_and_stop_a_real_run(qtbot, make_window, tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    window = make_window()
    set_up_job(window, tiny_sd1, tiny_dataset, tmp_path / "runs" / "long", steps=500, sample_every=0)
    page = window.train_page
    window.start_training()
    qtbot.waitUntil(lambda: page.step >= 1, timeout=RUN_TIMEOUT_MS)
    clicked_at = page.step
    qtbot.mouseClick(page.pause_button, Qt.LeftButton)
    assert page.run_state == "pausing" and page.pause_button.text() == "Pausing…"  # seen at once, not a step later
    assert not page.pause_button.isEnabled()
    qtbot.waitUntil(lambda: page.run_state == "paused", timeout=RUN_TIMEOUT_MS)
    held = page.step
    assert held <= clicked_at + 1, f"clicked Pause at step {clicked_at}, paused at {held}"  # only the step in flight
    qtbot.wait(300)
    assert page.step == held and window.controller.running  # the model stays loaded while paused
    qtbot.mouseClick(page.resume_button, Qt.LeftButton)
    assert page.run_state == "running" and page.pause_button.isVisible()
    qtbot.waitUntil(lambda: page.step > held + 1, timeout=RUN_TIMEOUT_MS)

    def answered_after_reading(*args, **kwargs):
        qtbot.wait(1500)  # a person reads the question; the run must not train on meanwhile
        return QMessageBox.Yes

    monkeypatch.setattr(QMessageBox, "question", answered_after_reading)
    clicked_at = page.step
    qtbot.mouseClick(page.stop_button, Qt.LeftButton)
    assert page.run_state == "stopping" and not page.stop_button.isEnabled()
    wait_until_done(qtbot, window, "cancelled", "failed", "finished")
    assert page.run_state == "cancelled", page.banner.text.text()
    assert page.step <= clicked_at + 1, f"clicked Stop at step {clicked_at}, stopped at {page.step}"
    assert page.lora_path is not None and page.lora_path.is_file()
    assert window.export_page.selected_lora() == page.lora_path


def test_window_stays_responsive_while_a_real_run_trains(qtbot, make_window, tiny_sd1, tiny_dataset, tmp_path):
    from studio.engine.events import StatusChanged

    window = make_window()
    set_up_job(window, tiny_sd1, tiny_dataset, tmp_path / "runs" / "responsive", steps=4, sample_every=2)
    page = window.train_page
    # (start, end, this process's CPU seconds during it, the phase the page showed at its start and at its end) per
    # gap between ticks. A gap in which the process itself hardly ran is the OS giving the cores to other programs
    # (a busy CI machine), not something this app did; a gap spent computing (the worker holding the GIL, work on
    # the GUI thread) is what the test is for.
    gaps: list[tuple[float, float, float, str, str]] = []
    last = [time.perf_counter(), time.process_time(), page.phase.label.text()]
    loading_shown: list[float] = []  # when "Loading model" reached the window

    def tick():
        now, cpu, phase = time.perf_counter(), time.process_time(), page.phase.label.text()
        gaps.append((last[0], now, cpu - last[1], last[2], phase))
        last[:] = [now, cpu, phase]

    def on_event(event):
        if isinstance(event, StatusChanged) and event.phase.startswith("Loading model"):
            loading_shown.append(time.perf_counter())

    window.controller.event_received.connect(on_event)
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    window.start_training()
    wait_until_done(qtbot, window, "finished", "failed")
    timer.stop()
    assert page.run_state == "finished", page.banner.text.text()
    assert len(gaps) > 50 and loading_shown

    def loading(start, end, before, after):
        # Loading model: it began, ended, or (the page being frozen throughout) came and went during the gap. The
        # event that ends a freeze may be handled just after the late tick, hence the 20 ms.
        return before.startswith("Loading model") or after.startswith("Loading model") or any(
            start <= t <= end + 0.02 for t in loading_shown)

    ours = [(end - start, cpu, after, loading(start, end, before, after))
            for start, end, cpu, before, after in gaps if cpu >= 0.5 * (end - start)]
    # Loading a model builds its CLIP tokenizer: the `tokenizers` library holds the GIL for the whole BPE build
    # (measured: 0.1 s on a quiet core, 0.29 s on the 2-core CI machine, 0.55 s at load 10), an upstream limit
    # paid once per run while the page says "Loading model". A gap that starts there and ends in a later phase is
    # that stall too: counted by the phase at its end, such gaps read as "Scanning dataset" or "Caching latents"
    # (benchmarks/gui_stalls.py: 173-176 ms ones on a loaded 2-core machine, which fits the 204-251 ms fresh-clone
    # CI saw in those phases). Everything else must stay under 0.2 s (measured there after the fixes: at most
    # 125 ms over 16 runs), which a worker holding the GIL (a probe sorting 1.5 M shuffled ints inside each step:
    # ~490 ms) fails.
    running = [g[:3] for g in ours if not g[3]]
    worst, cpu, phase = max(running, default=(0.0, 0.0, ""))
    assert worst < BOUND_S, f"the GUI thread stalled for {worst * 1000:.0f} ms while the app computed " \
                            f"{cpu * 1000:.0f} ms during {phase!r} (ticks: {len(gaps)})"
    worst, cpu, phase = max((g[:3] for g in ours if g[3]), default=(0.0, 0.0, ""))
    assert worst < 1.0, f"loading the model stalled the GUI thread for {worst * 1000:.0f} ms (CPU {cpu * 1000:.0f} ms)"


def test_a_stopped_run_is_offered_for_resume_and_finishes(qtbot, make_window, tiny_sd1, tiny_dataset, tmp_path):
    window = make_window()
    run_dir = tmp_path / "runs" / "circles"
    set_up_job(window, tiny_sd1, tiny_dataset, run_dir, steps=6, sample_every=2)
    page = window.train_page
    qtbot.mouseClick(page.start_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: page.step >= 2, timeout=RUN_TIMEOUT_MS)
    window.stop_training()
    wait_until_done(qtbot, window, "cancelled", "failed")
    assert page.run_state == "cancelled", page.banner.text.text()
    stopped_at = page.step

    qtbot.waitUntil(lambda: page.resume_banner.isVisible(), timeout=30_000)
    assert f"stopped at step {stopped_at} of 6" in page.resume_banner.text.text()
    qtbot.mouseClick(page.resume_run_button, Qt.LeftButton)
    wait_until_done(qtbot, window, "finished", "failed")
    assert page.run_state == "finished", page.banner.text.text() + page.banner.details.toPlainText()
    assert (run_dir / "my-lora.safetensors").is_file() and not (tmp_path / "runs" / "circles-2").exists()
    assert page.loss_plot.point_count == 6  # the earlier part (read from metrics.jsonl) and the resumed part
    assert page.loss_plot.steps == list(range(1, 7))
    shown_steps = {b.toolTip().split(" · ")[0] for b in page.gallery.buttons}
    assert "Step 0" in shown_steps and "Step 6" in shown_steps  # the base model's previews and the last ones
    assert all("“a red circle”" in b.toolTip() for b in page.gallery.buttons)
    qtbot.waitUntil(lambda: not window.tasks.is_running("unfinished"), timeout=30_000)
    assert not page.resume_banner.isVisible(), "a finished run is no longer offered"
