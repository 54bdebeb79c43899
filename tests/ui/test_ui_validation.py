"""The validation loss on the Train page's plot (curve, best step starred and named) and in Try & Export's list."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt

from studio.engine.events import RunFinished, RunStarted, StepCompleted, ValidationCompleted
from test_ui_training import ready, wait_for_state  # noqa: F401  (fixture)
from ui_fakes import scripted_run, write_lora_stub

VAL = {0: 1.10, 3: 0.52, 6: 0.61}  # the lowest at step 3


def validation_run(run_dir: Path) -> list:
    lora = write_lora_stub(run_dir / "fake.safetensors")
    write_lora_stub(run_dir / "fake-step000003.safetensors")
    events: list = [RunStarted(run_dir, 6, "sd1", "CPU", 4)]
    best = (0, VAL[0])
    events.append(ValidationCompleted(0, VAL[0], *best, 2))
    for step in range(1, 7):
        events.append(StepCompleted(step, 6, 1.0 / step, 1e-4, step * 0.1, 10.0, (6 - step) * 0.1))
        if step in VAL:
            best = min(best, (step, VAL[step]), key=lambda b: b[1])
            events.append(ValidationCompleted(step, VAL[step], *best, 2))
    events.append(RunFinished(run_dir, lora, 6, 0.6, best_step=3, best_val_loss=VAL[3]))
    return events


def test_validation_curve_and_best_step_are_drawn_and_named(qtbot, make_window, ready, tmp_path):  # noqa: F811
    window = ready(make_window(scripted_run(validation_run(tmp_path / "run"))))
    page = window.train_page
    qtbot.mouseClick(page.start_button, Qt.LeftButton)
    wait_for_state(qtbot, window, "finished")
    plot = page.loss_plot
    plot.redraw()  # what the batching timer does a moment later
    x, y = plot.val_curve.getData()
    assert list(x) == [0, 3, 6] and list(y) == [VAL[0], VAL[3], VAL[6]]
    assert plot.raw_curve.getData()[0] is not None and len(plot.raw_curve.getData()[0]) == 6, "with the training loss"
    spots = [(p.pos().x(), p.pos().y()) for p in plot.best_marker.points()]
    assert spots == [(3, VAL[3])]
    assert plot.best_line.isVisible() and plot.best_line.value() == 3
    assert plot.best_label.isVisible() and "step 3" in plot.best_label.text()
    assert "lowest validation loss" in page.log_view.toPlainText()
    # Try & Export marks the LoRA saved at the best step.
    combo = window.export_page.lora_combo
    labels = [combo.itemText(i) for i in range(combo.count())]
    assert [t for t in labels if "★" in t] == ["fake-step000003.safetensors — step 3 ★ lowest validation loss"]


def test_a_resumed_run_replaces_repeated_validation_points(qtbot):
    from studio.ui.widgets.loss_plot import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    for step, loss in ((0, 1.0), (10, 0.5), (20, 0.7), (10, 0.4)):  # resumed from step 10's checkpoint
        plot.add_validation_point(step, loss)
    plot.redraw()
    assert plot.val_steps == [0, 10] and plot.best == (10, 0.4)
    plot.clear()
    assert plot.best is None and not plot.best_line.isVisible()


def test_validation_settings_have_their_own_group_and_flag_bad_values(qtbot, window):
    page = window.settings_page
    box, _ = page.groups["validation"]
    assert box.title() == "Validation loss"
    split = page.editor("validation.split")
    assert "Hold out" in split.input.toolTip() and page.editor("validation.folder").browse is not None
    window.model.set_value("validation.split", 0.8)
    qtbot.waitUntil(lambda: bool(split.error.text()))
    assert "too few to train" in split.error.text()
