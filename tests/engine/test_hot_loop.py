"""The hot loop never waits on the host: real training steps with every host read of a tensor trapped (CPU), and
under ``torch.cuda.set_sync_debug_mode("error")`` (CUDA; skipped with the reason printed where there is none)."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from studio.engine import trainer
from studio.engine.families import get_family, registered
from studio.engine.host_values import PendingValues
from studio.engine.run_state import Run
from test_trainer import tiny_job

# conftest lets exactly this skip through in CI (every other skip fails the run there).
NO_CUDA = "needs a CUDA GPU: the sync-free claim is checked by CUDA's own sync detector, which a CPU does not have"
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def host_reads_trapped(allowed: dict[str, int] | None = None):
    """Every Python-level read of a tensor's value on the host raises (the calls that make the host wait for a GPU).

    ``allowed`` lets named reads through and counts them (a family's declared ``step_host_read``)."""
    real = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def trap(name):
        def read(self, *args, **kwargs):
            if allowed is not None and name in allowed:
                allowed[name] += 1
                return real[name](self, *args, **kwargs)
            raise AssertionError(f"a training step read a tensor back on the host: Tensor.{name}")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, trap(name))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)


@contextmanager
def prepared_run(job):
    from studio.engine.recovery import release
    from studio.engine.run_setup import setup

    run = Run(job)
    try:
        list(setup(run, threading.Event(), None))
        for module in [run.bundle.denoiser, *(run.bundle.text_encoders if job.lora.train_text_encoder else [])]:
            module.train()
        yield run
    finally:
        release(run)


def steps(run: Run, n: int, pending: PendingValues, cache: dict) -> None:
    """What the loop does per step, up to handing the loss to the host copy (trainer._train_loop)."""
    for _ in range(n):
        loss, _skipped = trainer._train_step(run, cache)
        run.position.step += 1
        pending.put(run.step, loss)


def busy_job(model, data, out, **more):
    """Everything that draws randomness or derives conditioning per step: flips, noise offset, min-SNR, batches."""
    return tiny_job(model, data, out, dataset__random_flip=True, training__noise_offset=0.05,
                    training__min_snr_gamma=5.0, training__batch_size=2, **more)


def test_the_trap_catches_a_read():
    with host_reads_trapped(), pytest.raises(AssertionError, match="Tensor.item"):
        torch.ones(1).item()


@pytest.mark.parametrize("family", [f.name for f in registered()])
def test_a_training_step_reads_nothing_back_on_the_host(family, tiny_model, tiny_dataset, tmp_path, monkeypatch):
    """Every registered family. The device path (no per-step finite check on the host, which only the CPU does):
    after one warm-up step, two more with every host read trapped; the losses arrive afterwards, in order."""
    monkeypatch.setattr(Run, "host_checks", property(lambda self: False))
    model = tiny_model(family, get_family(family).tiny_prediction_types[0])
    with prepared_run(busy_job(model, tiny_dataset, tmp_path / "run")) as run:
        assert run.resident is not None, "the step reads the resident caches"
        pending, cache = PendingValues(), {}
        steps(run, 1, pending, cache)  # warm-up: lazy state (schedulers' tables on the device, optimizer state)
        # A family that must read something per step says what and why; it gets exactly one small list read a step.
        allowed = {"tolist": 0} if get_family(family).step_host_read else None
        with host_reads_trapped(allowed):
            steps(run, 2, pending, cache)
        if allowed is not None:
            assert allowed == {"tolist": 2}, allowed
        losses = pending.take(wait=True)
        assert [s for s, _ in losses] == [1, 2, 3] and all(0 < v < 10 for _, v in losses)


def test_cuda_steps_run_under_sync_debug_error(tiny_sd1, tiny_dataset, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    job = busy_job(tiny_sd1, tiny_dataset, tmp_path / "run", training__device="cuda")
    with prepared_run(job) as run:
        assert run.resident_on_device and all(t.device.type == "cuda" for e in run.resident.values() for t in e.values())
        ampere = torch.cuda.get_device_capability()[0] >= 8
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if ampere else "ieee"), "training.tf32 is on"
        pending, cache = PendingValues(), {}
        steps(run, 1, pending, cache)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps(run, 3, pending, cache)
            done = pending.take()  # only what the device has finished: no wait
        finally:
            torch.cuda.set_sync_debug_mode("default")
        done += pending.take(wait=True)
        assert [s for s, _ in done] == [1, 2, 3, 4] and all(0 < v < 10 for _, v in done)


def test_pinned_caches_copy_without_blocking_on_cuda(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    """When the caches do not fit on the device they stay in pinned memory, copied non-blocking per step."""
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    from studio.engine import run_data

    monkeypatch.setattr(run_data, "RESIDENT_SHARE", 0.0)
    with prepared_run(busy_job(tiny_sd1, tiny_dataset, tmp_path / "run", training__device="cuda")) as run:
        assert not run.resident_on_device and all(t.is_pinned() for e in run.resident.values() for t in e.values())
        pending, cache = PendingValues(), {}
        steps(run, 1, pending, cache)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps(run, 2, pending, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_pending_values_keep_order_and_report_only_what_is_done():
    pending = PendingValues()
    for step in range(3):
        pending.put(step, torch.tensor(step + 0.5))
    assert pending.take() == [(0, 0.5), (1, 1.5), (2, 2.5)]  # CPU values are ready at once
    assert pending.take(wait=True) == [] and len(pending) == 0
