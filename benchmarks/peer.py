"""The peer row: diffusers' own reference LoRA script (``examples/text_to_image/train_text_to_image_lora.py``), run as is.

The script is not part of this repository: the benchmark takes its path (``--peer-script``) and records the
diffusers commit it came from. It runs unmodified in a child process on the same model folder and the same images
(a copy of the dataset laid out as the ``imagefolder`` loader wants it: the JPEGs plus ``metadata.jsonl``). Its step
times are read from what the script itself logs: it calls ``accelerator.log({"train_loss": ...}, step=...)`` once
per optimizer step, and with ``--report_to tensorboard`` each of those is an event stamped with the wall time, so
the difference of consecutive stamps is one step, data loading, VAE and text encoding included (the script caches
nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEER_SCRIPT_NAME = "train_text_to_image_lora.py"
PEER_SOURCE = "https://github.com/huggingface/diffusers/blob/{commit}/examples/text_to_image/" + PEER_SCRIPT_NAME


def script_identity(script: Path, commit: str | None) -> dict[str, Any]:
    """What exactly ran: the script's path, sha256 and the diffusers commit (given, or read from its git work tree)."""
    script = Path(script)
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(script.parent), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip() or None
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return {"path": str(script), "sha256": hashlib.sha256(script.read_bytes()).hexdigest(), "diffusers_commit": commit,
            "source": PEER_SOURCE.format(commit=commit or "main")}


def imagefolder_dataset(dataset_dir: Path, out: Path) -> Path:
    """The benchmark dataset (``img_NNN.jpg`` + ``img_NNN.txt``) as an ``imagefolder``: images + ``metadata.jsonl``."""
    dataset_dir, out = Path(dataset_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for image in sorted(dataset_dir.glob("*.jpg")):
        target = out / image.name
        if not target.exists():
            try:
                os.link(image, target)  # same bytes, no copy
            except OSError:
                shutil.copy2(image, target)
        caption = image.with_suffix(".txt")
        text = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
        lines.append(json.dumps({"file_name": image.name, "text": text}))
    if not lines:
        raise FileNotFoundError(f"no .jpg images in {dataset_dir}")
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def peer_command(python: str, script: Path, model_dir: Path, data_dir: Path, out_dir: Path, *, resolution: int,
                 batch_size: int, steps: int, rank: int, mixed_precision: str, seed: int = 0,
                 gradient_checkpointing: bool = False) -> list[str]:
    """The script's command line for one benchmark run (its defaults otherwise: AdamW, lr 1e-4, clip 1.0)."""
    cmd = [python, str(script), "--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
           "--caption_column", "text", "--resolution", str(resolution), "--center_crop",
           "--train_batch_size", str(batch_size), "--max_train_steps", str(steps), "--rank", str(rank),
           "--mixed_precision", mixed_precision, "--seed", str(seed), "--output_dir", str(out_dir),
           "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0", "--report_to", "tensorboard",
           "--logging_dir", "logs"]
    if gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    return cmd


def logged_step_times(logging_dir: Path, tag: str = "train_loss") -> list[tuple[int, float]]:
    """(step, wall time) of every ``tag`` scalar the script logged, from its TensorBoard event files, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stamps: dict[int, float] = {}
    for events in sorted(Path(logging_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                stamps[e.step] = e.wall_time
    return sorted(stamps.items())


def step_durations(stamps: list[tuple[int, float]], started: float | None = None) -> list[float]:
    """Seconds of each step from consecutive stamps (step 1 from ``started`` when given, else left out)."""
    out = []
    prev = started
    for _, wall in stamps:
        if prev is not None:
            out.append(wall - prev)
        prev = wall
    return out


def peer_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the script once (in a child of this worker, so RUSAGE_CHILDREN is the script's alone) and measure it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        tmp_path = Path(tmp)
        data = imagefolder_dataset(Path(spec["dataset_dir"]), tmp_path / "data")
        out_dir = tmp_path / "out"
        cmd = peer_command(spec.get("python") or sys.executable, Path(spec["script"]), Path(spec["model_dir"]), data,
                           out_dir, resolution=spec["resolution"], batch_size=spec["batch_size"], steps=spec["steps"],
                           rank=spec["rank"], mixed_precision=spec.get("mixed_precision", "no"),
                           gradient_checkpointing=spec.get("gradient_checkpointing", False))
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"), HF_HOME=str(tmp_path / "hf-home"),
                   TQDM_DISABLE="1", WANDB_MODE="disabled")
        started = time.time()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        total = time.time() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        result: dict[str, Any] = {"label": spec.get("label", "peer"), "command": cmd, "total_s": total,
                                  "ok": proc.returncode == 0, "returncode": proc.returncode}
        if proc.returncode != 0:
            result["error"] = f"the reference script exited with {proc.returncode}"
            result["details"] = proc.stderr[-3000:]
            return result
        stamps = logged_step_times(out_dir / "logs")
        durations = step_durations(stamps)  # step 1 has no earlier stamp: it is warm-up anyway
        warmup = spec.get("warmup", 3)
        # durations[i] is step i + 2; drop the warm-up steps (1 .. warmup).
        steady = durations[max(0, warmup - 1):]
        result["steps_logged"] = len(stamps)
        result["step_seconds"] = [round(d, 5) for d in durations]
        result["lora_file"] = (out_dir / "pytorch_lora_weights.safetensors").is_file()
        if not steady:
            result.update(ok=False, error=f"the script logged {len(stamps)} steps; too few to time")
            return result
        per_step = statistics.median(steady)
        result.update(seconds_per_step=per_step, images_per_s=spec["batch_size"] / per_step,
                      cpu_seconds_total=usage.ru_utime + usage.ru_stime, peak_rss_bytes=usage.ru_maxrss * 1024,
                      first_logged_s=stamps[0][1] - started)
        return result
