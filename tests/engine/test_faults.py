"""Failures with a way out: NaN, exceptions anywhere, read-only and full disks, bad datasets; nothing lost or half-written."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import studio.engine.recovery as recovery
import studio.engine.run_data as run_data
import studio.engine.trainer as trainer
from studio.cli import main
from studio.engine.events import LogMessage, RunFailed, RunFinished, RunStarted
from studio.engine.runs import read_metrics
from studio.engine.state import TrainPosition, list_checkpoints, load_checkpoint, save_checkpoint
from studio.engine.trainer import run_training
from test_trainer import assert_grammar, tiny_job


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial" in p.name]


def failed(events: list) -> RunFailed:
    assert_grammar(events)
    assert isinstance(events[-1], RunFailed), events[-1]
    return events[-1]


def assert_checkpoint_loads(folder: Path, step: int) -> None:
    position, lora, _ = load_checkpoint(folder)
    assert position.step == step
    assert all(torch.isfinite(t).all() for sd in lora.values() for t in sd.values())


# ----------------------------------------------------------------------------------------------- NaN loss


def test_nan_loss_stops_naming_causes_and_keeps_the_last_good_lora(tiny_sd1, tiny_dataset, tmp_path, monkeypatch, capsys):
    real_loss = trainer._loss

    def loss_going_nan(run, *args):
        loss = real_loss(run, *args)
        return loss * float("nan") if run.position.step == 2 else loss  # step 3 diverges

    monkeypatch.setattr(trainer, "_loss", loss_going_nan)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(out), "--steps", "5",
                 "--save-every", "2", "--name", "tiny", "--resolution", "64", "--rank", "4", "--sample-every", "0",
                 "--set", "dataset.bucket_step=16", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "step 3" in err and "NaN" in err and "learning rate" in err
    good = out / "tiny-step000002.safetensors"
    assert f"last good LoRA is kept at {good}" in err and f"--resume {out}" in err
    assert all(torch.isfinite(t).all() for t in load_file(good).values())
    # The non-finite step never reached the optimizer: no state past step 2, no metrics line for step 3.
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [2]
    assert_checkpoint_loads(out / "checkpoints" / "step-000002", 2)
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert not (out / "tiny.safetensors").exists() and not partials(out)


def test_a_non_finite_step_is_skipped_on_the_device_without_a_host_sync(monkeypatch):
    """Where the per-step host check is off (accelerators), fused AdamW leaves weights and moments untouched."""
    weight = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([weight], lr=0.1, fused=True)
    run = SimpleNamespace(optimizer=opt, accelerator=SimpleNamespace(scaler=None), host_checks=False)
    weight.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    trainer._optimizer_step(run, torch.isfinite(weight.grad).all())
    assert torch.equal(weight.detach(), torch.ones(4)) and int(opt.state[weight]["step"]) == 0
    assert not hasattr(opt, "found_inf")
    weight.grad = torch.ones(4)
    trainer._optimizer_step(run, torch.isfinite(weight.grad).all())
    assert (weight.detach() < 1).all() and int(opt.state[weight]["step"]) == 1


# ------------------------------------------------------------------------------------ exceptions anywhere


def test_an_exception_while_sampling_fails_readably_and_keeps_the_step(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    import studio.engine.sampling as sampling

    real_render = sampling.render_many
    calls = []

    def render_breaking_later(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the step-0 baseline works; the step-2 preview fails
            raise ValueError("preview exploded")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(sampling, "render_many", render_breaking_later)
    out = tmp_path / "run"
    job = tiny_job(tiny_sd1, tiny_dataset, out, training__steps=4, sampling__every=2, sampling__prompts=["a"])
    event = failed(list(run_training(job)))
    assert "while making preview images" in event.message and "preview exploded" in event.message
    assert f"--resume {out}" in event.message and "--sample-every 0" in event.message
    assert event.log_path == out / "logs" / "run.log" and "preview exploded" in event.log_path.read_text()
    assert "Traceback" in event.details
    assert_checkpoint_loads(out / "checkpoints" / "step-000002", 2)
    assert event.lora_path == out / "tiny-step000002.safetensors" and event.lora_path.is_file()
    assert not partials(out)


def test_an_exception_while_scanning_the_dataset_names_the_phase_and_the_log(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    import studio.engine.dataset as dataset

    def broken_scan(*args, **kwargs):
        raise RuntimeError("scanner on fire")

    monkeypatch.setattr(dataset, "scan_dataset", broken_scan)
    out = tmp_path / "run"
    event = failed(list(run_training(tiny_job(tiny_sd1, tiny_dataset, out))))
    assert "while scanning the dataset" in event.message and "scanner on fire" in event.message
    # Nothing was trained, so no run folder is left behind; the log is kept elsewhere (test_run_folder.py).
    assert event.run_dir is None and not out.exists() and "scanner on fire" in event.log_path.read_text()


def test_a_failing_final_export_keeps_the_state_and_a_resume_only_writes_the_lora(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    import studio.engine.export as export

    real_export = export.export_lora

    def final_export_breaks(bundle, job, path, **kwargs):
        if Path(path).name == "tiny.safetensors":
            raise RuntimeError("exporter bug")
        return real_export(bundle, job, path, **kwargs)

    monkeypatch.setattr(export, "export_lora", final_export_breaks)
    out = tmp_path / "run"
    job = tiny_job(tiny_sd1, tiny_dataset, out, training__steps=2)
    event = failed(list(run_training(job)))
    assert "while writing the LoRA file" in event.message and "exporter bug" in event.message
    assert f"--resume {out}" in event.message
    assert not (out / "tiny.safetensors").exists() and not partials(out)
    assert_checkpoint_loads(out / "checkpoints" / "step-000002", 2)

    monkeypatch.setattr(export, "export_lora", real_export)
    events = list(run_training(job, resume_dir=out))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    assert events[-1].steps == 2 and events[-1].lora_path == out / "tiny.safetensors"
    final, kept = load_file(out / "tiny.safetensors"), load_file(out / "tiny-step000002.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in kept), "no step was trained twice"


# ---------------------------------------------------------------------------------- read-only and full disks


def _fail_writes_under(monkeypatch, root: Path, code: int, when=lambda: True,
                       stages=("create", "replace", "rename")) -> None:
    """Make new files/temporary folders ("create") and publishing renames ("replace": files, "rename": checkpoint
    folders) under ``root`` fail with ``code``: what a read-only mount or a full disk looks like even to root."""
    root = str(root)

    def guard(path, stage: str) -> None:
        if stage in stages and path is not None and str(path).startswith(root) and when():
            raise OSError(code, os.strerror(code), str(path))

    import studio.engine.fileio as fileio

    real_file, real_dir, real_replace, real_rename = fileio.create_temp_file, fileio.create_temp_dir, os.replace, os.rename

    def create_temp_file(folder, name):
        guard(folder, "create")
        return real_file(folder, name)

    def create_temp_dir(folder, name):
        guard(folder, "create")
        return real_dir(folder, name)

    def replace(src, dst, *args, **kwargs):
        guard(dst, "replace")
        return real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        guard(dst, "rename")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileio, "create_temp_file", create_temp_file)
    monkeypatch.setattr(fileio, "create_temp_dir", create_temp_dir)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)


def test_a_read_only_output_folder_is_refused_before_any_work(tiny_sd1, tiny_dataset, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "mounted"
    parent.mkdir()
    _fail_writes_under(monkeypatch, parent, errno.EROFS)
    code = main(["train", "--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(parent / "run"),
                 "--steps", "1", "--resolution", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "output.dir" in err and "Read-only file system" in err
    events = list(run_training(tiny_job(tiny_sd1, tiny_dataset, parent / "run")))
    assert len(events) == 1 and "output.dir" in failed(events).message
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("code, stage", [(errno.EROFS, "create"), (errno.ENOSPC, "replace"), (errno.ENOSPC, "rename")])
def test_the_disk_failing_mid_run_gives_a_clear_error_and_leaves_no_partial_file(tiny_sd1, tiny_dataset, tmp_path, monkeypatch, code, stage):
    """Writes start failing after step 2's checkpoint: the step-4 save fails whole, step 2 stays loadable.

    "replace" fails the intermediate LoRA after its bytes are written; "rename" fails the checkpoint folder
    after every file in it is written and synced.
    """
    out = tmp_path / "run"
    state = {"armed": False}
    real_save = save_checkpoint

    def arm_after_first(*args, **kwargs):
        folder = real_save(*args, **kwargs)
        state["armed"] = True
        return folder

    monkeypatch.setattr(recovery, "save_checkpoint", arm_after_first)
    _fail_writes_under(monkeypatch, out, code, when=lambda: state["armed"], stages=(stage,))
    job = tiny_job(tiny_sd1, tiny_dataset, out, training__steps=6, output__save_every=2)
    event = failed(list(run_training(job)))
    expected = "disk is full" if code == errno.ENOSPC else "read-only"
    assert expected in event.message and "no partial file" in event.message
    assert event.lora_path == out / "tiny-step000002.safetensors"
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [2]
    assert_checkpoint_loads(out / "checkpoints" / "step-000002", 2)
    assert not partials(out) and not (out / "checkpoints" / "step-000004").exists()
    # The intermediate LoRA comes before its checkpoint: complete if the checkpoint folder failed, else absent.
    assert (out / "tiny-step000004.safetensors").exists() == (stage == "rename")


def test_a_crash_while_writing_a_checkpoint_or_a_lora_never_leaves_a_file_under_the_final_name(tmp_path, monkeypatch):
    import studio.engine.state as state_module
    from studio.engine.fileio import atomic_write_with

    weight = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([weight])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    lora = {"unet": {"a.lora_A.weight": weight.detach()}}
    root = tmp_path / "checkpoints"
    save_checkpoint(root, TrainPosition(2, 0, 2), lora, opt, sched)

    real_torch_save = torch.save

    def save_half_then_die(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\x80\x02half a pickle")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module.torch, "save", save_half_then_die)
    with pytest.raises(OSError):
        save_checkpoint(root, TrainPosition(4, 0, 4), lora, opt, sched)
    monkeypatch.setattr(state_module.torch, "save", real_torch_save)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    assert_checkpoint_loads(root / "step-000002", 2)

    final = tmp_path / "tiny.safetensors"

    def write_half_then_die(tmp: Path) -> None:
        tmp.write_bytes(b"half a LoRA")
        raise KeyboardInterrupt  # any exception, even one that is not an Exception

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(final, write_half_then_die)
    assert not final.exists() and not partials(tmp_path)


def test_a_resume_cleans_up_what_a_kill_mid_write_left(tmp_path):
    from studio.engine.runs import RunFolder

    folder = RunFolder(tmp_path / "run")
    for sub in ("samples", "checkpoints/step-000004", "checkpoints/.step-000008.x1.partial", "logs"):
        (folder.root / sub).mkdir(parents=True)
    leftovers = [folder.root / ".tiny-step000008.safetensors.abc.partial", folder.samples / ".step000008_00.png.q.partial",
                 folder.samples / "step000006_00.png", folder.root / "tiny-step000008.safetensors"]
    kept = [folder.samples / "step000004_00.png", folder.root / "tiny-step000004.safetensors"]
    for path in leftovers + kept:
        path.write_bytes(b"x")
    (folder.checkpoints / "step-000004" / "state.pt").write_bytes(b"")
    (folder.checkpoints / "step-000004" / "lora.safetensors").write_bytes(b"")
    folder.forget_after(4, "tiny")
    assert all(p.exists() for p in kept) and not any(p.exists() for p in leftovers)
    assert not (folder.checkpoints / ".step-000008.x1.partial").exists()


# ---------------------------------------------------------------------------------------- the dataset doctor


def test_a_short_run_on_the_awkward_folder_skips_bad_files_with_warnings(tiny_sd1, tmp_path, monkeypatch):
    from fixtures_data import build_awkward_dataset

    import studio.engine.dataset as dataset
    from studio.engine.images import DatasetImageError

    data = build_awkward_dataset(tmp_path / "awkward")
    real_load = dataset.load_image

    def vanished_after_the_scan(path, *args, **kwargs):
        if Path(path).name == "UPPER.PNG":
            raise DatasetImageError(path, "File disappeared")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(dataset, "load_image", vanished_after_the_scan)
    # No disk cache: a cached latent would not need the file that "vanished".
    job = tiny_job(tiny_sd1, data, tmp_path / "run", training__steps=2, training__cache_to_disk=False)
    events = list(run_training(job))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    warnings = " | ".join(e.message for e in events if isinstance(e, LogMessage) and e.level == "warning")
    for bad in ("bomb.png", "truncated.jpg", "truncated.png", "text.png", "empty.png", "clip.gif", "good_copy.png"):
        assert bad in warnings, bad
    assert "UPPER.PNG: could not be read any more" in warnings
    started = next(e for e in events if isinstance(e, RunStarted))
    assert started.image_count == 25  # the 26 usable images of the scan, less the one that vanished


def test_dora_trains_to_a_lycoris_kohya_file_and_a_diffusers_copy_when_asked(tiny_sd1, tiny_dataset, tmp_path):
    """DoRA is written in the LyCORIS/kohya layout (dora_scale); the export report says which tools apply it."""
    from studio.engine.export import describe_lora

    events = list(run_training(tiny_job(tiny_sd1, tiny_dataset, tmp_path / "b", lora__dora=True, training__steps=1,
                                        output__save_diffusers=True)))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    warned = [e.message for e in events if type(e).__name__ == "LogMessage" and e.level == "warning"]
    assert any("DoRA file will not load as trained in: A1111/Forge" in w for w in warned), warned
    info = describe_lora(events[-1].lora_path)
    assert (info["layout"], info["network_type"]) == ("kohya", "dora")
    copy = events[-1].lora_path.with_name(events[-1].lora_path.stem + "-diffusers.safetensors")
    assert (describe_lora(copy)["layout"], describe_lora(copy)["network_type"]) == ("diffusers", "dora")


def test_a_vae_giving_nan_latents_is_named_while_caching(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    real_encode = run_data._encode_latent

    def nan_latents(run, index, flip):
        value = real_encode(run, index, flip)
        return {**value, "mean": value["mean"] * float("nan")}

    monkeypatch.setattr(run_data, "_encode_latent", nan_latents)
    job = tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", training__cache_to_disk=False)
    event = failed(list(run_training(job)))
    assert "The VAE turned 'img_00.png' into NaN/infinite latents" in event.message and "model.vae" in event.message
