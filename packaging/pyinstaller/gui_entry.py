"""Frozen entry of the windowed launcher (Windows shortcuts, the macOS .app): always opens the window."""

import multiprocessing
import os
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()

    # A windowed executable has no console: sys.stdout/stderr are None on Windows, and the first library that
    # prints a warning or a progress bar would raise. Keep stderr in a file so crashes leave a trace.
    from studio.paths import user_cache_dir

    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    if sys.stderr is None:
        log = user_cache_dir() / "gui-stderr.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        sys.stderr = open(log, "a", encoding="utf-8", buffering=1)

    from studio.cli import main

    # main([]) checks the display before Qt is imported (studio.display_check), as `lora-studio` does.
    # Arguments are ignored on purpose: Finder may pass -psn_..., and a windowed exe could not show usage anyway.
    sys.exit(main([]))
