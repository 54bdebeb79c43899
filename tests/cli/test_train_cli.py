"""`lora-studio train` and `demo` as a user runs them: flags, job files, exit codes, several processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from studio.cli import main
from studio.engine.config import Job, load_job, save_job

TINY_FLAGS = ["--resolution", "64", "--rank", "4", "--sample-every", "0", "--set", "dataset.bucket_step=16"]


def test_flags_train_and_write_the_run_folder(tiny_sd1, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(out), "--steps", "2",
                 "--alpha", "2", "--name", "cats", *TINY_FLAGS])
    assert code == 0, capsys.readouterr().err
    lora = out / "cats.safetensors"
    with safe_open(lora, "pt") as f:
        meta = f.metadata()
        alphas = [f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")]
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0 and set(alphas) == {2.0}
    ran = load_job(out / "job.toml")
    assert ran.training.steps == 2 and ran.lora.alpha == 2.0 and ran.model.path == str(tiny_sd1)
    assert "LoRA:" in capsys.readouterr().out


def test_validation_loss_is_printed_with_the_best_step(tiny_sd1, tiny_dataset, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
                 "--steps", "2", *TINY_FLAGS, "--set", "validation.split=1", "--set", "validation.every=1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("validation loss at step")]
    assert [line.split(":")[0] for line in lines] == [f"validation loss at step {s}" for s in (0, 1, 2)], captured.err
    assert "Lowest validation loss: " in captured.out and " at step " in captured.out


def test_job_file_with_flags_overriding_it(tiny_sd1, tiny_dataset, tmp_path):
    job = Job()
    job.model.path = str(tiny_sd1)
    job.dataset.path = str(tiny_dataset)
    job.training.steps = 50
    job.output.dir = str(tmp_path / "from-file")
    save_job(job, tmp_path / "job.toml")
    code = main(["train", str(tmp_path / "job.toml"), "--steps", "1", "--out", str(tmp_path / "run"), *TINY_FLAGS])
    assert code == 0
    assert load_job(tmp_path / "run" / "job.toml").training.steps == 1
    assert not (tmp_path / "from-file").exists()


def test_bad_input_exits_2_and_names_every_problem(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "missing"), "--rank", "0", "--set", "training.stepz=3",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "training.stepz" in err and "did you mean 'training.steps'" in err
    code = main(["train", "--data", str(tmp_path / "missing"), "--rank", "0", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "dataset.path" in err and "lora.rank" in err
    assert not (tmp_path / "run").exists()


def test_help_lists_every_job_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "training.min_snr_gamma" in out and "--sample-every" in out and "Min-SNR" in out


def test_estimate_prints_time_per_step(tiny_sd1, tiny_dataset, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(tmp_path / "r"),
                 "--estimate", *TINY_FLAGS])
    assert code == 0 and "per step" in capsys.readouterr().out


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = main(["demo", "--steps", "2", "--out", str(tmp_path / "demo")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "demo" / "demo-lora.safetensors").is_file()
    assert len(list((tmp_path / "demo" / "samples").glob("*.png"))) >= 2


def test_two_processes_under_torchrun_write_exactly_one_lora(tiny_sd1, tiny_dataset, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "studio", "train", "--model",
           str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(out), "--steps", "2", "--quiet", *TINY_FLAGS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["my-lora.safetensors"]
    assert not list(tmp_path.glob("run-*")), "the second process must not make its own run folder"
    assert "2 process(es)" in (out / "logs" / "run.log").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert done.stdout.count("Done:") == 1
