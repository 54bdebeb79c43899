"""Z-Image files as ComfyUI users keep them: the transformer alone (original layout with fused qkv, or diffusers'),
qwen_3_4b and ae found in the usual model folders, Qwen3's tokenizer from ComfyUI's own copy; what is missing is named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.engine.config import ModelSection, TrainingSection
from studio.engine.detect import detect
from studio.engine.families import get_family
from studio.engine.safe_load import ModelLoadError

# diffusers' names → the original (Tongyi / ComfyUI) names, the inverse of diffusers' single-file converter.
_TO_ORIGINAL = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
                ".attention.to_out.0.": ".attention.out.", ".attention.norm_k.": ".attention.k_norm.",
                ".attention.norm_q.": ".attention.q_norm."}


def original_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer's weights as the original files hold them: q/k/v fused into attention.qkv."""
    out = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        new = key
        for diffusers_name, original_name in _TO_ORIGINAL.items():
            new = new.replace(diffusers_name, original_name)
        if ".attention.to_q." in key:
            new = new.replace(".attention.to_q.", ".attention.qkv.")
            value = torch.cat([value, state[key.replace("to_q", "to_k")], state[key.replace("to_q", "to_v")]])
        out[prefix + new] = value.contiguous()
    return out


@pytest.fixture(scope="module")
def comfy_tree(tiny_model, tmp_path_factory):
    """<ComfyUI>/models/{diffusion_models,text_encoders,vae} and the tokenizer in comfy/text_encoders/qwen25_tokenizer;
    a config folder without tokenizer (the tiny sizes need one: auto-detection sizes the full model only)."""
    from studio.engine.checkpoint import load_model

    folder = tiny_model("zimage", "flow")
    bundle = load_model(ModelSection(path=str(folder)))
    root = tmp_path_factory.mktemp("ComfyUI")
    models = root / "models"
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True)
    state = bundle.denoiser.state_dict()
    transformers = models / "diffusion_models"
    save_file(original_state_dict(state, "model.diffusion_model."), str(transformers / "tiny_z_image_turbo_bf16.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(transformers / "tiny_z_image_diffusers.safetensors"))
    qwen = {"model." + k: v.contiguous() for k, v in bundle.text_encoders[0].state_dict().items()}
    qwen["lm_head.weight"] = qwen["model.embed_tokens.weight"].clone()  # some copies keep the (tied) LM head
    save_file(qwen, str(models / "text_encoders" / "qwen_3_4b.safetensors"))
    save_file({k: v.contiguous() for k, v in bundle.vae.state_dict().items()}, str(models / "vae" / "ae.safetensors"))
    shutil.copytree(folder / "tokenizer", root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    configs = root / "configs"
    for file in folder.rglob("*.json"):
        if file.parent.name != "tokenizer":
            (configs / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, configs / file.relative_to(folder))
    return folder, models, configs


def test_detection_by_keys_and_not_lumina_2():
    full = {"cap_embedder.1.weight": (3840, 2560), "noise_refiner.0.attention_norm1.weight": (3840,),
            "layers.0.adaLN_modulation.0.weight": (15360, 256), "layers.0.attention.qkv.weight": (11520, 3840)}
    det = detect({"model.diffusion_model." + k: v for k, v in full.items()}, {}, "z_image_turbo_bf16.safetensors")
    assert (det.family, det.prediction_type, det.usable, det.standard_size) == ("zimage", "flow", True, True)
    lumina = {k.replace("adaLN_modulation.0", "adaLN_modulation.1"): v for k, v in full.items()}
    det = detect(lumina, {}, "lumina_2.safetensors")
    assert det.family is None and "Lumina" in det.architecture


@pytest.mark.parametrize("file", ["tiny_z_image_turbo_bf16.safetensors", "tiny_z_image_diffusers.safetensors"])
def test_transformer_only_file_loads_with_parts_found_in_comfyui_folders(comfy_tree, file):
    from studio.engine.checkpoint import load_model
    from studio.engine.families import get_family

    folder, models, configs = comfy_tree
    reference = load_model(ModelSection(path=str(folder)))
    path = models / "diffusion_models" / file
    model = ModelSection(path=str(path), config_dir=str(configs))
    found = get_family("zimage").part_files(path, model)
    assert found == {"text_encoder": models / "text_encoders" / "qwen_3_4b.safetensors", "vae": models / "vae" / "ae.safetensors"}
    bundle = load_model(model)
    assert bundle.family.name == "zimage" and bundle.prediction_type == "flow" and "detection" in bundle.extra
    assert bundle.extra["parts"]["text_encoder"] == str(models / "text_encoders" / "qwen_3_4b.safetensors")
    assert bundle.tokenizers[0].name_or_path.endswith("qwen25_tokenizer")  # ComfyUI's own copy, found by location
    for ours, theirs in ((bundle.denoiser, reference.denoiser), (bundle.text_encoders[0], reference.text_encoders[0]),
                         (bundle.vae, reference.vae)):
        ref = theirs.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in ours.state_dict().items())
    latents = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [float(b.family.training_loss(b, b.denoiser, latents, b.family.encode_text(b, ["a red circle", "a dog"]),
                                               training=TrainingSection(), generator=torch.Generator().manual_seed(1),
                                               weight_dtype=torch.float32)) for b in (bundle, reference)]
    assert losses[0] == losses[1]


def test_missing_parts_are_named(comfy_tree, tmp_path):
    from studio.engine.checkpoint import load_model

    folder, models, configs = comfy_tree
    alone = tmp_path / "z_image_turbo.safetensors"
    shutil.copy(models / "diffusion_models" / "tiny_z_image_turbo_bf16.safetensors", alone)
    with pytest.raises(ModelLoadError, match=r"without its text encoder \(Qwen3-4B\), VAE .* and Qwen3's tokenizer"):
        load_model(ModelSection(path=str(alone), config_dir=str(configs)))
    transformer = str(models / "diffusion_models" / "tiny_z_image_turbo_bf16.safetensors")
    bad = tmp_path / "qwen_broken.safetensors"
    save_file({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, str(bad))
    with pytest.raises(ModelLoadError, match="not a complete Qwen3 text encoder"):
        load_model(ModelSection(path=transformer, config_dir=str(configs), text_encoder=str(bad)))
    # The VAE chosen as the text encoder: the file and the field are named, on the Model page's rows too.
    vae = str(models / "vae" / "ae.safetensors")
    with pytest.raises(ModelLoadError, match=r"'ae.safetensors' \(model.text_encoder\) holds no Qwen3 text encoder"):
        get_family("zimage").part_files(Path(transformer), ModelSection(path=transformer, text_encoder=vae))
