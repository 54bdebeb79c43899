"""The Qt binding keeps Python's reference counts straight: a long session must not wear None away and crash."""

from __future__ import annotations

import sys

from PySide6.QtWidgets import QProgressBar


def test_void_qt_calls_do_not_drop_references_to_none(qapp):
    """PySide6 6.12.0 on Python 3.11 lost one reference to None per void call (None is immortal only from 3.12).

    The Train page makes about a thousand such calls a step (labels, progress, painting), so a real window crashed
    with "Fatal Python error: none_dealloc" a few hundred steps into a run (benchmarks/pause_latency.py, --at 400).
    pyproject excludes that version; this test fails on any binding that does it again.
    """
    bar = QProgressBar()
    before = sys.getrefcount(None)
    for value in range(1000):
        bar.setValue(value)
    lost = before - sys.getrefcount(None)
    assert lost < 100, f"{lost} references to None lost in 1000 QProgressBar.setValue calls"
