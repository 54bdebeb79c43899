"""FLUX.1: the tiny model trains from the CLI and learns; its LoRA loads in diffusers' FluxPipeline; kohya names with
fused qkv are exact and read back by diffusers' own converter at full width; the full-size key list is golden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.engine.families import get_family
from studio.engine.families.flux import FLUX_DEV, FLUX_SCHNELL, bfl_name

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="module")
def tiny_dev(tiny_model) -> Path:
    return tiny_model("flux-dev", "flow")


def _latents_and_text(bundle, data: Path):
    from studio.engine.dataset import load_image, prepare_image

    items = sorted(data.glob("*.png"))
    with torch.no_grad():
        latents = torch.cat([bundle.family.encode_image(bundle, prepare_image(load_image(p), (64, 64))[0][None])[0]
                             for p in items])
        cond = bundle.family.encode_text(bundle, [p.with_suffix(".txt").read_text() for p in items])
    return latents, cond


def _fixed_noise_loss(bundle, latents, cond, training) -> float:
    """The family's own objective at 8 fixed draws of noise and σ (the same for base and LoRA)."""
    with torch.no_grad():
        return sum(float(bundle.family.training_loss(bundle, bundle.denoiser, latents, cond, training=training,
                                                     generator=torch.Generator().manual_seed(100 + s),
                                                     weight_dtype=torch.float32)) for s in range(8)) / 8


def _image(pipe):
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(7), output_type="np", max_sequence_length=32).images


def test_bundled_flux_configs_match_their_generator(tmp_path):
    import filecmp
    import importlib.util

    from studio.paths import resource_path

    root = resource_path("model_configs")
    spec = importlib.util.spec_from_file_location("make_flux_configs", root / "make_flux_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_configs(tmp_path)
    for name in module.NAMES:
        for file in sorted((tmp_path / name).rglob("*.json")):
            rel = file.relative_to(tmp_path / name)
            assert filecmp.cmp(file, root / name / rel, shallow=False), rel
    dev = json.loads((root / "flux-dev" / "transformer" / "config.json").read_text())
    schnell = json.loads((root / "flux-schnell" / "transformer" / "config.json").read_text())
    assert (dev["guidance_embeds"], schnell["guidance_embeds"]) == (True, False)


def test_tiny_flux_trains_from_the_cli_and_its_lora_loads_in_diffusers(tiny_dev, tmp_path, capsys):
    from diffusers import FluxPipeline

    from fixtures_data import make_dataset
    from studio.cli import main
    from studio.engine.checkpoint import load_model
    from studio.engine.config import load_job
    from test_export import _key_problems, _load_messages

    data = make_dataset(tmp_path / "data", count=4)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_dev), "--data", str(data), "--out", str(out), "--steps", "30",
                 "--lr", "5e-3", "--rank", "8", "--alpha", "8", "--resolution", "64", "--sample-every", "0",
                 "--name", "tiny", "--set", "dataset.bucket_step=16", "--set", "output.save_diffusers=true"])
    assert code == 0, capsys.readouterr().err
    job = load_job(out / "job.toml")
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
        kohya = set(f.keys())
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya

    bundle = load_model(job.model)
    latents, cond = _latents_and_text(bundle, data)
    before = _fixed_noise_loss(bundle, latents, cond, job.training)
    pipe = bundle.pipeline()
    pipe.set_progress_bar_config(disable=True)
    base_image = _image(pipe)
    diffusers_file = out / "tiny-diffusers.safetensors"
    assert isinstance(pipe, FluxPipeline)
    with _load_messages() as messages:
        pipe.load_lora_weights(str(diffusers_file), adapter_name="trained")
    # diffusers says so when a file has no text-encoder part (this one trained the transformer only).
    assert [m for m in _key_problems(messages) if not m.startswith("No LoRA keys associated to CLIPTextModel")] == []
    from studio.engine.lora import count_lora_modules

    modules = count_lora_modules(bundle.denoiser, "trained")
    assert modules == 1 * 14 + 2 * 6  # every Linear of the tiny model's 1 double and 2 single blocks
    after = _fixed_noise_loss(bundle, latents, cond, job.training)
    print(f"flux-dev tiny: {modules} LoRA modules, loss at fixed noise {before:.4f} -> {after:.4f} "
          f"(ratio {after / before:.3f})")
    assert after < 0.95 * before, (before, after)
    assert not (_image(pipe) == base_image).all()  # scale 1 changes the image
    pipe.set_adapters(["trained"], adapter_weights=[0.0])
    assert (_image(pipe) == base_image).all()  # scale 0 is the base model exactly


def test_schnell_objective_has_no_guidance_and_no_shift(tiny_model):
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection, TrainingSection

    bundle = load_model(ModelSection(path=str(tiny_model("flux-schnell", "flow"))))
    assert bundle.family is FLUX_SCHNELL and bundle.denoiser.config.guidance_embeds is False
    sampling = FLUX_SCHNELL.flow_sampling(TrainingSection(), bundle.noise_scheduler.config)
    assert (sampling.shift, sampling.shift_value) == ("constant", 1.0)  # schnell's schedule: unshifted
    dev = FLUX_DEV.flow_sampling(TrainingSection(), {"use_dynamic_shifting": True})
    assert dev.shift == "resolution"
    assert FLUX_SCHNELL.preview.steps == 4 and FLUX_SCHNELL.pipeline_kwargs(
        negative_prompt="", guidance=3.5, lora_scale=None)["guidance_scale"] == 0.0


# ------------------------------------------------------------------------------------------ kohya layout


def _random_lora_bundle(folder: Path, targets: str = "kohya-default"):
    from studio.engine.checkpoint import load_model
    from studio.engine.config import LoraSection, ModelSection
    from studio.engine.lora import inject_lora

    bundle = load_model(ModelSection(path=str(folder)))
    params = inject_lora(bundle, LoraSection(rank=4, alpha=2.0, targets=targets), train_text_encoder=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for group in params.values():
            for p in group:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return bundle


@pytest.mark.parametrize("targets", ["kohya-default", "attention"])
def test_fused_kohya_modules_apply_exactly_the_trained_update(tiny_dev, targets):
    """What ComfyUI/Forge apply (W += up @ down · alpha/rank on the BFL module) equals the separate q/k/v updates."""
    from studio.engine.export import kohya_delta, kohya_state_dict
    from studio.engine.lora import lora_layers

    bundle = _random_lora_bundle(tiny_dev, targets)
    sd = kohya_state_dict(bundle, torch.float32)
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for path, layer in lora_layers(bundle.denoiser).items():
        name, group, index = bfl_name(path)
        scale = layer.scaling["default"]
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * scale
        parts.setdefault(name, {})[index] = delta.detach()
    assert {n.removeprefix("lora_unet_").removesuffix(".alpha") for n in sd if n.startswith("lora_unet_") and
            n.endswith(".alpha")} == set(parts)
    for name, deltas in parts.items():
        key = "lora_unet_" + name
        if name.endswith(("qkv", "linear1")):  # the tiny model: inner width 32, MLP width 128
            widths = 3 * [32] + ([128] if name.endswith("linear1") else [])
            expected = torch.cat([deltas.get(i, torch.zeros(w, 32)) for i, w in enumerate(widths)])
        else:
            expected = deltas[0]
        got = kohya_delta(sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], float(sd[f"{key}.alpha"]),
                          expected.shape)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in sd)
    assert not any(k.startswith("lora_te3_") for k in sd)  # T5 is never trained


def test_diffusers_reads_the_fused_kohya_file_back_at_full_width():
    """diffusers' kohya-Flux converter (what load_lora_weights runs) hard-codes FLUX.1's widths, so our fused
    modules are built at those widths for block 0 and converted back: every part's update is recovered."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    config = json.loads((FLUX_DEV.bundled_config_dir() / "transformer" / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    rank, alpha, inner = 4, 2.0, 3072
    widths = {"attn.to_q": inner, "attn.to_k": inner, "attn.to_v": inner, "proj_mlp": 4 * inner,
              "attn.add_q_proj": inner, "attn.add_k_proj": inner, "attn.add_v_proj": inner, "attn.to_out.0": inner}
    paths = ([f"transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                                                      "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0")]
             + [f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    layers, expected = [], {}
    for path in paths:
        down = torch.randn(rank, inner, generator=gen) * 0.1
        up = torch.randn(widths[path.split(".", 2)[2]], rank, generator=gen) * 0.1
        layers.append(("transformer", path, down, up, alpha))
        expected["transformer." + path] = up @ down * (alpha / rank)
    sd = {}
    for name, down, up, a in FLUX_DEV.kohya_modules(layers, config):
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(a)})
    converted = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    assert {k.rsplit(".lora_", 1)[0] for k in converted} == set(expected)
    for module, delta in expected.items():
        got = converted[f"{module}.lora_B.weight"] @ converted[f"{module}.lora_A.weight"]
        torch.testing.assert_close(got, delta, rtol=1e-4, atol=1e-6)


def _meta_flux_bundle():
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.engine.families import ModelBundle

    folder = FLUX_DEV.bundled_config_dir()
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder / "transformer"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    # T5 left out: it is never trained (trainable_text_encoders), so it has no names to check.
    return ModelBundle(FLUX_DEV, "flow", transformer, None, [clip], [], None, "meta:flux-dev")


def golden_flux_names(preset: str) -> list[str]:
    from studio.engine.config import LoraSection
    from studio.engine.lora import inject_lora, lora_layers

    bundle = _meta_flux_bundle()
    inject_lora(bundle, LoraSection(rank=4, alpha=4.0, targets=preset), train_text_encoder=True)
    layers = [(key, path, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 4.0)
              for key, model in bundle.components().items() for path, layer in lora_layers(model).items()]
    return sorted(name for name, *_ in FLUX_DEV.kohya_modules(layers, bundle.denoiser.config))


@pytest.mark.parametrize("preset", ["kohya-default", "attention"])
def test_kohya_keys_of_full_size_flux_match_the_golden_list(preset):
    """The full FLUX.1 architecture on the meta device: kohya's 304 transformer modules (19 double blocks x 10,
    38 single x 3) plus CLIP-L's 72, by sd-scripts' names (tests/engine/golden/make_flux_golden.py writes them)."""
    names = golden_flux_names(preset)
    golden = (GOLDEN / f"flux-dev_{preset}.txt").read_text(encoding="utf-8").split()
    assert names == golden
    unet = sum(n.startswith("lora_unet_") for n in names)
    if preset == "kohya-default":
        assert (unet, len(names) - unet) == (304, 72)
        assert {"lora_unet_double_blocks_18_txt_mod_lin", "lora_unet_single_blocks_37_modulation_lin",
                "lora_unet_double_blocks_0_img_attn_qkv", "lora_te1_text_model_encoder_layers_11_mlp_fc2"} <= set(names)
    else:
        assert (unet, len(names) - unet) == (19 * 4 + 38, 48)


def test_flux_lora_files_are_told_apart_from_sd():
    from studio.engine.families import lora_family

    shapes = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072)}
    family, _, source = lora_family({}, shapes)
    assert (family, source) == (get_family("flux-dev"), "keys")
    family, _, source = lora_family({"modelspec.architecture": "flux-1-schnell/lora"}, shapes)
    assert (family, source) == (get_family("flux-schnell"), "metadata")


def test_flux_presets_set_the_family_s_resolution_guidance_and_sampler_steps():
    from studio.ui.presets import builtin_presets

    presets = {p.path.stem: p for p in builtin_presets()}
    dev, schnell = presets["flux-dev"].values, presets["flux-schnell"].values
    assert (dev["dataset.resolution"], dev["training.guidance"], dev["sampling.steps"]) == (1024, 1.0, FLUX_DEV.preview.steps)
    assert (schnell["sampling.steps"], schnell["sampling.guidance"]) == (FLUX_SCHNELL.preview.steps, 0.0)
    assert dev["training.base_weights_fp8"] and dev["training.gradient_checkpointing"]
    assert "model.family" not in dev  # a preset says how to train, not what (a Flux preset on SD must not break it)
