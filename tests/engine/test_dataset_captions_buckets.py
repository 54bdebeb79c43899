"""Captions (decoding, trigger, shuffle, dropout, atomic save) and buckets (sizes, assignment, cropping)."""

from __future__ import annotations

import os
import random
import stat

import pytest
import torch
from PIL import Image

from studio.engine.captions import decode_caption, has_trigger
from studio.engine.dataset import (
    assign_bucket,
    bucket_sizes,
    caption_path_for,
    compose_caption,
    plan_buckets,
    prepare_image,
    save_caption,
    scan_dataset,
)


# ------------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize("data,text,encoding", [
    (b"a cat, sitting", "a cat, sitting", "utf-8"),
    ("\ufeffcaf\u00e9".encode("utf-8"), "café", "utf-8"),
    ("naïve".encode("utf-16"), "naïve", "utf-16"),
    ("café".encode("cp1252"), "café", "cp1252"),
    (b"\x81\x8d odd", "\x81\x8d odd", "latin-1"),  # undefined in cp1252: Latin-1 still reads it
    (b"  one\r\n\r\ntwo  \n", "one, two", "utf-8"),
    (b"\n \t\n", "", "utf-8"),
])
def test_decode_caption_never_fails(data, text, encoding):
    got = decode_caption(data)
    assert (got.text, got.encoding) == (text, encoding)


def test_trigger_is_prepended_once():
    kw = dict(shuffle_tags=False, keep_tokens=0, dropout=0.0, rng=random.Random(0))
    assert compose_caption("a cat", trigger_word="ohwx", **kw) == "ohwx, a cat"
    assert compose_caption("", trigger_word="ohwx", **kw) == "ohwx"
    assert compose_caption("ohwx, a cat", trigger_word="ohwx", **kw) == "ohwx, a cat"
    assert compose_caption("ohwx man smiling", trigger_word="ohwx", **kw) == "ohwx man smiling"
    assert compose_caption("a cat, OHWX", trigger_word="ohwx", **kw) == "a cat, OHWX"
    assert compose_caption("ohwxman", trigger_word="ohwx", **kw) == "ohwx, ohwxman"
    assert compose_caption("  a cat  ", trigger_word="", **kw) == "a cat"
    assert compose_caption("", trigger_word="", **kw) == ""
    assert compose_caption("sks dog on grass", trigger_word="sks dog", **kw) == "sks dog on grass"
    assert has_trigger("anything", "")


def test_shuffle_keeps_the_first_tags_and_the_trigger():
    tags = [f"t{i}" for i in range(8)]
    caption = ", ".join(tags)
    seen = set()
    for seed in range(30):
        out = compose_caption(caption, trigger_word="ohwx", shuffle_tags=True, keep_tokens=2, dropout=0.0,
                              rng=random.Random(seed)).split(", ")
        # the trigger is prepended and counts as one of the two kept tags
        assert out[:2] == ["ohwx", "t0"]
        assert sorted(out[2:]) == sorted(tags[1:])
        seen.add(tuple(out))
    assert len(seen) > 10  # it does shuffle
    out = compose_caption(caption, trigger_word="ohwx", shuffle_tags=True, keep_tokens=0, dropout=0.0,
                          rng=random.Random(1)).split(", ")
    assert out[0] == "ohwx"  # kept even with keep_tokens=0
    # a trigger tag further back moves to the front instead of being duplicated
    out = compose_caption("a, b, ohwx, c", trigger_word="ohwx", shuffle_tags=True, keep_tokens=1, dropout=0.0,
                          rng=random.Random(3)).split(", ")
    assert out[0] == "ohwx" and sorted(out) == ["a", "b", "c", "ohwx"]
    # the kohya way: trigger written first, keep_tokens=1 → same as letting us prepend it
    a = compose_caption("ohwx, x, y, z", trigger_word="ohwx", shuffle_tags=True, keep_tokens=1, dropout=0, rng=random.Random(5))
    b = compose_caption("x, y, z", trigger_word="ohwx", shuffle_tags=True, keep_tokens=1, dropout=0, rng=random.Random(5))
    assert a == b


def test_compose_is_deterministic_given_the_rng():
    kw = dict(trigger_word="ohwx", shuffle_tags=True, keep_tokens=1, dropout=0.3)
    caption = "a, b, c, d, e, f"
    first = [compose_caption(caption, rng=r, **kw) for r in [random.Random(7)] for _ in range(50)]
    rng = random.Random(7)
    second = [compose_caption(caption, rng=rng, **kw) for _ in range(50)]
    assert first == second
    assert "" in first and any(first)


def test_dropout_zero_and_one():
    rng = random.Random(0)
    assert all(compose_caption("a, b", trigger_word="t", shuffle_tags=False, keep_tokens=0, dropout=1.0, rng=rng) == ""
               for _ in range(20))
    state = rng.getstate()
    assert all(compose_caption("a, b", trigger_word="t", shuffle_tags=False, keep_tokens=0, dropout=0.0, rng=rng) == "t, a, b"
               for _ in range(20))
    assert rng.getstate() == state  # no dropout, no shuffle: the rng is not consumed


def test_save_caption_is_atomic_and_keeps_existing_names_and_permissions(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(img)
    path = save_caption(img, "  ohwx, a cat \n")
    assert path == tmp_path / "a.txt" and path.read_bytes() == b"ohwx, a cat"
    assert scan_dataset(tmp_path).items[0].caption == "ohwx, a cat"
    if os.name != "nt":
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600
        os.chmod(path, 0o640)
        save_caption(img, "café")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.read_text(encoding="utf-8") == "café"
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # an existing caption whose extension differs in case is rewritten, not duplicated
    img2 = tmp_path / "b.png"
    Image.new("RGB", (64, 64)).save(img2)
    (tmp_path / "b.TXT").write_text("old", encoding="utf-8")
    assert caption_path_for(img2) == tmp_path / "b.TXT"
    save_caption(img2, "new")
    assert (tmp_path / "b.TXT").read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.txt", "b.TXT", "b.png"]


def test_save_caption_failure_leaves_the_old_caption(tmp_path, monkeypatch):
    img = tmp_path / "a.png"
    (tmp_path / "a.txt").write_text("old", encoding="utf-8")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_caption(img, "new")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# -------------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("resolution,step", [(512, 64), (768, 64), (1024, 64), (512, 32), (1024, 8), (64, 64), (96, 32)])
def test_bucket_sizes_follow_the_rules(resolution, step):
    sizes = bucket_sizes(resolution, step)
    assert sizes == sorted(set(sizes), key=lambda wh: wh[0] / wh[1]) or len(set(sizes)) == len(sizes)
    sq = resolution // step * step
    assert (sq, sq) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert max(w, h) / min(w, h) <= 2.0
        assert (h, w) in sizes  # portrait and landscape alike


def test_bucket_sizes_known_set_and_limits():
    assert bucket_sizes(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    wide = bucket_sizes(512, min_side=256, max_side=1024, max_aspect=4.0)
    assert (256, 1024) in wide and (1024, 256) in wide
    assert all(256 <= s <= 1024 for wh in wide for s in wh)
    assert (704, 1408) in bucket_sizes(1024)
    with pytest.raises(ValueError):
        bucket_sizes(32, 64)


def test_assign_bucket_picks_the_closest_aspect():
    sizes = bucket_sizes(512)
    assert assign_bucket(1000, 1000, sizes) == (512, 512)
    assert assign_bucket(1600, 900, sizes) == (640, 384)  # 1.78 → 1.67
    assert assign_bucket(900, 1600, sizes) == (384, 640)
    assert assign_bucket(1200, 1000, sizes) == (576, 448)  # 1.2 → 1.29 (not 1.0)
    assert assign_bucket(5000, 100, sizes) == (640, 384)  # beyond the widest: the widest
    # ties go to the larger bucket
    assert assign_bucket(10, 10, [(256, 256), (512, 512)]) == (512, 512)
    with pytest.raises(ValueError):
        assign_bucket(1, 1, [])


def test_plan_buckets_per_item_and_disabled(tmp_path):
    from types import SimpleNamespace as NS

    items = [NS(width=1600, height=900), NS(width=64, height=64), NS(width=300, height=600)]
    assert plan_buckets(items, 512, 64, True) == [(640, 384), (512, 512), (384, 640)]
    assert plan_buckets(items, 512, 64, False) == [(512, 512)] * 3


# ---------------------------------------------------------------------------------------------- preparation


def test_prepare_image_shape_range_and_crop():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 150, 100))  # left half blue
    tensor, crop, original = prepare_image(img, (128, 64))
    assert tensor.shape == (3, 64, 128) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert original == (100, 300)
    # 300×100 → cover 128×64 at scale 0.64: 192×64, crop x = 32
    assert crop == (0, 32)
    assert torch.allclose(tensor[:, 32, 0], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)  # blue on the left
    assert torch.allclose(tensor[:, 32, -1], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)  # red on the right


def test_prepare_image_flip_mirrors_pixels_and_crop():
    img = Image.new("RGB", (301, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 150, 100))
    plain, crop, _ = prepare_image(img, (128, 64))
    flipped, fcrop, _ = prepare_image(img, (128, 64), flip=True)
    assert torch.equal(flipped, plain.flip(-1))
    rw = round(301 * 64 / 100)  # the resized width
    assert fcrop == (crop[0], rw - crop[1] - 128)


def test_prepare_image_upscales_tall_and_tiny_images():
    tensor, crop, original = prepare_image(Image.new("L", (16, 40), 0), (64, 128))
    assert tensor.shape == (3, 128, 64) and original == (40, 16)
    assert crop[1] == 0 and crop[0] >= 0
    assert torch.allclose(tensor, torch.full_like(tensor, -1.0))
