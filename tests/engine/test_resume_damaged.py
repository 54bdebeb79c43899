"""Damaged checkpoints: a resume verifies each against its checksums, falls back to the newest good one and says
which and why; checkpoints of earlier versions (no checksums) still resume."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.cli import main
from studio.engine.events import LogMessage, RunFailed, RunFinished, StepCompleted
from studio.engine.trainer import run_training
from test_trainer import tiny_job

STEPS, SAVE_EVERY, STOP_AT = 8, 3, 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def job_for(model, data, out):
    return tiny_job(model, data, out, training__steps=STEPS, output__save_every=SAVE_EVERY, output__save_dtype="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from fixtures_data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("damaged-data") / "data")


@pytest.fixture(scope="module")
def reference(tiny_sd1, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damaged-ref") / "run"
    events = list(run_training(job_for(tiny_sd1, data, out)))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    return out / "tiny.safetensors"


def stopped_run(model, data, out: Path) -> Path:
    """A run stopped after step 5: checkpoints at step 3 (cadence) and step 5 (the stop)."""
    stop = threading.Event()
    for event in run_training(job_for(model, data, out), stop):
        if isinstance(event, StepCompleted) and event.step == STOP_AT:
            stop.set()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000005"]
    return out


def same_lora(a: Path, b: Path) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def as_earlier_version(checkpoint: Path) -> None:
    """What the previous version wrote: no manifest.json, and meta.json without the "manifest" entry."""
    (checkpoint / "manifest.json").unlink(missing_ok=True)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta.pop("manifest", None)
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_cut_off_newest_state_falls_back_to_the_checkpoint_before_and_says_so(tiny_sd1, data, reference, tmp_path,
                                                                                 capsys):
    out = stopped_run(tiny_sd1, data, tmp_path / "run")
    cut_in_half(out / "checkpoints" / "step-000005" / "state.pt")
    assert main(["train", "--resume", str(out)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "please report" not in err
    # Said before training starts (the size check), and again once the checksums are verified.
    assert "Checkpoint step-000005 is damaged: state.pt is" in err and "Resuming from step-000003 (step 3)" in err
    assert "moved to" in err and (out / "checkpoints" / "damaged-step-000005" / "state.pt").is_file(), "kept, not deleted"
    assert same_lora(out / "tiny.safetensors", reference), "steps 4-8 trained again from step 3: the same LoRA"


def test_garbled_newest_weights_are_caught_by_their_checksum(tiny_sd1, data, reference, tmp_path):
    out = stopped_run(tiny_sd1, data, tmp_path / "run")
    lora = out / "checkpoints" / "step-000005" / "lora.safetensors"
    raw = bytearray(lora.read_bytes())
    tail = min(5000, len(raw) // 2)
    raw[-tail:] = os.urandom(tail)  # same size: only the checksum can tell
    lora.write_bytes(bytes(raw))
    events = list(run_training(job_for(tiny_sd1, data, out), resume_dir=out))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "message", events[-1])
    warnings = [e.message for e in events if isinstance(e, LogMessage) and e.level == "warning"]
    assert any("step-000005 is damaged: lora.safetensors does not match its checksum" in w
               and "Resuming from step-000003" in w for w in warnings), warnings
    assert same_lora(out / "tiny.safetensors", reference)


def test_checkpoints_of_the_earlier_version_still_resume_and_are_checked_as_far_as_possible(
        tiny_sd1, data, reference, tmp_path):
    out = stopped_run(tiny_sd1, data, tmp_path / "run")
    for folder in (out / "checkpoints").iterdir():
        as_earlier_version(folder)
    cut_in_half(out / "checkpoints" / "step-000005" / "state.pt")  # the zip archive's own structure tells
    events = list(run_training(job_for(tiny_sd1, data, out), resume_dir=out))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "message", events[-1])
    warnings = " | ".join(e.message for e in events if isinstance(e, LogMessage) and e.level == "warning")
    assert "step-000005 is damaged: state.pt is cut off or damaged" in warnings
    assert "step-000003 was saved by an earlier version without checksums" in warnings
    assert same_lora(out / "tiny.safetensors", reference)


def test_when_every_checkpoint_is_damaged_the_resume_refuses_and_changes_nothing(tiny_sd1, data, tmp_path):
    out = stopped_run(tiny_sd1, data, tmp_path / "run")
    for step in ("step-000003", "step-000005"):
        lora = out / "checkpoints" / step / "lora.safetensors"
        raw = bytearray(lora.read_bytes())
        raw[-100:] = bytes(100)
        lora.write_bytes(bytes(raw))
    events = list(run_training(job_for(tiny_sd1, data, out), resume_dir=out))
    failed = events[-1]
    assert isinstance(failed, RunFailed) and "please report" not in failed.message
    assert "step-000005 is damaged" in failed.message and "step-000003 is damaged" in failed.message
    assert "start a new run" in failed.message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000005"]
