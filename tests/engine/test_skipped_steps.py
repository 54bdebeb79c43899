"""fp16 loss scaling: an overflowing step is reported as skipped and does not move the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from studio.engine.config import Job
from studio.engine.recovery import _reset_accelerate
from studio.engine.run_state import Run
from studio.engine.trainer import apply_step


@pytest.mark.parametrize("fused", [True, False])
def test_an_overflowing_fp16_step_is_skipped_and_the_schedule_waits(fused):
    """The real GradScaler and AdamW (fused: found_inf handled inside the kernel, step() always called) behind
    accelerate's optimizer wrapper; accelerate makes no scaler on a CPU, so the test gives it the CPU one."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    try:
        acc.scaler = torch.amp.GradScaler("cpu")
        weight = torch.nn.Parameter(torch.ones(4))
        optimizer = acc.prepare(torch.optim.AdamW([weight], lr=0.1, fused=fused, foreach=False if not fused else None))
        run = Run(Job())
        run.accelerator, run.optimizer = acc, optimizer
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 10)
        finite = torch.tensor(True)

        acc.backward((weight * float("inf")).sum())  # scaled by accelerate's scaler: overflowing gradients
        assert apply_step(run, finite) is True
        assert run.scheduler.last_epoch == 0 and torch.equal(weight.detach(), torch.ones(4))
        assert all(p.grad is None for p in [weight])

        acc.backward((weight * 2).sum())
        assert apply_step(run, finite) is False
        assert run.scheduler.last_epoch == 1 and not torch.equal(weight.detach(), torch.ones(4))
    finally:
        _reset_accelerate(acc)
