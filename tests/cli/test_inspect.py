"""`lora-studio inspect` and `lora-studio merge`: readable words, JSON for scripts, non-zero exit with a sentence on failure."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from studio.cli import main
from studio.engine.checkpoint import load_model
from studio.engine.config import ModelSection
from studio.engine.merge import diffusers_folder_to_single_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_checkpoint_support import random_kohya_lora, write_sparse_safetensors, ldm_shapes  # noqa: E402


@pytest.fixture(scope="module")
def tiny_single(tmp_path_factory, tiny_sd1) -> Path:
    return diffusers_folder_to_single_file(tiny_sd1, tmp_path_factory.mktemp("cli") / "tiny-sd1.safetensors")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["inspect", *argv]) if argv and argv[0] != "merge" else main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_checkpoint_json(capsys, tiny_single):
    code, out, _ = run_cli(capsys, str(tiny_single), "--json")
    assert code == 0
    info = json.loads(out)
    assert (info["kind"], info["family"], info["format"]) == ("checkpoint", "sd1", "safetensors")
    assert info["sha256"] == hashlib.sha256(tiny_single.read_bytes()).hexdigest()
    assert info["a1111_shorthash"] == info["sha256"][:10]
    assert info["components"]["unet"]["parameters"] > 0


def test_inspect_full_size_header_in_words(capsys, tmp_path):
    path = write_sparse_safetensors(tmp_path / "v1-5-pruned-emaonly.safetensors", ldm_shapes("sd1"))
    code, out, _ = run_cli(capsys, str(path), "--no-hash")
    assert code == 0
    assert "Stable Diffusion 1.x" in out and "512 px" in out and "2.1 GB" in out
    assert "UNet 859.5 M" in out and "text encoder 123.1 M" in out and "VAE 83.7 M" in out
    assert "ready to train on" in out and "SHA-256" not in out


def test_inspect_lora_and_dataset(capsys, tiny_sd1, tiny_dataset, tmp_path):
    lora, _ = random_kohya_lora(load_model(ModelSection(path=str(tiny_sd1))), tmp_path / "style.safetensors", rank=4, alpha=2)
    code, out, _ = run_cli(capsys, str(lora))
    assert code == 0 and "LoRA" in out and "Rank" in out and "Stable Diffusion 1.x" in out
    code, out, _ = run_cli(capsys, str(lora), "--json")
    assert json.loads(out)["kind"] == "lora" and json.loads(out)["alpha"] == 2
    code, out, _ = run_cli(capsys, str(tiny_dataset))
    assert code == 0 and "4 images usable" in out
    assert json.loads(run_cli(capsys, str(tiny_dataset), "--json")[1])["usable"] == 4


def test_inspect_refuses_a_hostile_pickle_with_a_sentence(capsys, tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    code, out, err = run_cli(capsys, str(path))
    assert code == 1 and out == ""
    assert "would run code" in err and ".safetensors" in err and "Traceback" not in err
    assert not marker.exists()


def test_inspect_missing_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, str(tmp_path / "nope.safetensors"))
    assert code == 1 and "does not exist" in err


def test_inspect_unusable_model_says_why(capsys, tmp_path):
    shapes = dict(ldm_shapes("sd1"))
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    path = write_sparse_safetensors(tmp_path / "inpainting.safetensors", shapes)
    code, out, _ = run_cli(capsys, str(path), "--no-hash")
    assert code == 0 and "cannot be trained on" in out and "inpainting" in out


def test_merge_command(capsys, tiny_sd1, tiny_single, tmp_path):
    lora, _ = random_kohya_lora(load_model(ModelSection(path=str(tiny_sd1))), tmp_path / "style.safetensors")
    out_file = tmp_path / "merged.safetensors"
    code, out, err = run_cli(capsys, "merge", str(tiny_single), str(lora), "--strength", "0.8", "--out", str(out_file),
                             "--config-dir", str(tiny_sd1))
    assert code == 0, err
    assert "modules baked at strength 0.8" in out and out_file.is_file()
    merged = load_model(ModelSection(path=str(out_file), config_dir=str(tiny_sd1)))
    assert merged.family.name == "sd1" and merged.denoiser.dtype == torch.float32
    assert {p.dtype for p in merged.denoiser.parameters()} == {torch.float32}
    code, _, err = run_cli(capsys, "merge", str(tiny_single), str(lora), "--out", str(out_file), "--config-dir", str(tiny_sd1))
    assert code == 2 and "exists" in err
    code, _, err = run_cli(capsys, "merge", str(tiny_single), str(tiny_single), "--out", str(tmp_path / "x.safetensors"),
                           "--config-dir", str(tiny_sd1))
    assert code == 1 and "not a LoRA" in err
