"""The benchmark entry point runs end to end on the tiny model and writes the JSON and markdown it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

RUN_KEYS = {
    "ok", "cold_load_s", "scan_s", "cache_build_s", "setup_s", "seconds_per_step", "images_per_s", "peak_rss_bytes",
    "rss_by_phase", "gpu_peak_allocated_bytes", "gpu_peak_reserved_bytes", "time_to_first_sample_s", "flops",
    "peak_tflops", "utilisation", "estimate", "data_path", "step_seconds", "cpu_seconds_per_step", "first_step_s",
}


def test_entry_point_measures_a_tiny_run(tmp_path):
    out = tmp_path / "result.json"
    md = tmp_path / "result.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--model", "tiny", "--steps", "2", "--warmup", "1", "--images", "2",
         "--sample", "--set", "sampling.steps=2", "--set", "sampling.prompts=[\"a red circle\"]", "--in-process", "--model-cache", str(tmp_path / "models"),
         "--json", str(out), "--markdown", str(md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema_version"] == 1
    assert {"cpu", "physical_cores", "ram_bytes", "gpu"} <= set(report["machine"])
    assert {"python", "torch", "diffusers", "peft"} <= set(report["versions"])
    assert report["base_settings"]["dataset.resolution"] == 64
    (experiment,) = report["experiments"]
    (variant,) = experiment["variants"]
    (run,) = variant["runs"]
    assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
    assert run["ok"] is True
    for key in ("cold_load_s", "cache_build_s", "seconds_per_step", "images_per_s", "time_to_first_sample_s",
                "utilisation", "peak_tflops"):
        assert isinstance(run[key], float) and run[key] > 0, key
    assert run["peak_rss_bytes"] > 50 * 2**20 and "Training" in run["rss_by_phase"]
    assert run["gpu_peak_allocated_bytes"] is None  # no GPU here
    assert run["flops"]["step_flops"] > run["flops"]["unet_forward_flops"] > 0
    assert run["estimate"]["seconds_per_step"] > 0 and isinstance(run["estimate"]["error"], float)
    assert variant["median"]["seconds_per_step"] == run["seconds_per_step"]
    text = md.read_text()
    assert "steady-state time per step" in text and "torch" in text and "no GPU" in text


def test_step_durations_split_flush_groups_and_skip_sampling():
    from benchmarks.measure import _step_durations

    # CPU: one StepCompleted per step. Step 3's interval also held a preview (dirty), so it is left out.
    assert _step_durations([(1, 1.0, False), (2, 1.5, False), (3, 3.5, True), (4, 4.0, False)]) == {
        1: 1.0, 2: 0.5, 4: 0.5}
    # GPU: steps 2-4 were flushed together at 2.2 s; they share the time since step 1 evenly.
    got = _step_durations([(1, 1.0, False), (2, 2.2, False), (3, 2.2001, False), (4, 2.2002, False)])
    assert got[1] == 1.0 and got[2] == got[3] == got[4] == pytest.approx(0.4, rel=1e-3)


def test_paired_ratios_and_results_sections(tmp_path):
    from benchmarks.run import paired_ratio, write_section

    a = [{"ok": True, "x": 2.0}, {"ok": True, "x": 4.0}, {"ok": False, "x": 1.0}]
    b = [{"ok": True, "x": 1.0}, {"ok": True, "x": 3.0}, {"ok": True, "x": 1.0}]
    assert paired_ratio(a, b, "x") == pytest.approx((0.5 + 0.75) / 2)
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\nprose\n")
    write_section(path, "cpu", "table 1\n")
    write_section(path, "cpu", "table 2\n")
    text = path.read_text()
    assert text.startswith("# Results\nprose\n") and "table 2" in text and "table 1" not in text
    assert text.count("<!-- BEGIN cpu -->") == 1
