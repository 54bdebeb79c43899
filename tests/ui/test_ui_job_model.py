"""JobModel: one owner of the job; changes are announced, coerced, validated and undoable by replace."""

from __future__ import annotations

import pytest

from studio.engine import config
from studio.ui.job_model import JobModel, default_run_root, new_job


def test_set_value_coerces_and_announces_once(qtbot):
    model = JobModel()
    seen = []
    model.changed.connect(lambda path, value: seen.append((path, value)))
    model.set_value("lora.rank", "8")
    model.set_value("lora.rank", 8)  # no change, no signal
    assert model.job.lora.rank == 8
    assert seen == [("lora.rank", 8)]
    assert model.dirty


def test_unreadable_value_raises_and_leaves_job_alone(qtbot):
    model = JobModel()
    before = model.job.lora.rank
    with pytest.raises(ValueError):
        model.set_value("lora.rank", "many")
    assert model.job.lora.rank == before


def test_problems_follow_changes(qtbot):
    model = JobModel()
    with qtbot.waitSignal(model.problems_changed):
        model.set_value("dataset.resolution", 100)
    assert [p.field for p in model.problems_for("dataset.resolution")] == ["dataset.resolution"]
    model.set_value("dataset.resolution", 512)
    assert model.problems_for("dataset.resolution") == []


def test_replace_refreshes_every_field(qtbot):
    model = JobModel()
    seen = set()
    model.changed.connect(lambda path, value: seen.add(path))
    job = new_job()
    job.lora.rank = 4
    model.replace(job)
    assert seen == {info.path for info in config.iter_fields()}
    assert not model.dirty


def test_apply_is_all_or_nothing(qtbot):
    model = JobModel()
    before = model.job.lora.rank
    with pytest.raises(config.ConfigError):
        model.apply({"lora.rank": 8, "training.stepz": 5})
    assert model.job.lora.rank == before
    model.apply({"lora.rank": 8, "training.steps": 200})
    assert (model.job.lora.rank, model.job.training.steps) == (8, 200)


def test_default_run_folder_follows_the_name_until_chosen(qtbot, tmp_path):
    model = JobModel()
    model.set_value("output.name", "cats")
    assert model.job.output.dir == str(default_run_root() / "cats")
    model.set_value("output.dir", str(tmp_path / "mine"))
    model.set_value("output.name", "dogs")
    assert model.job.output.dir == str(tmp_path / "mine")


def test_save_and_load_round_trip(qtbot, tmp_path):
    model = JobModel()
    model.set_value("lora.rank", 12)
    path = tmp_path / "job.toml"
    model.save(path)
    assert not model.dirty and model.file_path == str(path)
    other = JobModel()
    other.load(path)
    assert other.job == model.job
    assert config.load_job(path).lora.rank == 12  # the same file the CLI reads
