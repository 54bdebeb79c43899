"""LoRA injection: module sets per preset on the real architectures, rank/alpha patterns, frozen base, fp32 params, resume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from studio.engine.checkpoint import load_model
from studio.engine.config import LoraSection, ModelSection
from studio.engine.lora import (
    PRESETS,
    components,
    count_lora_modules,
    inject_lora,
    load_lora_state_dicts,
    lora_layers,
    lora_state_dicts,
    matching_modules,
    target_modules,
)


def _load_architectures():
    path = Path(__file__).parent / "golden" / "architectures.py"
    spec = importlib.util.spec_from_file_location("golden_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


arch = _load_architectures()

# kohya's counts (FACTS.md): UNet modules, then text-encoder modules per encoder. "attention" is diffusers' example
# set (q/k/v/out), "+conv" is kohya's LoCon (networks.lora with conv_dim): + ResnetBlock2D convs/time_emb_proj,
# 1x1 shortcuts and down/up-sampler convs.
EXPECTED = {
    ("sd1", "attention"): (128, [48]),
    ("sd1", "kohya-default"): (192, [72]),
    ("sd1", "+conv"): (278, [72]),
    ("sd2-v", "attention"): (128, [92]),
    ("sd2-v", "kohya-default"): (192, [138]),
    ("sd2-v", "+conv"): (278, [138]),
    ("sdxl", "attention"): (560, [48, 128]),
    ("sdxl", "kohya-default"): (722, [72, 192]),
    ("sdxl", "+conv"): (788, [72, 192]),
}


@pytest.fixture(scope="module")
def meta_bundles():
    return {name: arch.meta_bundle(name) for name in arch.ARCHITECTURES}


@pytest.mark.parametrize("name,preset", list(EXPECTED))
def test_presets_select_kohyas_module_counts_on_full_size_models(meta_bundles, name, preset):
    bundle = meta_bundles[name]
    counts = {key: len(matching_modules(model, target_modules(bundle.family, preset, key)))
              for key, model in components(bundle).items()}
    unet, encoders = EXPECTED[(name, preset)]
    assert counts["unet"] == unet
    assert [counts[k] for k in ("text_encoder", "text_encoder_2") if k in counts] == encoders


def test_peft_wraps_exactly_the_selected_modules_with_conv_rank_and_alpha():
    bundle = arch.meta_bundle("sdxl")
    lora = LoraSection(rank=8, alpha=4.0, targets="+conv", conv_rank=2, conv_alpha=1.0)
    selected = {key: matching_modules(model, target_modules("sdxl", "+conv", key)) for key, model in components(bundle).items()}
    params = inject_lora(bundle, lora, train_text_encoder=True)
    assert count_lora_modules(bundle.denoiser) == 788
    assert [count_lora_modules(te) for te in bundle.text_encoders] == [72, 192]
    for key, model in components(bundle).items():
        # The cheap selection (used by the golden key tests) is exactly what peft wrapped.
        assert list(lora_layers(model)) == selected[key]
    layers = lora_layers(bundle.denoiser)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        spatial = isinstance(base, torch.nn.Conv2d) and tuple(base.kernel_size) != (1, 1)
        # kohya: k x k convolutions use conv_dim/conv_alpha; Linear and 1x1 convs (shortcuts) the normal rank.
        assert (layer.r["default"], layer.lora_alpha["default"]) == ((2, 1.0) if spatial else (8, 4.0)), name
    assert layers["up_blocks.0.upsamplers.0.conv"].r["default"] == 2
    assert layers["up_blocks.0.resnets.0.conv_shortcut"].r["default"] == 8
    assert layers["down_blocks.0.resnets.0.time_emb_proj"].r["default"] == 8
    assert set(params) == {"unet", "text_encoder", "text_encoder_2"}
    assert len(params["unet"]) == 2 * 788


def test_conv_rank_zero_means_the_lora_rank():
    bundle = arch.meta_bundle("sd1")
    inject_lora(bundle, LoraSection(rank=6, alpha=3.0, targets="+conv"), train_text_encoder=False)
    layer = lora_layers(bundle.denoiser)["down_blocks.0.resnets.0.conv1"]
    assert (layer.r["default"], layer.lora_alpha["default"]) == (6, 3.0)


def test_unknown_preset_or_component_is_refused():
    with pytest.raises(ValueError, match="kohya-default"):
        target_modules("sd1", "everything", "unet")
    with pytest.raises(ValueError, match="component"):
        target_modules("sd1", "attention", "vae")
    assert set(PRESETS) == set(LoraSection.__dataclass_fields__["targets"].metadata["choices"])


def test_inject_freezes_base_and_keeps_lora_params_fp32_on_a_half_precision_model(tiny_sd1):
    bundle = load_model(ModelSection(path=str(tiny_sd1)), dtype=torch.float16)
    params = inject_lora(bundle, LoraSection(rank=4, alpha=2.0), train_text_encoder=False)
    assert set(params) == {"unet"}
    assert count_lora_modules(bundle.text_encoders[0]) == 0
    assert params["unet"] and all(p.dtype == torch.float32 and p.requires_grad for p in params["unet"])
    trainable = {n for n, p in bundle.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(p.requires_grad for p in bundle.vae.parameters())
    assert not any(p.requires_grad for p in bundle.text_encoders[0].parameters())
    base = [p for n, p in bundle.denoiser.named_parameters() if "lora_" not in n]
    assert base and all(p.dtype == torch.float16 for p in base)
    with pytest.raises(ValueError, match="already has a LoRA"):
        inject_lora(bundle, LoraSection(rank=4, alpha=2.0), train_text_encoder=False)
    assert all(p.requires_grad for p in params["unet"])  # the refused call changed nothing


def test_untrained_lora_changes_nothing_and_dora_adds_trainable_magnitudes(tiny_sd1):
    bundle = load_model(ModelSection(path=str(tiny_sd1)))
    torch.manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.randn(1, 77, 32)
    ids = torch.randint(0, 49406, (1, 77))
    with torch.no_grad():
        before = bundle.denoiser(x, t, ctx).sample, bundle.text_encoders[0](ids)[0]
    params = inject_lora(bundle, LoraSection(rank=4, alpha=8.0, dora=True), train_text_encoder=True)
    with torch.no_grad():
        after = bundle.denoiser(x, t, ctx).sample, bundle.text_encoders[0](ids)[0]
    # kohya's init (B = 0) and DoRA's magnitude = ‖W‖ leave the model unchanged until training moves them.
    torch.testing.assert_close(after[0], before[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after[1], before[1], rtol=1e-4, atol=1e-5)
    names = {n for n, p in bundle.denoiser.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names)
    assert len(params["unet"]) == 3 * count_lora_modules(bundle.denoiser)
    assert len(params["text_encoder"]) == 3 * 12


def test_state_dicts_round_trip_for_resume_and_mismatches_are_refused(tiny_sdxl):
    lora = LoraSection(rank=4, alpha=2.0, targets="+conv", conv_rank=2)
    first = load_model(ModelSection(path=str(tiny_sdxl)))
    params = inject_lora(first, lora, train_text_encoder=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for group in params.values():
            for p in group:
                p.normal_()
    saved = lora_state_dicts(first)
    assert set(saved) == {"unet", "text_encoder", "text_encoder_2"}
    assert all(".lora_A." in k or ".lora_B." in k for sd in saved.values() for k in sd)

    second = load_model(ModelSection(path=str(tiny_sdxl)))
    inject_lora(second, lora, train_text_encoder=True)
    load_lora_state_dicts(second, saved)
    again = lora_state_dicts(second)
    for key, sd in saved.items():
        assert sd.keys() == again[key].keys()
        for name, tensor in sd.items():
            assert torch.equal(tensor, again[key][name]), name
            assert again[key][name].dtype == torch.float32

    third = load_model(ModelSection(path=str(tiny_sdxl)))
    inject_lora(third, LoraSection(rank=4, alpha=2.0), train_text_encoder=False)
    with pytest.raises(ValueError, match="does not fit") as err:
        load_lora_state_dicts(third, saved)
    assert "text_encoder" in str(err.value) and "unexpected" in str(err.value)
