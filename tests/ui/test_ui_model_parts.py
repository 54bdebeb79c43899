"""Model page, parts of a transformer-only file (FLUX.1): found in ComfyUI's folders, asked for by name when missing."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from studio.engine.config import ModelSection
from ui_fakes import drop_paths


def _save(state: dict, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _comfy_tree(folder, root):
    from studio.engine.checkpoint import load_model

    bundle = load_model(ModelSection(path=str(folder)))
    models = root / "ComfyUI" / "models"
    _save(bundle.denoiser.state_dict(), models / "unet" / "tiny-flux1-dev.safetensors")
    _save({"text_model." + k.removeprefix("text_model."): v for k, v in bundle.text_encoders[0].state_dict().items()},
          models / "text_encoders" / "clip_l.safetensors")
    _save({k: v.half() for k, v in bundle.text_encoders[1].state_dict().items()},
          models / "text_encoders" / "t5xxl_fp16.safetensors")
    _save(bundle.vae.state_dict(), models / "vae" / "ae.safetensors")
    return models


def test_parts_are_found_and_a_missing_one_is_asked_for_by_name(qtbot, window, tiny_model, tmp_path):
    folder = tiny_model("flux-dev", "flow")
    models = _comfy_tree(folder, tmp_path)
    window.go_to("model")
    page = window.model_page
    window.model.set_value("model.config_dir", str(folder))  # a tiny file cannot be sized from its keys
    drop_paths(page.drop, models / "unet" / "tiny-flux1-dev.safetensors")
    qtbot.waitUntil(lambda: page.info is not None and bool(page.parts.rows), timeout=60_000)
    assert page.info["family"] == "flux-dev"
    assert {n: f and f.rsplit("/", 1)[-1] for n, (_, f) in page.parts.rows.items()} == {
        "text_encoder": "clip_l.safetensors", "text_encoder_2": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"}
    assert page.parts.isVisibleTo(page) and page.parts.missing == []

    # The VAE moves away: the page names it and needs attention until it is chosen.
    moved = tmp_path / "elsewhere" / "flux-ae.safetensors"
    moved.parent.mkdir()
    shutil.move(models / "vae" / "ae.safetensors", moved)
    page.parts.show_for("flux-dev")
    qtbot.waitUntil(lambda: page.parts.rows.get("vae", ("", "x"))[1] is None, timeout=30_000)
    assert page.parts.missing == ["VAE (16-channel autoencoder, 'ae')"]
    assert "missing" in page.parts.grid.itemAtPosition(2, 1).widget().text()
    # The inspection flags the tiny file's unusual size (real files are standard); without that, the missing
    # part is what the page asks for.
    page.inspect_error = ""
    state, message = page.state()
    assert state == "attention" and "VAE" in message
    page.parts.choose("vae", str(moved))
    assert window.model.job.model.vae == str(moved)
    qtbot.waitUntil(lambda: page.parts.rows.get("vae", ("", None))[1] == str(moved), timeout=30_000)
    assert page.parts.missing == [] and page.state()[0] != "attention"


def _sd3_split(folder, root):
    """Stability's SD3.5 download: the model file (MMDiT + VAE) and text_encoders/clip_l, clip_g beside it (no T5)."""
    from studio.engine.merge import diffusers_folder_to_single_file

    full = diffusers_folder_to_single_file(folder, root / "all-in-one.safetensors")
    state = load_file(str(full))
    repo = root / "stable-diffusion-3.5-medium"
    _save({k: v for k, v in state.items() if not k.startswith("text_encoders.")}, repo / "sd3.5_medium.safetensors")
    parts = {}
    for part in ("clip_l", "clip_g", "t5xxl"):
        prefix = f"text_encoders.{part}.transformer."
        parts[part] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for part in ("clip_l", "clip_g"):
        _save(parts[part], repo / "text_encoders" / f"{part}.safetensors")
    _save(parts["t5xxl"], root / "elsewhere" / "t5xxl_fp16.safetensors")
    return repo


def test_sd3_rows_clip_l_clip_g_and_an_optional_t5_are_shown_and_chosen(qtbot, window, tiny_model, tmp_path):
    folder = tiny_model("sd3.5-medium", "flow")
    repo = _sd3_split(folder, tmp_path)
    window.go_to("model")
    page = window.model_page
    window.model.set_value("model.config_dir", str(folder))
    drop_paths(page.drop, repo / "sd3.5_medium.safetensors")
    qtbot.waitUntil(lambda: page.info is not None and bool(page.parts.rows), timeout=60_000)
    assert page.info["family"] == "sd3.5-medium"
    # The file carries its VAE: no row for it. T5 is not found, and optional: the page does not need attention.
    assert {n: (label, f and f.rsplit("/", 1)[-1]) for n, (label, f) in page.parts.rows.items()} == {
        "text_encoder": ("text encoder (CLIP-L)", "clip_l.safetensors"),
        "text_encoder_2": ("second text encoder (CLIP-G)", "clip_g.safetensors"),
        "text_encoder_3": ("third text encoder (T5-XXL, optional)", None)}
    assert page.parts.missing == [] and page.parts.optional == {"text_encoder_3"}
    assert "optional" in page.parts.grid.itemAtPosition(2, 1).widget().text()
    page.inspect_error = ""  # the tiny file's unusual size is flagged; real files are standard
    assert page.state()[0] != "attention"

    t5 = tmp_path / "elsewhere" / "t5xxl_fp16.safetensors"
    page.parts.choose("text_encoder_3", str(t5))
    assert window.model.job.model.text_encoder_3 == str(t5)
    qtbot.waitUntil(lambda: page.parts.rows.get("text_encoder_3", ("", None))[1] == str(t5), timeout=30_000)

    # CLIP-L chosen as CLIP-G: the panel and the page say which file and field are wrong.
    page.parts.choose("text_encoder_2", str(repo / "text_encoders" / "clip_l.safetensors"))
    qtbot.waitUntil(lambda: bool(page.parts.error), timeout=30_000)
    assert "'clip_l.safetensors' (model.text_encoder_2) holds a CLIP text encoder" in page.parts.error
    assert page.parts.error_label.isVisibleTo(page) and page.parts.error_label.text() == page.parts.error
    assert page.state() == ("attention", page.parts.error)
    window.model.set_value("model.text_encoder_2", "")
    qtbot.waitUntil(lambda: not page.parts.error, timeout=30_000)
    assert page.parts.rows["text_encoder_2"][1].endswith("clip_g.safetensors")


def test_z_image_parts_are_found_in_comfyui_folders(qtbot, window, tiny_model, tmp_path):
    """ComfyUI's Z-Image files: the transformer alone (original fused-qkv layout), qwen_3_4b and ae beside it."""
    import sys
    from pathlib import Path

    from studio.engine.checkpoint import load_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from test_zimage_files import original_state_dict

    folder = tiny_model("zimage", "flow")
    bundle = load_model(ModelSection(path=str(folder)))
    models = tmp_path / "ComfyUI" / "models"
    _save(original_state_dict(bundle.denoiser.state_dict()), models / "diffusion_models" / "tiny_z_image_turbo.safetensors")
    _save({"model." + k: v for k, v in bundle.text_encoders[0].state_dict().items()},
          models / "text_encoders" / "qwen_3_4b.safetensors")
    _save(bundle.vae.state_dict(), models / "vae" / "ae.safetensors")
    window.go_to("model")
    page = window.model_page
    window.model.set_value("model.config_dir", str(folder))
    drop_paths(page.drop, models / "diffusion_models" / "tiny_z_image_turbo.safetensors")
    qtbot.waitUntil(lambda: page.info is not None and bool(page.parts.rows), timeout=60_000)
    assert page.info["family"] == "zimage"
    assert {n: f and f.rsplit("/", 1)[-1] for n, (_, f) in page.parts.rows.items()} == {
        "text_encoder": "qwen_3_4b.safetensors", "vae": "ae.safetensors"}
    assert page.parts.missing == []
