"""The shipped demo model: small, fp16, loads through the real loader and draws a shape on its background."""

from __future__ import annotations

import numpy as np
from safetensors import safe_open

from studio.engine.config import BUILTIN_DEMO_MODEL, ModelSection
from studio.engine.demo import demo_model_folder

BACKGROUND = np.array((238, 236, 230), dtype=np.float32)  # resources/demo/shapes.py


def test_the_shipped_weights_are_small_fp16_and_without_a_tokenizer_copy():
    folder = demo_model_folder()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8 * 1024 * 1024
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}, path
    assert not (folder / "tokenizer").exists()  # the app adds its bundled CLIP tokenizer


def test_the_base_draws_a_shape_in_the_middle_of_a_plain_background():
    from studio.engine.checkpoint import demo_model_path, load_model
    from studio.engine.sampling import generate

    assert (demo_model_path() / "tokenizer" / "vocab.json").is_file()
    bundle = load_model(ModelSection(path=BUILTIN_DEMO_MODEL))
    image = np.asarray(generate(bundle, "studioshape, a blue square", seed=1, steps=20), dtype=np.float32)
    assert image.shape == (64, 64, 3)
    centre = image[24:40, 24:40].reshape(-1, 3).mean(axis=0)
    corners = np.mean([np.abs(image[y:y + 6, x:x + 6] - BACKGROUND).mean() for y in (0, 58) for x in (0, 58)])
    assert np.abs(centre - BACKGROUND).mean() > 40 and corners < 25, (centre, corners)
    assert centre[2] > centre[0] + 40  # blue, as asked
