"""Measure one training run of the real engine: drive ``run_training(job)`` and time the events it emits.

There is no second training loop here. Phases are read off the event stream (StatusChanged "Loading model",
"Caching latents", ..., RunStarted, "Sampling", StepCompleted, RunFinished); step times come from
StepCompleted.elapsed_s; memory is sampled by a background thread (RSS) and read from the CUDA allocator at
every phase change. A few engine functions are wrapped with timers (image decode, VAE/text encode, the batch
assembly) to see what share of a step the data path costs; the wrappers only add two clock reads per call.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

WRAPPED = {
    # (module, attribute): label. The trainer looks these up at call time, so wrapping the attribute is enough.
    ("studio.engine.dataset", "scan_dataset"): "scan",
    ("studio.engine.dataset", "load_image"): "image_decode",
    ("studio.engine.dataset", "prepare_image"): "image_resize",
    ("studio.engine.run_data", "_encode_latent"): "vae_encode",  # includes decode + resize when caching is off
    ("studio.engine.run_data", "encode_text"): "text_encode",
    ("studio.engine.run_data", "batch_inputs"): "batch_inputs",  # everything a step does before the denoiser
}


@dataclass
class RunSpec:
    """What one measured run trains: a model folder, a dataset, job settings (dotted keys) and how long."""

    model_dir: str
    dataset_dir: str
    settings: dict[str, Any] = field(default_factory=dict)
    steps: int = 13
    warmup: int = 3
    label: str = ""
    cache_dir: str | None = None  # LORA_STUDIO_CACHE for disk caches; None: a fresh temporary one
    count_flops: bool = True
    sync_debug: bool = False  # CUDA only: count host<->device synchronisations during training steps


class RssSampler(threading.Thread):
    """Peak resident memory per phase, sampled every ``interval`` seconds (psutil; RSS includes the page cache
    of mapped weight files, as the OS accounts it)."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._halt = threading.Event()

    def sample(self) -> int:
        rss = self.process.memory_info().rss
        if rss > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = rss
        return rss

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


class GpuMemory:
    """Peak allocated/reserved CUDA memory per phase: read and reset at every phase change."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.enabled = device.type == "cuda"
        self.device = device
        self.by_phase: dict[str, dict[str, int]] = {}
        if self.enabled:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def close_phase(self, phase: str) -> None:
        if not self.enabled:
            return
        cuda = self.torch.cuda
        seen = self.by_phase.setdefault(phase, {"allocated": 0, "reserved": 0})
        seen["allocated"] = max(seen["allocated"], cuda.max_memory_allocated(self.device))
        seen["reserved"] = max(seen["reserved"], cuda.max_memory_reserved(self.device))
        cuda.reset_peak_memory_stats(self.device)

    def peak(self, kind: str) -> int | None:
        return max((v[kind] for v in self.by_phase.values()), default=0) if self.enabled else None


class Timers:
    """Seconds spent in each wrapped engine function, counted only while ``active``."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {label: 0.0 for label in WRAPPED.values()}
        self.calls: dict[str, int] = {label: 0 for label in WRAPPED.values()}
        self.active_labels: set[str] | None = None  # None: all

    def snapshot(self) -> dict[str, float]:
        return dict(self.total)

    @contextlib.contextmanager
    def installed(self) -> Iterator["Timers"]:
        import importlib

        originals = []
        for (module_name, attr), label in WRAPPED.items():
            module = importlib.import_module(module_name)
            original = getattr(module, attr)
            originals.append((module, attr, original))
            setattr(module, attr, self._wrap(original, label))
        try:
            yield self
        finally:
            for module, attr, original in originals:
                setattr(module, attr, original)

    def _wrap(self, fn: Any, label: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - started
                self.calls[label] += 1

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


def build_job(spec: RunSpec, out_dir: Path) -> Any:
    from studio.engine.config import Job, apply_overrides

    job = Job()
    job.model.path = spec.model_dir
    job.dataset.path = spec.dataset_dir
    job.output.dir = str(out_dir)
    job.output.name = "bench"
    job.training.steps = spec.steps
    job.sampling.every = 0
    apply_overrides(job, dict(spec.settings))
    return job


def _step_durations(steps: list[tuple[int, float, bool]]) -> dict[int, float]:
    """Per-step seconds from (step, elapsed_s, dirty) StepCompleted records.

    On a GPU the trainer syncs the loss a few times a second, so several StepCompleted events arrive together
    with (almost) the same elapsed_s: such a group shares the time since the previous group evenly. ``dirty``
    marks a step whose interval also contains sampling or a checkpoint; those are left out.
    """
    out: dict[int, float] = {}
    prev_step, prev_elapsed = 0, 0.0
    group: list[tuple[int, bool]] = []
    group_elapsed = None
    for step, elapsed, dirty in steps + [(-1, float("inf"), False)]:
        if group and (elapsed - group_elapsed > 0.002 or step == -1):
            span = group_elapsed - prev_elapsed
            size = group[-1][0] - prev_step
            if not any(d for _, d in group):
                for s, _ in group:
                    out[s] = span / size
            prev_step, prev_elapsed = group[-1][0], group_elapsed
            group = []
        if step == -1:
            break
        group.append((step, dirty))
        group_elapsed = elapsed
    return out


def measure(spec: RunSpec) -> dict[str, Any]:
    """Run the job described by ``spec`` once and return every measured figure (see benchmarks/README)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if spec.cache_dir is None:
            os.environ["LORA_STUDIO_CACHE"] = str(Path(tmp) / "cache")
        else:
            os.environ["LORA_STUDIO_CACHE"] = spec.cache_dir
        return _measure(spec, Path(tmp) / "run")


def _measure(spec: RunSpec, out_dir: Path) -> dict[str, Any]:
    import torch

    from studio.engine import devices
    from studio.engine.events import (
        CheckpointSaved, LogMessage, RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StatusChanged,
        StepCompleted,
    )
    from studio.engine.trainer import run_training

    job = build_job(spec, out_dir)
    t = job.training
    device = devices.pick_device(t.device)
    cpu = device.type == "cpu"
    precision = devices.resolve_precision(t.mixed_precision, cpu)
    result: dict[str, Any] = {"label": spec.label, "settings": spec.settings, "steps": spec.steps,
                              "warmup": spec.warmup, "device": devices.describe_device(device),
                              "precision": precision, "batch_size": t.batch_size, "ok": False, "error": None}
    peak_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if peak_dtype is torch.float16 and cpu:
        peak_dtype = torch.float32
    peaks = []
    if spec.count_flops:
        from benchmarks.flops import calibrate_peak_tflops, count_step

        result["flops"] = count_step(Path(spec.model_dir), job)
        # The device's peak is measured just before and just after the run: on a machine shared with other
        # work the share it gets drifts, and the mean of the two brackets the run.
        peaks.append(calibrate_peak_tflops(device, peak_dtype))
    # The pre-flight estimate, as a user would see it before starting (its calibration is taken now, too).
    preflight = _preflight(job)

    gc.collect()
    rss = RssSampler()
    result["baseline_rss_bytes"] = rss.sample()
    rss.peaks.clear()
    rss.start()
    gpu = GpuMemory(device)
    timers = Timers()
    phase_started: dict[str, float] = {}
    phase_seconds: dict[str, float] = {}
    current = "start"
    step_records: list[tuple[int, float, bool]] = []
    cpu_at_step: dict[int, float] = {}
    timer_at_step: dict[int, dict[str, float]] = {}
    dirty = False
    first_sample = None
    samples: list[float] = []
    sync_warnings: list[int] = []
    last_caching_event = None
    last_status = None
    t0 = time.perf_counter()

    def enter(phase: str, now: float) -> None:
        nonlocal current
        if phase == current:
            return
        phase_seconds[current] = phase_seconds.get(current, 0.0) + now - phase_started.get(current, t0)
        gpu.close_phase(current)
        rss.phase = current = phase
        phase_started[phase] = now

    with timers.installed(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        events = run_training(job)
        while True:
            try:
                event = next(events)
            except StopIteration:
                break
            now = time.perf_counter()
            match event:
                case StatusChanged(phase=phase):
                    last_status = now
                    if phase.startswith("Caching"):
                        last_caching_event = now
                    if phase == "Training" and spec.sync_debug and device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("warn")
                    if phase == "Sampling" and spec.sync_debug and device.type == "cuda":
                        torch.cuda.set_sync_debug_mode(0)
                    enter(phase, now)
                    if phase == "Sampling":
                        dirty = True
                case RunStarted():
                    # From the last setup status to RunStarted: LoRA injection, optimizer, accelerate.prepare.
                    result["setup_s"] = now - last_status if last_status is not None else None
                    enter("Starting", now)
                case StepCompleted(step=step, elapsed_s=elapsed):
                    if current != "Training":
                        enter("Training", now)
                    step_records.append((step, elapsed, dirty))
                    cpu_at_step[step] = time.process_time()
                    timer_at_step[step] = timers.snapshot()
                    if spec.sync_debug:
                        # torch's sync debug mode reports "called a synchronizing CUDA operation" as a warning.
                        sync_warnings.append(sum(1 for w in caught if "synchroniz" in str(w.message)))
                    dirty = False
                    if step == 1:
                        result["first_step_done_s"] = now - t0
                case SampleReady():
                    samples.append(now - t0)
                    if first_sample is None:
                        first_sample = now - t0
                case CheckpointSaved():
                    dirty = True
                case LogMessage():
                    pass
                case RunFinished(elapsed_s=elapsed):
                    result["ok"] = True
                    result["train_elapsed_s"] = elapsed
                case RunFailed(message=message, details=details):
                    result["error"] = message
                    result["details"] = details[-2000:]
                case RunCancelled():
                    result["error"] = "cancelled"
        if spec.sync_debug and device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    end = time.perf_counter()
    enter("end", end)
    rss.stop()
    del events
    gc.collect()
    result["total_s"] = end - t0
    result["end_rss_bytes"] = rss.process.memory_info().rss
    # ru_maxrss: the kernel's lifetime high-water mark of this (worker) process, KiB on Linux, bytes on macOS.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["ru_maxrss_bytes"] = maxrss if os.uname().sysname == "Darwin" else maxrss * 1024
    result["peak_rss_bytes"] = max(rss.peaks.values(), default=0)
    result["rss_by_phase"] = rss.peaks
    result["phase_seconds"] = phase_seconds
    result["gpu_peak_allocated_bytes"] = gpu.peak("allocated")
    result["gpu_peak_reserved_bytes"] = gpu.peak("reserved")
    result["gpu_by_phase"] = gpu.by_phase or None

    scan = timers.total["scan"]
    result["cold_load_s"] = phase_seconds.get("Loading model")
    result["scan_s"] = scan
    if last_caching_event is not None and "Scanning dataset" in phase_started:
        # The first cache entry is encoded before the first "Caching" event, inside the scan phase's interval.
        result["cache_build_s"] = last_caching_event - phase_started["Scanning dataset"] - scan
    else:
        result["cache_build_s"] = 0.0
    result["time_to_first_sample_s"] = first_sample
    result["sampling_s"] = phase_seconds.get("Sampling")
    result["sample_times_s"] = samples

    durations = _step_durations(step_records)
    measured = {s: d for s, d in durations.items() if s > spec.warmup}
    result["step_seconds"] = [round(durations[s], 5) for s in sorted(durations)]
    result["first_step_s"] = durations.get(1)
    if measured:
        per_step = statistics.median(measured.values())
        images = t.batch_size * t.gradient_accumulation
        result["seconds_per_step"] = per_step
        result["seconds_per_step_mean"] = statistics.fmean(measured.values())
        result["seconds_per_step_stdev"] = statistics.pstdev(measured.values())
        result["images_per_s"] = images / per_step
        result["steps_measured"] = len(measured)
        if cpu:
            # CPU time of the whole process (all threads) per step: the work, nearly independent of how much of
            # a shared machine the run got; wall time per step is what a user waits.
            cpu_steps = [cpu_at_step[s_] - cpu_at_step[s_ - 1] for s_ in measured if s_ - 1 in cpu_at_step]
            if cpu_steps:
                result["cpu_seconds_per_step"] = statistics.median(cpu_steps)
                result["cores_busy"] = result["cpu_seconds_per_step"] / per_step
        result["data_path"] = _data_path(timer_at_step, spec.warmup, max(measured), result["seconds_per_step_mean"])
        if spec.sync_debug and device.type == "cuda":
            counts = [sync_warnings[i] - sync_warnings[i - 1] for i in range(1, len(sync_warnings))]
            result["host_syncs_per_step"] = statistics.median(counts) if counts else None
    else:
        result["seconds_per_step"] = None
        result["images_per_s"] = None

    if result.get("flops") and result["seconds_per_step"]:
        from benchmarks.flops import calibrate_peak_tflops

        peaks.append(calibrate_peak_tflops(device, peak_dtype))
        peak = statistics.fmean(peaks)
        achieved = result["flops"]["step_flops"] / result["seconds_per_step"] / 1e12
        result["peak_tflops"] = peak
        result["peak_tflops_before_after"] = peaks
        result["peak_dtype"] = str(peak_dtype).removeprefix("torch.")
        result["achieved_tflops"] = achieved
        result["utilisation"] = achieved / peak
    if preflight.get("seconds_per_step") and result["seconds_per_step"]:
        preflight["error"] = preflight["seconds_per_step"] / result["seconds_per_step"] - 1
    if preflight.get("gpu_memory_bytes") and result["gpu_peak_reserved_bytes"]:
        preflight["memory_error"] = preflight["gpu_memory_bytes"] / result["gpu_peak_reserved_bytes"] - 1
    result["estimate"] = preflight
    return result


def _data_path(timer_at_step: dict[int, dict[str, float]], first: int, last: int, mean_step: float) -> dict[str, Any]:
    """Mean seconds per step in each data-path function over the measured steps, and as a share of a step.

    Totals between two steps, not per-step deltas: on a GPU several steps share one StepCompleted flush.
    """
    before, after = timer_at_step.get(first), timer_at_step.get(last)
    if before is None or after is None or last <= first:
        return {}
    seconds = {k: (after[k] - before[k]) / (last - first) for k in after if k != "scan"}
    return {"seconds_per_step": seconds, "fraction_of_step": {k: v / mean_step for k, v in seconds.items()}}


def _preflight(job: Any) -> dict[str, Any]:
    """The engine's pre-flight estimate for this job; its error is filled in once the step time is measured."""
    from studio.engine.estimate import estimate

    try:
        e = estimate(job)
    except Exception as exc:  # the benchmark must report, not die, when the estimate is broken
        return {"failed": f"{type(exc).__name__}: {exc}"}
    return {"seconds_per_step": e.seconds_per_step, "step_tflop": e.step_tflop, "calibrated_tflops": e.peak_tflops,
            "gpu_memory_bytes": e.gpu_memory_bytes, "launch_bound": e.launch_bound, "warnings": e.warnings,
            "calibrated": e.calibrated, "error_band": e.error_band, "preview_seconds": e.preview_seconds, "error": None}


def spec_dict(spec: RunSpec) -> dict[str, Any]:
    return asdict(spec)
