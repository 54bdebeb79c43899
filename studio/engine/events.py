"""The closed set of events a training run emits; every consumer matches on these types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union


@dataclass(frozen=True)
class RunStarted:
    run_dir: Path
    total_steps: int
    family: str
    device: str
    image_count: int
    start_step: int = 0  # above 0 when resuming
    job: Any = None  # the resolved studio.engine.config.Job


@dataclass(frozen=True)
class StatusChanged:
    """A phase of the run began, e.g. 'Loading model', 'Caching latents'; ``progress`` in 0..1 when known."""

    phase: str
    message: str = ""
    progress: float | None = None


@dataclass(frozen=True)
class StepCompleted:
    step: int  # 1-based count of optimizer steps done
    total_steps: int
    loss: float
    lr: float
    elapsed_s: float  # wall time since the first step began
    steps_per_s: float  # recent throughput
    eta_s: float
    epoch: int = 0
    skipped: bool = False  # fp16 gradients overflowed: the weights and the learning-rate schedule did not move


@dataclass(frozen=True)
class ValidationCompleted:
    """The validation loss after ``step`` steps (0: the base model), and the best one so far."""

    step: int
    loss: float
    best_step: int
    best_loss: float
    images: int = 0


@dataclass(frozen=True)
class SampleReady:
    step: int
    index: int  # which prompt
    prompt: str
    seed: int
    path: Path
    image: Any = field(default=None, compare=False, repr=False)  # PIL.Image; the GUI converts it on its thread


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: Path  # resumable state folder
    lora_path: Path | None = None  # intermediate LoRA export written with it


@dataclass(frozen=True)
class LogMessage:
    level: str  # "info" | "warning"
    message: str


@dataclass(frozen=True)
class RunFinished:
    run_dir: Path
    lora_path: Path
    steps: int
    elapsed_s: float
    best_step: int | None = None  # the step with the lowest validation loss (None: no validation)
    best_val_loss: float | None = None


@dataclass(frozen=True)
class RunFailed:
    message: str  # a sentence for people: what happened and what to do
    details: str = ""  # the technical part (traceback)
    run_dir: Path | None = None
    log_path: Path | None = None
    lora_path: Path | None = None  # the last good LoRA, when one was saved
    # The trained LoRA, kept in memory when the disk would not take it (studio.engine.unsaved.UnsavedLora):
    # ``unsaved.save(folder)`` writes it elsewhere. None when nothing trained is left unsaved.
    unsaved: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class RunCancelled:
    step: int
    run_dir: Path | None = None
    lora_path: Path | None = None  # a usable partial LoRA, when at least one step ran


TrainEvent = Union[
    RunStarted, StatusChanged, StepCompleted, ValidationCompleted, SampleReady, CheckpointSaved, LogMessage, RunFinished,
    RunFailed, RunCancelled,
]
TERMINAL_EVENTS = (RunFinished, RunFailed, RunCancelled)


def is_terminal(event: object) -> bool:
    return isinstance(event, TERMINAL_EVENTS)
