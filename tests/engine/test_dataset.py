"""Dataset doctor: an 'every bad and awkward case' folder, built by code, scans to exactly the expected report."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.engine.dataset import (
    DatasetError,
    DatasetImageError,
    ScanCancelled,
    clear_scan_cache,
    folder_repeats,
    load_image,
    plan_buckets,
    prepare_image,
    scan_dataset,
    set_max_image_pixels,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_data import make_dataset  # noqa: E402
from fixtures_data import CAN_SYMLINK, _noise, build_awkward_dataset  # noqa: E402  (shared with the trainer tests)


# Every issue the awkward folder must produce: (file, severity, words in the problem, words in the action).
EXPECTED_ISSUES = [
    ("2024_trip", "warning", "starts with 2024", "repeated 1×"),
    ("animated.png", "info", "Animated", "first frame"),
    ("bomb.png", "error", "Too large: 400.0 million pixels, above the safety limit of 179.0 million", "skipped"),
    ("clip.gif", "error", "GIF file", "skipped"),
    ("cmyk.jpg", "info", "CMYK", "converted from CMYK"),
    ("empty.png", "error", "Empty file (0 bytes)", "skipped"),
    ("empty_caption.png", "warning", "Caption file 'empty_caption.txt' is empty", "used with caption 'ohwx'"),
    ("good_copy.png", "warning", "Exact copy of 'good.png'", "skipped"),
    ("gray.jpg", "info", "Grayscale", "converted to RGB"),
    ("gray_alpha.png", "info", "Grayscale image with transparent areas", "filled with white"),
    ("jpeg_named.png", "info", "JPEG file with the extension '.png'", "read as JPEG"),
    ("latin1.png", "warning", "not UTF-8; read as Windows-1252", "used with caption 'ohwx, café, crème'"),
    ("multiline.png", "info", "has 2 lines", "used with caption 'ohwx, tag one, tag two'"),
    ("no_caption.png", "warning", "No caption file ('no_caption.txt')", "used with caption 'ohwx'"),
    ("palette.png", "info", "Palette image with transparent areas", "filled with white"),
    ("rotated.jpg", "info", "EXIF orientation tag (6)", "turned upright"),
    ("sixteen.png", "info", "16-bit", "converted to 8-bit"),
    ("text.png", "error", "Not a PNG image: it is a text file", "skipped"),
    ("tiny.png", "warning", "Only 16×16 px, smaller than 64 px", "blurry"),
    ("transparent.png", "info", "Has transparent areas", "filled with white"),
    ("truncated.jpg", "error", "Truncated or damaged", "skipped"),
    ("truncated.png", "error", "Truncated or damaged", "skipped"),
    ("utf16.png", "info", "is UTF-16", "used with caption 'ohwx, naïve, utf sixteen'"),
]
if CAN_SYMLINK:
    EXPECTED_ISSUES += [
        ("broken.png", "error", "Link to a file that does not exist", "skipped"),
        ("plain/loop", "info", "already scanned ('.')", "not scanned twice"),
    ]

EXPECTED_ITEMS = {
    # file: (folder, repeats, (width, height), caption, caption_source)
    "10_faces/close/close.png": ("10_faces/close", 10, (64, 96), "close, test image", "file"),
    "10_faces/face.png": ("10_faces", 10, (64, 64), "face, test image", "file"),
    "2024_trip/trip.png": ("2024_trip", 1, (64, 64), "trip, test image", "file"),
    "animated.png": ("", 1, (64, 64), "animated, test image", "file"),
    "bom.png": ("", 1, (64, 64), "bom caption", "file"),
    "cmyk.jpg": ("", 1, (80, 80), "cmyk, test image", "file"),
    "empty_caption.png": ("", 1, (64, 64), "", "empty"),
    "good.png": ("", 1, (96, 64), "a red square, simple", "file"),
    "gray.jpg": ("", 1, (64, 64), "gray, test image", "file"),
    "gray_alpha.png": ("", 1, (64, 64), "gray alpha, test image", "file"),
    "jpeg_named.png": ("", 1, (64, 64), "jpeg named, test image", "file"),
    "latin1.png": ("", 1, (64, 64), "café, crème", "fallback-encoding"),
    "mixed_case.png": ("", 1, (64, 64), "caption with an upper-case extension", "file"),
    "multiline.png": ("", 1, (64, 64), "tag one, tag two", "file"),
    "no_caption.png": ("", 1, (64, 64), "", "missing"),
    "opaque_rgba.png": ("", 1, (64, 64), "opaque rgba, test image", "file"),
    "palette.png": ("", 1, (64, 64), "palette, test image", "file"),
    "photo.bmp": ("", 1, (64, 72), "photo, test image", "file"),
    "plain/p.jpg": ("plain", 1, (64, 64), "p, test image", "file"),
    "rotated.jpg": ("", 1, (80, 128), "rotated, test image", "file"),
    "sixteen.png": ("", 1, (64, 64), "sixteen, test image", "file"),
    "tiny.png": ("", 1, (16, 16), "tiny, test image", "file"),
    "transparent.png": ("", 1, (64, 64), "transparent, test image", "file"),
    "UPPER.PNG": ("", 1, (64, 64), "UPPER, test image", "file"),
    "utf16.png": ("", 1, (64, 64), "naïve, utf sixteen", "file"),
    "ünïcödé 画像.webp": ("", 1, (64, 64), "unicode name", "file"),
}
# notes.json, readme.md, orphan.txt, .DS_Store, .hidden.png, .thumbs/, __MACOSX/
EXPECTED_IGNORED = 7


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> Path:
    return build_awkward_dataset(tmp_path_factory.mktemp("awkward") / "data")


@pytest.fixture(scope="module")
def awkward_report(awkward):
    clear_scan_cache()
    return scan_dataset(awkward, trigger_word="ohwx")


# ----------------------------------------------------------------------------------------------- the report


def test_awkward_folder_items_are_exactly_the_usable_images(awkward_report, awkward):
    got = {item.image_path.relative_to(awkward).as_posix(): item for item in awkward_report.items}
    assert set(got) == set(EXPECTED_ITEMS)
    for rel, (folder, repeats, wh, caption, source) in EXPECTED_ITEMS.items():
        item = got[rel]
        assert (item.folder, item.repeats, (item.width, item.height), item.caption, item.caption_source) == (
            folder, repeats, wh, caption, source), rel
        assert len(item.sha256) == 64 and item.size == item.image_path.stat().st_size
        assert item.mtime_ns == item.image_path.stat().st_mtime_ns
    assert awkward_report.usable == len(EXPECTED_ITEMS)
    assert awkward_report.images_per_epoch == len(EXPECTED_ITEMS) + 2 * 9  # two images in 10_faces
    assert awkward_report.ignored == EXPECTED_IGNORED


def test_awkward_folder_reports_every_issue_exactly(awkward_report):
    got = [(i.file, i.severity) for i in awkward_report.issues]
    assert sorted(got) == sorted((f, s) for f, s, _, _ in EXPECTED_ISSUES), "\n".join(map(str, awkward_report.issues))
    by_file = {i.file: i for i in awkward_report.issues}
    for file, severity, problem, action in EXPECTED_ISSUES:
        issue = by_file[file]
        assert problem in issue.problem, issue
        assert action in issue.action, issue
        assert issue.problem[0].isupper() or issue.problem[0].isdigit(), issue  # reads as a sentence
    assert all(i.action.startswith("skipped") for i in awkward_report.issues if i.severity == "error")


def test_scan_is_sorted_and_deterministic(awkward, awkward_report):
    rels = [item.image_path.relative_to(awkward).as_posix() for item in awkward_report.items]
    assert rels[:3] == ["10_faces/close/close.png", "10_faces/face.png", "2024_trip/trip.png"]
    clear_scan_cache()
    serial = scan_dataset(awkward, trigger_word="ohwx", workers=1)
    cached = scan_dataset(awkward, trigger_word="ohwx")
    for other in (serial, cached):
        assert other.items == awkward_report.items
        assert other.issues == awkward_report.issues
        assert other.to_json() == awkward_report.to_json()


def test_every_scanned_item_loads_and_prepares_for_its_bucket(awkward_report):
    buckets = plan_buckets(awkward_report.items, 128, 32, True)
    for item, bucket in zip(awkward_report.items, buckets):
        img = load_image(item.image_path)
        assert img.mode == "RGB"
        assert img.size == (item.width, item.height), item.image_path.name
        tensor, _, original = prepare_image(img, bucket, flip=True)
        assert tensor.shape == (3, bucket[1], bucket[0]) and original == (item.height, item.width)
        assert -1 <= tensor.min() and tensor.max() <= 1


def test_every_error_file_fails_to_load_with_a_dataset_image_error(awkward_report, awkward):
    for issue in awkward_report.issues:
        if issue.severity == "error" and issue.file.endswith((".png", ".jpg")):
            with pytest.raises(DatasetImageError):
                load_image(awkward / issue.file)


def test_to_json_is_serialisable_and_complete(awkward_report):
    data = json.loads(json.dumps(awkward_report.to_json(), ensure_ascii=False))
    assert set(data) >= {"root", "usable", "ignored", "images", "problems", "tag_frequency"}
    assert data["usable"] == len(data["images"]) == len(EXPECTED_ITEMS)
    assert {p["file"] for p in data["problems"]} == {f for f, *_ in EXPECTED_ISSUES}
    assert set(data["problems"][0]) == {"file", "problem", "severity", "action"}
    assert data["images"][0]["file"] == "10_faces/close/close.png"


def test_tag_frequency_is_per_folder_in_kohya_format(awkward_report):
    freq = awkward_report.tag_frequency()
    assert freq["10_faces"] == {"ohwx": 1, "face": 1, "test image": 1}
    assert freq["10_faces/close"] == {"ohwx": 1, "close": 1, "test image": 1}
    assert freq["1_plain"] == {"ohwx": 1, "p": 1, "test image": 1}
    root = freq[f"1_{awkward_report.root.name}"]
    assert root["ohwx"] == sum(1 for i in awkward_report.items if i.folder == "")
    assert root["café"] == 1 and root["tag one"] == 1


def test_summary_line(awkward_report):
    assert awkward_report.summary().startswith(f"{len(EXPECTED_ITEMS)} images usable (")
    assert "skipped" in awkward_report.summary()


# ----------------------------------------------------------------------------------------- smaller behaviours


def test_missing_captions_are_info_when_no_image_has_one(tmp_path):
    for i in range(2):
        _noise((64, 64), i).save(tmp_path / f"{i}.png")
    report = scan_dataset(tmp_path, trigger_word="sks")
    assert [(i.severity, i.action) for i in report.issues] == [("info", "used with caption 'sks'")] * 2
    report = scan_dataset(tmp_path)
    files = [i for i in report.issues if i.file != "."]
    assert {(i.severity, i.action) for i in files} == {("info", "used with an empty caption")}
    # No caption anywhere and no trigger word: one warning for the folder says what to do.
    folder = [i for i in report.issues if i.file == "."]
    assert [(i.severity, "trigger word" in i.action) for i in folder] == [("warning", True)]


def test_pixel_limit_is_configurable(tiny_dataset):
    report = scan_dataset(tiny_dataset, max_pixels=64 * 64 - 1)
    assert report.usable == 0
    assert all("Too large" in i.problem for i in report.issues if i.file != ".")
    assert report.issues[0].file == "." and report.issues[0].severity == "error"  # folder-level issues first
    assert scan_dataset(tiny_dataset, max_pixels=64 * 64).usable == 4
    from studio.engine import images

    old = images.MAX_IMAGE_PIXELS
    try:
        set_max_image_pixels(100)
        assert Image.MAX_IMAGE_PIXELS == 100
        assert scan_dataset(tiny_dataset).usable == 0
    finally:
        set_max_image_pixels(old)
    assert scan_dataset(tiny_dataset).usable == 4
    with pytest.raises(DatasetImageError, match="Too large"):
        load_image(tiny_dataset / "img_00.png", max_pixels=100)


def test_empty_folder_says_there_is_nothing_to_train_on(tmp_path):
    report = scan_dataset(tmp_path)
    assert report.usable == 0 and report.ignored == 0
    assert [(i.file, i.severity, i.action) for i in report.issues] == [(".", "error", "nothing to train on")]


def test_bad_dataset_paths_raise_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(tmp_path / "f.png")


def test_repeats_from_dict_win_over_folder_names_then_default(tmp_path):
    make_dataset(tmp_path / "5_cats", 1, seed=1)
    make_dataset(tmp_path / "dogs", 1, seed=2)
    make_dataset(tmp_path / "birds", 1, seed=3)
    make_dataset(tmp_path / "birds" / "small", 1, seed=4)
    make_dataset(tmp_path, 1, seed=5)
    report = scan_dataset(tmp_path, repeats={"5_cats": 2, "dogs": 7, "ghost": 3}, default_repeats=4)
    got = {i.folder: i.repeats for i in report.items}
    assert got == {"": 4, "5_cats": 2, "dogs": 7, "birds": 4, "birds/small": 4}
    assert [(i.file, i.severity) for i in report.issues] == [("ghost", "warning")]
    by_name = {i.folder: i.repeats for i in scan_dataset(tmp_path).items}
    assert by_name["5_cats"] == 5  # by its kohya name when the dict does not say


def test_folder_repeats_rules():
    assert folder_repeats("", {}, 3) == (3, None)
    assert folder_repeats("10_a", {}, 1) == (10, None)
    assert folder_repeats("10_a/b", {}, 1) == (10, None)  # inherited from the enclosing kohya folder
    assert folder_repeats("10_a/2_b", {}, 1) == (2, None)  # innermost wins
    assert folder_repeats("10_a/b", {"b": 3}, 1) == (3, None)  # by folder name
    assert folder_repeats("10_a/b", {"10_a/b": 4, "b": 3}, 1) == (4, None)  # by relative path first
    assert folder_repeats("10_a/b", {"10_a": 6}, 1) == (6, None)  # the dict beats kohya names at any level
    n, warning = folder_repeats("0_a", {}, 2)
    assert n == 2 and "does not look like a repeat count" in warning
    n, warning = folder_repeats("a", {"a": 0}, 2)
    assert n == 2 and "whole number" in warning
    assert folder_repeats("a_10", {}, 1) == (1, None)  # not kohya style; we never demand it either
    assert folder_repeats("", {".": 3}, 1) == (3, None)  # the root by "." (or "")
    assert folder_repeats("a", {"a": 2.0}, 1) == (2, None)  # TOML may give a float


def test_progress_and_stop(tmp_path):
    make_dataset(tmp_path, 6)
    calls = []
    scan_dataset(tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    stop = threading.Event()
    stop.set()
    with pytest.raises(ScanCancelled):
        scan_dataset(tmp_path, stop=stop)
    with pytest.raises(ScanCancelled):
        scan_dataset(tmp_path, stop=stop, workers=1)


def test_cache_notices_a_changed_file(tmp_path):
    make_dataset(tmp_path, 2)
    first = scan_dataset(tmp_path)
    (tmp_path / "img_01.png").write_bytes(b"")
    second = scan_dataset(tmp_path)
    assert first.usable == 2 and second.usable == 1
    assert [i.problem for i in second.issues] == ["Empty file (0 bytes)"]


@pytest.mark.skipif(not CAN_SYMLINK, reason="symlinks need privileges on Windows")
def test_linked_folders_are_scanned_once(tmp_path):
    make_dataset(tmp_path / "real", 2)
    os.symlink(tmp_path / "real", tmp_path / "alias", target_is_directory=True)
    os.symlink(tmp_path, tmp_path / "real" / "up", target_is_directory=True)
    report = scan_dataset(tmp_path)
    assert {i.folder for i in report.items} == {"real"}  # the real folder wins over the link to it
    assert [(i.file, i.severity, i.problem) for i in report.issues] == [
        ("alias", "info", "Link to a folder that is already scanned ('real')"),
        ("real/up", "info", "Link to a folder that is already scanned ('.')"),
    ]


def test_scan_speed_500_small_images(tmp_path, monkeypatch):
    """A second scan of unchanged files decodes nothing (the probe cache); the time is printed (pytest -s) for the
    report, not asserted: timings belong in benchmarks/, and a busy CI core made the cached scan slower once."""
    from studio.engine import images

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for i in range(500):
        arr = base.copy()
        arr[0, 0] = (i % 256, i // 256, 7)  # every file different, so none is a duplicate
        Image.fromarray(arr).save(tmp_path / f"{i:04d}.png", compress_level=1)
        (tmp_path / f"{i:04d}.txt").write_text(f"image {i}", encoding="utf-8")
    clear_scan_cache()
    opened: list[object] = []
    real_open = images.Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(images.Image, "open", counting_open)
    t0 = time.perf_counter()
    report = scan_dataset(tmp_path)
    cold, cold_opens = time.perf_counter() - t0, len(opened)
    opened.clear()
    t0 = time.perf_counter()
    again = scan_dataset(tmp_path)
    warm = time.perf_counter() - t0
    print(f"\nscan of 500 64×64 PNGs: {cold * 1000:.0f} ms cold, {warm * 1000:.0f} ms cached")
    assert report.usable == 500 and not report.issues and again.usable == 500
    assert cold_opens >= 500 and opened == []
