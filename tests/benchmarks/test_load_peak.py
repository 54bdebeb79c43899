"""The load-peak benchmark's dry run walks its whole path on the tiny Flux model on a CPU, so the script never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_load_peak_dry_run_loads_both_orders(tmp_path):
    out, md = tmp_path / "load.json", tmp_path / "load.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.load_peak", "--dry-run", "--block-swap", "0", "2",
                           "--json", str(out), "--markdown", str(md)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["suite"] == "load-peak-dry" and report["device_name"] is None
    rows = {(r["order"], r["block_swap"]): r for r in report["results"]}
    assert set(rows) == {(o, s) for o in ("ours", "cast after move") for s in (0, 2)}
    for r in rows.values():
        assert r["peak_allocated"] is None and r["moved_bytes"] == 0  # a CPU has no second device to measure
    # Both orders end with the same stored model; two swapped blocks keep part of it off the device.
    for swap in (0, 2):
        assert rows[("ours", swap)]["stored_bytes"] == rows[("cast after move", swap)]["stored_bytes"]
        assert rows[("ours", swap)]["frozen_bytes_on_device"] == rows[("cast after move", swap)]["frozen_bytes_on_device"]
    assert rows[("ours", 2)]["frozen_bytes_on_device"] < rows[("ours", 0)]["frozen_bytes_on_device"] < rows[("ours", 0)]["bf16_bytes"]
    assert "| ours | 0 |" in md.read_text()
