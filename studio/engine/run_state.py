"""The typed state of one training run: what setup built, where the loop is, and what recovery needs to know."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from studio.engine.config import Job
from studio.engine.state import TrainPosition

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.cache import TensorCache
    from studio.engine.dataset import DatasetReport
    from studio.engine.families import ModelBundle
    from studio.engine.runs import MetricsWriter, RunFolder


class Cancelled(Exception):
    """Raised at a step boundary (or while caching) when the stop event is set; turns into RunCancelled."""


@dataclass
class Run:
    """One run, from the first line of setup to the terminal event.

    Setup fills the parts in order (accelerator, folder, bundle, dataset, caches, adapters, optimizer); the
    loop moves ``position``; recovery reads ``phase``/``consistent`` and the last saved paths to decide what
    can be kept and what to tell the user. Fields set later in setup are None until then.
    """

    job: Job
    # ------------------------------------------------------------------ where the run is (recovery reads these)
    phase: str = "setup"  # a key of failures.PHASES
    consistent: bool = True  # False while an optimizer step may have half-updated the weights
    lora_path: Path | None = None  # the last LoRA file written (intermediate or final)
    checkpoint: Path | None = None  # the last resumable checkpoint written (or resumed from)
    saved_step: int | None = None  # the step that checkpoint holds
    started: float | None = None  # perf_counter() at the (virtual) start of training: resumed runs go back
    elapsed: float = 0.0  # training seconds, the interrupted run's included
    elapsed_before: float = 0.0  # training seconds of the interrupted run, when resuming
    position: TrainPosition = field(default_factory=TrainPosition)
    skipped_steps: int = 0  # steps fp16 loss scaling skipped (overflow) in this process's part of the run
    # ------------------------------------------------------------------ handles released at the end
    accelerator: Any = None
    folder: "RunFolder | None" = None
    log_handler: Any = None
    run_lock: Any = None  # the OS lock on the run folder (runs.lock_run), held until release
    metrics: "MetricsWriter | None" = None
    # ------------------------------------------------------------------ what setup built
    bundle: "ModelBundle | None" = None
    report: "DatasetReport | None" = None
    buckets: list[tuple[int, int]] = field(default_factory=list)  # per item: (width, height)
    weight_dtype: torch.dtype = torch.float32
    latents: "TensorCache | None" = None
    text: "TensorCache | None" = None
    text_is_static: bool = False  # captions never change and the encoders are frozen: encode once
    model_fp: str = ""  # the model's fingerprint, part of every cache key
    params: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)
    optimizer: Any = None
    scheduler: Any = None  # the learning-rate schedule
    steps_per_epoch: int = 1
    total_steps: int = 1
    prompts: list[str] = field(default_factory=list)
    sample_every: int = 0  # steps between previews: the job's, or picked by time when the job says 'auto' (-1)
    denoiser_ddp: Any = None  # the denoiser as accelerate prepared it (DDP-wrapped under several processes)
    te_ddp: list = field(default_factory=list)
    # The caches as the step reads them (run_data.make_resident): on the device when they fit, else pinned host memory.
    resident: dict | None = None
    resident_on_device: bool = False
    validation: Any = None  # validation.ValidationSet: the images the validation loss is measured on (None: off)
    best_validation: tuple[int, float] | None = None  # (step, loss) of the lowest validation loss so far

    @property
    def run_dir(self) -> Path | None:
        return self.folder.root if self.folder is not None else None

    @property
    def step(self) -> int:
        """Completed optimizer steps."""
        return self.position.step

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def host_checks(self) -> bool:
        # Reading a value on the CPU costs nothing, so non-finite losses are caught before the optimizer step
        # there; on an accelerator that read would stall the queue every step (see trainer._optimizer_step).
        return self.device.type == "cpu"

    def drop_models(self) -> None:
        """Forget every reference to the model, adapters and optimizer, so their memory can be freed."""
        self.bundle = self.optimizer = self.scheduler = self.denoiser_ddp = None
        self.params, self.te_ddp = {}, []
        self.latents = self.text = self.validation = self.resident = None
