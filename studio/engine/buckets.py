"""Aspect-ratio buckets: which sizes exist, which one an image goes to, and cutting the image to it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def bucket_sizes(
    resolution: int,
    step: int = 64,
    *,
    min_side: int | None = None,
    max_side: int | None = None,
    max_aspect: float = 2.0,
) -> list[tuple[int, int]]:
    """(width, height) buckets: multiples of ``step``, area ≤ resolution², aspect ≤ ``max_aspect``.

    kohya's scheme: for every width, the largest height that keeps the area within budget, plus the square.
    diffusers' ``generate_aspect_ratio_buckets`` rounds to the nearest multiple and so can exceed the pixel
    budget (memory planned for resolution² would not hold), which is why this is not delegated to it.
    Sorted from the tallest to the widest.
    """
    if step <= 0 or resolution < step:
        raise ValueError(f"resolution ({resolution}) must be at least the bucket step ({step})")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be at least 1, got {max_aspect}")
    area = resolution * resolution
    lo = step if min_side is None else max(step, math.ceil(min_side / step) * step)
    hi = (area // step) if max_side is None else max_side
    hi = hi // step * step
    square = resolution // step * step
    sizes: set[tuple[int, int]] = set()
    if lo <= square <= hi:
        sizes.add((square, square))
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h < lo or (w >= h and w / h > max_aspect + 1e-9):
            break  # heights only shrink from here on, so every later width is too wide as well
        if h / w <= max_aspect + 1e-9:
            sizes.add((w, h))
            sizes.add((h, w))
    if not sizes:
        raise ValueError(
            f"no bucket fits resolution {resolution}, step {step}, sides {lo}–{hi}, aspect ≤ {max_aspect}"
        )
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def assign_bucket(width: int, height: int, sizes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (compared as log ratios, so 1:2 and 2:1 are
    equally far from square); ties go to the larger bucket, then to the first listed.

    diffusers' ``find_nearest_bucket`` minimises |h·bw − w·bh|, which grows with the bucket's size and so
    prefers small buckets at equal shape; it is not used for that reason.
    """
    target = math.log(width / height)
    best, best_key = None, None
    for w, h in sizes:
        key = (round(abs(math.log(w / h) - target), 12), -(w * h))
        if best_key is None or key < best_key:
            best, best_key = (w, h), key
    if best is None:
        raise ValueError("no bucket sizes given")
    return best


def plan_buckets(items: Iterable[Any], resolution: int, step: int, enabled: bool) -> list[tuple[int, int]]:
    """The (width, height) bucket of each item (anything with ``width``/``height``); all square when disabled."""
    items = list(items)
    if not enabled:
        return [(resolution, resolution)] * len(items)
    sizes = bucket_sizes(resolution, step)
    cache: dict[tuple[int, int], tuple[int, int]] = {}
    out = []
    for item in items:
        key = (item.width, item.height)
        if key not in cache:
            cache[key] = assign_bucket(item.width, item.height, sizes)
        out.append(cache[key])
    return out


def prepare_image(
    img: Image.Image, bucket_wh: tuple[int, int], *, flip: bool = False
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize ``img`` (RGB) to cover the bucket, centre-crop to it, optionally mirror it.

    Returns a float32 CHW tensor in [-1, 1], the crop's top-left (y, x) in the resized image (after the
    mirror, as SDXL's crop conditioning expects) and the original (height, width).
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    bw, bh = bucket_wh
    w, h = img.size
    original_hw = (h, w)
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        # LANCZOS keeps detail when shrinking; for enlarging it rings, BICUBIC is the smoother choice.
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((rw, rh), resample=resample, reducing_gap=3.0 if scale < 0.5 else None)
    y, x = (rh - bh) // 2, (rw - bw) // 2
    img = img.crop((x, y, x + bw, y + bh))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = rw - x - bw
    import torch  # here, not at the top: scanning a dataset (`lora-studio inspect`) need not load torch (~1.5 s)

    arr = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return tensor.contiguous(), (y, x), original_hw
