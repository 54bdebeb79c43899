"""Broken files and full disks get a sentence that names the file and the cause, never a raw internal error and
never "please report it"."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from studio.cli import main
from studio.engine.checkpoint import ModelLoadError, load_model
from studio.engine.inspection import inspect_checkpoint
from studio.engine.config import ModelSection
from studio.engine.events import RunFailed, RunFinished
from studio.engine.trainer import run_training
from test_trainer import assert_grammar, tiny_job

RAW = ("AttributeError", "RecursionError", "maximum recursion depth", "JSONDecodeError", "SafetensorError",
       "header too large", "please report", "Traceback")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def broken_copy(tiny_sd1: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1, folder)
    (folder / name).write_bytes(content)
    return folder


def readable(text: str) -> str:
    assert not any(r in text for r in RAW), text
    return text


CONFIG_CASES = {
    "index is a list": ("model_index.json", b"[1, 2]", ["model_index.json", "must hold a JSON object", "holds a list"]),
    "unet config not JSON": ("unet/config.json", b'{"in_channels": 4,, }', ["unet/config.json", "not valid JSON",
                                                                            "line 1, column 19"]),
    "nested 200 000 deep": ("unet/config.json", b"[" * 200_000 + b"]" * 200_000, ["unet/config.json",
                                                                                 "nested far too deeply"]),
    "scheduler a string": ("scheduler/scheduler_config.json", b'"epsilon"', ["scheduler_config.json", "holds a string"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_broken_config_files_are_named_with_what_is_wrong(tiny_sd1, tmp_path, case):
    name, content, words = CONFIG_CASES[case]
    folder = broken_copy(tiny_sd1, tmp_path, name, content)
    with pytest.raises(ModelLoadError) as loading:
        load_model(ModelSection(path=str(folder)))
    info = inspect_checkpoint(folder)
    for text in (str(loading.value), info["problem"]):
        assert all(w in readable(text) for w in words), text
    assert info["usable"] is False


def test_config_values_of_the_wrong_kind_make_a_model_not_ready(tiny_sd1, tmp_path):
    unet = json.loads((tiny_sd1 / "unet" / "config.json").read_text())
    folder = broken_copy(tiny_sd1, tmp_path, "unet/config.json", json.dumps({**unet, "block_out_channels": "lots"}).encode())
    info = inspect_checkpoint(folder)
    assert info["usable"] is False
    assert "'block_out_channels' must be a list of whole numbers above 0" in readable(info["problem"])
    with pytest.raises(ModelLoadError, match="block_out_channels"):
        load_model(ModelSection(path=str(folder)))


def test_a_pickle_named_safetensors_is_called_what_it_is(tiny_sd1, tmp_path, capsys):
    weights = "unet/diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    import io

    buf = io.BytesIO()
    torch.save(load_file(tiny_sd1 / weights), buf)
    folder = broken_copy(tiny_sd1, tmp_path, weights, buf.getvalue())
    with pytest.raises(ModelLoadError) as loading:
        load_model(ModelSection(path=str(folder)))
    assert "diffusion_pytorch_model.safetensors" in readable(str(loading.value))
    assert "PyTorch pickle" in str(loading.value)
    assert main(["inspect", str(folder), "--no-hash"]) == 1
    assert "PyTorch pickle" in readable(capsys.readouterr().err)


def test_a_broken_model_config_fails_a_run_with_a_sentence(tiny_sd1, tiny_dataset, tmp_path):
    folder = broken_copy(tiny_sd1, tmp_path, "model_index.json", b"[1, 2]")
    events = list(run_training(tiny_job(folder, tiny_dataset, tmp_path / "run")))
    assert_grammar(events)
    assert isinstance(events[-1], RunFailed)
    assert "model_index.json" in readable(events[-1].message)


# ------------------------------------------------------------------------------------------------ full disks

Usage = namedtuple("Usage", "total used free")


def _safetensors_enospc():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


# What safetensors, torch.save's zip writer and its C++ stream raise when the disk fills (measured on a full tmpfs).
WRITERS = {
    "checkpoint weights (safetensors)": ("save_file", _safetensors_enospc, False),
    "checkpoint state (torch.save zip)": ("torch_save", lambda: RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 598"), True),
    "checkpoint state (C++ stream)": ("torch_save", lambda: RuntimeError(
        "write(): fd 3 failed with No space left on device"), False),
}


@pytest.mark.parametrize("case", WRITERS)
def test_a_full_disk_while_saving_says_so_however_the_writer_reports_it(tiny_sd1, tiny_dataset, tmp_path, monkeypatch,
                                                                        case):
    import studio.engine.state as state

    target, make, errno_lost = WRITERS[case]
    real_save_file, real_torch_save = state.save_file, torch.save
    calls = {"n": 0}

    def failing(real):
        def write(obj, path, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 1:  # the first checkpoint is written; the disk is full from the second on
                if errno_lost:
                    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 8192, 8192))
                Path(path).write_bytes(b"half")
                raise make()
            return real(obj, path, *args, **kwargs)
        return write

    if target == "save_file":
        monkeypatch.setattr(state, "save_file", failing(real_save_file))
    else:
        monkeypatch.setattr(state.torch, "save", failing(real_torch_save))
    out = tmp_path / "run"
    events = list(run_training(tiny_job(tiny_sd1, tiny_dataset, out, training__steps=6, output__save_every=2)))
    assert_grammar(events)
    failed = events[-1]
    assert isinstance(failed, RunFailed)
    assert "The disk is full while saving a checkpoint" in readable(failed.message) and "no partial file" in failed.message
    assert str(out / "checkpoints" / "step-000004") in failed.message
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


def test_a_full_disk_for_the_latent_cache_does_not_stop_training(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    import studio.engine.cache as cache

    def full(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise _safetensors_enospc()

    monkeypatch.setattr(cache, "save_file", full)
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))  # nothing cached yet: every entry is written
    events = list(run_training(tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", training__steps=2)))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "message", events[-1])
