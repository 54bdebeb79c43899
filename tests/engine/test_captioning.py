"""Captioning: each tiny model captions the demo images end to end (load → caption → write → the doctor reads
it back), options, modes, bad input, cancel, safe writes and the consented download's offline behaviour."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_captioning import TINY_TAGS, WORDS
from studio.engine.captioning import (
    BACKUP_FOLDER, TERMINAL, CaptioningCancelled, CaptioningFailed, CaptioningFinished, CaptionModelError,
    CaptionOptions, CaptionProposed, CaptionRequest, CaptionSkipped, OverwriteNotConfirmed, compose_proposal,
    run_captioning, write_captions,
)
from studio.engine.captioning import hub
from studio.engine.captioning.models import find_offline, identify, load_captioner, resolve
from studio.engine.captioning.tagger_onnx import preprocess, select_tags
from studio.engine.dataset import scan_dataset


def run(request, stop=None):
    events = list(run_captioning(request, stop))
    assert sum(isinstance(e, TERMINAL) for e in events) == 1 and isinstance(events[-1], TERMINAL), events
    return events


def proposals(events):
    return [e.proposal for e in events if isinstance(e, CaptionProposed)]


TAG_TEXTS = {name if name == "^_^" else name.replace("_", " ") for name, category in TINY_TAGS if category != 9}


@pytest.mark.parametrize("kind", ["tagger", "blip", "florence2"])
def test_each_captioner_captions_the_demo_dataset_and_the_doctor_reads_it_back(kind, tiny_captioners, demo_copy):
    old = {p.name: p.read_bytes() for p in demo_copy.glob("*.txt")}
    options = CaptionOptions(mode="replace", prefix="studioshape", general_threshold=0.5, max_tokens=12, beams=2)
    events = run(CaptionRequest(demo_copy, str(tiny_captioners[kind]), kind, options))
    assert isinstance(events[-1], CaptioningFinished) and events[-1].proposed == 8
    made = proposals(events)
    assert [p.rel for p in made] == [f"shape_0{i}.png" for i in range(8)]
    for p in made:
        assert p.proposed.startswith("studioshape, ") and p.overwrites
        body = p.proposed[len("studioshape, "):]
        if kind == "tagger":  # tags from the list, underscores as spaces, emoticons kept, no rating by default
            assert set(body.split(", ")) <= TAG_TEXTS and body
        else:  # words of the tiny tokenizer's vocabulary
            assert body and all(w.isprintable() for w in body)
            assert set(body.replace(",", " ").split()) <= set(WORDS) | set("abcdefghijklmnopqrstuvwxyz") | {"photo"}
    assert not any(p.read_bytes() != old[p.name] for p in demo_copy.glob("*.txt"))  # proposing writes nothing

    with pytest.raises(OverwriteNotConfirmed):
        write_captions(demo_copy, made)
    assert all(p.read_bytes() == old[p.name] for p in demo_copy.glob("*.txt"))
    result = write_captions(demo_copy, made, confirm_overwrite=True)
    assert len(result.written) == 8 and not result.edit.failed
    assert result.backup_dir.parent == demo_copy / BACKUP_FOLDER
    assert {p.name: p.read_bytes() for p in result.backup_dir.glob("*.txt")} == old  # the exact old text

    report = scan_dataset(demo_copy)  # the doctor: same images, new captions, backups neither images nor captions
    assert report.usable == 8 and report.ignored == 1  # the hidden .lora-studio folder
    assert {i.image_path.name: i.caption for i in report.items} == {p.image_path.name: p.proposed for p in made}
    assert all(i.caption_source == "file" for i in report.items)
    assert not any(".lora-studio" in i.file for i in report.issues)


def test_tagger_preprocessing_follows_the_wd_taggers():
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))  # wide and red
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # a transparent pixel becomes white
    arr = preprocess(rgba, 20)
    assert arr.shape == (20, 20, 3) and arr.dtype == np.float32
    assert arr[10, 10].tolist() == [0, 0, 255]  # BGR
    assert arr[0, 10].tolist() == [255, 255, 255] and arr[19, 10].tolist() == [255, 255, 255]  # white padding, centred
    assert arr[5, 0].tolist() == [255, 255, 255]  # transparency on white
    assert preprocess(rgba, 8).shape == (8, 8, 3)


def test_tag_selection_thresholds_split_exclusions_and_limits():
    tags = [("general", "rating"), ("explicit", "rating"), ("long_hair", "general"), ("smile", "general"),
            ("^_^", "general"), ("hero_x", "character"), ("weak_one", "character")]
    probs = np.array([0.9, 0.1, 0.8, 0.4, 0.6, 0.95, 0.7], dtype=np.float32)
    base = dict(general_threshold=0.5, character_threshold=0.85)
    assert select_tags(probs, tags, CaptionOptions(**base)).text == "hero x, long hair, ^_^"
    assert select_tags(probs, tags, CaptionOptions(**base, characters="omit")).text == "long hair, ^_^"
    assert select_tags(probs, tags, CaptionOptions(**base, characters="mixed", underscores_to_spaces=False)).text == \
        "hero_x, long_hair, ^_^"
    assert select_tags(probs, tags, CaptionOptions(general_threshold=0.3, character_threshold=0.6,
                                                   exclude_tags="long hair, weak_one")).text == "hero x, ^_^, smile"
    assert select_tags(probs, tags, CaptionOptions(**base, max_tags=2, rating=True)).text == "hero x, long hair, general"


def test_modes_prefix_and_only_missing(tiny_captioners, demo_copy):
    o = CaptionOptions
    assert compose_proposal("", "a cat", o(prefix="ohwx")) == "ohwx, a cat"
    assert compose_proposal("ohwx, old", "cat, old", o(mode="append", prefix="ohwx")) == "ohwx, old, cat"
    assert compose_proposal("old", "cat", o(mode="append", prefix="ohwx")) == "ohwx, old, cat"
    assert compose_proposal("old", "ohwx cat", o(mode="replace", prefix="ohwx")) == "ohwx cat"
    (demo_copy / "shape_03.txt").unlink()
    (demo_copy / "shape_05.txt").write_text("  \n")
    events = run(CaptionRequest(demo_copy, str(tiny_captioners["tagger"]), None, o(general_threshold=0.5)))
    assert sorted(p.rel for p in proposals(events)) == ["shape_03.png", "shape_05.png"]
    kept = [e for e in events if isinstance(e, CaptionSkipped)]
    assert len(kept) == 6 and all(e.severity == "info" and "has a caption" in e.reason for e in kept)
    result = write_captions(demo_copy, proposals(events))  # no existing text changes: no confirmation, no backup
    assert len(result.written) == 2 and result.backup_dir is None


def test_bad_models_fail_with_a_sentence_naming_the_file(tiny_captioners, tmp_path, demo_copy):
    broken = Path(shutil.copytree(tiny_captioners["tagger"], tmp_path / "broken-tagger"))
    (broken / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    replace = CaptionOptions(mode="replace")
    failed = run(CaptionRequest(demo_copy, str(broken), options=replace))[-1]
    assert isinstance(failed, CaptioningFailed) and "model.onnx" in failed.message and "download it again" in failed.message

    wrong = run(CaptionRequest(demo_copy, str(tiny_captioners["blip"]), "tagger", replace))[-1]
    assert isinstance(wrong, CaptioningFailed) and "BLIP" in wrong.message and "not a WD14 tagger" in wrong.message

    no_csv = Path(shutil.copytree(tiny_captioners["tagger"], tmp_path / "no-csv"))
    (no_csv / "selected_tags.csv").unlink()
    with pytest.raises(CaptionModelError, match="selected_tags.csv"):
        load_captioner(str(no_csv))
    short = Path(shutil.copytree(tiny_captioners["tagger"], tmp_path / "short-csv"))
    lines = (short / "selected_tags.csv").read_text().splitlines()
    (short / "selected_tags.csv").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(CaptionModelError, match="different models"):
        load_captioner(str(short))

    remote = Path(shutil.copytree(tiny_captioners["florence2"], tmp_path / "ms-florence"))
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(CaptionModelError, match="florence-community"):
        load_captioner(str(remote))

    damaged = Path(shutil.copytree(tiny_captioners["blip"], tmp_path / "damaged-blip"))
    (damaged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CaptionModelError, match="damaged"):
        load_captioner(str(damaged))
    with pytest.raises(CaptionModelError, match="no captioning model|does not hold"):
        load_captioner(str(demo_copy))


def test_an_undecodable_image_is_named_and_the_rest_are_captioned(tiny_captioners, demo_copy, monkeypatch):
    (demo_copy / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    from studio.engine import images

    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda p, **kw: (_ for _ in ()).throw(
        images.DatasetImageError(p, "Truncated since the scan")) if Path(p).name == "shape_02.png" else real(p, **kw))
    events = run(CaptionRequest(demo_copy, str(tiny_captioners["tagger"]), options=CaptionOptions(mode="replace")))
    skipped = {e.rel: e.reason for e in events if isinstance(e, CaptionSkipped)}
    assert set(skipped) == {"broken.png", "shape_02.png"} and "Truncated" in skipped["shape_02.png"]
    assert len(proposals(events)) == 7 and events[-1].skipped == 2


def test_cancel_mid_way_keeps_what_was_proposed_and_writes_nothing(tiny_captioners, demo_copy):
    stop = threading.Event()
    before = {p: p.read_bytes() for p in demo_copy.glob("*.txt")}
    events = []
    for event in run_captioning(CaptionRequest(demo_copy, str(tiny_captioners["blip"]),
                                               options=CaptionOptions(mode="replace", batch_size=2, max_tokens=6)), stop):
        events.append(event)
        if isinstance(event, CaptionProposed) and event.index == 2:
            stop.set()
    assert isinstance(events[-1], CaptioningCancelled) and events[-1].proposed == 2
    assert len(proposals(events)) == 2
    assert {p: p.read_bytes() for p in demo_copy.glob("*.txt")} == before


def test_a_failed_write_leaves_that_file_whole_and_writes_the_others(tiny_captioners, demo_copy, monkeypatch):
    made = proposals(run(CaptionRequest(demo_copy, str(tiny_captioners["tagger"]),
                                        options=CaptionOptions(mode="replace"))))
    before = (demo_copy / "shape_04.txt").read_bytes()
    from studio.engine.captioning import run as run_module

    real = run_module.atomic_write_bytes

    def flaky(path, data):
        if Path(path).name == "shape_04.txt" and BACKUP_FOLDER not in str(path):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(run_module, "atomic_write_bytes", flaky)
    result = write_captions(demo_copy, made, confirm_overwrite=True)
    assert [p.name for p, _ in result.edit.failed] == ["shape_04.txt"] and "No space" in result.edit.failed[0][1]
    assert len(result.written) == 7 and (demo_copy / "shape_04.txt").read_bytes() == before
    assert not list(demo_copy.glob(".*.partial"))


def test_models_are_found_offline_in_the_hub_cache(tiny_captioners, demo_copy, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--SmilingWolf--wd-vit-tagger-v3"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_captioners["tagger"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    other = cache / "models--someone--my-blip" / "snapshots" / ("b" * 40)
    shutil.copytree(tiny_captioners["blip"], other)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    found = {m.ref: m for m in find_offline([tiny_captioners["florence2"]])}
    assert found["SmilingWolf/wd-vit-tagger-v3"].kind == "tagger" and found["SmilingWolf/wd-vit-tagger-v3"].size_bytes > 0
    assert found["someone/my-blip"].kind == "blip"
    assert found[str(tiny_captioners["florence2"])].kind == "florence2"
    assert resolve("SmilingWolf/wd-vit-tagger-v3") == snapshot
    assert identify(snapshot) == "tagger"
    events = run(CaptionRequest(demo_copy, "SmilingWolf/wd-vit-tagger-v3", "tagger", CaptionOptions(mode="replace")))
    assert isinstance(events[-1], CaptioningFinished) and events[-1].proposed == 8
    with pytest.raises(CaptionModelError, match="not on this computer yet"):
        resolve("SmilingWolf/wd-eva02-large-tagger-v3")


def test_the_download_offer_falls_back_to_the_table_and_never_downloads_without_consent(monkeypatch):
    from huggingface_hub import constants

    offer = hub.download_offer("SmilingWolf/wd-swinv2-tagger-v3")  # the network is blocked in tests
    assert offer.source == "table" and offer.exact and offer.total_bytes == 467_460_978 + 308_468
    assert "467.8 MB" in offer.describe()
    assert hub.download_offer("florence-community/Florence-2-base").describe().count("about") == 1
    assert constants.HF_HUB_OFFLINE  # asking switched the hub on for that call only
    with pytest.raises(CaptionModelError, match="agreement"):
        hub.download(offer, consent=False)
    with pytest.raises(CaptionModelError, match="only downloads"):
        hub.download_offer("someone/unknown-model")


def test_the_offer_lists_the_hub_files_and_sizes(monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    files = [SimpleNamespace(rfilename=n, size=s) for n, s in
             (("model.onnx", 100), ("selected_tags.csv", 5), ("README.md", 7), ("sw_jax_cv_config.json", 9))]
    seen = {}

    def fake_info(self, repo_id, files_metadata=False, timeout=None):
        from huggingface_hub import constants

        seen["online"] = not constants.HF_HUB_OFFLINE
        return SimpleNamespace(siblings=files, sha="c" * 40)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_info)
    offer = hub.download_offer("SmilingWolf/wd-vit-tagger-v3")
    assert seen["online"] and offer.source == "hub" and offer.exact
    assert offer.files == (("model.onnx", 100), ("selected_tags.csv", 5)) and offer.total_bytes == 105


@pytest.mark.parametrize("kind", ["blip", "florence2"])
def test_a_length_past_the_models_position_table_is_capped_not_an_error(kind, tiny_captioners, tmp_path):
    from fixtures_data import make_dataset

    folder = make_dataset(tmp_path / "one", count=1)
    events = run(CaptionRequest(folder, str(tiny_captioners[kind]), kind,
                                CaptionOptions(mode="replace", max_tokens=1024, beams=1)))
    assert isinstance(events[-1], CaptioningFinished) and events[-1].proposed == 1, events
