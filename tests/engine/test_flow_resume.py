"""Exact resume on the flow families: a FLUX.1 [dev] and an SD3.5 run stopped mid-way and resumed give the LoRA,
the per-step losses and the validation losses of the uninterrupted run (as the SD path does, bit for bit on CPU)."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from fixtures_data import make_dataset
from fixtures_runs import tiny_job
from studio.engine.events import RunCancelled, RunFinished, StepCompleted
from studio.engine.runs import read_metrics
from studio.engine.trainer import run_training

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("flow-resume") / "data", count=4)


def _job(model, data, out):
    # Held-out validation (1 image, 2 fixed draws) every 2 steps; buckets, flips and caption dropout on, so the
    # resumed run must restore every random stream, not only the weights.
    return tiny_job(model, data, out, training__steps=STEPS, output__save_every=2, output__save_dtype="fp32",
                    validation__split=1, validation__every=2, validation__timesteps=2,
                    dataset__random_flip=True, dataset__caption_dropout=0.3, training__lr=1e-2)


def _metrics(run_dir):
    rows = read_metrics(run_dir)
    return ([(m["step"], m["loss"]) for m in rows if "loss" in m],
            [(m["step"], m["val_loss"]) for m in rows if "val_loss" in m])


@pytest.mark.parametrize("family", ["flux-dev", "sd3.5-medium"])
def test_stop_and_resume_gives_the_uninterrupted_run(tiny_model, data, tmp_path, family):
    torch.set_num_threads(1)
    model = tiny_model(family, "flow")
    ref = tmp_path / "ref"
    assert isinstance(list(run_training(_job(model, data, ref)))[-1], RunFinished)

    out = tmp_path / "resumed"
    stop = threading.Event()
    first = []
    for event in run_training(_job(model, data, out), stop):
        first.append(event)
        if isinstance(event, StepCompleted) and event.step == 3:
            stop.set()
    assert isinstance(first[-1], RunCancelled) and first[-1].step == 3
    assert isinstance(list(run_training(_job(model, data, out), resume_dir=out))[-1], RunFinished)

    a, b = load_file(ref / "tiny.safetensors"), load_file(out / "tiny.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{family}: stop at 3 + resume, max |diff| of the LoRA = {diff:.3g}")
    assert diff == 0.0
    losses, val = _metrics(ref)
    assert _metrics(out) == (losses, val)
    assert [s for s, _ in val] == [0, 2, 4, 6] and len(losses) == STEPS
