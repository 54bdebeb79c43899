"""LoHa and LoKr (peft) end to end: trained from the CLI, exported in the LyCORIS/kohya layout, applied from the file
by LoRA Studio's own reader and by LyCORIS's loader (every key matched, the same ΔW), exact resume state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studio.cli import main
from studio.engine.adapters import ADAPTERS, adapter_of_layer, read_modules
from studio.engine.checkpoint import load_model
from studio.engine.config import Job, LoraSection, ModelSection
from studio.engine.export import describe_lora, export_lora, kohya_state_dict, read_lora
from studio.engine.lora import components, inject_lora, load_lora_state_dicts, lora_layers, lora_state_dicts
from studio.engine.merge import apply_kohya_lora

LYCORIS = {
    "loha": LoraSection(algorithm="loha", rank=4, alpha=2.0, targets="+conv", train_text_encoder=True),
    "lokr": LoraSection(algorithm="lokr", rank=2, alpha=1.0, targets="+conv", lokr_factor=4, train_text_encoder=True),
    # rank 1 is below half of the small factor's side (4 of 32 = 4 × 8), so w1 is a low-rank pair too.
    "lokr-both": LoraSection(algorithm="lokr", rank=1, alpha=2.0, lokr_decompose_both=True, train_text_encoder=True),
    "lokr-full": LoraSection(algorithm="lokr", rank=2, alpha=1.0, lokr_full_matrix=True, targets="+conv"),
}


def _randomised(model_dir: Path, lora: LoraSection, seed: int = 0):
    """A bundle with the adapter injected and every adapter weight random (a 'trained' adapter, fast)."""
    bundle = load_model(ModelSection(path=str(model_dir)))
    inject_lora(bundle, lora, train_text_encoder=lora.train_text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in components(bundle).values():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return bundle


def _job(lora: LoraSection) -> Job:
    job = Job()
    job.lora = lora
    return job


def _applied_by_lycoris(lyco, base: torch.nn.Module) -> torch.Tensor:
    """The ΔW LyCORIS's module applies in its forward (it calls ``self.op(x, delta_weight, …)``, rebuild mode)."""
    captured = []
    real = lyco.op

    def spy(x, weight, *args, **kwargs):
        captured.append(weight.detach().float())
        return real(x, weight, *args, **kwargs)

    lyco.op = spy
    lyco.eval()
    x = torch.randn(1, base.in_features) if isinstance(base, torch.nn.Linear) else torch.randn(1, base.in_channels, 8, 8)
    with torch.no_grad():
        lyco.forward(x)
    assert len(captured) == 1
    return captured[0]


def _lycoris_deltas(bundle, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """ΔW per kohya name as LyCORIS's own loader builds the modules (lycoris-lora 4.1.3, lycoris/modules/__init__.py
    get_module + make_module, the functions lycoris.kohya.create_network_from_weights calls), and the keys it used.

    The delta is the one the module's forward applies. (4.1.3's get_diff_weight/get_merged_weight scale LoHa and
    LoKr twice, alpha/rank squared, while forward, training and merging in ComfyUI/A1111 scale once.)"""
    from lycoris.modules import get_module, make_module

    index = bundle.family.kohya_index(bundle)
    deltas, used = {}, set()
    for name in sorted({k.partition(".")[0] for k in tensors}):
        lyco_type, params = get_module(tensors, name)
        assert lyco_type is not None, f"LyCORIS recognises no algorithm in {name}"
        _, module = index[name]
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # the layer under peft's
        lyco = make_module(lyco_type, params, name, module)
        assert lyco is not None, name
        lyco.multiplier = 1.0
        deltas[name] = _applied_by_lycoris(lyco, module).reshape(module.weight.shape)
        used |= {f"{name}.{w}" for w in lyco_type.weight_list if f"{name}.{w}" in tensors}
    return deltas, used


@pytest.mark.parametrize("family_fixture", ["tiny_sd1", "tiny_sdxl"])
@pytest.mark.parametrize("variant", list(LYCORIS))
def test_lycoris_loader_matches_every_key_and_reproduces_the_trained_delta(family_fixture, variant, request):
    lora = LYCORIS[variant]
    bundle = _randomised(request.getfixturevalue(family_fixture), lora)
    tensors = kohya_state_dict(bundle, torch.float32)
    trained = {}
    for key, model in components(bundle).items():
        for path, layer in lora_layers(model).items():
            adapter = adapter_of_layer(layer)
            assert adapter is ADAPTERS[lora.algorithm]
            name = bundle.family.kohya_name(key, path, bundle.denoiser.config)
            trained[name] = adapter.trained_delta(layer)
    deltas, used = _lycoris_deltas(bundle, tensors)
    assert used == set(tensors), sorted(set(tensors) - used)[:5]
    assert set(deltas) == set(trained)
    worst = max((deltas[n] - trained[n]).abs().max().item() for n in trained)
    assert worst <= 1e-5, worst
    # LoRA Studio's own reader (merge, Try & Export) computes the same ΔW from the file.
    ours = read_modules(tensors)
    index = bundle.family.kohya_index(bundle)
    worst_ours = max((ours[n].delta(index[n][1].weight.detach()) - trained[n]).abs().max().item() for n in trained)
    assert worst_ours <= 1e-5, worst_ours
    parts = {k.partition(".")[2] for k in tensors}
    if variant == "lokr-both":
        assert {"lokr_w1_a", "lokr_w1_b"} <= parts
    if variant == "lokr-full":
        assert parts == {"lokr_w1", "lokr_w2", "alpha"}


def test_lycoris_file_metadata_names_lycoris_and_its_arguments(tiny_sdxl, tmp_path):
    lora = LYCORIS["lokr-both"]
    bundle = _randomised(tiny_sdxl, lora)
    path = export_lora(bundle, _job(lora), tmp_path / "x.safetensors", steps=3)
    _, meta = read_lora(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "preset": "full", "factor": "-1",
                                                   "decompose_both": "True", "full_matrix": "False"}
    info = describe_lora(path)
    assert (info["layout"], info["network_type"], info["family"]) == ("kohya", "lokr", "sdxl")
    assert info["modules"]["te1"] > 0 and info["modules"]["te2"] > 0


def test_lycoris_state_round_trips_for_exact_resume(tiny_sd1):
    lora = LYCORIS["loha"]
    bundle = _randomised(tiny_sd1, lora, seed=1)
    saved = lora_state_dicts(bundle)
    other = _randomised(tiny_sd1, lora, seed=2)
    load_lora_state_dicts(other, saved)
    for key, sd in lora_state_dicts(other).items():
        for name, value in sd.items():
            assert torch.equal(value, saved[key][name]), name
    with pytest.raises(ValueError, match="does not fit"):
        load_lora_state_dicts(_randomised(tiny_sd1, LYCORIS["lokr"]), saved)


def _fixed_loss(bundle, data: Path) -> float:
    """The family's training loss on the dataset's images at fixed noise and timesteps (any family)."""
    from studio.engine.config import TrainingSection
    from studio.engine.dataset import load_image, prepare_image

    items = sorted(data.glob("*.png"))[:4]
    with torch.no_grad():
        pixels = torch.cat([prepare_image(load_image(p), (64, 64))[0][None] for p in items])
        mean, _ = bundle.family.encode_image(bundle, pixels)
        cond = bundle.family.encode_text(bundle, [p.with_suffix(".txt").read_text() for p in items])
        entries = [{"original_hw": torch.tensor([64, 64]), "crop_tl": torch.tensor([0, 0])} for _ in items]
        cond = cond.with_tensors(**bundle.family.example_conditioning(entries, (64, 64)))
        g = torch.Generator().manual_seed(7)
        return float(bundle.family.training_loss(bundle, bundle.denoiser, mean, cond, training=TrainingSection(),
                                                 generator=g, weight_dtype=torch.float32))


@pytest.mark.parametrize("family_fixture", ["tiny_sd1", "tiny_sdxl"])
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_lycoris_trains_from_the_cli_and_its_file_lowers_the_loss(family_fixture, algorithm, tmp_path, request, capsys):
    from fixtures_data import make_dataset

    model = request.getfixturevalue(family_fixture)
    data = make_dataset(tmp_path / "data", count=4)
    out = tmp_path / "run"
    code = main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "20",
                 "--resolution", "64", "--rank", "4", "--alpha", "4", "--lr", "1e-2", "--sample-every", "0",
                 "--set", f"lora.algorithm={algorithm}", "--set", "dataset.bucket_step=16",
                 "--set", "lora.targets=+conv", "--set", "lora.lokr_factor=4"])
    assert code == 0, capsys.readouterr().err[-2000:]
    lora_file = next(p for p in out.glob("*.safetensors") if "-step" not in p.stem)
    assert describe_lora(lora_file)["network_type"] == algorithm
    bundle = load_model(ModelSection(path=str(model)))
    before = _fixed_loss(bundle, data)
    tensors, _ = read_lora(lora_file)
    applied = apply_kohya_lora(bundle, read_modules(tensors), 1.0)
    assert not applied["unmatched"]
    after = _fixed_loss(bundle, data)
    print(f"{family_fixture} {algorithm}: loss {before:.4f} -> {after:.4f} ratio {after / before:.3f}")
    assert after < 0.95 * before, (before, after)
