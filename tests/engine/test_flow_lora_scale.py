"""Try & Export on FLUX.1 and SD3: a LoRA file loaded the way the preview tab loads it (diffusers' own
``load_lora_weights`` on what ``family.pipeline_lora`` hands it), at strength 0.5, changes every adapted layer by
exactly half the trained update, in the diffusers layout and (SD3, whose kohya layout diffusers cannot read) in the
kohya layout too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from studio.engine.checkpoint import load_model
from studio.engine.config import Job, LoraSection, ModelSection
from studio.engine.export import export_diffusers_lora, export_lora
from studio.engine.lora import inject_lora, lora_layers
from studio.engine.sampling import generate


def _trained(folder):
    bundle = load_model(ModelSection(path=str(folder)))
    params = inject_lora(bundle, LoraSection(rank=4, alpha=2.0), train_text_encoder=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for group in params.values():
            for p in group:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    deltas = {}
    for key, model in bundle.components().items():
        for path, layer in lora_layers(model).items():
            deltas[(key, path)] = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                                   * layer.scaling["default"]).detach()
    return bundle, deltas


def _loaded_deltas(bundle, name: str) -> dict:
    out = {}
    for key, model in bundle.components().items():
        for path, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and name in getattr(module, "lora_A", {}):
                out[(key, path)] = module.get_delta_weight(name).detach().float()
    return out


@pytest.mark.parametrize("family,layouts", [("flux-dev", ("diffusers",)), ("sd3.5-medium", ("diffusers", "kohya"))])
def test_a_lora_file_at_half_strength_applies_half_the_trained_update(tiny_model, tmp_path, family, layouts):
    folder = tiny_model(family, "flow")
    trained, deltas = _trained(folder)
    job = Job()
    job.model.path, job.output.name = str(folder), "half"
    files = {"diffusers": export_diffusers_lora(trained, tmp_path / "half-diffusers.safetensors"),
             "kohya": export_lora(trained, job, tmp_path / "half.safetensors", steps=1, dtype="fp32")}
    for layout in layouts:
        fresh = load_model(ModelSection(path=str(folder)))
        generate(fresh, "a red circle", steps=1, guidance=1.0, width=64, height=64, lora_path=files[layout],
                 lora_scale=0.5)
        (name,) = fresh.extra["try_adapters"]
        got = _loaded_deltas(fresh, name)
        assert set(got) == set(deltas), (layout, set(deltas) ^ set(got))
        for where, delta in deltas.items():
            torch.testing.assert_close(got[where], 0.5 * delta, rtol=1e-4, atol=1e-6, msg=f"{layout} {where}")


def test_resized_and_merged_sd3_files_keep_their_fused_qkv_modules_loadable(tiny_model, tmp_path):
    """lora_tools rewrite a fused ``qkv`` module as a dense low-rank pair (no longer block-diagonal); SD3's kohya
    reader still splits it onto q, k and v exactly: a full-rank resize, and a merge of the file with itself at
    0.5 + 0.5, load as the trained update."""
    from studio.engine.lora_tools import merge_loras, resize_lora

    folder = tiny_model("sd3.5-medium", "flow")
    trained, deltas = _trained(folder)
    job = Job()
    job.model.path, job.output.name = str(folder), "src"
    src = export_lora(trained, job, tmp_path / "src.safetensors", steps=1, dtype="fp32")
    resized = resize_lora(src, tmp_path / "resized.safetensors", rank=64).path
    merged = Path(merge_loras([(src, 0.5), (src, 0.5)], tmp_path / "merged.safetensors")["path"])
    for path in (resized, merged):
        fresh = load_model(ModelSection(path=str(folder)))
        generate(fresh, "a red circle", steps=1, guidance=1.0, width=64, height=64, lora_path=path)
        (name,) = fresh.extra["try_adapters"]
        got = _loaded_deltas(fresh, name)
        assert set(got) == set(deltas)
        for where, delta in deltas.items():
            torch.testing.assert_close(got[where], delta, rtol=1e-4, atol=1e-5, msg=f"{path.name} {where}")
