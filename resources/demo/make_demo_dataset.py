"""Write the demo dataset (resources/demo/dataset): striped, outlined shapes with captions, made in code.

Run from the repository root:  python resources/demo/make_demo_dataset.py

The demo model (train_demo_model.py) only ever saw flat shapes; these pictures are its LoRA's lesson, in a style
it does not know: diagonal white stripes inside a black outline. 128 px pictures, trained at the model's 64 px.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shapes import Shape, render_shape  # noqa: E402

TRIGGER = "studioshape"
# Every shape and most colours, so the LoRA learns the style rather than one shape or colour.
PICTURES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("orange", "circle"),
            ("purple", "square"), ("yellow", "triangle"), ("red", "square"), ("blue", "circle")]
SIZE = 128


def caption(color: str, shape: str) -> str:
    return f"{TRIGGER}, a {color} {shape}, striped, black outline"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "dataset"))
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("shape_*.png")) + list(out.glob("shape_*.txt")):
        old.unlink()
    rng = random.Random(args.seed)
    for index, (color, shape) in enumerate(PICTURES):
        picture = Shape(shape=shape, color=color, cx=0.5 + rng.uniform(-0.06, 0.06), cy=0.5 + rng.uniform(-0.06, 0.06),
                        radius=rng.uniform(0.28, 0.34), style="striped")
        render_shape(picture, SIZE).save(out / f"shape_{index:02d}.png", optimize=True)
        (out / f"shape_{index:02d}.txt").write_text(caption(color, shape), encoding="utf-8")
    print(f"wrote {len(PICTURES)} pictures to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
