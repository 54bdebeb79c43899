"""`lora-studio train a.toml b.toml ...`: jobs run in order; a failed one does not stop the rest unless asked."""

from __future__ import annotations

from studio.cli import main
from studio.engine.config import Job, save_job


def write_job(path, model, data, out, *, name: str):
    job = Job()
    job.model.path, job.dataset.path, job.output.dir, job.output.name = str(model), str(data), str(out), name
    job.training.steps, job.lora.rank, job.lora.alpha = 1, 4, 4.0
    job.dataset.resolution, job.sampling.every, job.training.cache_to_disk = 64, 0, False
    save_job(job, path)
    return path


def test_a_queue_runs_every_job_and_the_exit_code_names_the_failure(tiny_sd1, tiny_dataset, tmp_path, capsys):
    a = write_job(tmp_path / "a.toml", tiny_sd1, tiny_dataset, tmp_path / "runs" / "a", name="first")
    b = write_job(tmp_path / "b.toml", tiny_sd1, tmp_path / "no-such-folder", tmp_path / "runs" / "b", name="broken")
    c = write_job(tmp_path / "c.toml", tiny_sd1, tiny_dataset, tmp_path / "runs" / "c", name="third")
    code = main(["train", str(a), str(b), str(c), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err  # the broken job's bad input
    assert (tmp_path / "runs" / "a" / "first.safetensors").is_file()
    assert (tmp_path / "runs" / "c" / "third.safetensors").is_file()  # run although b failed
    assert "Queue: a.toml finished; b.toml refused (bad input); c.toml finished" in err

    code = main(["train", str(b), str(c), "--quiet", "--stop-on-failure"])
    err = capsys.readouterr().err
    assert code == 2 and "Queue: b.toml refused (bad input); 1 not run" in err
    assert not (tmp_path / "runs" / "c-2").exists()
