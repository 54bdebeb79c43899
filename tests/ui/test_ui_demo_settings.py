"""Choosing the demo model applies the demo's recipe (one source: studio.engine.demo), as `lora-studio demo` uses it."""

from __future__ import annotations

from PySide6.QtCore import Qt

from studio.engine import config
from studio.engine.config import BUILTIN_DEMO_MODEL
from studio.engine.demo import DEMO_LR, demo_job, demo_model_settings


def test_a_new_window_starts_with_the_cli_demos_recipe(qtbot, window):
    cli = demo_job()
    for path in demo_model_settings():
        assert window.model.value(path) == config.get_value(cli, path), path
    assert window.model.job.training.lr == DEMO_LR and window.model.job.dataset.resolution == 64


def test_choosing_the_demo_model_sets_its_recipe_and_the_page_agrees(qtbot, window, tiny_sd1):
    window.go_to("model")
    page = window.model_page
    # Someone had a real model and SD's usual recipe...
    page.choose(str(tiny_sd1))
    window.model.apply({"dataset.resolution": 512, "training.lr": 1e-4, "training.steps": 1500, "lora.rank": 16})
    assert window.model.job.training.lr == 1e-4
    # ...then picks the demo model from the drop zone's button.
    qtbot.mouseClick(page.use_demo, Qt.LeftButton)
    job = window.model.job
    assert job.model.path == BUILTIN_DEMO_MODEL
    assert (job.dataset.resolution, job.training.lr, job.training.steps, job.lora.rank) == (64, DEMO_LR, 50, 4)
    assert job.output.save_every == 10  # intermediate LoRAs for Try & Export's grid
    qtbot.waitUntil(lambda: page.info is not None, timeout=5000)
    # The page no longer says the demo is made for one size while training is set to another.
    assert page.detail_labels["resolution"].text() == "64 px"
    assert page.banner.isHidden() and not page.use_native.isVisible()
    assert "striped" in page.note.text() and f"learning rate {DEMO_LR:g}" in page.note.text()
    # The Settings page shows the same numbers (it reads the one job).
    window.go_to("settings")
    assert window.model.value("training.lr") == DEMO_LR


def test_picking_the_demo_from_the_recent_list_applies_the_recipe_too(qtbot, window, tiny_sd1):
    window.go_to("model")
    page = window.model_page
    page.choose(str(tiny_sd1))
    window.model.set_value("training.lr", 3e-4)
    demo_item = page.recent_list.item(0)
    assert demo_item.data(Qt.UserRole) == BUILTIN_DEMO_MODEL
    page._pick_item(demo_item)
    assert window.model.job.training.lr == DEMO_LR
