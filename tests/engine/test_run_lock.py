"""One process per run folder: a second `--resume` of a run that is training is refused, the first is untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from studio.cli import main
from studio.engine.config import save_job
from studio.engine.events import RunCancelled, StepCompleted
from studio.engine.runs import read_metrics
from studio.engine.trainer import run_training
from test_trainer import tiny_job


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_second_process_resuming_a_run_in_training_is_refused_and_the_first_carries_on(
        tiny_sd1, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    job = tiny_job(tiny_sd1, tiny_dataset, out, training__steps=5000, output__save_every=2,
                   output__keep_last_loras=0)  # the first process removes nothing itself either
    stop = threading.Event()
    for event in run_training(job, stop):
        if isinstance(event, StepCompleted) and event.step == 2:
            stop.set()
    assert isinstance(event, RunCancelled)

    first = subprocess.Popen([sys.executable, "-m", "studio", "train", "--resume", str(out), "--quiet"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while len(read_metrics(out)) < 4:  # the first process is past its setup and training
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first resume did not start training within 300 s"
            time.sleep(0.05)
        # Not checkpoints/ nor the first process's own in-flight temp files (`.….partial`, renamed by it when done).
        files_before = {p for p in out.rglob("*") if "checkpoints" not in p.parts and not p.name.endswith(".partial")}

        assert main(["train", "--resume", str(out), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert f"The run in '{out}' is being trained by another LoRA Studio process right now" in err, err
        assert "please report" not in err
        assert first.poll() is None, "the first run carries on"
        assert files_before <= {p for p in out.rglob("*")}, "the refused process removed nothing"
    finally:
        first.send_signal(signal.SIGKILL)  # even a killed process leaves no stale lock: the OS drops it
        first.wait(timeout=60)
        first.stderr.close()
    from studio.engine.runs import lock_run

    lock_run(out).release()
    assert (out / ".lora-studio.lock").exists(), "the lock file stays (waiters share one inode); only the OS lock matters"


def test_the_lock_is_released_when_a_run_ends_so_the_same_process_can_resume(tiny_sd1, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    job = tiny_job(tiny_sd1, tiny_dataset, out, training__steps=4, output__save_every=2)
    stop = threading.Event()
    for event in run_training(job, stop):
        if isinstance(event, StepCompleted) and event.step == 2:
            stop.set()
    events = list(run_training(job, resume_dir=out))
    assert type(events[-1]).__name__ == "RunFinished", getattr(events[-1], "message", events[-1])
    from studio.engine.runs import lock_run

    lock_run(out).release()  # free again after the run finished
