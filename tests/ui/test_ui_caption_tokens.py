"""Settings page: caption tokens and clip skip, among the advanced settings, bound to the job as numbers."""

from __future__ import annotations

from PySide6.QtWidgets import QComboBox, QSpinBox


def test_caption_tokens_and_clip_skip_are_advanced_settings(window, qtbot):
    window.go_to("settings")
    page = window.settings_page
    page.advanced.setChecked(True)
    tokens, skip = page.editor("training.max_token_length"), page.editor("training.clip_skip")
    assert isinstance(tokens.input, QComboBox) and isinstance(skip.input, QSpinBox)
    assert [tokens.input.itemText(i) for i in range(tokens.input.count())] == ["75", "150", "225"]
    assert tokens.isVisible() and skip.isVisible() and "kohya" in tokens.input.toolTip()
    tokens.input.setCurrentText("225")
    skip.input.setValue(2)
    assert window.model.value("training.max_token_length") == 225 and window.model.value("training.clip_skip") == 2
    assert window.model.errors() == [] or all(p.field not in ("training.max_token_length", "training.clip_skip")
                                              for p in window.model.errors())
    window.model.set_value("training.max_token_length", 150)
    assert tokens.input.currentText() == "150"
    page.advanced.setChecked(False)
    assert not tokens.isVisible()
