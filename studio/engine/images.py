"""Reading training images safely: format allow-list, decompression-bomb limit, truncation, RGB conversion."""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp"})
# Images people drop into a dataset folder that we do not read: reported, not silently ignored.
UNSUPPORTED_IMAGE_EXTENSIONS = {
    ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF",
    ".jxl": "JPEG XL", ".psd": "Photoshop", ".svg": "SVG", ".ico": "icon", ".dng": "camera RAW",
    ".cr2": "camera RAW", ".cr3": "camera RAW", ".nef": "camera RAW", ".arw": "camera RAW", ".orf": "camera RAW",
}
# Pillow plugins we let parse user files. Restricting them keeps exotic decoders out of reach and makes a
# '.png' that is really a TIFF fail clearly. (Many phone/camera JPEGs come back as format "MPO": the JPEG
# opener returns them; "MPO" itself is not an opener name and must not be listed.)
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP", "BMP": "BMP"}
EXTENSION_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG",
                     ".webp": "WebP", ".bmp": "BMP"}

# ~179 million pixels (about 13,400 × 13,400): Pillow's own hard limit. A real photo or scan is far below;
# decoding more costs over 0.5 GB per image and is the classic decompression-bomb attack.
MAX_IMAGE_PIXELS = 178_956_970

EXIF_ORIENTATION = 0x0112


def set_max_image_pixels(limit: int) -> None:
    """Change the decompression-bomb limit for this module and for Pillow (which errors above twice it)."""
    global MAX_IMAGE_PIXELS
    MAX_IMAGE_PIXELS = int(limit)
    Image.MAX_IMAGE_PIXELS = int(limit)


# Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; we refuse above it ourselves (see
# _pixels_problem), so Pillow's warning only ever fires for files that are reported and skipped anyway.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class DatasetImageError(Exception):
    """An image that cannot be used for training; ``problem`` says why, as a short sentence."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# ---------------------------------------------------------------------------------------------- conversion


def to_rgb(img: Image.Image, *, transpose: bool = True) -> Image.Image:
    """An upright 8-bit RGB version of ``img`` (``img`` itself when it already is one): EXIF orientation applied, transparency composited on white,
    CMYK (through its ICC profile when it has one), palette, gray, gray+alpha and 16/32-bit modes converted.
    """
    # exif_transpose copies even upright images (~45 ms for 12 MP), so it runs only when there is a turn to make.
    if transpose and exif_orientation(img) != 1:
        try:
            img = ImageOps.exif_transpose(img) or img
        except Exception:  # a broken EXIF block must not cost the image; it is merely not rotated
            pass
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit PNGs (Pillow reads gray ones as I;16 or I): 0..65535 → 0..255. A plain convert("L")
        # clips everything above 255 to white.
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0  # float images are usually 0..1
        arr = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # a damaged or unsupported profile: Pillow's plain formula is still a usable image
            pass
    return img.convert("RGB")


def has_transparency(img: Image.Image) -> bool:
    """Whether any pixel of ``img`` (as decoded) is not fully opaque."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
        return alpha.getextrema()[0] < 255
    return False


def exif_orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
        value = int(value)
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


# ------------------------------------------------------------------------------------------------- loading


def _too_large(pixels: str, limit: int) -> str:
    return (f"Too large: {pixels} pixels, above the safety limit of {limit / 1e6:.1f} million "
            "(a decompression bomb, or an extreme scan); shrink it to train with it")


def _bomb_problem(exc: Exception, limit: int) -> str:
    # Pillow refused before we saw the size; its message carries the pixel count.
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return _too_large(f"{int(match.group(1)) / 1e6:.1f} million" if match else "too many", limit)


def _pixels_problem(size: tuple[int, int], limit: int) -> str | None:
    w, h = size
    if w * h > limit:
        return _too_large(f"{w}×{h} = {w * h / 1e6:.1f} million", limit)
    if w < 1 or h < 1:
        return f"Impossible image size {w}×{h}"
    return None


def _open(source: Path | io.BytesIO, path: Path, limit: int) -> Image.Image:
    try:
        img = Image.open(source, formats=PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise DatasetImageError(path, _bomb_problem(exc, limit)) from None
    except Image.UnidentifiedImageError:
        raise DatasetImageError(path, _unidentified_problem(source, path)) from None
    except Exception as exc:
        raise DatasetImageError(path, f"Could not be read ({_reason(exc)})") from None
    problem = _pixels_problem(img.size, limit)
    if problem:
        img.close()
        raise DatasetImageError(path, problem)
    return img


def _decode(img: Image.Image, path: Path) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise DatasetImageError(path, _bomb_problem(exc, MAX_IMAGE_PIXELS)) from None
    except Exception as exc:
        raise DatasetImageError(path, f"Truncated or damaged: the image cannot be decoded ({_reason(exc)})") from None


def load_image(path: Path | str, *, max_pixels: int | None = None, thumbnail: int | None = None) -> Image.Image:
    """Open ``path`` as an upright RGB image (see :func:`to_rgb`); raise DatasetImageError if it is unusable.

    ``thumbnail``: longest side of a smaller preview (JPEGs then decode at reduced scale, which is fast).
    """
    path = Path(path)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DatasetImageError(path, f"Could not be opened ({_reason(exc)})") from None
    with fh:
        img = _open(fh, path, limit)
        out: Image.Image | None = None
        try:
            if thumbnail:
                img.draft("RGB", (thumbnail, thumbnail))
            _decode(img, path)  # after this the pixels are in memory and the file may close
            try:
                out = to_rgb(img)
            except Exception as exc:
                raise DatasetImageError(path, f"Could not be converted to RGB ({_reason(exc)})") from None
        finally:
            if out is not img:  # an RGB image is returned as it is; anything else was converted to a copy
                img.close()
    if thumbnail:
        out.thumbnail((thumbnail, thumbnail), Image.Resampling.LANCZOS)
    return out


# --------------------------------------------------------------------------------------------------- probe


@dataclass
class Note:
    severity: str  # "warning" | "info"
    problem: str
    action: str


@dataclass
class Probe:
    """What scanning learnt about one image file (independent of where it lies, so it can be cached)."""

    sha256: str = ""
    width: int = 0  # upright, after EXIF orientation
    height: int = 0
    format: str = ""
    error: str = ""  # set when the file is unusable
    notes: list[Note] = field(default_factory=list)


def probe_image(path: Path, *, max_pixels: int | None = None) -> Probe:
    """Everything scanning needs from an image file: hash, upright size, and whether it decodes fully.

    Decoding fully is the only reliable way to catch truncation, so it is done; JPEGs decode at 1/8 scale
    (libjpeg still reads every byte of the entropy-coded data, so truncation is still caught, ~4× faster).
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    out = Probe()
    try:
        data = path.read_bytes()
    except OSError as exc:
        out.error = f"Could not be read ({_reason(exc)})"
        return out
    if not data:
        out.error = "Empty file (0 bytes)"
        return out
    out.sha256 = hashlib.sha256(data).hexdigest()
    try:
        img = _open(io.BytesIO(data), path, limit)
        with img:
            out.format = FORMAT_NAMES.get(img.format or "", img.format or "")
            raw_w, raw_h = img.size
            mode = img.mode
            orientation = exif_orientation(img)
            # Only PNG/WebP frames are animation; a phone's MPO "frames" are a depth map or a preview.
            animated = img.format in ("PNG", "WEBP") and bool(getattr(img, "is_animated", False))
            if img.format in ("JPEG", "MPO"):
                img.draft("RGB", (max(1, raw_w // 8), max(1, raw_h // 8)))
            _decode(img, path)
            transparent = has_transparency(img)
            try:
                to_rgb(img, transpose=False)  # the conversion load_image will do must work
            except Exception as exc:
                raise DatasetImageError(path, f"Could not be converted to RGB ({_reason(exc)})") from None
    except DatasetImageError as exc:
        out.error = exc.problem
        return out

    out.width, out.height = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)
    notes = out.notes
    expected = EXTENSION_FORMATS.get(path.suffix.lower())
    if expected and expected != out.format:
        notes.append(Note("info", f"A {out.format} file with the extension '{path.suffix}'", f"read as {out.format}"))
    if orientation != 1:
        notes.append(Note("info", f"Stored {_ORIENTATION_WORDS[orientation]} with an EXIF orientation tag ({orientation})",
                          "turned upright"))
    if mode == "CMYK":
        notes.append(Note("info", "CMYK image (print colours)", "converted from CMYK to RGB"))
    elif mode.startswith("I") or mode == "F":
        notes.append(Note("info", f"16-bit image (mode {mode})", "converted to 8-bit RGB"))
    elif mode == "P":
        notes.append(Note("info", "Palette image" + (" with transparent areas" if transparent else ""),
                          "converted from palette to RGB" + ("; transparent areas filled with white" if transparent else "")))
    elif mode in ("LA", "La"):
        notes.append(Note("info", "Grayscale image with transparent areas" if transparent else "Grayscale image (with an unused alpha channel)",
                          "converted to RGB" + ("; transparent areas filled with white" if transparent else "")))
    elif mode in ("L", "1"):
        notes.append(Note("info", "Grayscale image" + (" with transparent areas" if transparent else ""),
                          "converted to RGB" + ("; transparent areas filled with white" if transparent else
                                                " (the LoRA learns from gray pixels)")))
    elif transparent:
        notes.append(Note("info", "Has transparent areas", "transparent areas filled with white"))
    if animated:
        notes.append(Note("info", "Animated image", "only the first frame is used"))
    return out


_ORIENTATION_WORDS = {2: "mirrored", 3: "upside down", 4: "mirrored upside down", 5: "sideways and mirrored",
                      6: "sideways", 7: "sideways and mirrored", 8: "sideways"}


def _unidentified_problem(source: Path | io.BytesIO, path: Path) -> str:
    try:
        if isinstance(source, io.BytesIO):
            head = source.getvalue()[:512]
        else:
            with open(path, "rb") as fh:
                head = fh.read(512)
    except OSError:
        head = b""
    if not head:
        return "Empty file (0 bytes)"
    kind = _sniff(head)
    if kind:
        return f"Not a {_expected_name(path)} image: it is {kind}"
    return f"Not a {_expected_name(path)} image (its content is not a format LoRA Studio reads)"


def _expected_name(path: Path) -> str:
    return EXTENSION_FORMATS.get(path.suffix.lower(), "PNG/JPEG/WebP/BMP")


_MAGIC = (
    (b"GIF8", "a GIF image (not supported; save it as PNG)"),
    (b"II*\x00", "a TIFF image (not supported; save it as PNG)"),
    (b"MM\x00*", "a TIFF image (not supported; save it as PNG)"),
    (b"8BPS", "a Photoshop document (export it as PNG)"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"<!DOCTYPE html", "a web page (a failed download?)"),
    (b"<html", "a web page (a failed download?)"),
)


def _sniff(head: bytes) -> str:
    for magic, kind in _MAGIC:
        if head.startswith(magic) or head.lower().startswith(magic.lower()):
            return kind
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
            return "a HEIC photo (not supported; export it as JPEG)"
        if brand in (b"avif", b"avis"):
            return "an AVIF image (not supported; save it as PNG)"
        return "a video or HEIF file"
    try:
        head.decode("utf-8")
        printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head) / len(head)
        if printable > 0.9:
            return "a text file"
    except UnicodeDecodeError:
        pass
    return ""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 160 else text[:159] + "…"
