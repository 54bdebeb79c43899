"""The finished Train page: one message at a time, the others reachable, and the loss plot keeps its room."""

from __future__ import annotations

from PySide6.QtWidgets import QApplication

from studio.ui import theme
from studio.engine.runs import UnfinishedRun
from ui_fakes import stepping_run


def test_one_banner_at_a_time_and_the_plot_keeps_its_height(qtbot, make_window, tiny_dataset, tmp_path):
    window = make_window(stepping_run(tmp_path / "run", total=6, delay=0.002))  # default window size
    window.model.set_value("dataset.path", str(tiny_dataset))
    page = window.train_page
    window.start_training()
    qtbot.waitUntil(lambda: page.run_state == "finished" and not window.controller.running, timeout=10_000)
    qtbot.waitUntil(lambda: not window.tasks.is_running("unfinished"), timeout=10_000)
    # An earlier unfinished run is offered as well: two messages, the page shows one.
    page.offer_resume(UnfinishedRun(tmp_path / "older", window.model.snapshot(), 3, 10, 0.0))
    QApplication.processEvents()
    qtbot.wait(50)
    visible = [b for b in (page.banner, page.resume_banner) if b.isVisible()]
    assert visible == [page.banner]  # the result outranks an older run's offer, though that came later
    assert "Your LoRA is ready" in page.banner.text.text()
    assert [b.wanted for b in page.messages.banners] == [True, True], [b.wanted for b in page.messages.banners]
    assert page.messages.nav.isVisible() and page.messages.count_label.text() == "1 of 2 messages"
    page.messages.next_button.click()
    assert page.resume_banner.isVisible() and not page.banner.isVisible()
    assert page.messages.count_label.text() == "2 of 2 messages"
    em = theme.em(page)
    assert page.loss_plot.height() >= em * 14, f"the plot is {page.loss_plot.height()} px high at {window.size()}"
    # Withdrawing a message shows the other one without a switch.
    page.offer_resume(None)
    assert page.banner.isVisible() and not page.messages.nav.isVisible()


def test_an_error_comes_before_an_older_success(qtbot, make_window, tmp_path):
    window = make_window()
    window.go_to("train")
    page = window.train_page
    page.offer_resume(UnfinishedRun(tmp_path / "older", window.model.snapshot(), 3, 10, 0.0))
    page.banner.show_message("error", "It broke.")
    assert page.banner.isVisible() and not page.resume_banner.isVisible()
    page.offer_resume(UnfinishedRun(tmp_path / "older", window.model.snapshot(), 4, 10, 0.0))  # newer, but only info
    assert page.banner.isVisible() and page.banner.kind == "error"
