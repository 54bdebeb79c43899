"""SD3 Medium / SD3.5 Medium / SD3.5 Large: configs, CLI training that learns, LoRA files in diffusers and kohya
layouts read back by their consumers, golden kohya names of the full-size models, single files users have."""

from __future__ import annotations

import filecmp
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.cli import main
from studio.engine.checkpoint import load_model
from studio.engine.config import ModelSection, TrainingSection
from studio.engine.families import get_family
from studio.paths import resource_path

ROOT = Path(__file__).resolve().parents[2]
TINY = "sd3.5-medium"  # the richest variant: q/k norms and the second attention (MMDiT-X)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


golden = _load(ROOT / "tests" / "engine" / "golden" / "make_golden_sd3.py", "golden_sd3")


# ------------------------------------------------------------------------------------------------ configs


def test_bundled_sd3_configs_match_their_script(tmp_path):
    root = resource_path("model_configs")
    module = _load(root / "make_sd3_configs.py", "make_sd3_configs")
    module.write_configs(tmp_path)
    for name in module.NAMES:
        stack = [filecmp.dircmp(tmp_path / name, root / name)]
        while stack:
            c = stack.pop()
            assert not c.left_only and not c.right_only, (c.left, c.left_only, c.right_only)
            _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
            assert not mismatch and not errors, (c.left, mismatch)
            stack.extend(c.subdirs.values())


@pytest.mark.parametrize("name", ["sd3", "sd3.5-medium", "sd3.5-large"])
def test_bundled_configs_build_the_reference_sizes_and_are_told_apart(name):
    """The cost model's parameter counts are the bundled architecture's; each config is found as its family."""
    from diffusers import SD3Transformer2DModel

    from studio.engine.families import family_of_folder

    family = get_family(name)
    folder = family.bundled_config_dir()
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(family.denoiser_config(folder))
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e5) / 10 == family.full_size_parameters()["denoiser"] / 1e6
    assert family_of_folder(folder) is family


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A LoRA (transformer and both CLIPs) trained from the command line on four images of the tiny SD3.5 Medium,
    written in both layouts."""
    from fixtures_data import make_dataset

    tmp = tmp_path_factory.mktemp("sd3-run")
    data = make_dataset(tmp / "data", count=4)
    folder = tiny_model(TINY, "flow")
    out = tmp / "run"
    code = main(["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--steps", "40",
                 "--rank", "8", "--alpha", "8", "--lr", "5e-3", "--resolution", "64", "--sample-every", "0",
                 "--name", "sd3", "--set", "dataset.bucket_step=16", "--set", "output.save_diffusers=true",
                 "--set", "training.max_grad_norm=1.0", "--set", "lora.train_text_encoder=true",
                 "--set", "lora.text_encoder_lr=1e-3"])
    assert code == 0
    return {"folder": folder, "data": data, "kohya": out / "sd3.safetensors", "diffusers": out / "sd3-diffusers.safetensors"}


def _fixed_loss(bundle, data: Path) -> float:
    """The training objective on the four images at fixed noise and σ (the same generator seed every call)."""
    from studio.engine.dataset import load_image, prepare_image

    items = sorted(data.glob("*.png"))
    with torch.no_grad():
        pixels = torch.cat([prepare_image(load_image(p), (64, 64))[0][None] for p in items])
        latents = bundle.family.encode_image(bundle, pixels)[0]
        cond = bundle.family.encode_text(bundle, [p.with_suffix(".txt").read_text() for p in items])
        return float(bundle.family.training_loss(bundle, bundle.denoiser, latents, cond, training=TrainingSection(),
                                                 generator=torch.Generator().manual_seed(7), weight_dtype=torch.float32))


def test_a_lora_trained_from_the_cli_lowers_the_denoising_loss(trained, capsys):
    from studio.engine.lora import count_lora_modules

    bundle = load_model(ModelSection(path=str(trained["folder"])))
    before = _fixed_loss(bundle, trained["data"])
    bundle.pipeline().load_lora_weights(str(trained["diffusers"]))
    after = _fixed_loss(bundle, trained["data"])
    modules = [count_lora_modules(m) for m in bundle.components().values()]
    with capsys.disabled():
        print(f"\nSD3 tiny LoRA: {modules} modules (transformer, CLIP-L, CLIP-G, T5), loss {before:.4f} -> {after:.4f} "
              f"(ratio {after / before:.3f})")
    assert after < 0.95 * before, (before, after)
    # Every kohya-default module of the tiny MMDiT-X: block 0 (image 7, attn2 4, text 7), block 1 (image 7, its
    # pre-only text stream 4), and of both 2-layer CLIPs (6 each).
    assert modules == [(7 + 4 + 7) + (7 + 4), 12, 12, 0]  # T5 is not trained


def _image(pipe, **kwargs):
    import numpy as np

    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return np.asarray(out.images[0])


def test_the_diffusers_layout_loads_in_diffusers_with_no_unexpected_keys(trained, caplog):
    from diffusers import StableDiffusion3Pipeline
    from peft.tuners.lora import LoraLayer

    pipe = StableDiffusion3Pipeline.from_pretrained(trained["folder"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    base = _image(pipe)
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(str(trained["diffusers"]), adapter_name="studio")
    assert "unexpected keys" not in caplog.text and "No LoRA keys" not in caplog.text, caplog.text
    tensors = load_file(str(trained["diffusers"]))
    for component in ("transformer", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component)
        layers = {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}
        # Every module in the file got its adapter, with the trained weights (not zeros).
        assert {k.split(".", 1)[1].rsplit(".lora_", 1)[0].removeprefix("text_model.")
                for k in tensors if k.startswith(component + ".")} == {n.removeprefix("text_model.") for n in layers}
        # The last block's text queries feed nothing (its text stream ends there), so that LoRA gets no gradient.
        idle = {f"transformer_blocks.{pipe.transformer.config.num_layers - 1}.attn.add_q_proj"}
        assert [n for n, m in layers.items() if not m.lora_B["studio"].weight.abs().sum() > 0] == \
            (sorted(idle) if component == "transformer" else []), component
    pipe.set_adapters(["studio"], adapter_weights=[1.0])
    assert abs(_image(pipe) - base).max() > 1e-3  # the LoRA changes the image
    pipe.set_adapters(["studio"], adapter_weights=[0.0])
    assert abs(_image(pipe) - base).max() == 0  # and at strength 0 it is the base model's


def test_the_kohya_layout_applied_as_comfyui_does_reproduces_the_trained_model(trained):
    """ComfyUI adds ``up @ down · alpha/rank`` to ``diffusion_model.<name>.weight`` of the MMDiT; converting that
    MMDiT back with diffusers' own converter must give the trained model (fused qkv and swapped halves included)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from studio.engine.export import kohya_delta
    from studio.engine.families.sd3_names import mmdit_state_dict

    base = SD3Transformer2DModel.from_pretrained(trained["folder"], subfolder="transformer", local_files_only=True)
    mmdit = mmdit_state_dict(base.state_dict(), base.config.num_layers)
    # The name map is the exact inverse of diffusers' converter.
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit))
    assert back.keys() == base.state_dict().keys() and all(torch.equal(back[k], v) for k, v in base.state_dict().items())

    lora = load_file(str(trained["kohya"]))
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in lora}
    unet_names = sorted(n for n in names if n.startswith("lora_unet_"))
    by_lora_name = {k[:-len(".weight")].replace(".", "_"): k for k in mmdit if k.endswith(".weight")}
    assert all("lora_unet_" + n.removeprefix("lora_unet_") in {"lora_unet_" + b for b in by_lora_name}
               for n in unet_names), "a kohya name with no MMDiT weight"
    merged = dict(mmdit)
    for name in unet_names:
        key = by_lora_name[name.removeprefix("lora_unet_")]
        down, up = lora[f"{name}.lora_down.weight"].float(), lora[f"{name}.lora_up.weight"].float()
        merged[key] = merged[key] + kohya_delta(down, up, float(lora[f"{name}.alpha"]), merged[key].shape)
    comfy = SD3Transformer2DModel.from_config(base.config)
    comfy.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(merged))

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(trained["folder"], local_files_only=True)
    pipe.load_lora_weights(str(trained["diffusers"]))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([500.0, 900.0])
    ctx, pooled = torch.randn(2, 20, 64, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        want = pipe.transformer(x, ctx, pooled, t, return_dict=False)[0]
        got = comfy(x, ctx, pooled, t, return_dict=False)[0]
        plain = base(x, ctx, pooled, t, return_dict=False)[0]
    assert (want - plain).abs().max() > 1e-3  # the LoRA matters here
    assert torch.allclose(got, want, atol=2e-3), (got - want).abs().max()  # fp16 file vs fp32 adapters


def test_kohya_file_metadata_names_the_family_the_way_kohya_does(trained):
    from studio.engine.export import describe_lora

    with safe_open(str(trained["kohya"]), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_base_model_version"] == "5-medium" and meta["ss_network_module"] == "networks.lora"
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn2_qkv.") for k in keys)
    assert not any("to_q" in k or "add_q_proj" in k for k in keys)
    info = describe_lora(trained["kohya"])
    assert (info["family"], info["family_source"]) == (TINY, "metadata")


def test_fused_qkv_equals_the_three_trained_deltas_also_with_different_alphas():
    """kohya's ``qkv`` is one LoRA; the q, k, v LoRAs it stands for may even have been trained at other scales."""
    from studio.engine.export import kohya_delta

    family = get_family("sd3")
    g = torch.Generator().manual_seed(0)
    parts = [(f"transformer_blocks.0.attn.to_{p}", torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), a)
             for p, a in (("q", 4.0), ("k", 4.0), ("v", 2.0))]
    for chosen in (parts, [(p, d, u, 4.0) for p, d, u, _ in parts]):
        [(name, down, up, alpha)] = family.kohya_modules([("transformer", *part) for part in chosen])
        assert name == "lora_unet_joint_blocks_0_x_block_attn_qkv"
        fused = kohya_delta(down, up, alpha, (24, 16))
        want = torch.cat([kohya_delta(d, u, a, (8, 16)) for _, d, u, a in chosen])
        assert torch.allclose(fused, want, atol=1e-5)


# ------------------------------------------------------------------------------------------------ golden keys


@pytest.mark.parametrize("name", list(golden.VARIANTS))
def test_kohya_names_of_the_full_size_models_match_the_golden_lists(name):
    lists = {preset: golden.golden_path(name, preset).read_text(encoding="utf-8").split() for preset in golden.PRESETS}
    for preset, names in lists.items():
        assert golden.golden_names(name, preset) == names
    # "+conv" adds nothing: the MMDiT's blocks have no convolutions.
    family = get_family(name)
    assert family.lora_targets("+conv", "transformer") == family.lora_targets("kohya-default", "transformer")
    unet = [n for n in lists["kohya-default"] if n.startswith("lora_unet_")]
    # kohya's lora_sd3 module set: qkv, proj, fc1, fc2, adaLN per stream and block; the last text stream is
    # pre-only (qkv and adaLN); SD3.5 Medium adds attn2 qkv/proj in blocks 0-12; CLIP-L 72 + CLIP-G 192.
    expected = {"sd3": 24 * 5 + 23 * 5 + 2, "sd3.5-medium": 24 * 5 + 23 * 5 + 2 + 13 * 2, "sd3.5-large": 38 * 5 + 37 * 5 + 2}
    assert len(unet) == expected[name] and len(lists["kohya-default"]) - len(unet) == 72 + 192


# ------------------------------------------------------------------------------------------------ single files


@pytest.fixture(scope="module")
def single_files(tiny_model, tmp_path_factory):
    """Stability-layout single files of the tiny SD3.5 Medium: all-in-one and without T5 (without the CLIPs:
    test_sd3_parts.py)."""
    from studio.engine.ldm import save_safetensors
    from studio.engine.merge import diffusers_folder_to_single_file

    folder = tiny_model(TINY, "flow")
    tmp = tmp_path_factory.mktemp("sd3-files")
    full = diffusers_folder_to_single_file(folder, tmp / "tiny-sd35m.safetensors")
    state = load_file(str(full))
    save_safetensors({k: v for k, v in state.items() if not k.startswith("text_encoders.t5xxl.")},
                     tmp / "no-t5.safetensors")
    return {"folder": folder, "full": full, "no_t5": tmp / "no-t5.safetensors",
            "keys": set(state)}


def _outputs(bundle):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        cond = bundle.family.encode_text(bundle, ["a red circle"])
        out = bundle.denoiser(x, cond["hidden"], cond["pooled"], torch.tensor([400.0]), return_dict=False)[0]
        latent = bundle.vae.decode(x[:, :, :4, :4]).sample
    return cond, out, latent


def test_the_all_in_one_file_loads_like_the_diffusers_folder(single_files):
    from studio.engine.detect import detect
    from studio.engine.safe_load import open_weights

    keys = single_files["keys"]
    for prefix in ("model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight", "first_stage_model.encoder.conv_in.weight",
                   "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                   "text_encoders.clip_g.transformer.text_projection.weight", "text_encoders.t5xxl.transformer.shared.weight"):
        assert prefix in keys
    w = open_weights(single_files["full"])
    det = detect(w.shapes, w.metadata, single_files["full"].name)
    assert (det.family, det.prediction_type, det.usable, det.standard_size) == (TINY, "flow", True, False)
    folder = load_model(ModelSection(path=str(single_files["folder"])))
    # Tiny sizes: the bundled config cannot fit, so the tiny folder serves as model.config_dir (it has tokenizer_3).
    with pytest.raises(Exception, match="unusual sizes.*model.config_dir"):
        load_model(ModelSection(path=str(single_files["full"])))
    single = load_model(ModelSection(path=str(single_files["full"]), config_dir=str(single_files["folder"])))
    assert single.family is folder.family and len(single.text_encoders) == 3 and "warning" not in single.extra
    for a, b in zip(_outputs(folder), _outputs(single)):
        pairs = zip(a.tensors.values(), b.tensors.values()) if hasattr(a, "tensors") else [(a, b)]
        for x, y in pairs:
            assert torch.allclose(x, y, atol=1e-5), (x - y).abs().max()


def test_t5_is_optional_in_a_single_file_and_its_tokenizer_is_asked_for_by_name(single_files, tmp_path):
    import shutil

    folder = single_files["folder"]
    no_t5 = load_model(ModelSection(path=str(single_files["no_t5"]), config_dir=str(folder)))
    assert len(no_t5.text_encoders) == 2
    cond = no_t5.family.encode_text(no_t5, ["a red circle"])
    assert cond["hidden"].shape[1] == 77 + 256 and not cond["hidden"][:, 77:].any()  # zeros where T5 would be
    # The pipeline (previews, Try & Export) runs without T5 too.
    no_t5.pipeline()("a red circle", num_inference_steps=1, height=64, width=64, output_type="np")

    # T5 inside, but no tokenizer for it anywhere: trained without T5, and the message names what to add.
    configs = shutil.copytree(folder, tmp_path / "configs", ignore=shutil.ignore_patterns("tokenizer_3", "*.safetensors"))
    bundle = load_model(ModelSection(path=str(single_files["full"]), config_dir=str(configs)))
    assert len(bundle.text_encoders) == 2 and "tokenizer_3" in bundle.extra["warning"]


@pytest.mark.parametrize("name", ["sd3", "sd3.5-medium", "sd3.5-large"])
def test_full_size_single_files_are_told_apart_by_their_shapes(name):
    """Medium vs Large by depth and width, SD3 vs SD3.5 by q/k norms, SD3.5 Medium by its second attention."""
    from studio.engine.detect import detect
    from studio.engine.families.sd3_names import mmdit_state_dict

    bundle = golden.meta_bundle(name)
    transformer = bundle.denoiser
    mmdit = mmdit_state_dict(transformer.state_dict(), transformer.config.num_layers)
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in mmdit.items()}
    shapes.update({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
                   "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (768,),
                   "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": (1280,)})
    det = detect(shapes, {}, f"{name}.safetensors")
    assert (det.family, det.standard_size, det.usable) == (name, True, True)
    assert any("T5" in note for note in det.notes)
    # A transformer-only file (ComfyUI's diffusion_models folder) is the same model; its notes name what it lacks
    # (loaded with part files: test_sd3_parts.py).
    bare = detect({k.removeprefix("model.diffusion_model."): v for k, v in shapes.items()
                   if k.startswith("model.diffusion_model.")}, {}, "x.safetensors")
    assert bare.family == name and bare.usable and any("no CLIP-L, CLIP-G, VAE inside" in n for n in bare.notes)


def test_try_and_export_applies_the_kohya_file_like_the_diffusers_one(trained):
    """diffusers cannot read kohya's SD3 layout; the family hands its pipeline the same LoRA in diffusers' layout."""
    import numpy as np

    from studio.engine.sampling import generate

    bundle = load_model(ModelSection(path=str(trained["folder"])))
    settings = dict(seed=1, steps=2, guidance=1.0, width=64, height=64)
    base = np.asarray(generate(bundle, "a red circle", **settings), dtype=np.float32)
    kohya = np.asarray(generate(bundle, "a red circle", lora_path=trained["kohya"], **settings), dtype=np.float32)
    off = np.asarray(generate(bundle, "a red circle", lora_path=trained["kohya"], lora_scale=0.0, **settings),
                     dtype=np.float32)
    other = load_model(ModelSection(path=str(trained["folder"])))
    diffusers = np.asarray(generate(other, "a red circle", lora_path=trained["diffusers"], **settings), dtype=np.float32)
    assert np.abs(kohya - base).max() > 2  # 8-bit images: the LoRA shows
    assert np.abs(kohya - diffusers).max() <= 2  # both layouts give the same image (fp16 rounding aside)
    assert np.array_equal(off, base)


def test_block_swap_and_fp8_storage_apply_to_the_joint_blocks(tiny_model):
    """On the CPU a swapped block goes to and from the same device: the step must be unchanged; fp8 shrinks the stored weights."""
    from studio.engine.config import LoraSection
    from studio.engine.families import memory
    from studio.engine.lora import inject_lora

    def run(**training):
        bundle = load_model(ModelSection(path=str(tiny_model(TINY, "flow"))))
        torch.manual_seed(0)
        inject_lora(bundle, LoraSection(rank=4, alpha=4.0), train_text_encoder=False)
        section = TrainingSection(**training)
        bundle.family.apply_speed_options(bundle, section, False)
        bundle.family.place_denoiser(bundle, section, "cpu")
        g = torch.Generator().manual_seed(3)
        latents = torch.randn(1, 16, 8, 8, generator=g)
        cond = bundle.family.encode_text(bundle, ["a red circle"])
        loss = bundle.family.training_loss(bundle, bundle.denoiser, latents, cond, training=section,
                                           generator=torch.Generator().manual_seed(1), weight_dtype=torch.float32)
        loss.backward()
        grads = [p.grad.clone() for p in bundle.denoiser.parameters() if p.requires_grad]
        return bundle, float(loss), grads

    _, plain, plain_grads = run()
    swapped, loss, grads = run(block_swap=1, gradient_checkpointing=True)
    assert "block_swap" in swapped.extra and loss == pytest.approx(plain, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, plain_grads))
    full = load_model(ModelSection(path=str(tiny_model(TINY, "flow")))).denoiser
    before = memory.parameter_bytes(full)
    memory.store_frozen_in_fp8(full, torch.float32)
    # Linear weights at 1 byte instead of 4; the tiny model's biases, norms and embeddings keep theirs.
    assert memory.parameter_bytes(full) < 0.55 * before
    family = get_family("sd3.5-large")
    bf16 = family.denoiser_weight_bytes(TrainingSection(), 2)
    assert family.denoiser_weight_bytes(TrainingSection(base_weights_fp8=True), 2) == bf16 / 2
    # 20 of SD3.5 Large's 38 joint blocks in CPU memory (one at a time on the GPU): about half the bytes stay.
    assert 0.45 < family.denoiser_weight_bytes(TrainingSection(block_swap=20), 2) / bf16 < 0.55
