"""A quiet console: the known-harmless library messages (diffusers' empty float32 notice, Pillow's decompression-bomb
warning for an image the doctor already refuses) no longer reach stderr of real runs; every other warning does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fixtures_data import _bomb_png, make_dataset

ENTRY = Path(sys.executable).with_name("lora-studio.exe" if os.name == "nt" else "lora-studio")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "LORA_STUDIO_DATA": str(tmp_path / "data-dir"),
            "LORA_STUDIO_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": ""}


def test_train_with_the_text_encoder_prints_no_float32_notice(tiny_sd1, tiny_dataset, tmp_path):
    command = [str(ENTRY), "train", "--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out",
               str(tmp_path / "run"), "--steps", "2", "--resolution", "64", "--rank", "4", "--sample-every", "0",
               "--set", "dataset.bucket_step=16", "--set", "lora.train_text_encoder=true"]
    result = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "tiny.safetensors").is_file() or list((tmp_path / "run").glob("*.safetensors"))
    assert "should be kept in float32" not in result.stderr, result.stderr
    assert "Warning" not in result.stderr and "warning:" not in result.stderr.lower(), result.stderr


def test_the_doctor_records_a_huge_image_without_pillows_warning(tmp_path):
    data = make_dataset(tmp_path / "photos")
    # 15,000 × 15,000 = 225 million pixels: above the 179 million limit (Pillow warns), below twice it (Pillow errors).
    (data / "huge.png").write_bytes(_bomb_png(15_000, 15_000))
    result = subprocess.run([str(ENTRY), "inspect", str(data)], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "huge.png" in result.stdout and "225.0 million pixels, above the safety limit" in result.stdout, result.stdout
    assert "DecompressionBomb" not in result.stderr and "decompression bomb" not in result.stderr, result.stderr


def test_other_warnings_still_show(tmp_path):
    """The filters are narrow: the same logger with another message, Pillow's warning raised elsewhere, and an
    unrelated warning all still print."""
    code = """
import warnings
import studio.engine  # installs the filters
from diffusers.utils import logging as dlog
from PIL import Image
log = dlog.get_logger("diffusers.models.modeling_utils")
log.warning("There are modules in AutoencoderKL that should be kept in float32: []. Casting directly ...")
log.warning("There are modules in UNet2DConditionModel that should be kept in float32: ['conv_in']. Casting ...")
log.warning("a different diffusers warning")
warnings.warn("Image size (9 pixels) exceeds limit of 5 pixels, could be decompression bomb DOS attack.",
              Image.DecompressionBombWarning)
warnings.warn("an unrelated warning", RuntimeWarning)
"""
    result = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "AutoencoderKL that should be kept in float32: []" not in err, err
    assert "UNet2DConditionModel that should be kept in float32: ['conv_in']" in err, err
    assert "a different diffusers warning" in err and "an unrelated warning" in err, err
    assert "DecompressionBombWarning" in err, err  # raised from __main__, not from PIL.Image
