"""The GPU suite's dry run walks its whole path on the tiny model on a CPU, so the script never rots."""

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


def _suite(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--suite", "gpu", "--dry-run", "--in-process", "--model-cache",
         str(tmp_path / "models"), "--json", str(out), "--markdown", str(md), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


def test_gpu_suite_dry_run_measures_every_planned_run(tmp_path):
    report, text = _suite(tmp_path)
    assert report["suite"] == "gpu-dry" and report["device_name"] is None
    ours = [r for r in report["results"] if r["row"] == "ours" and not r.get("skipped")]
    # Two configurations × eager and checkpointing (compile is left out of a dry run).
    assert {(r["config"], r["batch"], r["variant"]) for r in ours} == {
        ("tiny-a", 1, "eager"), ("tiny-b", 2, "eager"),
        ("tiny-a", 1, "eager + checkpointing"), ("tiny-b", 2, "eager + checkpointing")}
    for r in ours:
        assert r["ok"], r.get("error")
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds_per_step"])
        assert r["step_tflop"] > 0 and r["mfu"] is None  # no datasheet peak for a CPU
        assert r["run"]["settings"]["training.gradient_checkpointing"] is (r["variant"] != "eager")
    by = {(r["config"], r["variant"]): r for r in ours}
    # Checkpointing recomputes the forward: more counted FLOPs for the same batch.
    assert by[("tiny-a", "eager + checkpointing")]["step_tflop"] > by[("tiny-a", "eager")]["step_tflop"]
    # The compiled rows are planned, not run: their settings are checked as a GPU job (CUDA graphs at batch 1 only).
    compiled = [r for r in report["results"] if r["row"] == "ours" and r.get("skipped")]
    assert {(r["config"], r["variant"]) for r in compiled} >= {
        ("tiny-a", "CUDA graphs (whole denoiser)"), ("tiny-b", "compiled (whole denoiser)"),
        ("tiny-a", "compiled (blocks)"), ("tiny-b", "compiled (blocks) + checkpointing")}
    assert ("tiny-b", "CUDA graphs (whole denoiser)") not in {(r["config"], r["variant"]) for r in compiled}
    assert all(r["compile"] and r["problems"] == [] for r in compiled), [r["problems"] for r in compiled]
    peers = [r for r in report["results"] if r["row"] == "peer"]
    assert peers and all("no reference script" in r["skipped"] for r in peers)
    assert "| config | batch | row | variant | img/s |" in text and "tiny-b" in text


def test_gpu_suite_skips_what_would_overrun_its_budget(tmp_path):
    report, text = _suite(tmp_path, "--budget-s", "0.001")
    ours = [r for r in report["results"] if r["row"] == "ours" and not r["compile"]]
    assert ours and all("over the time budget" in r["skipped"] and "run" not in r for r in ours)
    assert "over the time budget" in text


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("Some Future GPU", None), (None, None),
])
def test_dense_bf16_peak_by_device_name(name, peak):
    from benchmarks.gpu_suite import dense_bf16_peak

    assert dense_bf16_peak(name) == peak
