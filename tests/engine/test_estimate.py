"""The pre-flight estimate: counted FLOPs, the cost-model constants checked against a real count, GPU-fit warnings."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from studio.engine import estimate as est
from studio.engine.config import Job
from studio.engine.estimate import Estimate, estimate, format_duration, planned_steps
from studio.engine.families import get_family

GB = 10**9


def family_job(family: str, resolution: int, batch: int, *, checkpointing: bool = False) -> Job:
    """A job on the bundled full-size config of ``family`` (no weights needed: the estimate reads configs only)."""
    job = Job()
    job.model.path = "/nowhere/model.safetensors"
    job.model.family = family
    job.dataset.resolution = resolution
    job.training.batch_size = batch
    job.training.gradient_checkpointing = checkpointing
    return job


@pytest.fixture
def card_24gb(monkeypatch):
    """Pretend a 24 GB NVIDIA card is present (only its properties are read, nothing runs on it)."""
    props = SimpleNamespace(name="NVIDIA Test 24GB", total_memory=24 * GB, major=8, minor=9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return props


def test_sdxl_1024_batch_8_without_checkpointing_warns_on_24gb(card_24gb):
    e = estimate(family_job("sdxl", 1024, 8), device="cuda", calibrate=False)
    assert e.gpu_total_bytes == 24 * GB and e.gpu_memory_bytes > 24 * GB
    assert len(e.warnings) == 1 and "not fit" in e.warnings[0]
    assert "gradient checkpointing" in e.warnings[0] and "batch size" in e.warnings[0]
    assert e.device == "NVIDIA Test 24GB"
    assert "GPU memory" in e.summary and "warning:" in e.summary


def test_sdxl_1024_batch_8_with_checkpointing_fits_on_24gb(card_24gb):
    e = estimate(family_job("sdxl", 1024, 8, checkpointing=True), device="cuda", calibrate=False)
    assert e.gpu_memory_bytes < 0.9 * 24 * GB and e.warnings == []


def test_sd15_512_batch_1_fits_on_24gb_without_warning(card_24gb):
    e = estimate(family_job("sd1", 512, 1), device="cuda", calibrate=False)
    assert e.warnings == []
    # Weights (bf16) + VAE + LoRA state + activations + context: a few GB, as SD1.5 LoRA training is known to need.
    assert 2.5 * GB < e.gpu_memory_bytes < 6 * GB


def test_a_nearly_full_card_gets_a_may_not_fit_warning(card_24gb):
    job = family_job("sd1", 512, 1)
    need = estimate(job, device="cuda", calibrate=False).gpu_memory_bytes
    card_24gb.total_memory = int(need / 0.95)
    e = estimate(job, device="cuda", calibrate=False)
    assert len(e.warnings) == 1 and "may not fit" in e.warnings[0]


def test_memory_follows_the_settings(card_24gb):
    base = estimate(family_job("sd1", 512, 4), device="cuda", calibrate=False).gpu_memory_bytes
    ckpt = estimate(family_job("sd1", 512, 4, checkpointing=True), device="cuda", calibrate=False).gpu_memory_bytes
    job = family_job("sd1", 512, 4)
    job.training.mixed_precision = "no"
    fp32 = estimate(job, device="cuda", calibrate=False).gpu_memory_bytes
    job = family_job("sd1", 512, 4)
    job.dataset.shuffle_tags = True  # captions change every step: the text encoder stays on the GPU
    te = estimate(job, device="cuda", calibrate=False).gpu_memory_bytes
    assert ckpt < base < fp32 and te > base


def test_lora_parameter_count_is_exact():
    """SD1.5's 192 kohya modules at rank 16, against the adapters peft builds (on meta: no memory)."""
    from diffusers import UNet2DConditionModel

    from studio.engine.config import LoraSection
    from studio.engine.lora import lora_config
    from studio.paths import resource_path

    from peft.tuners.lora import LoraLayer

    config = json.loads((resource_path("model_configs", "sd1") / "unet" / "config.json").read_text())
    count = est.lora_param_count("sd1", json.dumps(config, sort_keys=True), "kohya-default", 16)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        unet.requires_grad_(False)
        unet.add_adapter(lora_config(LoraSection(rank=16), "sd1", "unet", unet))
    assert sum(isinstance(m, LoraLayer) for m in unet.modules()) == 192  # kohya's module set on SD1.5 (FACTS.md)
    assert count == sum(p.numel() for p in unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("targets", ["attention", "kohya-default", "+conv"])
def test_lora_parameter_count_matches_peft(tiny_sd1, targets):
    """Against the adapters peft really builds, convolutions (with their own conv rank) included."""
    from diffusers import UNet2DConditionModel

    from studio.engine.config import LoraSection
    from studio.engine.lora import lora_config

    config = json.loads((tiny_sd1 / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(LoraSection(rank=4, targets=targets, conv_rank=2), "sd1", "unet", unet))
    real = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert est.lora_param_count("sd1", json.dumps(config, sort_keys=True), targets, 4, 2) == real


@pytest.mark.slow
def test_cost_model_constants_match_a_counted_sd15_lora_step():
    """STEP_OVER_FORWARD, CHECKPOINTING_OVERHEAD and OPS_STEP_OVER_FORWARD against a real SD1.5 LoRA step
    (forward + backward with peft adapters) counted on the meta device, where it costs no memory."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from studio.engine.config import LoraSection
    from studio.engine.lora import lora_config
    from studio.paths import resource_path

    config = json.loads((resource_path("model_configs", "sd1") / "unet" / "config.json").read_text())
    forward, forward_ops = est.denoiser_cost("sd1", json.dumps(config, sort_keys=True), 512, 512, 1, 8)
    counted = {}
    for ckpt in (False, True):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
            unet.requires_grad_(False)
            unet.add_adapter(lora_config(LoraSection(rank=16), "sd1", "unet", unet))
            if ckpt:
                unet.enable_gradient_checkpointing()
            unet.train()
            (x, t, ctx), _ = get_family("sd1").denoiser_example_inputs(config, 1, 64, 64)
        ops = est._OpCounter()
        with FlopCounterMode(display=False) as flops, ops:
            unet(x, t, ctx).sample.float().pow(2).mean().backward()
        counted[ckpt] = (flops.get_total_flops(), ops.ops)
    step, step_ops = counted[False]
    assert forward == pytest.approx(0.80e12, rel=0.03)  # FACTS.md: SD1.5 forward at 512 px ≈ 0.80 TFLOP
    assert step / forward == pytest.approx(est.STEP_OVER_FORWARD, rel=0.05)
    assert counted[True][0] / step == pytest.approx(est.CHECKPOINTING_OVERHEAD, rel=0.05)
    assert step_ops / forward_ops == pytest.approx(est.OPS_STEP_OVER_FORWARD, rel=0.1)


def test_uncached_steps_add_the_counted_vae_and_text_encoder(tiny_sd1):
    job = Job()
    job.model.path = str(tiny_sd1)
    job.dataset.resolution = 64
    cached = estimate(job, device="cpu", calibrate=False)
    job.training.cache_latents = False
    no_latents = estimate(job, device="cpu", calibrate=False)
    job.training.cache_text_embeddings = False
    nothing = estimate(job, device="cpu", calibrate=False)
    vae_config = json.loads((tiny_sd1 / "vae" / "config.json").read_text())
    vae = est.vae_encode_flops(json.dumps(vae_config, sort_keys=True), 64, 64, 1)
    te = get_family("sd1").text_encoder_flops(tiny_sd1, 1)
    assert vae > 0 and te > 0
    assert no_latents.step_tflop * 1e12 == pytest.approx(cached.step_tflop * 1e12 + vae, rel=1e-6)
    assert nothing.step_tflop * 1e12 == pytest.approx(no_latents.step_tflop * 1e12 + te, rel=1e-6)
    assert nothing.seconds_per_step > no_latents.seconds_per_step > cached.seconds_per_step


def test_checkpointing_accumulation_and_batch_scale_the_work(tiny_sd1):
    def flops(**training) -> float:
        job = Job()
        job.model.path = str(tiny_sd1)
        job.dataset.resolution = 64
        for k, v in training.items():
            setattr(job.training, k, v)
        return estimate(job, device="cpu", calibrate=False).step_tflop

    one = flops()
    assert flops(gradient_checkpointing=True) == pytest.approx(one * est.CHECKPOINTING_OVERHEAD)
    assert flops(gradient_accumulation=3) == pytest.approx(one * 3)
    assert flops(batch_size=2) == pytest.approx(one * 2, rel=0.05)


def test_small_gpu_steps_are_launch_bound(card_24gb):
    """SD1.5 at batch 1 on a fast GPU: ~9 k eager ops per step cost more than its FLOPs (FACTS.md)."""
    e = estimate(family_job("sd1", 512, 1), device="cuda", calibrate=False)
    assert e.launch_bound
    assert e.seconds_per_step == pytest.approx(9400 * est.OP_OVERHEAD_S["cuda"], rel=0.1)
    big = estimate(family_job("sdxl", 1024, 8, checkpointing=True), device="cuda", calibrate=False)
    assert not big.launch_bound


def test_epochs_count_the_dataset(tmp_path):
    from PIL import Image

    (tmp_path / "data" / "3_faces").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / f"a{i}.png")
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "3_faces" / f"f{i}.jpg")
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    job = Job()
    job.dataset.path = str(tmp_path / "data")
    job.training.epochs = 2
    job.training.batch_size = 2
    assert planned_steps(job) == 2 * ((4 + 2 * 3) // 2)  # 4 images + 2 × 3 repeats, 2 per batch
    job.training.epochs = 0
    job.training.steps = 77
    assert planned_steps(job) == 77


def test_cpu_estimate_uses_the_calibration_and_warns_about_hours(tiny_sd1, monkeypatch):
    monkeypatch.setattr(est, "calibrate_tflops", lambda device_type, dtype=None, seconds=0.3: 1e-6)
    job = Job()
    job.model.path = str(tiny_sd1)
    job.dataset.resolution = 64
    e = estimate(job, device="cpu")
    assert e.peak_tflops == 1e-6 and e.gpu_memory_bytes is None
    assert e.seconds_per_step == pytest.approx(e.step_tflop / (1e-6 * est.ACHIEVED_FRACTION["cpu"]))
    assert e.total_seconds == pytest.approx(e.seconds_per_step * 1000) and e.total_steps == 1000
    assert any("hours" in w for w in e.warnings)


def test_cpu_bf16_is_estimated_from_the_fp32_calibration(tiny_sd1, monkeypatch):
    """bf16 matmuls calibrate several times faster on AVX-512 CPUs, but a bf16 step was measured barely faster."""
    asked = []
    monkeypatch.setattr(est, "calibrate_tflops", lambda device_type, dtype=None, seconds=0.3: asked.append(dtype) or 0.1)
    job = Job()
    job.model.path = str(tiny_sd1)
    job.dataset.resolution = 64
    job.training.mixed_precision = "bf16"
    estimate(job, device="cpu")
    assert asked == [torch.float32]


def test_bigger_cpu_batches_are_estimated_more_efficient(tiny_sd1):
    def per_image(batch: int) -> float:
        job = Job()
        job.model.path = str(tiny_sd1)
        job.dataset.resolution = 64
        job.training.batch_size = batch
        return estimate(job, device="cpu", calibrate=False).seconds_per_step / batch

    assert per_image(4) == pytest.approx(per_image(1) / 4**est.BATCH_EXPONENT["cpu"], rel=0.05)


def test_calibration_measures_something_plausible():
    tflops = est.calibrate_tflops("cpu", torch.float32, 0.15)
    assert 1e-4 < tflops < 100


def test_format_duration():
    assert format_duration(0.25) == "250 ms"
    assert format_duration(12.34) == "12.3 s"
    assert format_duration(125) == "2 min 5 s"
    assert format_duration(7260) == "2 h 1 min"


def test_cli_estimate_prints_without_training(tiny_sd1, tiny_dataset, tmp_path, capsys):
    from studio.cli import main

    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(out), "--resolution",
                 "64", "--steps", "10", "--estimate"])
    text = capsys.readouterr().out
    assert code == 0 and "per step" in text and "(10 steps)" in text and "on CPU" in text
    assert not out.exists()


def test_estimate_of_the_builtin_demo_model():
    e = estimate(Job(), device="cpu", calibrate=False)
    assert isinstance(e, Estimate) and e.seconds_per_step > 0 and e.step_tflop > 0
