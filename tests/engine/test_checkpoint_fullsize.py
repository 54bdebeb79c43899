"""A full-size SD1.5-architecture checkpoint (random fp16 weights) as .safetensors and as a Lightning .ckpt: inspect, load, train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio.engine.inspection import inspect_path
from studio.engine.ldm import save_safetensors
from test_checkpoint_support import ldm_tensors, write_lightning_ckpt

pytestmark = pytest.mark.slow

# Runs in a fresh process so its peak memory is the load's alone (the test process holds the source weights).
PROBE = r"""
import json, sys, threading, time
import torch
import diffusers, transformers  # imported before timing: the load time is the model's, not Python's
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
from studio.engine.checkpoint import load_model
from studio.engine.config import Job, ModelSection
from studio.engine.inspection import peak_rss_bytes
from studio.engine.safe_load import open_weights

path, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
result = {"rss_before_load": peak_rss_bytes()}
bundle = load_model(ModelSection(path=path), dtype=torch.float32)
result["load_time_s"] = bundle.load_time_s
result["peak_rss_after_load"] = peak_rss_bytes()
result["family"], result["prediction_type"] = bundle.family.name, bundle.prediction_type

# Weights equal the source: one key checked by hand, then every tensor through the original layout.
w = open_weights(path)
direct = bundle.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
result["direct_equal"] = torch.equal(
    direct.half(), w.tensor("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"))
back = bundle.family.single_file_state_dict(bundle)
source = {k for k in w.shapes if not k.endswith("position_ids")}
result["missing"] = sorted(source - set(back))[:5]
result["mismatched"] = [k for k in sorted(source & set(back)) if not torch.equal(back[k].half(), w.tensor(k))][:5]
del back, bundle, w

if data == "-":
    result["peak_rss"] = peak_rss_bytes()
    print("RESULT " + json.dumps(result))
    sys.exit(0)

# One real training step through the engine's trainer (64 px images: 8x8 latents keep it quick on a CPU).
from studio.engine.events import RunFailed, RunFinished, StepCompleted
from studio.engine.trainer import run_training

job = Job()
job.model.path = path
job.dataset.path = data
job.dataset.resolution = 64
job.dataset.bucket_step = 16
job.lora.rank = 4
job.lora.alpha = 4.0
job.training.steps = 1
job.training.cache_to_disk = False
job.sampling.every = 0
job.output.dir = out
job.output.name = "fullsize"
started = time.perf_counter()
events = list(run_training(job, threading.Event()))
result["train_s"] = time.perf_counter() - started
steps = [e for e in events if isinstance(e, StepCompleted)]
result["losses"] = [e.loss for e in steps]
failed = [e for e in events if isinstance(e, RunFailed)]
result["failed"] = failed[0].message if failed else None
finished = [e for e in events if isinstance(e, RunFinished)]
result["lora"] = str(finished[0].lora_path) if finished else None
result["peak_rss"] = peak_rss_bytes()
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def sd15_files(tmp_path_factory) -> dict[str, Path]:
    """SD1.5's exact architecture and key names with random fp16 weights, written both ways (≈2.1 GB each)."""
    root = tmp_path_factory.mktemp("sd15")
    g = torch.Generator().manual_seed(1234)
    # Drawing a billion normals takes long on a small CPU; slices of a random pool at random offsets are
    # just as random for loading and training purposes, and each tensor still differs from every other.
    pool = (torch.randn(2**23 + 2**22, generator=g) * 0.02).half()

    def make(key: str, meta: torch.Tensor) -> torch.Tensor:
        if meta.dim() == 1 and key.endswith("weight"):
            return torch.ones(meta.shape, dtype=torch.float16)  # norm scales: keeps activations sane
        n = meta.numel()
        start = int(torch.randint(0, 2**22, (1,), generator=g))
        repeats = -(-(start + n) // pool.numel())
        flat = pool.repeat(repeats)[start:start + n] if repeats > 1 else pool[start:start + n]
        return flat.clone().reshape(meta.shape)

    state = ldm_tensors("sd1", make)
    files = {"safetensors": save_safetensors(state, root / "v1-5-pruned-emaonly.safetensors"),
             "ckpt": write_lightning_ckpt(root / "v1-5-pruned-emaonly.ckpt", state)}
    del state
    yield files
    for path in files.values():
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_full_size_sd15_inspects_loads_offline_and_trains(sd15_files, fmt, tiny_dataset, tmp_path, record_property):
    path = sd15_files[fmt]
    info = inspect_path(path)
    assert (info["family"], info["prediction_type"], info["native_resolution"], info["dtype"]) == ("sd1", "epsilon", 512, "float16")
    assert info["usable"] and round(info["components"]["unet"]["parameters"] / 1e6, 1) == 859.5
    assert round(info["size_bytes"] / 1e9, 1) == 2.1

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Training once is enough: both files hold the same weights (checked bit for bit below).
    data = str(tiny_dataset) if fmt == "safetensors" else "-"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path), data, str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    for key in ("load_time_s", "peak_rss_after_load", "peak_rss", "train_s"):
        record_property(f"{fmt}_{key}", result.get(key))
    print(f"\n{fmt}: load {result['load_time_s']:.1f} s, peak RSS after load {result['peak_rss_after_load'] / 2**30:.2f} GiB"
          + (f", with a training step {result['peak_rss'] / 2**30:.2f} GiB, run {result['train_s']:.1f} s" if "train_s" in result else ""))

    assert (result["family"], result["prediction_type"]) == ("sd1", "epsilon")
    assert result["direct_equal"] and result["missing"] == [] and result["mismatched"] == []
    # fp32 SD1.5 is 4.3 GB; the file's pages are mapped, not copied: far from swapping on a 24 GB machine.
    assert result["peak_rss_after_load"] < 8 * 2**30
    if fmt == "safetensors":
        assert result["failed"] is None and len(result["losses"]) == 1
        assert all(loss == loss and abs(loss) < 1e4 for loss in result["losses"])
        assert result["lora"] and Path(result["lora"]).is_file()
