"""LossPlot: raw loss, its moving average, the validation loss with its best step, and the learning rate (pyqtgraph)."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from studio.ui import theme

EMA_BETA = 0.95  # a ~20-step window: smooths per-batch noise, still shows the trend within a short run


class LossPlot(QWidget):
    """``add_point`` is cheap; redraws are batched on a timer so a fast run cannot flood the GUI thread."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.lrs: list[float] = []
        self.val_steps: list[int] = []
        self.val_losses: list[float] = []
        self._ema: float | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        self.view = pg.GraphicsLayoutWidget()
        layout.addWidget(self.view)
        self.loss_plot = self.view.addPlot(row=0, col=0)
        self.lr_plot = self.view.addPlot(row=1, col=0)
        self.view.ci.layout.setRowStretchFactor(0, 3)
        self.view.ci.layout.setRowStretchFactor(1, 1)
        self.lr_plot.setXLink(self.loss_plot)
        for plot in (self.loss_plot, self.lr_plot):
            plot.showGrid(x=True, y=True, alpha=0.15)
            plot.setMenuEnabled(False)
            plot.setMouseEnabled(x=True, y=False)
            plot.hideButtons()
        self.loss_plot.setLabel("left", "loss")
        self.lr_plot.setLabel("left", "lr")
        # Learning rates are small numbers; pyqtgraph's SI prefixes ("×0.001") read badly there.
        self.lr_plot.getAxis("left").enableAutoSIPrefix(False)
        self.lr_plot.setLabel("bottom", "step")
        self.loss_plot.addLegend(offset=(-10, 10))
        self.raw_curve = self.loss_plot.plot(name="loss")
        self.ema_curve = self.loss_plot.plot(name="smoothed")
        self.lr_curve = self.lr_plot.plot()
        # Validation loss: points joined by a line on the loss axis, the lowest one starred with a line at its step.
        self.val_curve = self.loss_plot.plot(name="validation", symbol="o", symbolSize=6)
        self.best_marker = pg.ScatterPlotItem(symbol="star", size=16)
        self.loss_plot.addItem(self.best_marker)
        self.best_line = pg.InfiniteLine(angle=90, movable=False)
        self.loss_plot.addItem(self.best_line, ignoreBounds=True)
        self.best_line.hide()
        self.best_label = QLabel()
        self.best_label.setObjectName("muted")
        self.best_label.hide()
        layout.addWidget(self.best_label)
        self.empty_text = pg.TextItem("The loss curve is drawn here once training starts.", anchor=(0.5, 0.5))
        self.loss_plot.addItem(self.empty_text, ignoreBounds=True)
        self.empty_text.setPos(0.5, 0.5)
        self.apply_theme()
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(100)
        self._redraw_timer.timeout.connect(self.redraw)

    def apply_theme(self) -> None:
        c = theme.colours()
        self.view.setBackground(c["base"])
        for plot in (self.loss_plot, self.lr_plot):
            for axis in ("left", "bottom"):
                ax = plot.getAxis(axis)
                ax.setPen(pg.mkPen(c["mid"]))
                ax.setTextPen(pg.mkPen(c["muted"]))
        self.empty_text.setColor(c["muted"])
        self.raw_curve.setPen(pg.mkPen(c["muted"], width=1))
        self.ema_curve.setPen(pg.mkPen(theme.ACCENT, width=2))
        self.lr_curve.setPen(pg.mkPen(theme.WARN_COLOUR, width=1.5))
        self.val_curve.setPen(pg.mkPen(theme.OK_COLOUR, width=2))
        self.val_curve.setSymbolBrush(pg.mkBrush(theme.OK_COLOUR))
        self.val_curve.setSymbolPen(pg.mkPen(theme.OK_COLOUR))
        self.best_marker.setBrush(pg.mkBrush(theme.OK_COLOUR))
        self.best_marker.setPen(pg.mkPen(c["muted"]))
        self.best_line.setPen(pg.mkPen(theme.OK_COLOUR, width=1, style=Qt.DashLine))

    @property
    def point_count(self) -> int:
        return len(self.steps)

    def clear(self) -> None:
        self.steps.clear()
        self.losses.clear()
        self.smoothed.clear()
        self.lrs.clear()
        self.val_steps.clear()
        self.val_losses.clear()
        self._ema = None
        self.redraw()

    def add_point(self, step: int, loss: float, lr: float) -> None:
        if self.steps and step <= self.steps[-1]:  # a resumed run repeats steps: keep the newest values
            cut = next(i for i, s in enumerate(self.steps) if s >= step)
            del self.steps[cut:], self.losses[cut:], self.smoothed[cut:], self.lrs[cut:]
            self._ema = self.smoothed[-1] if self.smoothed else None
        self.steps.append(step)
        self.losses.append(loss)
        self.lrs.append(lr)
        if np.isfinite(loss):
            # Started at the first loss rather than zero, so the first points are not dragged down.
            self._ema = loss if self._ema is None else EMA_BETA * self._ema + (1 - EMA_BETA) * loss
            self.smoothed.append(self._ema)
        else:
            self.smoothed.append(self.smoothed[-1] if self.smoothed else float("nan"))
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, loss) of the lowest validation loss drawn (the earliest on a tie), or None."""
        finite = [(s, v) for s, v in zip(self.val_steps, self.val_losses) if np.isfinite(v)]
        return min(finite, key=lambda sv: sv[1]) if finite else None

    def add_validation_point(self, step: int, loss: float) -> None:
        if self.val_steps and step <= self.val_steps[-1]:  # a resumed run measures again: keep the newest values
            cut = next(i for i, s in enumerate(self.val_steps) if s >= step)
            del self.val_steps[cut:], self.val_losses[cut:]
        self.val_steps.append(step)
        self.val_losses.append(loss)
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def redraw(self) -> None:
        self.empty_text.setVisible(not self.steps and not self.val_steps)
        self.val_curve.setData(np.asarray(self.val_steps, dtype=float), np.asarray(self.val_losses, dtype=float))
        best = self.best
        self.best_marker.setData([best[0]] if best else [], [best[1]] if best else [])
        self.best_line.setVisible(best is not None)
        self.best_label.setVisible(best is not None)
        if best is not None:
            self.best_line.setPos(best[0])
            self.best_label.setText(f"Lowest validation loss {best[1]:.4g} at step {best[0]} (★)")
        x = np.asarray(self.steps, dtype=float)
        self.raw_curve.setData(x, np.asarray(self.losses, dtype=float))
        self.ema_curve.setData(x, np.asarray(self.smoothed, dtype=float))
        self.lr_curve.setData(x, np.asarray(self.lrs, dtype=float))
        top = max((v for v in self.lrs if np.isfinite(v)), default=0.0)
        if top > 0:  # from zero up: a constant rate is a flat line near the top, not noise around a midpoint
            self.lr_plot.setYRange(0, top * 1.15, padding=0)
        # Fit the ranges now rather than in the coming paint: a paint that changes the range (and the axes' ticks)
        # asks for a second full paint right after it, and each costs 5-50 ms of Python on the GUI thread.
        for plot in (self.loss_plot, self.lr_plot):
            plot.getViewBox().prepareForPaint()
