"""FLUX.1, SD3.5, Z-Image and Qwen-Image in the real window: a tiny model of each trains through the pages, with its own previews."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from safetensors import safe_open

from studio.engine.families import get_family
from test_ui_real_engine import set_up_job, wait_until_done

pytestmark = pytest.mark.real_engine


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium", "zimage", "qwen-image"])
def test_a_flow_family_trains_from_the_window(qtbot, make_window, tiny_model, tiny_dataset, tmp_path, name):
    family = get_family(name)
    model = tiny_model(name, family.tiny_prediction_types[0])
    window = make_window()
    set_up_job(window, model, tiny_dataset, tmp_path / "runs" / name, steps=2, sample_every=2)
    page = window.train_page
    qtbot.mouseClick(page.start_button, Qt.LeftButton)
    wait_until_done(qtbot, window, "finished", "failed")
    assert page.run_state == "finished", page.banner.text.text() + page.banner.details.toPlainText()
    assert page.loss_plot.point_count == 2
    assert page.gallery.count >= 1  # previews drawn with the family's own pipeline
    assert page.lora_path is not None and page.lora_path.is_file()
    with safe_open(str(page.lora_path), "pt") as f:
        architecture = f.metadata()["modelspec.architecture"]
    assert architecture == family.metadata_ids(family.tiny_prediction_types[0])["modelspec.architecture"]
