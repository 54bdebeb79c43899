"""Frozen entry of the `lora-studio` executable: the same command line as `python -m studio`."""

import multiprocessing
import sys

if __name__ == "__main__":
    # A frozen app starts multiprocessing children (spawn: Windows, macOS) by re-running its own executable;
    # freeze_support turns such a run into the child's work instead of a second copy of the app.
    multiprocessing.freeze_support()

    from studio.cli import main

    sys.exit(main())
