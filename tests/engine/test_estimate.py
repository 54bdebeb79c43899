"""The pre-flight estimate: counted FLOPs, the cost-model constants checked against a real count, GPU-fit warnings."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from studio.engine import estimate as est
from studio.engine.config import Job
from studio.engine.estimate import Estimate, estimate, format_duration, planned_steps
from studio.engine.families import get_family

GB = 10**9
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ holds the recorded runs and the code that re-estimates them
    sys.path.insert(0, str(ROOT))


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
    """SD1.5's 192 kohya modules at rank 16: A (16×in) and B (out×16) for each wrapped Linear/Conv."""
    from diffusers import UNet2DConditionModel

    from studio.engine.config import LoraSection
    from studio.engine.lora import matching_modules, target_modules
    from studio.paths import resource_path

    config = json.loads((resource_path("model_configs", "sd1") / "unet" / "config.json").read_text())
    count = est.lora_param_count("sd1", json.dumps(config, sort_keys=True), LoraSection(rank=16))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    modules = dict(unet.named_modules())
    wrapped = [modules[n] for n in matching_modules(unet, target_modules("sd1", "kohya-default", "unet"))]
    assert len(wrapped) == 192  # kohya's module set on SD1.5 (FACTS.md)
    sizes = [(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear)
             else (m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels) for m in wrapped]
    assert count == sum(16 * (i + o) for i, o in sizes)


@pytest.mark.parametrize("targets", ["attention", "kohya-default", "+conv"])
def test_lora_parameter_count_matches_a_real_injection(tiny_sd1, targets):
    """Against the job's adapters injected into the real (CPU) tiny UNet the way a run does, conv ranks included."""
    from studio.engine.checkpoint import load_model
    from studio.engine.config import LoraSection, ModelSection
    from studio.engine.lora import inject_lora

    lora = LoraSection(rank=4, targets=targets, conv_rank=2)
    bundle = load_model(ModelSection(path=str(tiny_sd1)))
    params = inject_lora(bundle, lora, train_text_encoder=False)
    config = json.loads((tiny_sd1 / "unet" / "config.json").read_text())
    assert est.lora_param_count("sd1", json.dumps(config, sort_keys=True), lora) == sum(p.numel() for p in params["unet"])


def test_adapter_types_count_their_own_parameters(tiny_sd1):
    """LoHa carries two rank-r pairs per layer (twice LoRA's), DoRA adds one magnitude per output feature, LoKr's
    Kronecker factors are far smaller than LoRA's pair at the same rank (the estimate used to count all as LoRA)."""
    from studio.engine.config import LoraSection

    config = json.dumps(json.loads((tiny_sd1 / "unet" / "config.json").read_text()), sort_keys=True)
    count = {name: est.lora_param_count("sd1", config, LoraSection(rank=8, targets="attention", **kw))
             for name, kw in {"lora": {}, "loha": {"algorithm": "loha"}, "lokr": {"algorithm": "lokr"},
                              "dora": {"dora": True}}.items()}
    assert count["loha"] == 2 * count["lora"]
    assert count["lora"] < count["dora"] < 1.5 * count["lora"]
    assert count["lokr"] < count["lora"] / 2


@pytest.mark.slow
def test_cost_model_constants_match_a_counted_sd15_lora_step():
    """STEP_OVER_FORWARD, CHECKPOINTING_OVERHEAD and the op-count model against a real SD1.5 LoRA step
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
    modules = est.lora_module_count("sd1", json.dumps(config, sort_keys=True), "kohya-default")
    assert modules == 192
    assert step_ops == pytest.approx(forward_ops * est.OPS_STEP_OVER_FORWARD + modules * est.OPS_PER_LORA_MODULE,
                                     rel=0.1)


def test_uncached_steps_add_the_counted_vae_and_text_encoder(tiny_sd1):
    job = Job()
    job.model.path = str(tiny_sd1)
    job.dataset.resolution = 64
    cached = estimate(job, device="cpu", calibrate=False)
    job.training.cache_latents = False
    no_latents = estimate(job, device="cpu", calibrate=False)
    job.training.cache_text_embeddings = False
    nothing = estimate(job, device="cpu", calibrate=False)
    assert nothing.step_tflop > no_latents.step_tflop > cached.step_tflop
    assert nothing.seconds_per_step > no_latents.seconds_per_step > cached.seconds_per_step


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



# ------------------------------------------------------------------------------- orderings that must hold


def small_job(**settings) -> Job:
    """A job on the benchmark's small SD model's configs (benchmarks/models.py SMALL), from the recorded runs."""
    from benchmarks.estimate_check import RESULTS

    record = json.loads(RESULTS.read_text())["records"][0]
    folder = Path(tempfile.mkdtemp(prefix="estimate-small-"))
    for name, config in record["configs"].items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    job = Job()
    job.model.path = str(folder)
    job.model.family = "sd1"
    job.dataset.resolution = 256
    job.sampling.every = 0
    from studio.engine.config import apply_overrides

    apply_overrides(job, settings)
    return job


def cpu_seconds(job: Job) -> float:
    return estimate(job, device="cpu", peak_tflops=0.2).seconds_per_step


def test_cpu_step_time_grows_with_the_work():
    base = cpu_seconds(small_job())
    assert cpu_seconds(small_job(**{"dataset.resolution": 320})) > base > cpu_seconds(small_job(**{"dataset.resolution": 192}))
    assert cpu_seconds(small_job(**{"training.gradient_checkpointing": True})) > base
    assert cpu_seconds(small_job(**{"training.cache_latents": False})) > base
    assert cpu_seconds(small_job(**{"training.gradient_accumulation": 2})) > 1.9 * base
    # More adapted modules, more ops per step: +conv > kohya-default > attention.
    conv, attention = (cpu_seconds(small_job(**{"lora.targets": t})) for t in ("+conv", "attention"))
    assert conv > base > attention
    # A slower device: a longer step.
    assert estimate(small_job(), device="cpu", peak_tflops=0.1).seconds_per_step > base


def test_cpu_batches_cost_less_per_image_but_more_per_step():
    one, four = (cpu_seconds(small_job(**{"training.batch_size": b})) for b in (1, 4))
    assert one < four < 4 * one


def test_gpu_small_batches_are_launch_bound_and_big_ones_are_not(card_24gb):
    small = estimate(family_job("sd1", 512, 1), device="cuda", calibrate=False)
    big = estimate(family_job("sdxl", 1024, 8, checkpointing=True), device="cuda", calibrate=False)
    assert small.launch_bound and not big.launch_bound
    # Launch-bound: batch 8 costs (nearly) the same per step as batch 1, so images/s grows.
    eight = estimate(family_job("sd1", 512, 8), device="cuda", calibrate=False)
    assert eight.seconds_per_step < 8 * small.seconds_per_step


def test_the_hours_warning_follows_the_total_time():
    quick = small_job(**{"training.steps": 10})
    long = small_job(**{"training.steps": 100_000})
    assert not any("hours" in w for w in estimate(quick, device="cpu", peak_tflops=0.2).warnings)
    assert any("hours" in w for w in estimate(long, device="cpu", peak_tflops=0.2).warnings)


# ----------------------------------------------------------------------------------------- previews


def test_preview_rounds_follow_the_trainers_cadence():
    job = Job()
    job.sampling.every = 100
    assert est.preview_rounds(job, 1000) == 11  # step 0, 100, ..., 1000
    assert est.preview_rounds(job, 1050) == 12  # ... and the last step, off the cadence
    job.sampling.every = 0
    assert est.preview_rounds(job, 1000) == 0


def test_auto_preview_cadence_is_counted_as_the_run_will_pick_it(tiny_sd1, tiny_dataset):
    """'auto' (-1, the default) used to count 1 - steps rounds: a negative preview time in every default estimate."""
    from studio.engine.sampling import auto_preview_cadence

    job = Job()
    assert job.sampling.every == -1
    assert est.preview_rounds(job, 1000, seconds_per_step=3.0) == 1 + 1000 // auto_preview_cadence(3.0)
    assert est.preview_rounds(job, 1000, seconds_per_step=None) > 0
    job.model.path, job.dataset.path, job.dataset.resolution = str(tiny_sd1), str(tiny_dataset), 64
    e = est.estimate(job, device="cpu", calibrate=False)
    assert e.previews == est.preview_rounds(job, e.total_steps, e.seconds_per_step) > 0 and e.preview_seconds > 0
    assert e.total_seconds > e.seconds_per_step * e.total_steps


def test_previews_add_their_cost_to_the_total():
    def run(**sampling):
        job = small_job(**{"training.steps": 400, **{f"sampling.{k}": v for k, v in sampling.items()}})
        return estimate(job, device="cpu", peak_tflops=0.2)

    off = run(every=0)
    on = run(every=100)
    assert off.previews == 0 and off.preview_seconds == 0 and off.total_seconds == pytest.approx(400 * off.seconds_per_step)
    assert on.previews == 5 and on.preview_seconds > 0
    assert on.total_seconds == pytest.approx(off.total_seconds + on.preview_seconds)
    assert on.seconds_per_step == off.seconds_per_step  # previews are not steps
    # Each factor of the cost: prompts, sampler steps, classifier-free guidance, cadence.
    assert run(every=100, prompts=["a", "b", "c"]).preview_seconds > on.preview_seconds  # default: 2 prompts
    assert run(every=100, steps=40).preview_seconds > on.preview_seconds
    assert run(every=100, guidance=1.0).preview_seconds < on.preview_seconds  # no CFG: half the batch
    assert run(every=50).preview_seconds > on.preview_seconds
    assert "previews" in on.summary


# ------------------------------------------------------------------------------------- how good it is


def test_estimate_holds_within_its_error_band_on_recorded_held_out_runs():
    """The CPU estimate, as committed, against measured runs it was not fitted on (benchmarks/results, recorded by
    `python -m benchmarks.run --suite estimate`): each measured time must fall in HELD_OUT_ERROR["cpu"].
    Changing a constant or the cost model in a way the measurements contradict fails here."""
    from benchmarks.estimate_check import RESULTS, evaluate

    records = [r for r in json.loads(RESULTS.read_text())["records"] if r["ok"]]
    held_out = [r for r in records if r["role"] == "held-out"]
    assert len(held_out) >= 6 and {r["role"] for r in records} == {"fit", "held-out"}
    low, high = est.HELD_OUT_ERROR["cpu"]
    assert -1 < low < 0 < high  # a band, around the estimate
    for record in held_out:
        error = evaluate(record)["error"]
        assert low <= error <= high, (record["name"], error)


def test_gpu_estimates_say_they_are_uncalibrated(card_24gb):
    gpu = estimate(family_job("sd1", 512, 1), device="cuda", calibrate=False)
    cpu = estimate(small_job(), device="cpu", peak_tflops=0.2)
    assert not gpu.calibrated and gpu.seconds_range(1.0) is None and "uncalibrated" in gpu.summary
    assert cpu.calibrated and "not fitted on" in cpu.summary
    lo, hi = cpu.seconds_range(cpu.seconds_per_step)
    assert lo < cpu.seconds_per_step < hi
