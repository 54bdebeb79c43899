"""A full disk at the final export with save_every = 0: the trained LoRA stays in memory and can be saved elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.engine.events import RunFailed, RunFinished
from studio.engine.trainer import run_training
from studio.engine.unsaved import RescueFailed
from fixtures_disk import fail_publishing
from test_trainer import assert_grammar, tiny_job


def failed_run_with_full_disk(tiny_sd1, tiny_dataset, out: Path, monkeypatch) -> RunFailed:
    fail_publishing(monkeypatch, out / "tiny.safetensors")
    events = list(run_training(tiny_job(tiny_sd1, tiny_dataset, out, training__steps=2, output__save_every=0)))
    assert_grammar(events)
    assert isinstance(events[-1], RunFailed), events[-1]
    monkeypatch.undo()
    return events[-1]


def test_a_full_disk_at_the_final_export_keeps_the_lora_to_save_elsewhere(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    event = failed_run_with_full_disk(tiny_sd1, tiny_dataset, tmp_path / "run", monkeypatch)
    assert "disk is full" in event.message and "kept in memory" in event.message, event.message
    assert "please report" not in event.message
    assert event.lora_path is None and not (tmp_path / "run" / "tiny.safetensors").exists()
    unsaved = event.unsaved
    assert unsaved is not None and unsaved.step == 2 and unsaved.name == "tiny.safetensors" and unsaved.size > 0

    # What it saves is exactly what the run would have written.
    reference = list(run_training(tiny_job(tiny_sd1, tiny_dataset, tmp_path / "ok", training__steps=2)))[-1]
    assert isinstance(reference, RunFinished)
    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    path = unsaved.save(elsewhere)
    assert path == elsewhere / "tiny.safetensors"
    expected, got = load_file(reference.lora_path), load_file(path)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_steps"] == "2"
    # A second save into the same folder never overwrites the first; a file path is taken as given.
    assert unsaved.save(elsewhere) == elsewhere / "tiny-1.safetensors"
    assert unsaved.save(tmp_path / "named.safetensors") == tmp_path / "named.safetensors"
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]

    # A target that is full too is reported as a sentence; the fallback finds a folder with room.
    full = tmp_path / "also-full"
    full.mkdir()
    fail_publishing(monkeypatch, full / "tiny.safetensors")
    with pytest.raises(RescueFailed, match="could not write .*also-full.*No space left"):
        unsaved.save(full)
    monkeypatch.undo()
    path, tried = unsaved.save_to_fallback()
    assert path is not None and tried == [] and path.parent in unsaved.fallback_folders()
    assert load_file(path).keys() == expected.keys()
