"""FLUX.1 files as ComfyUI/Forge users keep them: a transformer-only file (fp16 or fp8) with separate CLIP-L, T5 and
"ae" files found in the usual model folders; detection of dev vs schnell; the message naming what is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.engine.config import ModelSection
from studio.engine.detect import detect
from studio.engine.safe_load import ModelLoadError


def _save(module: torch.nn.Module, path: Path, dtype: torch.dtype | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def comfy_tree(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """ComfyUI's layout: models/unet/<transformer>, models/text_encoders/{clip_l,t5xxl_fp16}, models/vae/ae (+ T5's
    tokenizer.json beside the T5 file, as users are told to put it)."""
    from studio.engine.checkpoint import load_model

    folder = tiny_model("flux-dev", "flow")
    bundle = load_model(ModelSection(path=str(folder)))
    models = tmp_path_factory.mktemp("ComfyUI") / "models"
    _save(bundle.denoiser, models / "unet" / "tiny-flux1-dev.safetensors")
    _save(bundle.denoiser, models / "unet" / "tiny-flux1-dev-fp8.safetensors", torch.float8_e4m3fn)
    clip = {("text_model." + k if not k.startswith("text_model.") else k): v
            for k, v in bundle.text_encoders[0].state_dict().items()}
    (models / "text_encoders").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in clip.items()}, str(models / "text_encoders" / "clip_l.safetensors"))
    _save(bundle.text_encoders[1], models / "text_encoders" / "t5xxl_fp16.safetensors", torch.float16)
    for file in (folder / "tokenizer_2").iterdir():
        shutil.copy(file, models / "text_encoders" / file.name)
    _save(bundle.vae, models / "vae" / "ae.safetensors")
    return folder, models


def test_detection_tells_dev_from_schnell_by_the_guidance_embedder():
    bfl = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "single_blocks.0.linear1.weight": (21504, 3072)}
    det = detect({**bfl, "guidance_in.in_layer.weight": (3072, 256)}, {}, "flux1-dev.safetensors")
    assert (det.family, det.prediction_type, det.usable, det.standard_size) == ("flux-dev", "flow", True, True)
    det = detect({"model.diffusion_model." + k: v for k, v in bfl.items()}, {}, "flux1-schnell.safetensors")
    assert (det.family, det.usable) == ("flux-schnell", True)
    # Chroma shares the block names but has its own guidance layer: not ours.
    det = detect({**bfl, "distilled_guidance_layer.in_proj.weight": (5120, 64)}, {}, "chroma.safetensors")
    assert det.family is None and "Chroma" in det.architecture


@pytest.mark.parametrize("file", ["tiny-flux1-dev.safetensors", "tiny-flux1-dev-fp8.safetensors"])
def test_transformer_only_file_loads_with_parts_found_in_comfyui_folders(comfy_tree, file):
    from studio.engine.checkpoint import load_model

    folder, models = comfy_tree
    reference = load_model(ModelSection(path=str(folder)))
    # Auto-detection cannot size a tiny file, hence the config folder (as for the tiny SD single files).
    bundle = load_model(ModelSection(path=str(models / "unet" / file), config_dir=str(folder)))
    assert bundle.family.name == "flux-dev" and bundle.prediction_type == "flow"
    assert bundle.extra["parts"] == {"text_encoder": str(models / "text_encoders" / "clip_l.safetensors"),
                                     "text_encoder_2": str(models / "text_encoders" / "t5xxl_fp16.safetensors"),
                                     "vae": str(models / "vae" / "ae.safetensors")}
    with torch.no_grad():
        ours = bundle.family.encode_text(bundle, ["a red circle"])
        theirs = reference.family.encode_text(reference, ["a red circle"])
        torch.testing.assert_close(ours["pooled"], theirs["pooled"])
        torch.testing.assert_close(ours["t5"], theirs["t5"], rtol=1e-2, atol=1e-3)  # the T5 file is fp16
        w, w_ref = (b.denoiser.transformer_blocks[0].attn.to_q.weight for b in (bundle, reference))
        tolerance = 0.07 if "fp8" in file else 0.0  # e4m3: 3 mantissa bits
        assert float((w - w_ref).abs().max()) <= tolerance * float(w_ref.abs().max()) + 1e-7


def test_missing_parts_are_named(comfy_tree, tmp_path):
    from studio.engine.checkpoint import load_model

    folder, models = comfy_tree
    alone = tmp_path / "somewhere" / "flux1-dev.safetensors"
    alone.parent.mkdir()
    shutil.copy(models / "unet" / "tiny-flux1-dev.safetensors", alone)
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSection(path=str(alone), config_dir=str(folder)))
    message = str(err.value)
    for part in ("text encoder (CLIP ViT-L)", "second text encoder (T5-XXL)", "VAE", "T5 tokenizer"):
        assert part in message
    # Naming the parts in the job is enough (the T5 tokenizer is found beside the T5 file).
    bundle = load_model(ModelSection(path=str(alone), config_dir=str(folder),
                                     text_encoder=str(models / "text_encoders" / "clip_l.safetensors"),
                                     text_encoder_2=str(models / "text_encoders" / "t5xxl_fp16.safetensors"),
                                     vae=str(models / "vae" / "ae.safetensors")))
    assert bundle.family.name == "flux-dev"


def test_an_incomplete_part_file_is_refused_by_name(comfy_tree, tmp_path):
    from safetensors.torch import load_file

    from studio.engine.checkpoint import load_model

    folder, models = comfy_tree
    clip = load_file(str(models / "text_encoders" / "clip_l.safetensors"))
    clip.pop(next(k for k in clip if k.endswith("layers.1.mlp.fc2.weight")))
    broken = tmp_path / "clip_l-broken.safetensors"
    save_file(clip, str(broken))
    with pytest.raises(ModelLoadError, match="clip_l-broken.safetensors' is not a complete CLIP-L text encoder"):
        load_model(ModelSection(path=str(models / "unet" / "tiny-flux1-dev.safetensors"), config_dir=str(folder),
                                text_encoder=str(broken)))


def test_a_comfyui_all_in_one_checkpoint_uses_its_own_encoders_and_vae(comfy_tree, tmp_path):
    """ComfyUI's all-in-one FLUX.1 checkpoints (flux1-dev-fp8.safetensors) carry CLIP-L and T5 under
    ``text_encoders.clip_l/t5xxl.transformer.`` and the VAE under ``vae.`` (LDM names): no part files are asked for.
    (Their transformer is BFL-named under ``model.diffusion_model.``, which diffusers' own converter reads; here it is
    in diffusers names, as the transformer-only files above, so the test needs no BFL writer.)"""
    from safetensors.torch import load_file

    from studio.engine.checkpoint import load_model
    from studio.engine.families import get_family
    from studio.engine.ldm import vae_to_ldm

    folder, models = comfy_tree
    reference = load_model(ModelSection(path=str(folder)))
    state = dict(reference.denoiser.state_dict())
    clip = load_file(str(models / "text_encoders" / "clip_l.safetensors"))
    state.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip.items()})
    state.update({"text_encoders.t5xxl.transformer." + k: v.to(torch.float8_e4m3fn)
                  for k, v in reference.text_encoders[1].state_dict().items()})
    state.update({"vae." + k.removeprefix("first_stage_model."): v
                  for k, v in vae_to_ldm(reference.vae.state_dict(), reference.vae.config).items()})
    home = tmp_path / "checkpoints"
    home.mkdir()
    file = home / "flux1-dev-fp8.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    for tok in (folder / "tokenizer_2").iterdir():  # T5's tokenizer is still the user's (not bundled)
        shutil.copy(tok, home / tok.name)
    det = detect({k: tuple(v.shape) for k, v in state.items()}, {}, file.name)
    assert det.components == {"transformer": True, "text_encoder": True, "text_encoder_2": True, "vae": True}
    assert any("carries its own CLIP-L, T5-XXL, VAE" in n for n in det.notes)
    section = ModelSection(path=str(file), config_dir=str(folder))
    assert get_family("flux-dev").part_files(file, section) == {}  # the Model page asks for nothing
    bundle = load_model(section)
    assert bundle.extra["parts"] == {"text_encoder": "inside", "text_encoder_2": "inside", "vae": "inside"}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, reference.vae.config.latent_channels, 8, 8, generator=g)
    with torch.no_grad():
        ours, theirs = (b.family.encode_text(b, ["a red circle"]) for b in (bundle, reference))
        torch.testing.assert_close(ours["pooled"], theirs["pooled"], rtol=0, atol=0)
        fp8 = reference.text_encoders[1].encoder.block[0].layer[0].SelfAttention.q.weight.to(torch.float8_e4m3fn)
        assert torch.equal(bundle.text_encoders[1].encoder.block[0].layer[0].SelfAttention.q.weight, fp8.float())
        torch.testing.assert_close(bundle.vae.decode(x).sample, reference.vae.decode(x).sample, rtol=0, atol=0)
        for a, b in zip(bundle.denoiser.state_dict().values(), reference.denoiser.state_dict().values()):
            assert torch.equal(a, b)
    # A part file named in the job still wins over the file's own part.
    chosen = load_model(ModelSection(path=str(file), config_dir=str(folder),
                                     text_encoder_2=str(models / "text_encoders" / "t5xxl_fp16.safetensors")))
    assert chosen.extra["parts"]["text_encoder_2"].endswith("t5xxl_fp16.safetensors")


def test_a_part_file_given_for_the_wrong_field_is_refused_by_name(comfy_tree):
    from studio.engine.checkpoint import load_model

    folder, models = comfy_tree
    t5 = models / "text_encoders" / "t5xxl_fp16.safetensors"
    with pytest.raises(ModelLoadError, match=r"'t5xxl_fp16.safetensors' \(model.text_encoder\) holds a T5 text encoder "
                                             r"\(width \d+, \d+ layers, MLP \d+\), not the text encoder \(CLIP ViT-L\)"):
        load_model(ModelSection(path=str(models / "unet" / "tiny-flux1-dev.safetensors"), config_dir=str(folder),
                                text_encoder=str(t5)))
    with pytest.raises(ModelLoadError, match=r"'tiny-flux1-dev.safetensors' \(model.vae\) holds a FLUX.1 \[dev\] model"):
        load_model(ModelSection(path=str(models / "unet" / "tiny-flux1-dev-fp8.safetensors"), config_dir=str(folder),
                                vae=str(models / "unet" / "tiny-flux1-dev.safetensors")))
