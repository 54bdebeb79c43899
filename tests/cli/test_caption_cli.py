"""`lora-studio caption`: proposals printed, existing captions changed only after consent (and backed up), a
missing model downloaded only after consent, bad input a clear message and a non-zero exit."""

from __future__ import annotations

import pytest

from studio.cli import build_parser
from studio.commands import caption as caption_cmd


def cli(*argv, ask=lambda q: False):
    args = build_parser().parse_args(["caption", *map(str, argv)])
    return caption_cmd.run(args, ask=ask)


def test_existing_captions_change_only_with_consent_and_are_backed_up(tiny_captioners, demo_copy, capsys):
    old = (demo_copy / "shape_00.txt").read_text()
    model = tiny_captioners["tagger"]
    assert cli(demo_copy, "--model", model, "--mode", "replace", "--general-threshold", "0.5") == 2
    out, err = capsys.readouterr()
    assert "[1/8] shape_00.png: " in out and f"was: {old}" in out and "--yes" in err
    assert (demo_copy / "shape_00.txt").read_text() == old and not (demo_copy / ".lora-studio").exists()

    assert cli(demo_copy, "--model", model, "--mode", "replace", "--dry-run", "--yes") == 0
    assert (demo_copy / "shape_00.txt").read_text() == old

    asked = []
    assert cli(demo_copy, "--model", model, "--mode", "replace", "--prefix", "studioshape",
               ask=lambda q: asked.append(q) or True) == 0
    assert "Change 8 existing caption(s)?" in asked[0]
    new = (demo_copy / "shape_00.txt").read_text()
    assert new.startswith("studioshape, ") and new != old
    backups = list((demo_copy / ".lora-studio" / "caption-backups").glob("*/shape_00.txt"))
    assert len(backups) == 1 and backups[0].read_text() == old
    assert "Wrote 8 caption file(s)" in capsys.readouterr().out


def test_bad_input_says_what_to_do(tiny_captioners, demo_copy, tmp_path, capsys):
    assert cli(demo_copy, "--model", tiny_captioners["blip"], "--kind", "tagger", "--mode", "replace") == 1
    assert "not a WD14 tagger" in capsys.readouterr().err
    assert cli(tmp_path / "nowhere", "--model", tiny_captioners["tagger"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli(demo_copy, "--model", tmp_path / "no-model") == 1
    assert "neither a folder nor a model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(demo_copy, "--model", tiny_captioners["tagger"], "--mode", "overwrite")


def test_a_missing_model_is_downloaded_only_after_consent(demo_copy, monkeypatch, capsys):
    from studio.engine.captioning import hub

    monkeypatch.setattr(hub, "download", lambda *a, **kw: pytest.fail("downloaded without consent"))
    assert cli(demo_copy, "--model", "SmilingWolf/wd-swinv2-tagger-v3") == 2
    err = capsys.readouterr().err
    assert "WD SwinV2 tagger v3 (SmilingWolf/wd-swinv2-tagger-v3), 467.8 MB is not on this computer" in err
    assert "--download" in err

    calls = []

    def fake_download(offer, *, consent, progress=None, stop=None):
        calls.append((offer.model_id, consent))
        raise hub.CaptionModelError("no network in tests")

    monkeypatch.setattr(hub, "download", fake_download)
    assert cli(demo_copy, "--model", "SmilingWolf/wd-swinv2-tagger-v3", "--download") == 1
    assert calls == [("SmilingWolf/wd-swinv2-tagger-v3", True)]


def test_list_models_names_the_real_models_on_offer(capsys):
    assert cli("--list-models") == 0
    out = capsys.readouterr().out
    for model_id in ("SmilingWolf/wd-eva02-large-tagger-v3", "SmilingWolf/wd-vit-tagger-v3",
                     "Salesforce/blip-image-captioning-large", "florence-community/Florence-2-base"):
        assert model_id in out
    assert "1.3 GB" in out and "about" in out
