"""The keep-last-N intermediate LoRAs setting appears on the Settings page from its one declaration."""

from __future__ import annotations

from studio.engine.config import field_info


def test_keep_last_loras_has_an_editor_with_its_help_and_range(window):
    window.go_to("settings")
    page = window.settings_page
    page.advanced.setChecked(True)
    editor = page.editor("output.keep_last_loras")
    info = field_info("output.keep_last_loras")
    assert editor.input.toolTip() == info.help and "0 keeps all" in info.help
    # The window starts on the demo, whose recipe keeps every intermediate LoRA (0) for the Compare steps grid.
    assert editor.input.minimum() == 0 and editor.input.value() == window.model.job.output.keep_last_loras
    assert editor.input.isVisibleTo(page)
    editor.input.setValue(5)
    assert window.model.job.output.keep_last_loras == 5
