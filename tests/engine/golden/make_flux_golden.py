"""Write the golden kohya key lists of the full-size FLUX.1 [dev] architecture (meta device): flux-dev_<preset>.txt.

Run ``python tests/engine/golden/make_flux_golden.py`` after a deliberate change of Flux's kohya names and commit
the result; tests/engine/test_flux.py compares the live names with these files.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[2])]

from test_flux import GOLDEN, golden_flux_names  # noqa: E402

if __name__ == "__main__":
    for preset in ("kohya-default", "attention"):
        (GOLDEN / f"flux-dev_{preset}.txt").write_text("\n".join(golden_flux_names(preset)) + "\n", encoding="utf-8")
