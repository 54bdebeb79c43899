"""Validation loss: held-out or chosen images, a fixed-noise loss that is deterministic, falls as a LoRA learns,
is logged (events, metrics.jsonl, TensorBoard), marks the best step and survives an exact resume."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from studio.engine import validation
from studio.engine.config import Job, errors, validate
from studio.engine.events import RunFinished, StepCompleted, ValidationCompleted
from studio.engine.failures import JobInvalid
from studio.engine.runs import read_metrics
from studio.engine.trainer import run_training
from test_trainer import assert_grammar, tiny_job


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from fixtures_data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("val-data") / "data", count=6)


def learning_job(model, data, out, **overrides) -> Job:
    settings = dict(training__steps=20, training__lr=5e-3, lora__rank=8, lora__alpha=8.0, lora__targets="+conv",
                    validation__split=2.0, validation__every=10)
    settings.update(overrides)
    return tiny_job(model, data, out, **settings)


def val_records(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


@pytest.fixture(scope="module")
def reference(tiny_sd1, data, tmp_path_factory) -> tuple[Path, list]:
    """One uninterrupted run, shared by the tests here: (run folder, events)."""
    out = tmp_path_factory.mktemp("val-reference") / "run"
    return out, list(run_training(learning_job(tiny_sd1, data, out)))


def test_validation_loss_falls_is_logged_and_marks_the_best_step(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, events = reference
    assert_grammar(events)
    done = events[-1]
    assert isinstance(done, RunFinished), getattr(done, "details", done)
    vals = [e for e in events if isinstance(e, ValidationCompleted)]
    assert [v.step for v in vals] == [0, 10, 20] and all(v.images == 2 for v in vals)
    first, last = vals[0].loss, vals[-1].loss
    print(f"validation loss: step 0 {first:.4f} → step 20 {last:.4f} ({last / first - 1:+.0%})")
    assert last < 0.8 * first, (first, last)
    best = min(vals, key=lambda v: v.loss)
    assert (vals[-1].best_step, vals[-1].best_loss) == (best.step, best.loss)
    assert (done.best_step, done.best_val_loss) == (best.step, best.loss)
    # Each validation event follows its step's StepCompleted (the plot draws it on that step).
    order = [(type(e).__name__, e.step) for e in events if isinstance(e, (StepCompleted, ValidationCompleted))]
    assert order.index(("ValidationCompleted", 10)) == order.index(("StepCompleted", 10)) + 1
    # metrics.jsonl: the base model's line at step 0, then val_loss on the steps' own lines.
    assert val_records(out) == [(v.step, v.loss) for v in vals]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 21))
    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    tb = [(s.step, s.value) for s in acc.Scalars("validation/loss")]
    assert [s for s, _ in tb] == [0, 10, 20] and all(abs(a - v.loss) < 1e-6 for (_, a), v in zip(tb, vals))


@dataclass
class Item:
    sha256: str
    image_path: Path


def test_held_out_images_are_chosen_by_content_and_never_all(tmp_path):
    items = [Item(f"{i:064x}", tmp_path / f"{i}.png") for i in range(10)]
    job = Job()
    job.validation.split = 0.2
    train, held = validation.split_items(job, items)
    assert len(held) == 2 and len(train) == 8 and not {id(x) for x in held} & {id(x) for x in train}
    # The same images stay out whatever the order (renamed files, another scan order) or the training seed.
    job.training.seed = 7
    assert {x.sha256 for x in validation.split_items(job, list(reversed(items)))[1]} == {x.sha256 for x in held}
    job.validation.split = 3
    assert len(validation.split_items(job, items)[1]) == 3
    job.validation.split = 0
    assert validation.split_items(job, items) == (items, [])
    job.validation.split = 10
    with pytest.raises(JobInvalid, match="validation.split"):
        validation.split_items(job, items)
    # A folder of one's own validation images holds out nothing.
    job.validation.split, job.validation.folder = 2, str(tmp_path)
    assert validation.split_items(job, items) == (items, [])


def test_bad_validation_settings_are_named(tmp_path):
    job = Job()
    job.validation.split = 0.7
    job.validation.folder = str(tmp_path / "missing")
    found = {p.field for p in errors(validate(job))}
    assert {"validation.split", "validation.folder"} <= found
    job.validation.split = 2.5
    assert any(p.field == "validation.split" and "whole number" in p.message for p in validate(job))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_same_weights_give_the_same_validation_loss(family, tiny_model, data, tmp_path):
    """Through the family protocol only: the same loss twice, and the evaluation leaves the training state alone."""
    from studio.engine.recovery import release
    from studio.engine.run_setup import setup
    from studio.engine.run_state import Run

    run = Run(learning_job(tiny_model(family, "epsilon"), data, tmp_path / "run"))
    try:
        list(setup(run, threading.Event(), None))
        assert run.validation is not None and run.validation.count == 2
        trained = {i.sha256 for i in run.report.items}
        assert len(trained) == 4, "the held-out images are not trained on"
        run.bundle.denoiser.train()
        rng = torch.get_rng_state()
        first, second = validation.validation_loss(run), validation.validation_loss(run)
        assert first == second and first > 0
        assert run.bundle.denoiser.training, "training mode restored"
        assert torch.equal(rng, torch.get_rng_state()), "the global RNG (LoRA dropout) is not moved"
    finally:
        release(run)


def test_exact_resume_measures_the_same_validation_losses(tiny_sd1, data, reference, tmp_path):
    reference = reference[0]
    out = tmp_path / "resumed"
    stop = threading.Event()
    job = learning_job(tiny_sd1, data, out, output__save_every=5, output__save_dtype="fp32")
    for event in run_training(job, stop):
        if isinstance(event, StepCompleted) and event.step == 12:
            stop.set()
    events = list(run_training(job, resume_dir=out))
    done = events[-1]
    assert isinstance(done, RunFinished), getattr(done, "details", done)
    assert [e.step for e in events if isinstance(e, ValidationCompleted)] == [20]
    assert val_records(out) == val_records(reference)
    ref_best = validation.best(val_records(reference))
    assert (done.best_step, done.best_val_loss) == ref_best
