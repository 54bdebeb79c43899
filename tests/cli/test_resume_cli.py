"""`lora-studio train --resume` and the checks at the edge: every problem reported at once, exit 2, nothing started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from studio.cli import main
from studio.engine.config import Job

from fixtures_data import fake_run


def small_job(model: Path, data: Path, out: Path) -> Job:
    job = Job()
    job.model.path = str(model)
    job.dataset.path = str(data)
    job.dataset.resolution = 64
    job.training.steps = 12
    job.output.dir = str(out)
    job.output.name = "tiny"
    return job


@pytest.fixture
def refused(capsys):
    def check(*args: str) -> str:
        assert main(["train", *args]) == 2
        return capsys.readouterr().err

    return check


def test_resume_refusals_name_the_problem(tiny_sd1, tiny_dataset, tmp_path, refused):
    job = small_job(tiny_sd1, tiny_dataset, tmp_path / "x")
    assert "does not exist" in refused("--resume", str(tmp_path / "missing"))
    assert "is a file" in refused("--resume", str(fake_run(tmp_path / "r0", job) / "job.toml"))
    assert "no complete checkpoint" in refused("--resume", str(fake_run(tmp_path / "r1", job, checkpoint_step=None)))
    assert "already finished" in refused("--resume", str(fake_run(tmp_path / "r2", job, finished=True)))


def test_a_folder_without_job_toml_and_a_bad_flag_are_reported_together(tmp_path, refused):
    (tmp_path / "empty").mkdir()
    err = refused("--resume", str(tmp_path / "empty"), "--set", "training.stepz=3")
    assert "not a run folder (it has no job.toml)" in err and "training.stepz" in err


def test_changes_a_resume_cannot_honour_are_refused_all_at_once(tiny_sd1, tiny_dataset, tmp_path, refused):
    run = fake_run(tmp_path / "run", small_job(tiny_sd1, tiny_dataset, tmp_path / "run"))
    err = refused("--resume", str(run), "--rank", "8", "--batch-size", "2", "--set", "training.steps=3")
    assert "lora.rank: was 16 when the run started, now 8" in err and "training.batch_size" in err
    assert "training.steps" in err and "step 4" in err
    assert not (run / "logs").exists(), "nothing was started"


def test_a_changed_job_toml_in_the_run_folder_is_compared_with_the_checkpoint(tiny_sd1, tiny_dataset, tmp_path, refused):
    run = fake_run(tmp_path / "run", small_job(tiny_sd1, tiny_dataset, tmp_path / "run"))
    text = (run / "job.toml").read_text().replace("seed = 42", "seed = 7")
    (run / "job.toml").write_text(text)
    assert "training.seed: was 42 when the run started, now 7" in refused("--resume", str(run))


def test_unreadable_dataset_and_an_output_path_that_is_a_file_are_reported_together(tiny_sd1, tiny_dataset, tmp_path,
                                                                                      refused, monkeypatch):
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == tiny_dataset:  # chmod cannot block root, who runs the tests: refuse as a permission error
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    err = refused("--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(tmp_path / "x"))
    assert "dataset.path" in err and "cannot be read (Permission denied)" in err
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr(os, "scandir", real_scandir)
    err = refused("--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(tmp_path / "taken" / "run"),
                  "--rank", "0")
    assert "output.dir" in err and "is a file, not a folder" in err and "lora.rank" in err
