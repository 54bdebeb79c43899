"""Exact resume: a killed, stopped or out-of-memory run continues to the LoRA an uninterrupted run gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.cli import main
from studio.engine import runs
from studio.engine.config import save_job
from studio.engine.events import (
    CheckpointSaved, LogMessage, RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StepCompleted,
)
from studio.engine.runs import find_unfinished_runs, read_metrics, unfinished_run
from studio.engine.state import load_checkpoint
from studio.engine.trainer import run_training
from fixtures_data import fake_run
from test_trainer import assert_grammar, tiny_job

TOLERANCE = 1e-5  # the bound; on CPU the measured difference is exactly 0
STEPS, SAVE_EVERY, SAMPLE_EVERY = 12, 4, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def job_for(model, data, out, **overrides):
    """The job every test here compares against: fp32 export, so the comparison sees the weights, not fp16 rounding."""
    settings = dict(training__steps=STEPS, output__save_every=SAVE_EVERY, output__save_dtype="fp32",
                    sampling__every=SAMPLE_EVERY, sampling__prompts=["a red circle"])
    settings.update(overrides)
    return tiny_job(model, data, out, **settings)


def max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir)]


def no_partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial" in p.name]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from fixtures_data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("resume-data") / "data")


@pytest.fixture(scope="module")
def reference(tiny_sd1, data, tmp_path_factory) -> Path:
    """One uninterrupted run of the job, shared by every comparison in this module."""
    out = tmp_path_factory.mktemp("reference") / "run"
    events = list(run_training(job_for(tiny_sd1, data, out)))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    return out


def test_kill_9_then_resume_from_the_command_line_gives_the_same_lora(tiny_sd1, data, reference, tmp_path, capsys):
    out = tmp_path / "runs" / "killed"
    save_job(job_for(tiny_sd1, data, out), tmp_path / "job.toml")
    proc = subprocess.Popen([sys.executable, "-m", "studio", "train", str(tmp_path / "job.toml"), "--quiet"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # as in this process (see _one_thread)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / f"step-{SAVE_EVERY:06d}").is_dir():  # appears only once complete
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "tiny.safetensors").exists()

    # What the GUI sees: an unfinished run it can offer to resume.
    found = unfinished_run(out)
    assert found is not None and found.step >= SAVE_EVERY and found.total_steps == STEPS
    assert found.job.output.name == "tiny" and found.run_dir == out
    assert [r.run_dir for r in find_unfinished_runs(out.parent)] == [out]

    assert main(["train", "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "tiny.safetensors").is_file() and not list(out.parent.glob("killed-*")), "same folder, no new one"
    diff = max_diff(out / "tiny.safetensors", reference / "tiny.safetensors")
    print(f"kill -9 + resume: max |diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert losses(out) == losses(reference), "every step's loss is the uninterrupted run's, each step once"
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(p.name for p in (reference / "samples").iterdir())
    assert not no_partials(out)
    assert unfinished_run(out) is None and find_unfinished_runs(out.parent) == []


def test_stop_then_resume_in_process_gives_the_same_lora_metrics_samples_and_tensorboard(tiny_sd1, data, reference, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    stop = threading.Event()
    first = []
    for event in run_training(job_for(tiny_sd1, data, out), stop):
        first.append(event)
        if isinstance(event, StepCompleted) and event.step == 7:
            stop.set()
    assert isinstance(first[-1], RunCancelled) and first[-1].step == 7
    assert [e.step for e in first if isinstance(e, CheckpointSaved)] == [4, 7]

    second = list(run_training(job_for(tiny_sd1, data, out), resume_dir=out))
    assert_grammar(second)
    assert isinstance(second[-1], RunFinished), getattr(second[-1], "details", second[-1])
    started = next(e for e in second if isinstance(e, RunStarted))
    assert started.start_step == 7 and started.run_dir == out
    assert [e.step for e in second if isinstance(e, StepCompleted)] == list(range(8, STEPS + 1))
    assert any(isinstance(e, LogMessage) and "Resumed at step 7" in e.message for e in second)
    assert {e.step for e in second if isinstance(e, SampleReady)} == {12}, "no second step-0 baseline"

    diff = max_diff(out / "tiny.safetensors", reference / "tiny.safetensors")
    print(f"stop + resume: max |diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert losses(out) == losses(reference)
    times = [m["time"] for m in read_metrics(out)]
    assert times == sorted(times), "the resumed run's clock continues"
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(p.name for p in (reference / "samples").iterdir())
    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    # Only the last keep_last (3) checkpoints stay.
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000004", "step-000007", "step-000008"]


def test_out_of_memory_keeps_the_last_step_and_resumes_exactly(tiny_sd1, data, reference, tmp_path, monkeypatch):
    import studio.engine.trainer as trainer

    out = tmp_path / "run"
    real_loss = trainer._loss

    def loss_running_out_of_memory(run, *args):
        if run.position.step == 6:  # computing step 7, after step 6's previews
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(run, *args)

    monkeypatch.setattr(trainer, "_loss", loss_running_out_of_memory)
    events = list(run_training(job_for(tiny_sd1, data, out)))
    assert_grammar(events)
    failed = events[-1]
    assert isinstance(failed, RunFailed)
    assert "ran out of memory" in failed.message and "gradient_checkpointing" in failed.message
    assert f"--resume {out}" in failed.message and "step 6" in failed.message
    assert failed.log_path == out / "logs" / "run.log" and "OutOfMemoryError" in failed.log_path.read_text()
    assert failed.lora_path == out / "tiny-step000006.safetensors" and failed.lora_path.is_file()
    position, _, _ = load_checkpoint(out / "checkpoints" / "step-000006")
    assert position.step == 6

    monkeypatch.setattr(trainer, "_loss", real_loss)
    resumed = list(run_training(job_for(tiny_sd1, data, out), resume_dir=out))
    assert isinstance(resumed[-1], RunFinished), getattr(resumed[-1], "details", resumed[-1])
    diff = max_diff(out / "tiny.safetensors", reference / "tiny.safetensors")
    print(f"OOM + resume: max |diff| = {diff:.3g}")
    assert diff <= TOLERANCE and losses(out) == losses(reference)


def test_hard_cases_accumulation_shuffle_flip_dropout_buckets_resume_exactly(tiny_sd1, tmp_path):
    """Gradient accumulation, tag shuffling, random flips, caption and LoRA dropout, batch 2 over three buckets."""
    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(64, 64), (64, 64), (96, 64), (96, 64), (64, 96), (64, 96)]):
        Image.new("RGB", size, (40 * i, 255 - 40 * i, 90)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"tag{i}, red, circle, shape{i % 2}", encoding="utf-8")
    settings = dict(training__steps=3, output__save_every=0, output__save_dtype="fp32", training__batch_size=2,
                    training__gradient_accumulation=2, dataset__shuffle_tags=True, dataset__keep_tokens=1,
                    dataset__random_flip=True, dataset__caption_dropout=0.3, lora__dropout=0.1)
    whole = list(run_training(tiny_job(tiny_sd1, data, tmp_path / "whole", **settings)))
    assert isinstance(whole[-1], RunFinished), getattr(whole[-1], "details", whole[-1])
    assert len({e.epoch for e in whole if isinstance(e, StepCompleted)}) > 1, "the run must cross an epoch boundary"

    stop = threading.Event()
    for event in run_training(tiny_job(tiny_sd1, data, tmp_path / "parts", **settings), stop):
        if isinstance(event, StepCompleted) and event.step == 2:
            stop.set()  # mid-epoch: 6 images, 4 per step
    resumed = list(run_training(tiny_job(tiny_sd1, data, tmp_path / "parts", **settings), resume_dir=tmp_path / "parts"))
    assert isinstance(resumed[-1], RunFinished), getattr(resumed[-1], "details", resumed[-1])
    diff = max_diff(tmp_path / "parts" / "tiny.safetensors", tmp_path / "whole" / "tiny.safetensors")
    print(f"hard cases, stop + resume: max |diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")


# ------------------------------------------------------------------------------------- what resume refuses


def test_job_changes_sort_into_refused_and_accepted(tmp_path):
    before = tiny_job(Path("m"), Path("d"), tmp_path)
    after = tiny_job(Path("m"), Path("d"), tmp_path / "elsewhere", training__lr=1e-4, sampling__steps=5,
                     lora__rank=8, training__seed=7, output__keep_last=5)
    refusals, notes = runs.job_changes(before, after)
    assert sorted(p.field for p in refusals) == ["lora.rank", "training.seed"]
    assert sorted(n.split(":")[0] for n in notes) == ["output.keep_last", "sampling.steps", "training.lr"]


def test_unfinished_runs_are_found_newest_first(tmp_path):
    job = tiny_job(Path("m"), Path("d"), tmp_path, training__steps=40)
    older = fake_run(tmp_path / "a", job, checkpoint_step=8)
    newer = fake_run(tmp_path / "b", job, checkpoint_step=12)
    os.utime(older / "checkpoints" / "step-000008", (1, 1))
    fake_run(tmp_path / "done", job, finished=True)
    fake_run(tmp_path / "never-saved", job, checkpoint_step=None)
    (tmp_path / "b" / "checkpoints" / ".step-000016.abc.partial").mkdir()  # a kill mid-save is not a checkpoint
    found = find_unfinished_runs(tmp_path)
    assert [(r.run_dir, r.step, r.total_steps) for r in found] == [(newer, 12, 40), (older, 8, 40)]
    assert unfinished_run(tmp_path / "done") is None and unfinished_run(tmp_path / "nothing-here") is None


def test_run_folders_are_claimed_once_under_races(tmp_path):
    requested = tmp_path / "run"
    claimed: list[Path] = []
    barrier = threading.Barrier(8)

    def claim():
        barrier.wait()
        claimed.append(runs.claim_run_dir(requested))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 8 and requested in claimed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run"] + [f"run-{n}" for n in range(2, 9)])
    (tmp_path / "file").write_text("x")
    assert runs.claim_run_dir(tmp_path / "file") == tmp_path / "file-2", "a file is never taken over"


def test_a_new_learning_rate_on_resume_applies_from_the_next_step(tiny_sd1, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    stop = threading.Event()
    for event in run_training(tiny_job(tiny_sd1, tiny_dataset, out, training__steps=4), stop):
        if isinstance(event, StepCompleted) and event.step == 2:
            stop.set()
    events = list(run_training(tiny_job(tiny_sd1, tiny_dataset, out, training__steps=4, training__lr=5e-4),
                               resume_dir=out))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    assert any(isinstance(e, LogMessage) and "training.lr: 0.001 → 0.0005" in e.message for e in events)
    assert [m["lr"] for m in read_metrics(out)] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert "lr = 0.0005" in (out / "job.toml").read_text(), "job.toml is the job that continues"
