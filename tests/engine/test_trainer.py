"""The training loop for real on tiny models: event grammar, run folder, families, stop, learning, failures."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from studio.engine.config import Job
from studio.engine.events import (
    CheckpointSaved, RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StatusChanged, StepCompleted,
    is_terminal,
)
from studio.engine.trainer import run_training
from fixtures_runs import tiny_job  # noqa: F401  (many test files import it from here)


def collect(job: Job, **kw) -> list:
    return list(run_training(job, **kw))


def assert_grammar(events: list) -> None:
    """Status events may come first; then RunStarted; exactly one terminal event, and it is last."""
    terminals = [e for e in events if is_terminal(e)]
    assert len(terminals) == 1 and events[-1] is terminals[0], [type(e).__name__ for e in events]
    if not isinstance(terminals[0], RunFailed):
        started = [i for i, e in enumerate(events) if isinstance(e, RunStarted)]
        assert len(started) == 1
        assert all(isinstance(e, StatusChanged) or type(e).__name__ == "LogMessage" for e in events[: started[0]])
    steps = [e.step for e in events if isinstance(e, StepCompleted)]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)


def test_event_grammar_and_run_folder(tiny_sd1, tiny_dataset, tmp_path):
    job = tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", sampling__every=2)
    events = collect(job)
    assert_grammar(events)
    done = events[-1]
    assert isinstance(done, RunFinished), events[-1]
    assert [e.step for e in events if isinstance(e, StepCompleted)] == [1, 2, 3]
    samples = [e for e in events if isinstance(e, SampleReady)]
    # baseline at step 0, every 2 steps, and the final step; two prompts (the dataset's first captions)
    assert sorted({s.step for s in samples}) == [0, 2, 3]
    run = tmp_path / "run"
    assert done.lora_path == run / "tiny.safetensors" and done.lora_path.is_file()
    assert (run / "job.toml").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all({"loss", "lr", "time"} <= x.keys() for x in lines)
    png = Image.open(samples[-1].path)
    assert png.text["prompt"] == samples[-1].prompt and png.text["step"] == "3" and png.text["seed"]
    assert any((run / "logs").glob("events.out.tfevents.*")) and (run / "logs" / "run.log").is_file()


def test_an_earlier_run_is_never_overwritten(tiny_sd1, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    first = collect(tiny_job(tiny_sd1, tiny_dataset, out, training__steps=1))[-1]
    second = collect(tiny_job(tiny_sd1, tiny_dataset, out, training__steps=1))[-1]
    assert first.run_dir == out and second.run_dir == tmp_path / "run-2"
    assert first.lora_path.is_file() and second.lora_path.is_file()


def _load_pipe(model_dir: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, **kw):
    g = torch.Generator().manual_seed(0)
    return torch.from_numpy(pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=g,
                                 output_type="np", **kw).images)


# What diffusers logs when a LoRA file does not fit the pipeline: peft's unexpected/missing LoRA keys
# (diffusers.utils.peft_utils._maybe_warn_for_unhandled_keys), keys the kohya/other converters drop, and a model
# that received no keys at all ("No LoRA keys associated to <Model> found with the prefix=...").
_KEY_PROBLEM = re.compile(r"(unexpected|missing) keys|unsupported keys|keys found in the state dict", re.I)
_NO_KEYS_FOR = re.compile(r"^No LoRA keys associated to (\w+) found")


@contextlib.contextmanager
def library_warnings():
    """WARNING+ messages of diffusers/transformers/peft; their loggers do not propagate, so caplog cannot see them."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield messages
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def key_problems(messages: list[str], text_encoder_trained: bool) -> list[str]:
    """The load-time warnings that mean the file and the pipeline disagree. A text encoder that got no keys is one,
    unless the LoRA was trained without the text encoder (then the file has none for it by design)."""
    problems = []
    for message in messages:
        no_keys = _NO_KEYS_FOR.match(message)
        if no_keys:
            if text_encoder_trained or not no_keys.group(1).startswith("CLIPTextModel"):
                problems.append(message)
        elif _KEY_PROBLEM.search(message):
            problems.append(message)
    return problems


def test_key_problems_catches_what_diffusers_logs_for_a_bad_file():
    """The assertion below must still fail on a real mismatch: feed it diffusers' own warnings."""
    from types import SimpleNamespace

    from diffusers.utils.peft_utils import _maybe_warn_for_unhandled_keys

    with library_warnings() as messages:
        _maybe_warn_for_unhandled_keys(SimpleNamespace(unexpected_keys=["down.0.to_q.lora_A.weight"], missing_keys=[
            "up.1.to_k.lora_B.default_0.weight"]), "default_0")
    assert len(messages) == 1 and len(key_problems(messages, text_encoder_trained=False)) == 1
    no_te_keys = ("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is safe to "
                  "ignore if LoRA state dict didn't originally have any CLIPTextModel related params. Otherwise, open "
                  "an issue if you think it's unexpected: https://github.com/huggingface/diffusers/issues/new")
    assert key_problems([no_te_keys], text_encoder_trained=False) == []
    assert key_problems([no_te_keys], text_encoder_trained=True) == [no_te_keys]
    assert key_problems([no_te_keys.replace("CLIPTextModel", "UNet2DConditionModel")], False)


@pytest.mark.parametrize("family_fixture, train_te", [("tiny_sd1", True), ("tiny_sd2v", False), ("tiny_sdxl", True)])
def test_each_family_trains_exports_and_loads_in_diffusers(family_fixture, train_te, tiny_dataset, tmp_path, request):
    model = request.getfixturevalue(family_fixture)
    job = tiny_job(model, tiny_dataset, tmp_path / "run", lora__train_text_encoder=train_te, training__steps=4,
                   training__lr=1e-2)
    events = collect(job)
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    pipe = _load_pipe(model)
    base = _image(pipe)
    with library_warnings() as messages:
        pipe.load_lora_weights(str(events[-1].lora_path))
    assert not key_problems(messages, train_te), messages
    with_lora = _image(pipe)
    assert not torch.equal(base, with_lora), "the LoRA must change the image"
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=0.0)
    assert torch.equal(_image(pipe), base), "at LoRA scale 0 the base image comes back exactly"


def test_stop_gives_a_usable_partial_lora(tiny_sd1, tiny_dataset, tmp_path):
    stop = threading.Event()
    events = []
    for event in run_training(tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", training__steps=50), stop):
        events.append(event)
        if isinstance(event, StepCompleted) and event.step == 2:
            stop.set()
    assert_grammar(events)
    cancelled = events[-1]
    assert isinstance(cancelled, RunCancelled) and cancelled.step == 2
    assert cancelled.lora_path and cancelled.lora_path.is_file()
    assert any(isinstance(e, CheckpointSaved) for e in events)
    pipe = _load_pipe(tiny_sd1)
    pipe.load_lora_weights(str(cancelled.lora_path))


def test_pause_waits_at_a_step_boundary_then_resumes(tiny_sd1, tiny_dataset, tmp_path):
    pause = threading.Event()
    events = []
    for event in run_training(tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", training__steps=3), pause=pause):
        events.append(event)
        if isinstance(event, StepCompleted) and event.step == 1:
            pause.set()
            threading.Timer(0.3, pause.clear).start()
    phases = [e.phase for e in events if isinstance(e, StatusChanged)]
    assert "Paused" in phases and isinstance(events[-1], RunFinished)


def test_invalid_job_fails_before_heavy_work_naming_every_field(tmp_path):
    job = Job()
    job.dataset.path = str(tmp_path / "missing")
    job.lora.rank = 0
    job.output.dir = str(tmp_path / "out")
    events = collect(job)
    assert len(events) == 1 and isinstance(events[0], RunFailed)
    assert "dataset.path" in events[0].message and "lora.rank" in events[0].message
    assert not (tmp_path / "out").exists()


def test_learning_is_real(tiny_sd1, tmp_path):
    """A LoRA trained hard on four images clearly lowers their denoising loss at fixed noise and timesteps."""
    from fixtures_data import make_dataset
    from studio.engine.checkpoint import load_model
    from studio.engine.dataset import load_image, prepare_image

    data = make_dataset(tmp_path / "data", count=4)
    job = tiny_job(tiny_sd1, data, tmp_path / "run", training__steps=150, training__lr=5e-3, lora__rank=8, lora__targets="+conv",
                   lora__alpha=8.0, training__max_grad_norm=1.0)
    done = collect(job)[-1]
    assert isinstance(done, RunFinished), getattr(done, "details", done)

    bundle = load_model(job.model)
    pipe_unet, vae, sched = bundle.denoiser, bundle.vae, bundle.noise_scheduler
    items = sorted(data.glob("*.png"))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = torch.cat([vae.encode(prepare_image(load_image(p), (64, 64))[0][None]).latent_dist.mean for p in items])
        latents = latents * vae.config.scaling_factor
        cond = bundle.family.encode_text(bundle, [p.with_suffix(".txt").read_text() for p in items])["hidden"]
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(100, 900, (len(items),), generator=g)
        noisy = sched.add_noise(latents, noise, timesteps)

        def loss() -> float:
            return torch.nn.functional.mse_loss(pipe_unet(noisy, timesteps, cond).sample, noise).item()

        before = loss()
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0],
                                       unet=pipe_unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.load_lora_weights(str(done.lora_path))
        after = loss()
    assert after < 0.8 * before, (before, after)
