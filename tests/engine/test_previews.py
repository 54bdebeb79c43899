"""Previews: every prompt in one pipeline call, the same images as one call per prompt, and a default cadence by
time (about every 5 minutes of training) that an explicit ``sampling.every`` overrides."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from studio.engine import sampling
from studio.engine.events import RunFinished, SampleReady
from studio.engine.trainer import run_training
from test_trainer import tiny_job

PROMPTS = ["a red circle", "a blue circle", "a green circle"]


@pytest.mark.parametrize("seconds_per_step", [0.004, 0.05, 0.29, 1.0, 2.7, 12.0, 400.0])
def test_auto_cadence_is_about_five_minutes_in_round_steps(seconds_per_step):
    every = sampling.auto_preview_cadence(seconds_per_step)
    mantissa = every / 10 ** int(math.log10(every))
    assert mantissa in (1, 2, 5), every  # 50, 100, 200, 500 …
    minutes = every * seconds_per_step / 60
    assert every == 1 or 2 <= minutes <= 5, (every, minutes)  # never more often than ~2 min, never beyond 5
    assert sampling.auto_preview_cadence(None) == sampling.FALLBACK_PREVIEW_STEPS


def test_explicit_every_is_kept_and_auto_follows_the_estimate(tiny_sd1, tiny_dataset, tmp_path):
    from studio.engine.estimate import estimate
    from studio.engine.run_setup import preview_cadence

    job = tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", sampling__every=7)
    assert preview_cadence(SimpleNamespace(job=job, device=torch.device("cpu"))) == 7
    job.sampling.every = -1
    every = preview_cadence(SimpleNamespace(job=job, device=torch.device("cpu")))
    per_step = estimate(job, device="cpu").seconds_per_step
    assert every * per_step <= sampling.AUTO_PREVIEW_SECONDS < 10 * every * per_step


def test_a_preview_renders_every_prompt_in_one_pipeline_call(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    calls = []
    real = StableDiffusionPipeline.__call__

    def counting(self, prompt, *args, **kwargs):
        calls.append(list(prompt) if isinstance(prompt, list) else [prompt])
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting)
    job = tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", training__steps=2, sampling__every=2,
                   sampling__prompts=PROMPTS)
    events = list(run_training(job))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    samples = [e for e in events if isinstance(e, SampleReady)]
    assert [(s.step, s.index, s.prompt) for s in samples] == [(st, i, p) for st in (0, 2) for i, p in enumerate(PROMPTS)]
    assert calls == [PROMPTS, PROMPTS], "one call per preview, with every prompt"


def test_batched_previews_are_the_images_of_single_calls(tiny_sd1):
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection

    bundle = load_model(ModelSection(path=str(tiny_sd1)))
    settings = dict(steps=3, guidance=5.0, width=64, height=64, negative_prompt="blurry")
    batched = sampling.render_many(bundle, PROMPTS[:2], seeds=[11, 12], **settings)
    single = [sampling.render(bundle, p, seed=s, **settings) for p, s in zip(PROMPTS[:2], (11, 12))]
    diffs = [np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() for a, b in zip(batched, single)]
    print("mean |batched - single| per image (0-255):", diffs)
    assert all(d < 1.0 for d in diffs), diffs
    other = np.abs(np.asarray(batched[0], dtype=float) - np.asarray(batched[1], dtype=float)).mean()
    assert other > 5 * max(diffs), "the two prompts/seeds give different images, so the comparison can fail"
