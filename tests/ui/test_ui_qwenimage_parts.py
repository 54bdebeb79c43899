"""Model page, Qwen-Image's ComfyUI files: the transformer alone, Qwen2.5-VL and the VAE found in ComfyUI's folders."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ui_fakes import drop_paths


def test_qwen_image_parts_are_found_in_comfyui_folders(qtbot, window, tiny_model, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from test_qwenimage import _comfy_files

    folder = tiny_model("qwen-image", "flow")
    models = tmp_path / "ComfyUI" / "models"
    files = _comfy_files(folder, models / "diffusion_models")
    for part, sub in (("text_encoder", "text_encoders"), ("vae", "vae")):
        shutil.move(str(files[part].parent), str(models / sub))
    window.go_to("model")
    page = window.model_page
    window.model.set_value("model.config_dir", str(folder))
    drop_paths(page.drop, files["transformer"])
    qtbot.waitUntil(lambda: page.info is not None and bool(page.parts.rows), timeout=60_000)
    assert page.info["family"] == "qwen-image"
    assert {n: f and f.rsplit("/", 1)[-1] for n, (_, f) in page.parts.rows.items()} == {
        "text_encoder": "qwen_2.5_vl_7b.safetensors", "vae": "qwen_image_vae.safetensors"}
    assert page.parts.missing == []
