"""Settings of the DDPM families that FLUX.1 and SD3 do not use (noise offset, min-SNR weighting, long captions,
clip skip) are said to have no effect when a run starts, and the LoRA's metadata records what training did, not
the ignored values (measured: a tiny FLUX.1 run with them set gives the very same losses as one without)."""

from __future__ import annotations

import torch
from safetensors import safe_open

from fixtures_data import make_dataset
from fixtures_runs import tiny_job
from studio.engine.config import TrainingSection
from studio.engine.events import LogMessage, RunFinished
from studio.engine.families import get_family
from studio.engine.trainer import run_training

SET = dict(training__noise_offset=0.1, training__min_snr_gamma=5.0, training__max_token_length=225,
           training__clip_skip=2)


def test_a_flux_run_says_which_settings_it_ignores_and_its_metadata_does_not_claim_them(tiny_model, tmp_path):
    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "data", count=2)
    job = tiny_job(tiny_model("flux-dev", "flow"), data, tmp_path / "run", training__steps=1, **SET)
    events = list(run_training(job))
    assert isinstance(events[-1], RunFinished)
    warnings = [e.message for e in events if isinstance(e, LogMessage) and e.level == "warning"]
    said = [w for w in warnings if "no effect" in w]
    assert len(said) == 1, warnings
    for field in ("training.noise_offset", "training.min_snr_gamma", "training.max_token_length", "training.clip_skip"):
        assert field in said[0]
    with safe_open(str(tmp_path / "run" / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_noise_offset"], meta["ss_min_snr_gamma"]) == ("0.0", "0.0")
    assert (meta["ss_max_token_length"], meta["ss_clip_skip"]) == ("None", "None")  # kohya's "not used"


def test_only_the_settings_a_family_ignores_and_only_when_set():
    training = TrainingSection(noise_offset=0.1, min_snr_gamma=5.0, max_token_length=225, clip_skip=2)
    assert get_family("sd1").unused_training_options(training) == []
    assert get_family("sd3.5-large").unused_training_options(TrainingSection()) == []
    assert sorted(get_family("sd3.5-large").unused_training_options(training)) == [
        "training.clip_skip", "training.max_token_length", "training.min_snr_gamma", "training.noise_offset"]
