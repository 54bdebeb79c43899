"""The window with the real engine: LoHa/LoKr chosen on the Settings page train, the Try & Export page shows the export
report, generates with a LyCORIS file, and its LoRA tools resize and merge (or refuse with the reason)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PySide6.QtCore import Qt

from test_ui_real_engine import RUN_TIMEOUT_MS, set_up_job, wait_until_done

pytestmark = pytest.mark.real_engine


def test_adapter_options_are_on_the_settings_page_and_bind_to_the_job(make_window):
    window = make_window()
    window.go_to("settings")
    s = window.settings_page
    s.advanced.setChecked(True)
    combo = s.editor("lora.algorithm").input
    assert [combo.itemText(i) for i in range(combo.count())] == ["lora", "loha", "lokr"]
    combo.setCurrentText("lokr")
    assert window.model.job.lora.algorithm == "lokr"
    s.editor("lora.lokr_factor").input.setValue(8)
    s.editor("lora.lokr_full_matrix").input.setChecked(True)
    assert (window.model.job.lora.lokr_factor, window.model.job.lora.lokr_full_matrix) == (8, True)
    assert s.editor("lora.dora_target").input.currentText() == "lycoris"


@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_lycoris_trains_in_the_window_and_try_and_export_reports_and_generates(qtbot, make_window, tiny_sd1,
                                                                                tiny_dataset, tmp_path, algorithm):
    window = make_window()
    set_up_job(window, tiny_sd1, tiny_dataset, tmp_path / "runs" / algorithm, steps=3, sample_every=0)
    window.settings_page.editor("lora.algorithm").input.setCurrentText(algorithm)
    qtbot.mouseClick(window.train_page.start_button, Qt.LeftButton)
    wait_until_done(qtbot, window, "finished", "failed")
    assert window.train_page.run_state == "finished", window.train_page.banner.text.text()

    export = window.export_page
    window.go_to("export")
    qtbot.waitUntil(lambda: export.info is not None, timeout=30_000)
    assert export.info["network_type"] == algorithm
    assert export.report.status("ComfyUI") == "loads fully" and export.report.status("diffusers") == "does not load"
    assert "LoHa" in export.report.text.text() or "LoKr" in export.report.text.text()

    export.prompt.setText("a red circle")
    export.steps.setValue(2)
    qtbot.mouseClick(export.generate_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: export.lora_panel.pixmap is not None and not export.generate_busy.active,
                    timeout=RUN_TIMEOUT_MS)
    assert not export.try_banner.isVisible(), export.try_banner.text.text()

    # Resize works on LoRA/LoCon only: the refusal says so.
    export.tools.resize_to(tmp_path / "cut.safetensors")
    qtbot.waitUntil(lambda: export.tools.banner.kind == "error", timeout=60_000)
    assert "LoRA/LoCon only" in export.tools.banner.text.text()


def test_lora_tools_resize_and_merge_from_the_page(qtbot, make_window, tiny_sd1, tmp_path):
    from studio.engine.checkpoint import load_model
    from studio.engine.config import Job, LoraSection, ModelSection
    from studio.engine.export import export_lora
    from studio.engine.lora import components, inject_lora

    files = []
    for seed in (1, 2):
        bundle = load_model(ModelSection(path=str(tiny_sd1)))
        inject_lora(bundle, LoraSection(rank=8, alpha=8.0), train_text_encoder=False)
        with torch.no_grad():
            for p in components(bundle)["unet"].parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        job = Job()
        job.lora = LoraSection(rank=8, alpha=8.0)
        files.append(export_lora(bundle, job, tmp_path / f"l{seed}.safetensors", steps=1))
    window = make_window()
    export = window.export_page
    window.go_to("export")
    export.add_file(str(files[0]))
    qtbot.waitUntil(lambda: export.info is not None, timeout=30_000)
    assert export.report.status("A1111/Forge") == "loads fully"

    export.tools.rank.setValue(0)
    export.tools.fraction.setValue(0.8)
    export.tools.resize_to(tmp_path / "cut.safetensors")
    qtbot.waitUntil(lambda: (export.tools.written is not None or export.tools.banner.kind == "error")
                    and not export.tasks.is_running("lora_tool"), timeout=60_000)
    assert export.tools.written == tmp_path / "cut.safetensors", export.tools.banner.text.text()
    assert export.tools.last_result.kept_fraction >= 0.8 and "kept" in export.tools.banner.text.text()

    export.tools.written = None
    export.tools.add_other(files[1], 0.5)
    export.tools.merge_to(tmp_path / "merged.safetensors")
    qtbot.waitUntil(lambda: (export.tools.written is not None or export.tools.banner.kind == "error")
                    and not export.tasks.is_running("lora_tool"), timeout=60_000)
    assert export.tools.written == tmp_path / "merged.safetensors", export.tools.banner.text.text()
    assert export.tools.last_result["rank"] == 16
