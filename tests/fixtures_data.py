"""Test data built by code and shared by several test files: the 'every bad and awkward case' dataset folder,
and run folders as an interrupted run leaves them."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CAN_SYMLINK = os.name != "nt"


# ------------------------------------------------------------------------------------------ fixture builder


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels but holds almost no data (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def build_awkward_dataset(root: Path) -> Path:
    """Write a dataset folder with every bad and awkward case the doctor knows; returns ``root``.

    Usable images (each gets a caption unless the case is about captions): good.png, cmyk.jpg, palette.png,
    gray_alpha.png, sixteen.png, transparent.png, opaque_rgba.png, rotated.jpg, gray.jpg, tiny.png,
    jpeg_named.png, animated.png, photo.bmp, UPPER.PNG, mixed_case.png, ünïcödé 画像.webp, the caption cases,
    10_faces/face.png, 10_faces/close/close.png, 2024_trip/trip.png, plain/p.jpg.
    """
    root.mkdir(parents=True, exist_ok=True)

    def image(name: str, data: bytes, caption: str | bytes | None = "auto") -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if caption == "auto":
            caption = f"{Path(name).stem.replace('_', ' ')}, test image"
        if caption is not None:
            cap = path.with_suffix(".txt")
            cap.write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8"))

    good = _png_bytes(_noise((96, 64), 1))
    image("good.png", good, "a red square, simple")
    image("good_copy.png", good, "a different caption")  # exact copy: skipped
    image("cmyk.jpg", _jpeg_bytes(Image.new("CMYK", (80, 80), (0, 255, 255, 0))))
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    for x in range(32):
        for y in range(64):
            pal.putpixel((x, y), 0)  # left half: the transparent index
    image("palette.png", _png_bytes(pal, transparency=0))
    la = Image.new("LA", (64, 64), (50, 255))
    la.paste((50, 0), (0, 0, 32, 64))
    image("gray_alpha.png", _png_bytes(la))
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    image("sixteen.png", _png_bytes(Image.fromarray(ramp)))
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    rgba.paste((0, 255, 0, 0), (0, 0, 32, 32))
    image("transparent.png", _png_bytes(rgba))
    image("opaque_rgba.png", _png_bytes(Image.new("RGBA", (64, 64), (0, 0, 255, 255))))
    exif = Image.Exif()
    exif[0x0112] = 6
    image("rotated.jpg", _jpeg_bytes(_noise((128, 80), 2), exif=exif))
    image("gray.jpg", _jpeg_bytes(Image.new("L", (64, 64), 90)))
    image("tiny.png", _png_bytes(_noise((16, 16), 3)))
    image("jpeg_named.png", _jpeg_bytes(_noise((64, 64), 4)))
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    image("animated.png", _png_bytes(frames[0], save_all=True, append_images=frames[1:]))
    bmp = io.BytesIO()
    _noise((64, 72), 5).save(bmp, "BMP")
    image("photo.bmp", bmp.getvalue())
    image("UPPER.PNG", _png_bytes(_noise((64, 64), 6)))
    image("mixed_case.png", _png_bytes(_noise((64, 64), 7)), caption=None)
    (root / "mixed_case.TXT").write_text("caption with an upper-case extension", encoding="utf-8")
    webp = io.BytesIO()
    _noise((64, 64), 8).save(webp, "WEBP", lossless=True)
    image("ünïcödé 画像.webp", webp.getvalue(), "unicode name")

    # Captions.
    image("no_caption.png", _png_bytes(_noise((64, 64), 9)), caption=None)
    image("empty_caption.png", _png_bytes(_noise((64, 64), 10)), caption="  \n ")
    image("latin1.png", _png_bytes(_noise((64, 64), 11)), caption="café, crème".encode("cp1252"))
    image("utf16.png", _png_bytes(_noise((64, 64), 12)), caption="naïve, utf sixteen".encode("utf-16"))
    image("multiline.png", _png_bytes(_noise((64, 64), 13)), caption="tag one\ntag two\n\n")
    image("bom.png", _png_bytes(_noise((64, 64), 14)), caption="\ufeffbom caption".encode("utf-8"))

    # Bad files: reported and skipped.
    image("empty.png", b"", caption=None)
    jpeg = _jpeg_bytes(_noise((128, 128), 15))
    image("truncated.jpg", jpeg[: len(jpeg) // 2], caption=None)
    png = _png_bytes(_noise((128, 128), 16))
    image("truncated.png", png[: len(png) * 2 // 3], caption=None)
    image("text.png", b"this is not an image, just some text\n" * 4, caption=None)
    image("bomb.png", _bomb_png(20_000, 20_000), caption=None)
    gif = io.BytesIO()
    Image.new("P", (8, 8)).save(gif, "GIF")
    image("clip.gif", gif.getvalue(), caption=None)

    # Sub-folders: kohya names, a nested folder, a number that is not a repeat count, a plain name.
    image("10_faces/face.png", _png_bytes(_noise((64, 64), 17)))
    image("10_faces/close/close.png", _png_bytes(_noise((64, 96), 18)))
    image("2024_trip/trip.png", _png_bytes(_noise((64, 64), 19)))
    image("plain/p.jpg", _jpeg_bytes(_noise((64, 64), 20)))

    # Ignored silently: non-image files, hidden files and folders, tool litter.
    (root / "notes.json").write_text("{}", encoding="utf-8")
    (root / "readme.md").write_text("hello", encoding="utf-8")
    (root / "orphan.txt").write_text("a caption without an image", encoding="utf-8")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".hidden.png").write_bytes(good)
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "x.png").write_bytes(good)
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._good.png").write_bytes(b"\x00\x05\x16\x07")

    if CAN_SYMLINK:
        os.symlink(root, root / "plain" / "loop", target_is_directory=True)  # a loop back to the root
        os.symlink(root / "missing.png", root / "broken.png")
    return root


def fake_run(folder: Path, job, *, checkpoint_step: int | None = 4, finished: bool = False) -> Path:
    """A run folder as a killed run leaves it, without training: job.toml and (empty) checkpoint files.

    Enough for everything that decides *whether* a run can be resumed; nothing here can be loaded.
    """
    from studio.engine.config import save_job

    folder.mkdir(parents=True)
    save_job(job, folder / "job.toml")
    if checkpoint_step is not None:
        ck = folder / "checkpoints" / f"step-{checkpoint_step:06d}"
        ck.mkdir(parents=True)
        for name in ("lora.safetensors", "state.pt"):
            (ck / name).write_bytes(b"")
        (ck / "meta.json").write_text(json.dumps({"step": checkpoint_step, "total_steps": job.training.steps}))
        save_job(job, ck / "job.toml")
    if finished:
        (folder / f"{job.output.name}.safetensors").write_bytes(b"")
    return folder


def make_dataset(folder: Path, count: int = 4, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    """Write ``count`` simple coloured-shape images with captions; returns the folder."""
    from PIL import Image, ImageDraw
    import random

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = colours[i % len(colours)]
        img = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        d = ImageDraw.Draw(img)
        w, h = size
        d.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=colour)
        img.save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(f"a {colour} circle", encoding="utf-8")
    return folder
