"""Compare a run's saved steps: a grid of images (rows = saved LoRAs, columns = strengths) at one prompt and seed.

Each cell is cached as a PNG in the run folder (``grid/``), keyed by everything that made it, so a grid drawn
once in the window or by ``lora-studio grid`` comes back instantly and survives a restart. Knowing when to stop
is the point: the step where the picture stops improving is the LoRA to export.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

from studio.engine.config import Job
from studio.engine.runs import RunFolder

GRID_FOLDER = "grid"
DEFAULT_STRENGTHS = (0.0, 0.5, 1.0)


class GridError(ValueError):
    """A grid that cannot be drawn: the sentence says what to do."""


@dataclass(frozen=True)
class GridRow:
    """One saved LoRA of the run: an intermediate one (named by its step) or the final one."""

    step: int | None  # None when the step is unknown (a final LoRA without ss_steps)
    path: Path
    final: bool = False

    @property
    def label(self) -> str:
        if self.final:
            return f"step {self.step} (final)" if self.step is not None else "final"
        return f"step {self.step}"


@dataclass(frozen=True)
class GridSpec:
    """What every cell shares: the prompt, seed and sampler settings (the same seed makes rows comparable)."""

    prompt: str
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    seed: int = 1234
    steps: int = 20
    guidance: float = 7.0
    negative_prompt: str = ""
    size: int | None = None  # None: the model's native size


@dataclass(frozen=True)
class CellDone:
    """Progress: one cell is ready (``image_path`` is its cached PNG)."""

    row: int
    column: int
    done: int
    total: int
    image_path: Path
    cached: bool


@dataclass
class Grid:
    """A rendered grid: ``paths[row][column]`` is the PNG of that cell."""

    spec: GridSpec
    rows: list[GridRow]
    paths: list[list[Path]] = field(default_factory=list)

    def image(self, row: int, column: int) -> Image.Image:
        with Image.open(self.paths[row][column]) as im:
            return im.convert("RGB")


# --------------------------------------------------------------------------------------------- the rows


def _final_step(path: Path) -> int | None:
    from studio.engine.safe_load import read_safetensors_header

    try:
        steps = read_safetensors_header(path).metadata.get("ss_steps", "")
    except Exception:  # a damaged file still gets a row; loading it later says what is wrong
        return None
    return int(steps) if steps.isdigit() else None


def grid_rows(run_dir: Path | str, name: str | None = None) -> list[GridRow]:
    """The run's saved LoRAs, oldest step first and the final one last; raises GridError when it has none."""
    folder = RunFolder(Path(run_dir))
    if name is None:
        name = run_job(run_dir).output.name
    rows = [GridRow(step, path) for step, path in folder.intermediate_loras(name)]
    final = folder.lora_path(name)
    if final.is_file():
        rows.append(GridRow(_final_step(final), final, final=True))
    if not rows:
        raise GridError(f"'{run_dir}' holds no LoRA named '{name}' yet; train (with output.save_every for "
                        "intermediate steps) or choose another run folder")
    return rows


def run_job(run_dir: Path | str) -> Job:
    """The job a run folder was made with (its job.toml)."""
    from studio.engine.config import load_job

    job_file = RunFolder(Path(run_dir)).job_file
    if not job_file.is_file():
        raise GridError(f"'{run_dir}' is not a run folder (it has no job.toml); choose the folder a training run wrote")
    return load_job(job_file)


def parse_strengths(text: str) -> tuple[float, ...]:
    """"0, 0.5, 1" → (0.0, 0.5, 1.0); raises GridError naming the bad entry."""
    values = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise GridError(f"strength '{part}' is not a number; write strengths like 0, 0.5, 1") from None
        if not -4.0 <= value <= 4.0:
            raise GridError(f"strength {value:g} is out of range; use values between -4 and 4 (1 is as trained)")
        values.append(value)
    if not values:
        raise GridError("no strengths given; write them like 0, 0.5, 1")
    return tuple(values)


# --------------------------------------------------------------------------------------------- the cells


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def cell_key(spec: GridSpec, model_path: str, lora: Path | None, strength: float) -> str:
    """Everything that decides a cell's picture; strength 0 is the base model, the same for every row."""
    use_lora = lora is not None and strength != 0
    parts = {
        "model": model_path, "prompt": spec.prompt, "negative": spec.negative_prompt, "seed": spec.seed,
        "steps": spec.steps, "guidance": spec.guidance, "size": spec.size,
        "lora": _file_identity(lora) if use_lora else None, "strength": strength if use_lora else 0.0,
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def render_grid(
    bundle: Any,
    run_dir: Path | str,
    spec: GridSpec,
    rows: list[GridRow],
    *,
    model_path: str,
    progress: Callable[[CellDone], None] | None = None,
    stop: threading.Event | None = None,
) -> Grid:
    """Render (or read from the cache) every cell, row by row; ``stop`` ends it between cells (GridError)."""
    from studio.engine.sampling import generate, save_png

    cache = Path(run_dir) / GRID_FOLDER
    cache.mkdir(parents=True, exist_ok=True)
    grid = Grid(spec, rows)
    total, done = len(rows) * len(spec.strengths), 0
    for r, row in enumerate(rows):
        paths = []
        for c, strength in enumerate(spec.strengths):
            if stop is not None and stop.is_set():
                raise GridError("stopped before the grid was complete")
            path = cache / f"{cell_key(spec, model_path, row.path, strength)}.png"
            cached = path.is_file()
            if not cached:
                image = generate(bundle, spec.prompt, negative_prompt=spec.negative_prompt, seed=spec.seed,
                                 steps=spec.steps, guidance=spec.guidance, width=spec.size, height=spec.size,
                                 lora_path=row.path if strength != 0 else None, lora_scale=strength)
                save_png(image, path, {"prompt": spec.prompt, "seed": str(spec.seed), "steps": str(spec.steps),
                                       "lora": row.path.name if strength != 0 else "", "strength": f"{strength:g}"})
            paths.append(path)
            done += 1
            if progress is not None:
                progress(CellDone(r, c, done, total, path, cached))
        grid.paths.append(paths)
    return grid


# --------------------------------------------------------------------------------------------- the sheet


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def strength_label(strength: float) -> str:
    # Plain ASCII: PIL's built-in font has no "×".
    return "base (0)" if strength == 0 else f"strength {strength:g}"


def compose_grid(grid: Grid, cell: int | None = None) -> Image.Image:
    """One labelled picture of the grid: the prompt on top, strengths over the columns, steps beside the rows.

    Cells are scaled up (without blurring) to at least 128 px so the demo model's 64 px pictures can be judged.
    """
    first = grid.image(0, 0)
    cell = cell or max(128, first.width)
    scale = cell / first.width
    cell_h = round(first.height * scale)
    pad = max(6, cell // 24)
    font, small = _font(max(12, cell // 9)), _font(max(11, cell // 11))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.textlength(row.label, font=font) for row in grid.rows) + 2 * pad
    title = f"{grid.spec.prompt}  ·  seed {grid.spec.seed}, {grid.spec.steps} steps"
    title_h, head_h = cell // 6 + pad, cell // 7 + pad
    cols = len(grid.spec.strengths)
    width = int(label_w + cols * (cell + pad) + pad)
    height = int(title_h + head_h + len(grid.rows) * (cell_h + pad) + pad)
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad // 2), title, fill=(20, 20, 20), font=small)
    for c, strength in enumerate(grid.spec.strengths):
        x = label_w + c * (cell + pad)
        draw.text((x + cell / 2, title_h + head_h / 2), strength_label(strength), fill=(20, 20, 20), font=font,
                  anchor="mm")
    for r, row in enumerate(grid.rows):
        y = title_h + head_h + r * (cell_h + pad)
        draw.text((pad, y + cell_h / 2), row.label, fill=(20, 20, 20), font=font, anchor="lm")
        for c in range(cols):
            image = grid.image(r, c).resize((cell, cell_h), Image.NEAREST if scale >= 1 else Image.LANCZOS)
            sheet.paste(image, (int(label_w + c * (cell + pad)), int(y)))
    return sheet


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference (0–255) between two same-size pictures: how much a LoRA changed one."""
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())
