"""The speed and memory switches do what they say, the GPU path's pieces that a CPU can check, and no leaks.

Speed claims live in benchmarks/RESULTS.md (measured by ``python -m benchmarks.run``); these tests check the
mechanisms: each job field reaches the model/optimizer, refusals are readable, memory is released after a run,
sampling shares the training modules, and the hot loop does not read device values every step.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fixtures_runs

from studio.engine import devices, run_setup, trainer
from studio.engine.config import Job
from studio.engine.events import RunFailed, RunFinished, StatusChanged, StepCompleted
from studio.engine.optim import OptimizerUnavailable, adamw_kernel_options, make_optimizer


def tiny_job(model: Path, data: Path, out: Path, **training) -> Job:
    """The shared tiny job, 2 steps, with ``training`` settings given by their plain names."""
    return fixtures_runs.tiny_job(model, data, out, **{f"training__{key}": value
                                                       for key, value in {"steps": 2, **training}.items()})


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide AcceleratorState; a test that trains in another precision resets it
    afterwards so later tests (which train in fp32) are not refused. See test_precision_can_change_between_runs."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


@pytest.fixture
def tiny_unet(tiny_sd1):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")


def fake_run(unet, **training) -> SimpleNamespace:
    """Just what run_setup.apply_speed_options reads: the job and the bundle's family and modules."""
    from studio.engine.families import get_family

    job = Job()
    for key, value in training.items():
        setattr(job.training, key, value)
    return SimpleNamespace(job=job, device=torch.device("cpu"), buckets=[(64, 64)],
                           bundle=SimpleNamespace(family=get_family("sd1"), denoiser=unet, text_encoders=[]))


# ------------------------------------------------------------------------------------- the switches


def test_default_switches_leave_sdpa_and_eager_modules(tiny_unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    run_setup.apply_speed_options(fake_run(tiny_unet))
    assert {type(p) for p in tiny_unet.attn_processors.values()} == {AttnProcessor2_0}
    assert not tiny_unet.is_gradient_checkpointing
    assert tiny_unet.conv_in.weight.is_contiguous()


def test_classic_attention_checkpointing_and_channels_last_reach_the_unet(tiny_unet):
    from diffusers.models.attention_processor import AttnProcessor

    run_setup.apply_speed_options(fake_run(tiny_unet, attention="classic", gradient_checkpointing=True,
                                          channels_last=True))
    assert {type(p) for p in tiny_unet.attn_processors.values()} == {AttnProcessor}
    assert tiny_unet.is_gradient_checkpointing
    assert tiny_unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_wraps_each_transformer_block_not_the_whole_unet(tiny_unet):
    """Compilation itself is lazy (first call); here only that the blocks are marked, which costs nothing."""
    run_setup.apply_speed_options(fake_run(tiny_unet, compile=True))
    blocks = [m for m in tiny_unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    assert getattr(tiny_unet, "_compiled_call_impl", None) is None


def test_compile_scope_denoiser_compiles_the_whole_unet_in_place(tiny_unet):
    """In place, so peft, accelerate and the preview pipeline, which hold this module, all run it compiled."""
    run_setup.apply_speed_options(fake_run(tiny_unet, compile=True, compile_scope="denoiser"))
    assert getattr(tiny_unet, "_compiled_call_impl", None) is not None
    blocks = [m for m in tiny_unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is None for b in blocks)


def test_tf32_changes_nothing_on_the_cpu(tiny_unet):
    """Process-wide PyTorch switches: a CPU run must leave them alone (CPU results stay bit-identical)."""
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
              torch.get_float32_matmul_precision())
    assert devices.set_tf32(torch.device("cpu"), True) is False
    run_setup.apply_speed_options(fake_run(tiny_unet, tf32=True))
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.get_float32_matmul_precision()) == before


def test_all_cpu_switches_together_still_train(tiny_sd1, tiny_dataset, tmp_path, monkeypatch, fresh_accelerate_state):
    """bf16 autocast on the CPU, classic attention, checkpointing, channels_last and the loop optimizer."""
    seen = {}
    real_apply, real_make = run_setup.apply_speed_options, run_setup.make_optimizer

    def spy_apply(run):
        real_apply(run)
        seen["precision"] = run.accelerator.mixed_precision
        seen["weight_dtype"] = run.weight_dtype

    def spy_make(params, job, device):
        seen["optimizer"] = opt = real_make(params, job, device)
        return opt

    monkeypatch.setattr(run_setup, "apply_speed_options", spy_apply)
    monkeypatch.setattr(run_setup, "make_optimizer", spy_make)
    job = tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", mixed_precision="bf16", attention="classic",
                   gradient_checkpointing=True, channels_last=True, fused_optimizer=False, batch_size=2)
    events = list(trainer.run_training(job))
    assert isinstance(events[-1], RunFinished), events[-1]
    losses = [e.loss for e in events if isinstance(e, StepCompleted)]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert seen["precision"] == "bf16" and seen["weight_dtype"] == torch.bfloat16
    assert seen["optimizer"].defaults["foreach"] is False and seen["optimizer"].defaults["fused"] is False


def test_precision_can_change_between_runs(tiny_sd1, tiny_dataset, tmp_path, fresh_accelerate_state):
    """The app trains several jobs in one process: fp32 then bf16 must both run."""
    for n, precision in enumerate(("no", "bf16")):
        events = list(trainer.run_training(tiny_job(tiny_sd1, tiny_dataset, tmp_path / f"run{n}",
                                                    mixed_precision=precision, steps=1)))
        assert isinstance(events[-1], RunFinished), getattr(events[-1], "message", events[-1])


# ------------------------------------------------------------------------------------------ optimizer


def lora_params() -> dict[str, list[torch.nn.Parameter]]:
    return {"unet": [torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))]}


@pytest.mark.parametrize(("device", "fast", "expected"), [
    ("cpu", True, {"fused": True}),
    ("cuda", True, {"fused": True}),
    ("mps", True, {"foreach": True}),
    ("cpu", False, {"foreach": False, "fused": False}),
    ("cuda", False, {"foreach": False, "fused": False}),
])
def test_adamw_kernel_choice(device, fast, expected):
    assert adamw_kernel_options(torch.device(device), fast) == expected


def test_fused_adamw_runs_on_the_cpu():
    job = Job()
    params = lora_params()
    opt = make_optimizer(params, job, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    before = params["unet"][0].detach().clone()
    for p in params["unet"]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(before, params["unet"][0])


def test_adamw8bit_is_refused_on_the_cpu_with_the_alternative():
    job = Job()
    job.training.optimizer = "adamw8bit"
    with pytest.raises(OptimizerUnavailable) as info:
        make_optimizer(lora_params(), job, torch.device("cpu"))
    message = str(info.value)
    assert "NVIDIA GPU" in message and "CPU" in message and "'adamw'" in message and "training.optimizer" in message


def test_adamw8bit_without_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    job = Job()
    job.training.optimizer = "adamw8bit"
    with pytest.raises(OptimizerUnavailable, match="pip install bitsandbytes"):
        make_optimizer(lora_params(), job, torch.device("cuda"))


def test_adamw8bit_on_a_cpu_run_fails_with_that_sentence(tiny_sd1, tiny_dataset, tmp_path):
    job = tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", optimizer="adamw8bit", device="cpu")
    events = list(trainer.run_training(job))
    assert isinstance(events[-1], RunFailed)
    assert "training.optimizer: 8-bit AdamW (bitsandbytes) needs an NVIDIA GPU" in events[-1].message
    # refused by validation, before minutes of loading and caching
    assert not any(isinstance(e, StatusChanged) and e.phase == "Loading model" for e in events)


# -------------------------------------------------------------------------------------------- devices


def test_precision_resolution(monkeypatch):
    assert devices.resolve_precision("auto", cpu=True) == "no"
    assert devices.resolve_precision("bf16", cpu=True) == "bf16"
    assert devices.resolve_precision("fp16", cpu=False) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.resolve_precision("auto", cpu=False) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a Turing card
    assert devices.resolve_precision("auto", cpu=False) == "fp16"


def test_device_choice_and_description(monkeypatch):
    assert devices.pick_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.pick_device("auto").type == "cuda"
    props = SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=25_757_220_864)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    assert devices.describe_device("cuda") == "NVIDIA GeForce RTX 4090, 25.8 GB"
    assert devices.describe_device("cpu").startswith("CPU (")


def test_usable_device_problem(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.device_problem("auto") is None and devices.device_problem("cpu") is None
    assert "no NVIDIA GPU" in devices.device_problem("cuda")
    assert "Apple" in devices.device_problem("mps")


def test_estimate_for_cuda_without_a_gpu_falls_back_to_cpu_and_says_so(tiny_sd1, monkeypatch):
    from studio.engine.estimate import estimate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job = Job()
    job.model.path = str(tiny_sd1)
    job.dataset.resolution = 64
    job.training.device = "cuda"
    e = estimate(job, calibrate=False)
    assert e.device == "CPU" and e.gpu_memory_bytes is None
    assert any("no NVIDIA GPU" in w for w in e.warnings)


# ------------------------------------------------------------------------------ memory and sharing


def _rss_after_gc() -> int:
    import psutil

    gc.collect()
    if sys.platform.startswith("linux"):
        # Give freed heap pages back to the OS first: otherwise glibc keeps them and RSS shows the allocator's
        # cache, not what is still referenced.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def test_two_runs_in_one_process_do_not_leak(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    """What the app does when a user trains twice: the first run's model must be gone, and RSS must not grow."""
    loaded: list[weakref.ref] = []
    real_load = run_setup.load_model

    def spy_load(*args, **kwargs):
        bundle = real_load(*args, **kwargs)
        loaded.append(weakref.ref(bundle))
        loaded.append(weakref.ref(bundle.denoiser))
        return bundle

    monkeypatch.setattr(run_setup, "load_model", spy_load)
    rss = []
    for n in range(3):
        events = list(trainer.run_training(tiny_job(tiny_sd1, tiny_dataset, tmp_path / f"run{n}")))
        assert isinstance(events[-1], RunFinished), events[-1]
        del events
        rss.append(_rss_after_gc())
        assert all(ref() is None for ref in loaded), "a finished run's bundle is still referenced"
    # The first run pays one-time costs (imports, kernel caches); later runs must come back to the same level.
    assert rss[2] - rss[1] < 24 * 2**20, [r / 2**20 for r in rss]


def test_a_failed_run_releases_its_model_too(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    loaded: list[weakref.ref] = []
    real_load = run_setup.load_model

    def spy_load(*args, **kwargs):
        bundle = real_load(*args, **kwargs)
        loaded.append(weakref.ref(bundle.denoiser))
        return bundle

    def failing_optimizer(*args, **kwargs):
        raise RuntimeError("the optimizer could not be made")  # a failure after the model is loaded

    monkeypatch.setattr(run_setup, "load_model", spy_load)
    monkeypatch.setattr(run_setup, "make_optimizer", failing_optimizer)
    job = tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run")
    events = list(trainer.run_training(job))
    assert isinstance(events[-1], RunFailed)
    del events
    gc.collect()
    assert loaded and all(ref() is None for ref in loaded)


def test_sampling_pipeline_shares_the_training_modules(tiny_sdxl):
    """Previews must not copy the model: the pipeline holds the very modules that train."""
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection

    bundle = load_model(ModelSection(path=str(tiny_sdxl)))
    pipe = bundle.pipeline()
    assert pipe.unet is bundle.denoiser and pipe.vae is bundle.vae
    assert pipe.text_encoder is bundle.text_encoders[0] and pipe.text_encoder_2 is bundle.text_encoders[1]
    ours = {p.data_ptr() for m in (bundle.denoiser, bundle.vae, *bundle.text_encoders) for p in m.parameters()}
    theirs = {p.data_ptr() for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()}
    assert theirs == ours


# Host syncs in the step: tests/engine/test_hot_loop.py (every host read trapped on the CPU, CUDA's sync detector
# on a GPU), which replaced a grep of the step's source that could not see syncs inside libraries.
