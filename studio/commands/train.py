"""`lora-studio train [JOB.toml] [flags]`: headless training with a progress bar; non-zero exit on failure."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Iterable

from studio.engine.config import (
    ConfigError, Job, apply_overrides, errors, field_info, iter_fields, load_job, parse_cli_value, validate,
)

# Common knobs get their own flags; everything else is reachable with --set. Help comes from the field.
FLAGS = {
    "--model": "model.path",
    "--data": "dataset.path",
    "--out": "output.dir",
    "--name": "output.name",
    "--trigger": "dataset.trigger_word",
    "--rank": "lora.rank",
    "--alpha": "lora.alpha",
    "--steps": "training.steps",
    "--resolution": "dataset.resolution",
    "--batch-size": "training.batch_size",
    "--lr": "training.lr",
    "--seed": "training.seed",
    "--sample-every": "sampling.every",
    "--save-every": "output.save_every",
}

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    for flag, path in FLAGS.items():
        info = field_info(path)
        parser.add_argument(flag, dest=path, default=None, metavar=info.type.__name__.upper(),
                            help=f"{info.help} [{path}]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set any job field, e.g. --set training.optimizer=prodigy (repeatable; list below)")


def settings_epilog() -> str:
    lines = ["all job fields (for job files and --set):"]
    for info in iter_fields():
        extra = f" one of {', '.join(info.choices)};" if info.choices else ""
        lines.append(f"  {info.path} = {info.default!r}:{extra} {info.help}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a LoRA headless", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a LoRA from a job file and/or flags (flags override the file).", epilog=settings_epilog(),
    )
    p.add_argument("job", nargs="*", help="job file(s) (.toml) as saved by the app or a previous run; several run "
                   "one after another (a queue), the flags apply to each")
    p.add_argument("--stop-on-failure", action="store_true",
                   help="with several job files: stop the queue at the first job that fails (default: run the rest)")
    add_job_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run in RUN_DIR from its latest checkpoint, with its job.toml; flags "
                   "may change what does not affect the saved state (previews, saving, steps, learning rate, speed)")
    p.add_argument("--estimate", action="store_true", help="print the time/memory estimate and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the result")
    p.add_argument("--rescue-dir", metavar="DIR",
                   help="if the disk fills up (or turns read-only) before the LoRA is written, save the trained LoRA "
                   "in DIR instead; without it the command asks on a terminal, otherwise it uses a folder with room "
                   "(the app's data folder, your home folder or the temporary folder) and prints where")
    return p


def job_from_args(args: argparse.Namespace) -> Job:
    """The job file (or the resumed run's job.toml, or defaults), then flags, then --set; all problems at once.

    With ``--resume`` and no job file the run's own job continues; a job file given as well is compared with it
    (the engine refuses changes that would not fit the saved state).
    """
    from studio.engine.config import Problem

    problems: list = []
    job = Job()
    if args.job:
        job = _load_collecting(args.job, problems)
    elif args.resume:
        from studio.engine.runs import resume_problems

        where = Path(args.resume)
        if (where / "job.toml").is_file():
            job = _load_collecting(where / "job.toml", problems)
        else:  # not a run folder: say so, rather than "file not found: …/job.toml"
            problems += resume_problems(where)
    overrides = {path: getattr(args, path) for path in FLAGS.values() if getattr(args, path, None) is not None}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(Problem("--set", f"'{item}' is not KEY=VALUE, e.g. training.lr=1e-4"))
            continue
        overrides[key.strip()] = parse_cli_value(value.strip())
    try:
        apply_overrides(job, overrides)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems, "command line")
    if not job.output.dir and not args.resume:
        job.output.dir = str(Path("runs") / job.output.name)
    return job


def _load_collecting(path, problems: list) -> Job:
    """The job in ``path``; its problems join the others (named with the file), so all are reported at once."""
    from studio.engine.config import Problem

    try:
        return load_job(path)
    except ConfigError as exc:
        problems += [Problem(f"{Path(path).name}: {p.field}", p.message, p.severity) for p in exc.problems]
        return Job()


def run(args: argparse.Namespace) -> int:
    jobs = list(args.job or [])
    if len(jobs) <= 1:
        args.job = jobs[0] if jobs else None
        return run_one(args)
    if args.resume:
        print("error: --resume continues one run; give one job file with it, not several", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_queue(args, jobs)


def run_queue(args: argparse.Namespace, jobs: list[str]) -> int:
    """Each job file in order; a failed job does not stop the rest unless --stop-on-failure. The exit code is 0
    when every job finished, else that of the first job that did not (2 bad input, 1 failed, 130 stopped)."""
    results: list[tuple[str, int]] = []
    for index, path in enumerate(jobs, 1):
        print(f"[{index}/{len(jobs)}] {path}", file=sys.stderr)
        one = argparse.Namespace(**{**vars(args), "job": path})
        code = run_one(one)
        results.append((path, code))
        if code == EXIT_CANCELLED or (code != EXIT_OK and args.stop_on_failure):
            break  # Ctrl+C stops the queue, not only the job
    words = {EXIT_OK: "finished", EXIT_FAILED: "failed", EXIT_BAD_INPUT: "refused (bad input)", EXIT_CANCELLED: "stopped"}
    print("Queue: " + "; ".join(f"{Path(p).name} {words.get(c, c)}" for p, c in results)
          + (f"; {len(jobs) - len(results)} not run" if len(results) < len(jobs) else ""), file=sys.stderr)
    return next((c for _, c in results if c != EXIT_OK), EXIT_OK if len(results) == len(jobs) else EXIT_FAILED)


def run_one(args: argparse.Namespace) -> int:
    try:
        job = job_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    problems = validate(job)
    if not errors(problems) and not args.estimate:
        # Paths, the run to resume and what may change on resume: checked before anything heavy starts.
        from studio.engine.trainer import preflight

        problems = preflight(job, args.resume)
    for p in problems:
        print(f"{'error' if p.severity == 'error' else 'warning'}: {p}", file=sys.stderr)
    if errors(problems):
        print("Fix the settings above and run again.", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.estimate:
        from studio.engine.estimate import estimate
        from studio.engine.jsonfile import JsonFileError

        try:
            print(estimate(job).summary)
        except JsonFileError as exc:  # a model config that cannot be read, named in the message
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    stop = threading.Event()
    _stop_on_interrupt(stop)
    from studio.engine.trainer import run_training

    resume = Path(args.resume) if args.resume else None
    return consume(run_training(job, stop, resume_dir=resume), quiet=args.quiet, rescue_dir=args.rescue_dir)


def _stop_on_interrupt(stop: threading.Event) -> None:
    """First Ctrl+C stops at the next step and saves a partial LoRA; a second one exits at once."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nStopping after this step (Ctrl+C again to quit at once)…", file=sys.stderr)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def consume(events: Iterable, *, quiet: bool = False, rescue_dir: str | None = None) -> int:
    """The CLI's one dispatch over the engine's events: progress bar, messages, exit code.

    A failed run whose trained LoRA the disk would not take is saved elsewhere (see save_unsaved).
    """
    from tqdm import tqdm

    from studio.engine.events import (
        CheckpointSaved, LogMessage, RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StatusChanged,
        StepCompleted, ValidationCompleted,
    )

    main = _is_main_process()
    show = main and not quiet
    say = (lambda text: tqdm.write(text, file=sys.stderr)) if show else (lambda text: None)
    bar = None
    smoothed = None
    code = EXIT_FAILED
    for event in events:
        match event:
            case RunStarted(run_dir=run_dir, total_steps=total, family=family, device=device, image_count=n, start_step=start):
                say(f"Run folder: {run_dir}\n{family.upper()} model, {n} images, {total} steps on {device}")
                if show:
                    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
            case StatusChanged(phase=phase, message=message):
                if bar is not None:
                    bar.set_description(phase)
                elif phase != "Training":
                    say(f"{phase}… {message}".rstrip())
            case StepCompleted(step=step, loss=loss, lr=lr):
                smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
                if bar is not None:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}", refresh=False)
            case ValidationCompleted(step=step, loss=loss, best_step=best_step, best_loss=best_loss):
                say(f"validation loss at step {step}: {loss:.4f} (lowest: {best_loss:.4f} at step {best_step})")
            case SampleReady(path=path):
                say(f"sample: {path}")
            case CheckpointSaved(step=step, lora_path=lora_path):
                say(f"checkpoint at step {step}" + (f": {lora_path}" if lora_path else ""))
            case LogMessage(level=level, message=message):
                say(f"{level}: {message}")
            case RunFinished(lora_path=lora_path, steps=steps, elapsed_s=elapsed, best_step=best_step,
                             best_val_loss=best_val_loss):
                _close(bar)
                if main:
                    print(f"Done: {steps} steps in {elapsed:.0f} s. LoRA: {lora_path}")
                    if best_step is not None:
                        print(f"Lowest validation loss: {best_val_loss:.4f} at step {best_step}")
                code = EXIT_OK
            case RunFailed(message=message, log_path=log_path, lora_path=lora_path, unsaved=unsaved):
                _close(bar)
                print(f"error: {message}", file=sys.stderr)
                if lora_path:
                    print(f"last good LoRA: {lora_path}", file=sys.stderr)
                if log_path:
                    print(f"details: {log_path}", file=sys.stderr)
                if unsaved is not None and main:
                    save_unsaved(unsaved, rescue_dir)
                code = EXIT_FAILED
            case RunCancelled(step=step, lora_path=lora_path, run_dir=run_dir):
                _close(bar)
                print(f"Stopped at step {step}." + (f" Partial LoRA: {lora_path}" if lora_path else "")
                      + (f" Resume with: lora-studio train --resume {run_dir}" if run_dir and lora_path else ""),
                      file=sys.stderr)
                code = EXIT_CANCELLED
            case _:
                logging.getLogger(__name__).warning("unhandled event %r", event)
    return code


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def save_unsaved(unsaved, rescue_dir: str | None) -> Path | None:
    """Save the trained LoRA a full disk would not take, before this process (and the LoRA in memory) ends.

    ``--rescue-dir`` first; then, on a terminal, ask for a folder (Enter takes the suggested one); with nobody to
    ask (a script, a scheduler) the first fallback folder with room. Prints exactly where it went.
    """
    from studio.engine.unsaved import RescueFailed

    if rescue_dir:
        try:
            return _saved(unsaved.save(rescue_dir))
        except RescueFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
    if sys.stdin is not None and sys.stdin.isatty():
        while True:
            suggestion = next(iter(unsaved.fallback_folders()), None)
            hint = f" [{suggestion}]" if suggestion else ""
            try:
                answer = input(f"Folder to save the trained LoRA in{hint} (or 'skip' to lose it): ").strip()
            except EOFError:
                break
            if answer.lower() == "skip":
                print("The trained LoRA was not saved.", file=sys.stderr)
                return None
            target = answer or suggestion
            if not target:
                continue
            try:
                return _saved(unsaved.save(Path(target).expanduser()))
            except RescueFailed as exc:
                print(f"error: {exc}; try another folder", file=sys.stderr)
    path, tried = unsaved.save_to_fallback()
    for why in tried:
        print(f"error: {why}", file=sys.stderr)
    if path is not None:
        return _saved(path)
    print("error: no folder with room for the trained LoRA was found, so it is lost when this command ends. Free "
          "some space and run again with --rescue-dir DIR pointing at a disk with room.", file=sys.stderr)
    return None


def _saved(path: Path) -> Path:
    print(f"Saved the trained LoRA to another place: {path}")
    return path
