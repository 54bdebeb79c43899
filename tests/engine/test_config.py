"""Job config: TOML round trip, unknown keys, every invalid value named, overrides, migrations refused."""

from __future__ import annotations

import pytest

from studio.engine.config import (
    ConfigError, Job, apply_overrides, dumps_job, errors, field_info, iter_fields, job_from_dict, load_job, save_job,
    validate,
)


def test_round_trip_keeps_every_field(tmp_path):
    job = Job()
    job.model.path = "/models/x.safetensors"
    job.dataset.repeats = {"faces": 3, "10_style": 2}
    job.sampling.prompts = ["a cat", "a dog, {trigger}"]
    job.training.lr = 3e-4
    job.lora.targets = "+conv"
    save_job(job, tmp_path / "job.toml")
    again = load_job(tmp_path / "job.toml")
    assert again == job
    assert dumps_job(again) == dumps_job(job)


def test_every_field_has_help_and_a_valid_default():
    fields = list(iter_fields())
    assert len(fields) > 50
    for info in fields:
        assert info.help and info.help[0].isupper(), info.path
        if info.choices:
            assert str(info.default) in info.choices, info.path  # numbers among the choices are written as text
    assert not [p for p in validate(Job(), check_paths=False) if p.severity == "error"]


def test_unknown_keys_are_errors_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        job_from_dict({"training": {"stepz": 10, "lr": 1e-4}, "optimiser": {}})
    text = str(err.value)
    assert "training.stepz" in text and "did you mean 'training.steps'" in text
    assert "optimiser: unknown section" in text
    assert len(err.value.problems) == 2


def test_wrong_types_are_all_reported_at_once():
    with pytest.raises(ConfigError) as err:
        job_from_dict({"lora": {"rank": "big", "dora": "maybe"}, "training": {"lr": [1]}})
    fields = sorted(p.field for p in err.value.problems)
    assert fields == ["lora.dora", "lora.rank", "training.lr"]


@pytest.mark.parametrize(
    "path, value, needle",
    [
        ("lora.rank", 0, "at least 1"),
        ("training.lr", -1.0, "at least 0"),
        ("training.optimizer", "sgd", "not one of"),
        ("dataset.resolution", 500, "multiple of 8"),
        ("dataset.caption_dropout", 1.5, "at most 1"),
        ("output.name", "a/b", "file name"),
        ("dataset.caption_extension", "txt", "start with a dot"),
        ("training.mixed_precision", "fp17", "not one of"),
    ],
)
def test_each_invalid_value_is_named(path, value, needle):
    job = Job()
    section, name = path.split(".")
    setattr(getattr(job, section), name, value)
    problems = [p for p in validate(job, check_paths=False) if p.field == path]
    assert problems and needle in problems[0].message, problems


def test_paths_are_checked_before_heavy_work(tmp_path):
    job = Job()
    job.model.path = str(tmp_path / "missing.safetensors")
    job.dataset.path = str(tmp_path / "nope")
    job.output.dir = ""
    found = {p.field for p in errors(validate(job))}
    assert {"model.path", "dataset.path", "output.dir"} <= found


def test_overrides_coerce_and_reject():
    job = Job()
    apply_overrides(job, {"training.steps": "200", "lora.dora": "true", "sampling.prompts": "a cat"})
    assert job.training.steps == 200 and job.lora.dora is True and job.sampling.prompts == ["a cat"]
    with pytest.raises(ConfigError) as err:
        apply_overrides(job, {"training.stepss": 1, "lora.rank": "x"})
    assert {p.field for p in err.value.problems} == {"training.stepss", "lora.rank"}


def test_newer_schema_is_refused_clearly():
    with pytest.raises(ConfigError, match="newer than this LoRA Studio"):
        job_from_dict({"schema_version": 99})


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[training\nsteps = 1", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_job(path)
    assert str(path) in str(err.value)


def test_field_info_feeds_ranges():
    info = field_info("lora.rank")
    assert info.min == 1 and info.type is int and "rank" in info.help.lower()
