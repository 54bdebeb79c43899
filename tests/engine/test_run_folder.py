"""The run folder keeps what users need and nothing else: no folder from a failed start, no pile of step LoRAs,
no file name with a newline in it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from studio.engine.config import validate
from studio.engine.events import CheckpointSaved, RunCancelled, RunFailed, RunFinished
from studio.engine.runs import RunFolder
from studio.engine.trainer import run_training
from test_trainer import tiny_job


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["foo\n", "foo\r\n", "a\nb", "tab\t"])
def test_a_name_with_a_newline_or_control_character_is_refused(name):
    from studio.engine.config import Job

    job = Job()
    job.output.name = name
    assert [p.field for p in validate(job, check_paths=False) if p.severity == "error"] == ["output.name"]


def test_a_failed_start_leaves_no_run_folder_and_the_next_start_gets_the_same_name(tiny_sd1, tiny_dataset, tmp_path):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "notes.txt").write_text("no weights here")
    out = tmp_path / "runs" / "mine"
    events = list(run_training(tiny_job(broken, tiny_dataset, out)))
    failed = events[-1]
    assert isinstance(failed, RunFailed) and "not a diffusers model" in failed.message
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == [], "nothing left behind"
    assert failed.run_dir is None and failed.log_path.is_file() and "not a diffusers model" in failed.log_path.read_text()

    events = list(run_training(tiny_job(tiny_sd1, tiny_dataset, out, training__steps=1)))
    assert isinstance(events[-1], RunFinished) and events[-1].run_dir == out, "not mine-2"


def test_a_failed_resume_and_a_folder_with_anything_else_in_it_are_kept(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    import studio.engine.run_setup as run_setup
    from studio.engine.checkpoint import ModelLoadError

    out = tmp_path / "run"
    job = tiny_job(tiny_sd1, tiny_dataset, out, training__steps=4, output__save_every=2)
    stopped = []
    import threading

    stop = threading.Event()
    for event in run_training(job, stop):
        stopped.append(event)
        if isinstance(event, CheckpointSaved):
            stop.set()
    assert isinstance(stopped[-1], RunCancelled)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def no_model(*args, **kwargs):
        raise ModelLoadError("the model went away")

    monkeypatch.setattr(run_setup, "load_model", no_model)
    failed = list(run_training(job, resume_dir=out))[-1]
    assert isinstance(failed, RunFailed) and failed.run_dir == out
    after = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert set(before) <= set(after), "a resumed run keeps everything"

    skeleton = RunFolder(tmp_path / "fresh")
    skeleton.create(job)
    assert skeleton.holds_only_what_a_start_made()
    (skeleton.root / "my notes.txt").write_text("mine")
    assert not skeleton.holds_only_what_a_start_made()
    assert skeleton.discard_unused(tmp_path / "logs") is None and (skeleton.root / "my notes.txt").is_file()


def test_intermediate_loras_keep_the_last_n_never_the_final_or_renamed_ones(tiny_sd1, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    job = tiny_job(tiny_sd1, tiny_dataset, out, training__steps=10, output__save_every=2, output__keep_last_loras=2)
    events = []
    for event in run_training(job):
        events.append(event)
        if isinstance(event, CheckpointSaved) and event.step == 2:  # the user keeps a copy under another name
            shutil.copy(event.lora_path, out / "tiny-step000002 (good one).safetensors")
            shutil.copy(event.lora_path, out / "favourite.safetensors")
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "favourite.safetensors", "tiny-step000002 (good one).safetensors", "tiny-step000006.safetensors",
        "tiny-step000008.safetensors", "tiny.safetensors"]

    everything = tmp_path / "all"
    job = tiny_job(tiny_sd1, tiny_dataset, everything, training__steps=6, output__save_every=2,
                   output__keep_last_loras=0)
    assert isinstance(list(run_training(job))[-1], RunFinished)
    assert sorted(p.name for p in everything.glob("*.safetensors")) == [
        "tiny-step000002.safetensors", "tiny-step000004.safetensors", "tiny.safetensors"]


def test_the_default_keeps_three_intermediate_loras():
    from studio.engine.config import field_info

    info = field_info("output.keep_last_loras")
    assert info.default == 3 and info.min == 0 and "0 keeps all" in info.help
