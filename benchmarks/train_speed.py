"""Training speed with and without caching (issue 2): steady-state seconds/step and peak RSS, JSON + markdown.

A preset of ``benchmarks.run``: the small SD-architecture model at 256 px, batch 1, latent and text-embedding
caching off vs on, repetitions alternating. Any ``benchmarks.run`` flag may be added, e.g.::

    python benchmarks/train_speed.py                       # 3 repetitions, results in benchmarks/out/
    python -m benchmarks.train_speed --repeats 5 --results-md benchmarks/RESULTS.md
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import DEFAULT_OUT, main as run_main  # noqa: E402

PRESET = ["--model", "small", "--resolution", "256", "--batch-size", "1", "--compare", "caching"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--repeats" not in argv:
        argv += ["--repeats", "3"]
    if "--json" not in argv:
        argv += ["--json", str(DEFAULT_OUT / "train_speed.json")]
    if "--section" not in argv:
        argv += ["--section", "train-speed"]
    return run_main(PRESET + argv)


if __name__ == "__main__":
    sys.exit(main())
