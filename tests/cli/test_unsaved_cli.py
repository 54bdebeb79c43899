"""`lora-studio train` when the disk fills up at the final export: the trained LoRA is saved elsewhere, and said where."""

from __future__ import annotations

import io
from pathlib import Path

from safetensors.torch import load_file, save

from fixtures_disk import fail_publishing
from studio.cli import main
from studio.commands.train import save_unsaved
from studio.engine.unsaved import UnsavedLora

TINY_FLAGS = ["--resolution", "64", "--rank", "4", "--sample-every", "0", "--set", "dataset.bucket_step=16"]


def test_a_full_disk_at_the_end_saves_the_lora_in_the_rescue_dir(tiny_sd1, tiny_dataset, tmp_path, monkeypatch, capsys):
    out, rescue = tmp_path / "run", tmp_path / "usb-stick"
    fail_publishing(monkeypatch, out / "cats.safetensors")
    code = main(["train", "--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(out), "--steps", "2",
                 "--name", "cats", "--rescue-dir", str(rescue), "--quiet", *TINY_FLAGS])
    captured = capsys.readouterr()
    assert code == 1
    assert "disk is full" in captured.err and "kept in memory" in captured.err
    assert f"Saved the trained LoRA to another place: {rescue / 'cats.safetensors'}" in captured.out
    assert load_file(rescue / "cats.safetensors") and not (out / "cats.safetensors").exists()


def _unsaved(tmp_path: Path) -> UnsavedLora:
    import torch

    data = save({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, metadata={"ss_steps": "7"})
    return UnsavedLora(name="mine.safetensors", step=7, meant_for=tmp_path / "full-disk", chunks=(data,))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_it_asks_for_a_folder_until_one_works(tmp_path, monkeypatch, capsys):
    unwritable = tmp_path / "not-a-folder"
    unwritable.write_text("a file where a folder should be")
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    monkeypatch.setattr("sys.stdin", _Terminal(f"{unwritable / 'sub'}\n{chosen}\n"))
    path = save_unsaved(_unsaved(tmp_path), None)
    captured = capsys.readouterr()
    assert path == chosen / "mine.safetensors" and load_file(path)
    assert "Folder to save the trained LoRA in" in captured.out and "try another folder" in captured.err
    assert f"Saved the trained LoRA to another place: {path}" in captured.out


def test_with_nobody_to_ask_it_uses_a_folder_with_room_and_says_which(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    unsaved = _unsaved(tmp_path)
    path = save_unsaved(unsaved, None)
    captured = capsys.readouterr()
    assert path is not None and path.parent in unsaved.fallback_folders() and load_file(path)
    assert f"Saved the trained LoRA to another place: {path}" in captured.out
