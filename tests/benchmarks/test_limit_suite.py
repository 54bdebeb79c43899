"""The CPU limit suite's dry path (ours beside the bare loop) and the peer harness's reading of the script's own logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_limit_suite_dry_run_measures_ours_and_the_bare_loop(tmp_path):
    out, md = tmp_path / "limit.json", tmp_path / "limit.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--suite", "limit", "--dry-run", "--in-process",
         "--model-cache", str(tmp_path / "models"), "--json", str(out), "--markdown", str(md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["suite"] == "limit" and report["peer"] is None and "peer-script" in report["peer_not_run"]
    assert [e["batch_size"] for e in report["experiments"]] == [1, 2]
    for e in report["experiments"]:
        labels = [v["label"] for v in e["variants"]]
        assert labels == ["ours", "bare"]
        runs = {v["label"]: v["runs"][0] for v in e["variants"]}
        assert runs["ours"]["ok"] and runs["bare"]["ok"], runs
        # Equal settings on both rows: the same attention modules at rank 4 (the reference script's LoRA).
        assert runs["ours"]["settings"]["lora.rank"] == 4 and runs["ours"]["settings"]["lora.targets"] == "attention"
        assert runs["ours"]["batch_size"] == pytest.approx(runs["bare"]["images_per_s"] * runs["bare"]["seconds_per_step"])
        assert runs["bare"]["lora_modules"] > 0 and runs["bare"]["final_loss"] > 0
        ratio = runs["ours"]["seconds_per_step"] / runs["bare"]["seconds_per_step"]
        assert e["ratio"]["ours_over_bare"] == pytest.approx(ratio)
        assert e["ratio"]["ours_over_peer"] is None
    text = md.read_text()
    assert "| batch | bare s/step | ours s/step |" in text and "Peer: not run" in text


def test_peer_step_times_come_from_the_scripts_tensorboard_log(tmp_path):
    """The script logs train_loss once per optimizer step; consecutive wall stamps are the step times."""
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks.peer import logged_step_times, step_durations

    writer = SummaryWriter(str(tmp_path / "logs" / "text2image-fine-tune"))
    for step in range(1, 5):
        writer.add_scalar("train_loss", 0.1 * step, global_step=step, walltime=100.0 + 0.5 * step * step)
    writer.add_scalar("other", 1.0, global_step=9, walltime=999.0)
    writer.close()
    stamps = logged_step_times(tmp_path / "logs")
    assert [s for s, _ in stamps] == [1, 2, 3, 4]
    assert step_durations(stamps) == pytest.approx([1.5, 2.5, 3.5])
    assert step_durations(stamps, started=100.0) == pytest.approx([0.5, 1.5, 2.5, 3.5])


def test_peer_dataset_is_an_imagefolder_of_the_same_files(tmp_path):
    from benchmarks.models import make_dataset
    from benchmarks.peer import imagefolder_dataset, peer_command

    src = make_dataset(tmp_path / "src", 3, 64)
    folder = imagefolder_dataset(src, tmp_path / "peer")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["img_000.jpg", "img_001.jpg", "img_002.jpg"]
    assert rows[0]["text"] == (src / "img_000.txt").read_text().strip()
    assert (folder / "img_001.jpg").read_bytes() == (src / "img_001.jpg").read_bytes()
    cmd = peer_command("python", Path("s.py"), Path("m"), folder, Path("o"), resolution=256, batch_size=4, steps=12,
                       rank=4, mixed_precision="no")
    def flag(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert flag("--train_batch_size") == "4" and flag("--rank") == "4" and flag("--report_to") == "tensorboard"
    assert flag("--train_data_dir") == str(folder) and flag("--mixed_precision") == "no"
