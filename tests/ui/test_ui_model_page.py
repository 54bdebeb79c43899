"""Model page: the demo model by default, dropping/choosing a model, what the engine says about it."""

from __future__ import annotations

import pytest

from studio.engine.config import BUILTIN_DEMO_MODEL
from studio.ui import backend, settings_store
from studio.ui.pages.model_page import RECENT_KEY
from ui_fakes import drop_paths


@pytest.fixture
def page(window):
    window.go_to("model")
    return window.model_page


def test_demo_model_is_the_default_with_a_clear_note(qtbot, window, page):
    assert window.model.job.model.path == BUILTIN_DEMO_MODEL
    assert "Built-in demo model" in page.name_label.text()
    assert "draws simple coloured shapes" in page.note.text()
    qtbot.waitUntil(lambda: page.info is not None, timeout=5000)
    assert page.detail_labels["family"].text() == "Stable Diffusion 1.x"
    assert page.detail_labels["size"].text().endswith("MB")  # the shipped weights
    assert window.rail_state("model") == "done"
    # The demo makes 64 px images, and the new job trains at that size already.
    assert window.model.job.dataset.resolution == 64 and not page.use_native.isVisible()
    # Another size: one click trains at the native one again.
    window.model.set_value("dataset.resolution", 512)
    assert page.use_native.isVisible()
    page.use_native.click()
    assert window.model.job.dataset.resolution == 64


def test_dropping_a_diffusers_folder_inspects_it_off_the_gui_thread(qtbot, window, page, tiny_sd1):
    drop_paths(page.drop, tiny_sd1)
    assert window.model.job.model.path == str(tiny_sd1)
    assert page.busy.active
    qtbot.waitUntil(lambda: page.info is not None and not page.busy.active, timeout=30_000)
    assert page.detail_labels["family"].text() == "Stable Diffusion 1.x"
    assert page.detail_labels["prediction"].text() == "noise (epsilon)"
    assert page.detail_labels["size"].text().endswith("MB")
    assert settings_store.read_list(RECENT_KEY) == [str(tiny_sd1)]
    assert any(page.recent_list.item(i).text() == tiny_sd1.name for i in range(page.recent_list.count()))


def test_dropping_something_else_is_refused(qtbot, window, page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with qtbot.waitSignal(page.drop.refused) as refused:
        drop_paths(page.drop, notes)
    assert "not a model file" in refused.args[0]
    folder = tmp_path / "pictures"
    folder.mkdir()
    with qtbot.waitSignal(page.drop.refused) as refused:
        drop_paths(page.drop, folder)
    assert "not a diffusers model" in refused.args[0]
    assert window.model.job.model.path == BUILTIN_DEMO_MODEL


def test_a_missing_model_needs_attention(qtbot, window, page, tmp_path):
    window.model.set_value("model.path", str(tmp_path / "gone.safetensors"))
    assert window.rail_state("model") == "attention"
    assert page.banner.isVisible() and "does not exist" in page.banner.text.text()
    assert not window.train_page.start_button.isEnabled()


def test_inspect_failure_is_readable(qtbot, window, page, tmp_path, monkeypatch):
    def broken(path):
        raise RuntimeError("header is damaged")

    monkeypatch.setattr(backend, "inspect_model", broken)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"x")
    page.choose(str(bad))
    qtbot.waitUntil(lambda: bool(page.inspect_error), timeout=5000)
    assert "header is damaged" in page.banner.text.text()
    assert page.banner.details_button.isVisible()
    assert window.rail_state("model") == "attention"


def test_models_found_on_this_computer_can_be_picked(qtbot, window, page, tiny_sd1, monkeypatch):
    monkeypatch.setattr(backend, "find_models", lambda stop=None: [tiny_sd1])
    page.find_models()
    qtbot.waitUntil(lambda: page.found_list.count() == 1 and not page.found_busy.active, timeout=5000)
    page._pick_item(page.found_list.item(0))
    assert window.model.job.model.path == str(tiny_sd1)


def test_the_page_names_every_family_it_can_train(page):
    """The list comes from the family registry: a family added later is named without touching the page."""
    from studio.engine.families import REGISTRY, get_family

    text = page.purpose_label.text()
    assert all(get_family(name).listed_as in text for name in REGISTRY), text
