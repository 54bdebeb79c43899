"""Hostile and broken files are refused with a sentence, before anything runs or is allocated; real .ckpt files still load."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.engine.checkpoint import ModelLoadError, load_model
from studio.engine.inspection import inspect_path
from studio.engine.config import ModelSection
from studio.engine.merge import diffusers_folder_to_single_file
from studio.engine.safe_load import (
    LightningModelCheckpoint, load_pickle, open_weights, read_safetensors_header,
)
from test_checkpoint_support import ldm_shapes, write_lightning_ckpt, write_sparse_safetensors


@pytest.fixture(scope="module")
def tiny_single(tmp_path_factory, tiny_sd1) -> Path:
    return diffusers_folder_to_single_file(tiny_sd1, tmp_path_factory.mktemp("safety") / "tiny.safetensors")


def _refused(path: Path, *patterns: str, readable: bool = False) -> str:
    """Every entry point refuses the file with a sentence matching all patterns (never a traceback).

    Unreadable files raise ModelLoadError everywhere; ``readable`` files (a model of the wrong kind) are
    described by inspect with ``usable`` false and the same reason.
    """
    calls = [lambda: load_model(ModelSection(path=str(path)))]
    if not readable:
        calls += [lambda: open_weights(path), lambda: inspect_path(path)]
    messages = []
    for call in calls:
        with pytest.raises(ModelLoadError) as info:
            call()
        messages.append(str(info.value))
    if readable:
        info = inspect_path(path)
        assert info["usable"] is False
        messages.append(info["problem"] + " " + str(info.get("architecture")))
    for message in messages:
        for pattern in patterns:
            assert pattern in message, (pattern, message)
        assert "Traceback" not in message
    return messages[0]


# ------------------------------------------------------------------------------------------------ pickles that run code


class _RunsCommand:
    """Unpickling this with plain pickle runs a shell command (creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evals:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


def _hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    files = {}
    files["zip"] = folder / "zip.ckpt"
    torch.save({"state_dict": state, "callbacks": _RunsCommand(marker)}, files["zip"])
    files["legacy"] = folder / "legacy.ckpt"
    torch.save({"state_dict": state, "x": _RunsCommand(marker)}, files["legacy"], _use_new_zipfile_serialization=False)
    files["plain"] = folder / "plain.pt"  # a bare pickle, as a hand-made "model" would be
    with open(files["plain"], "wb") as fh:
        pickle.dump({"state_dict": state, "x": _RunsCommand(marker)}, fh, protocol=2)
    files["eval"] = folder / "eval.ckpt"
    torch.save({"state_dict": state, "x": _Evals(marker)}, files["eval"])
    files["disguised"] = folder / "looks-safe.safetensors"  # a pickle with a safetensors name
    files["disguised"].write_bytes(files["zip"].read_bytes())
    return files


def test_the_hostile_fixture_really_runs_code_with_plain_torch_load(tmp_path):
    """Proof the files below are dangerous: an unsafe load (in a throwaway process) creates the marker."""
    marker = tmp_path / "ran"
    files = _hostile_files(tmp_path, marker)
    code = f"import torch; torch.load({str(files['zip'])!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain", "eval", "disguised"])
def test_pickles_that_would_run_code_are_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "ran"
    path = _hostile_files(tmp_path, marker)[kind]
    message = _refused(path, "would run code", "nothing from it was executed", ".safetensors")
    assert ("system" in message) or ("eval" in message)
    assert not marker.exists()


def test_unknown_classes_are_refused_without_importing_them(tmp_path):
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {}, "opt": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).state_dict(),
                "x": _Custom()}, path)
    _refused(path, "does not load", "test_safety._Custom")


class _Custom:
    pass


# ------------------------------------------------------------------------------------------------ real .ckpt files


@pytest.mark.parametrize("legacy", [False, True])
def test_lightning_checkpoints_load_through_inert_stand_ins(tiny_sd1, tiny_single, tmp_path, legacy):
    state = load_file(tiny_single)
    path = write_lightning_ckpt(tmp_path / "sd-v1-5.ckpt", state, legacy=legacy)
    raw = load_pickle(path)
    (callback, callback_state), = raw["callbacks"].items()
    assert callback is LightningModelCheckpoint  # the class key, replaced by our inert stand-in
    assert callback_state["best_model_score"] == pytest.approx(0.1234)  # numpy scalar decoded, no numpy code run
    assert raw["global_step"] == 840000
    w = open_weights(path)
    assert w.format == ("pickle" if legacy else "zip-pickle")
    for key, value in state.items():
        assert torch.equal(w.tensor(key), value)
    bundle = load_model(ModelSection(path=str(path), config_dir=str(tiny_sd1)))
    assert bundle.family.name == "sd1"


def test_cut_off_ckpt_is_reported_as_incomplete(tiny_single, tmp_path):
    full = write_lightning_ckpt(tmp_path / "full.ckpt", load_file(tiny_single))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _refused(cut, "incomplete or damaged", "download it again")


# ------------------------------------------------------------------------------------------------ broken safetensors


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_absurd_header_length_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge-header.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}" + b"\0" * 64)
    _refused(path, "header claims", "not a model")


def test_header_longer_than_the_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    _refused(path, "incomplete", "download it again")


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"{not json at all")
    _refused(path, "not JSON")


def test_offsets_past_the_end_of_the_file(tmp_path):
    path = tmp_path / "past-eof.safetensors"
    path.write_bytes(_safetensors_bytes({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 16))
    _refused(path, "incomplete", "past the end of the file")


def test_truncated_download(tiny_single, tmp_path):
    data = tiny_single.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[:-1000])
    _refused(path, "incomplete", "download it again")


def test_shape_and_byte_length_disagree(tmp_path):
    path = tmp_path / "lying-shape.safetensors"
    path.write_bytes(_safetensors_bytes({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16))
    _refused(path, "holds 16 bytes but its shape (4, 4) needs 64")


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(_safetensors_bytes(header, b"\0" * 24))
    _refused(path, "overlap")


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
    {"w": [1, 2, 3]},
    {"__metadata__": {"k": 5}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
])
def test_malformed_entries(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_safetensors_bytes(header, b"\0" * 4))
    _refused(path, "damaged")


@pytest.mark.parametrize("content, pattern", [
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2132625431\n", "Git LFS pointer"),
    (b"GGUF" + b"\0" * 64, "GGUF"),
    (b"<html>Access denied</html>" * 4, "not a model file"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, pattern):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    _refused(path, pattern)


def test_valid_header_passes_and_matches_the_library(tiny_single):
    header = read_safetensors_header(tiny_single)
    reference = load_file(tiny_single)
    assert set(header.tensors) == set(reference)
    for key, info in header.tensors.items():
        assert info.shape == tuple(reference[key].shape)
        assert info.dtype == str(reference[key].dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------ wrong kinds of model


def test_lora_given_as_base_model(tmp_path):
    path = tmp_path / "my-style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(path))
    with pytest.raises(ModelLoadError, match="this is a LoRA, not a base model"):
        load_model(ModelSection(path=str(path)))
    assert inspect_path(path)["kind"] == "lora"


@pytest.mark.parametrize("keys, name", [
    # SD3 and FLUX.1 are trained now (tests/engine/test_sd3.py, test_flux_files.py); these are not, yet.
    ({"single_stream_modulation.lin.weight": (18432, 3072)}, "FLUX.2"),
    ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}, "ControlNet"),
])
def test_other_architectures_are_named(tmp_path, keys, name):
    from studio.engine.families import supported_text

    path = write_sparse_safetensors(tmp_path / "other.safetensors", keys)
    message = _refused(path, name, f"LoRA Studio trains {supported_text()}", readable=True)
    assert "cannot be used as the base model" in message


@pytest.mark.parametrize("channels, what", [(9, "inpainting"), (8, "instruct-pix2pix")])
def test_inpainting_and_pix2pix_unets_are_refused(tmp_path, channels, what):
    shapes = dict(ldm_shapes("sd1"))
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, channels, 3, 3)
    path = write_sparse_safetensors(tmp_path / f"{what}.safetensors", shapes)
    _refused(path, what, f"{channels} input channels", readable=True)
    assert inspect_path(path)["family"] == "sd1"


def test_sdxl_refiner_is_refused(tmp_path):
    shapes = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
              for k, v in ldm_shapes("sdxl").items() if not k.startswith("conditioner.embedders.0.")}
    path = write_sparse_safetensors(tmp_path / "sd_xl_refiner_1.0.safetensors", shapes)
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        load_model(ModelSection(path=str(path)))


def test_vae_and_partial_files_say_what_they_are(tiny_single, tmp_path):
    state = load_file(tiny_single)
    vae = tmp_path / "vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in state.items() if k.startswith("first_stage_model.")}, str(vae))
    with pytest.raises(ModelLoadError, match="this is a VAE"):
        load_model(ModelSection(path=str(vae)))
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}, str(unet_only))
    with pytest.raises(ModelLoadError, match="only part of a model"):
        load_model(ModelSection(path=str(unet_only)))
