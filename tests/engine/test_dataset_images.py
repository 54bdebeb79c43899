"""Image loading and conversion: every odd mode ends as the right RGB pixels; bad files raise DatasetImageError."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.engine.dataset import DatasetImageError, load_image, to_rgb
from studio.engine.images import has_transparency, probe_image


def _save(path: Path, img: Image.Image, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def test_transparent_rgba_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 255, 0, 0))  # fully transparent green
    img.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    out = load_image(_save(tmp_path / "a.png", img))
    assert out.mode == "RGB" and out.size == (4, 2)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == pytest.approx((127, 127, 127), abs=1)
    assert out.getpixel((3, 1)) == (255, 0, 0)


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([9, 9, 9, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    path = _save(tmp_path / "p.png", img, transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 3)) == (0, 0, 255)
    # without transparency, index 0 keeps its colour
    out = load_image(_save(tmp_path / "q.png", img))
    assert out.getpixel((0, 0)) == (9, 9, 9)


def test_gray_alpha_becomes_gray_on_white(tmp_path):
    img = Image.new("LA", (2, 1), (40, 255))
    img.putpixel((0, 0), (40, 0))
    out = load_image(_save(tmp_path / "la.png", img))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (40, 40, 40)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 128, 65535, 300]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = load_image(_save(tmp_path / "g16.png", img))
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (1, 1, 1)]


@pytest.mark.parametrize("mode,values,expected", [
    ("I", [0, 32896, 65535], [0, 128, 255]),
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
])
def test_32_bit_modes_convert(mode, values, expected):
    img = Image.new(mode, (3, 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    out = to_rgb(img)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == expected


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    out = load_image(_save(tmp_path / "c.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95))
    assert out.mode == "RGB"
    assert out.getpixel((8, 8)) == pytest.approx((255, 0, 0), abs=6)


def test_exif_orientation_6_turns_the_image_upright(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = _save(tmp_path / "r.jpg", img, quality=95, exif=exif)
    out = load_image(path)
    assert out.size == (20, 40)
    assert out.getpixel((16, 3)) == pytest.approx((255, 0, 0), abs=12)  # now at the top-right
    assert out.getpixel((3, 3)) == pytest.approx((0, 0, 0), abs=12)
    probe = probe_image(path)
    assert (probe.width, probe.height) == (20, 40)


def test_thumbnail_is_small_and_upright(tmp_path):
    img = Image.new("RGB", (800, 400), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 8
    out = load_image(_save(tmp_path / "big.jpg", img, exif=exif), thumbnail=100)
    assert max(out.size) == 100 and out.size[1] > out.size[0]


def test_rgb_png_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    out = load_image(_save(tmp_path / "x.png", Image.fromarray(arr)))
    assert np.array_equal(np.asarray(out), arr)


def test_has_transparency_ignores_an_opaque_alpha_channel():
    assert not has_transparency(Image.new("RGBA", (2, 2), (1, 2, 3, 255)))
    assert has_transparency(Image.new("RGBA", (2, 2), (1, 2, 3, 254)))
    assert not has_transparency(Image.new("RGB", (2, 2)))


@pytest.mark.parametrize("name,data,words", [
    ("zero.png", b"", "Empty file"),
    ("text.png", b"hello, I am text\n" * 10, "it is a text file"),
    ("html.jpg", b"<!DOCTYPE html><html><body>404</body></html>", "web page"),
    ("gif.png", b"GIF89a" + b"\x00" * 40, "GIF image"),
    ("noise.webp", bytes(range(256)) * 4, "Not a WebP image"),
], ids=["empty", "text", "html", "gif", "noise"])
def test_bad_files_raise_dataset_image_error(tmp_path, name, data, words):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DatasetImageError) as info:
        load_image(path)
    assert words in info.value.problem
    assert info.value.path == path
    assert words in probe_image(path).error


def test_truncated_files_are_caught_in_every_format(tmp_path):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")):
        buf = io.BytesIO()
        img.save(buf, fmt)
        data = buf.getvalue()
        path = tmp_path / f"t.{ext}"
        path.write_bytes(data[: len(data) * 3 // 4])
        with pytest.raises(DatasetImageError):
            load_image(path)
        assert probe_image(path).error, fmt


def test_missing_file_raises_dataset_image_error(tmp_path):
    with pytest.raises(DatasetImageError, match="Could not be opened"):
        load_image(tmp_path / "nope.png")
