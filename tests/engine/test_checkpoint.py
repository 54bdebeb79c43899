"""Single-file checkpoints, diffusers folders and cached hub ids load offline, bit-exactly; families are detected."""

from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.engine.checkpoint import ModelLoadError, bundled_config_dir, cached_hub_models, load_model, resolve_model_path
from studio.engine.inspection import inspect_checkpoint, inspect_path
from studio.engine.config import ModelSection
from studio.engine.detect import detect
from studio.engine.merge import diffusers_folder_to_single_file
from studio.engine.safe_load import open_weights
from test_checkpoint_support import (
    apply_with_peft, ldm_shapes, random_kohya_lora, write_lightning_ckpt, write_sparse_safetensors,
)

FAMILY_FIXTURES = {"sd1": "tiny_sd1", "sd2": "tiny_sd2v", "sdxl": "tiny_sdxl"}


@pytest.fixture(scope="module")
def single_files(tmp_path_factory, tiny_sd1, tiny_sd2v, tiny_sdxl) -> dict[str, Path]:
    """Each tiny family as one original-layout .safetensors file (written by our diffusers → LDM conversion)."""
    root = tmp_path_factory.mktemp("single")
    folders = {"sd1": tiny_sd1, "sd2": tiny_sd2v, "sdxl": tiny_sdxl}
    return {f: diffusers_folder_to_single_file(folder, root / f"tiny-{f}.safetensors") for f, folder in folders.items()}


def _folder(request, family: str) -> Path:
    return request.getfixturevalue(FAMILY_FIXTURES[family])


def assert_same_weights(a, b) -> None:
    for part_a, part_b in [(a.denoiser, b.denoiser), (a.vae, b.vae), *zip(a.text_encoders, b.text_encoders)]:
        sa, sb = part_a.state_dict(), part_b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert len(a.text_encoders) == len(b.text_encoders)


# ------------------------------------------------------------------------------------------------ configs


def test_bundled_configs_match_their_generator(tmp_path):
    import importlib.util

    from studio.paths import resource_path

    root = resource_path("model_configs")
    spec = importlib.util.spec_from_file_location("make_model_configs", root / "make_model_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_configs(tmp_path)
    for name in module.NAMES:
        cmp = filecmp.dircmp(tmp_path / name, root / name)
        stack = [cmp]
        while stack:
            c = stack.pop()
            assert not c.left_only and not c.right_only, (c.left, c.left_only, c.right_only)
            _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
            assert not mismatch and not errors, (c.left, mismatch)
            stack.extend(c.subdirs.values())


@pytest.mark.parametrize("name, unet_m, text_m", [
    ("sd1", 859.5, [123.1]), ("sd2", 865.9, [340.4]), ("sd2-v", 865.9, [340.4]), ("sdxl", 2567.5, [123.1, 694.7]),
])
def test_bundled_configs_build_the_real_architectures(name, unet_m, text_m):
    from studio.engine.families import get_family
    from studio.engine.tokenizers import load_tokenizer
    from test_checkpoint_support import architecture

    unet, vae, encoders = architecture(name)
    millions = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)  # noqa: E731
    assert millions(unet) == unet_m and millions(vae) == 83.7
    assert [millions(e) for e in encoders] == text_m
    folder = Path(bundled_config_dir("sd2", "v_prediction") if name == "sd2-v" else bundled_config_dir(name))
    assert not list(folder.glob("tokenizer*")), "bundled config folders name their tokenizer, they hold no copy"
    pads = {"clip-l": 49407, "clip-g": 0}
    for tok_name in get_family(name.removesuffix("-v")).tokenizer_names:
        tok = load_tokenizer(tok_name)
        assert tok.model_max_length == 77 and tok.pad_token_id == pads[tok_name]
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if name == "sd2-v" else "epsilon")


def test_original_layout_names_match_real_checkpoints():
    """Spot checks against key names of the published SD1.5 / SD2.1 / SDXL files."""
    sd1, sd2, sdxl = ldm_shapes("sd1"), ldm_shapes("sd2"), ldm_shapes("sdxl")
    assert sd1["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert sd1["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)  # no attention there
    assert sd1["model.diffusion_model.output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert sd1["model.diffusion_model.input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert sd1["first_stage_model.decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)
    assert sd1["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] == (768, 3072)
    assert len([k for k in sd1 if k.startswith("model.diffusion_model.")]) == 686
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (3072, 1024)
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert sdxl["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert sdxl["model.diffusion_model.output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert sdxl["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == (640, 2048)
    assert sdxl["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert sdxl["conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.weight"] == (1280, 5120)


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_single_file_loads_offline_bit_exact(request, single_files, family):
    folder = _folder(request, family)
    reference = load_model(ModelSection(path=str(folder)))
    bundle = load_model(ModelSection(path=str(single_files[family]), config_dir=str(folder)))
    assert bundle.family.name == family
    assert bundle.prediction_type == reference.prediction_type  # the config folder's scheduler decides here
    assert bundle.extra["format"] == "safetensors" and bundle.load_time_s > 0
    assert_same_weights(reference, bundle)
    assert [t.model_max_length for t in bundle.tokenizers] == [77] * len(bundle.tokenizers)


def test_lightning_ckpt_loads_bit_exact(tiny_sd1, single_files, tmp_path):
    ckpt = write_lightning_ckpt(tmp_path / "tiny.ckpt", load_file(single_files["sd1"]))
    a = load_model(ModelSection(path=str(single_files["sd1"]), config_dir=str(tiny_sd1)))
    b = load_model(ModelSection(path=str(ckpt), config_dir=str(tiny_sd1)))
    assert b.extra["format"] == "zip-pickle"
    assert_same_weights(a, b)


@pytest.mark.parametrize("file_dtype, dtype", [
    (torch.float16, torch.float16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
])
def test_loads_straight_into_the_training_dtype(tiny_sd1, single_files, tmp_path, file_dtype, dtype):
    source = {k: v.to(file_dtype) if v.is_floating_point() else v for k, v in load_file(single_files["sd1"]).items()}
    save_file(source, str(tmp_path / "half.safetensors"))
    bundle = load_model(ModelSection(path=str(tmp_path / "half.safetensors"), config_dir=str(tiny_sd1)), dtype=dtype)
    for part in (bundle.denoiser, bundle.vae, *bundle.text_encoders):
        assert {p.dtype for p in part.parameters()} == {dtype}
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(bundle.denoiser.conv_in.weight, source[key].to(dtype))


def test_old_sd1_merges_without_text_model_prefix_load(tiny_sd1, single_files, tmp_path):
    sd = load_file(single_files["sd1"])
    prefix = "cond_stage_model.transformer."
    old = {(prefix + k[len(prefix + "text_model."):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    assert not any(k.startswith(prefix + "text_model.") for k in old)
    save_file(old, str(tmp_path / "old-merge.safetensors"))
    a = load_model(ModelSection(path=str(single_files["sd1"]), config_dir=str(tiny_sd1)))
    b = load_model(ModelSection(path=str(tmp_path / "old-merge.safetensors"), config_dir=str(tiny_sd1)))
    assert_same_weights(a, b)


def test_ema_copies_are_ignored(tiny_sd1, single_files, tmp_path):
    sd = load_file(single_files["sd1"])
    unet = [k for k in sd if k.startswith("model.diffusion_model.")]
    for k in unet:  # the flattened names the original training code used for its EMA copies
        sd["model_ema." + k.removeprefix("model.").replace(".", "")] = torch.randn_like(sd[k])
    save_file(sd, str(tmp_path / "with-ema.safetensors"))
    w = open_weights(tmp_path / "with-ema.safetensors")
    assert detect(w.shapes, w.metadata, "with-ema.safetensors").has_ema
    a = load_model(ModelSection(path=str(single_files["sd1"]), config_dir=str(tiny_sd1)))
    b = load_model(ModelSection(path=str(tmp_path / "with-ema.safetensors"), config_dir=str(tiny_sd1)))
    assert_same_weights(a, b)


def test_separate_vae_file_replaces_the_baked_one(tiny_sd1, single_files, tmp_path):
    sd = load_file(single_files["sd1"])
    vae = {k.removeprefix("first_stage_model."): v + 1.0 for k, v in sd.items() if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "vae-ft-mse.safetensors"))
    no_vae = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, str(tmp_path / "no-vae.safetensors"))

    with pytest.raises(ModelLoadError, match="no VAE inside; set model.vae"):
        load_model(ModelSection(path=str(tmp_path / "no-vae.safetensors"), config_dir=str(tiny_sd1)))
    base = load_model(ModelSection(path=str(single_files["sd1"]), config_dir=str(tiny_sd1)))
    for model_file in ("no-vae.safetensors", None):
        path = tmp_path / model_file if model_file else single_files["sd1"]
        bundle = load_model(ModelSection(path=str(path), config_dir=str(tiny_sd1), vae=str(tmp_path / "vae-ft-mse.safetensors")))
        for key, value in base.vae.state_dict().items():
            assert torch.equal(bundle.vae.state_dict()[key], value + 1.0), key
    # The same VAE file also replaces a diffusers folder's own.
    folder_bundle = load_model(ModelSection(path=str(tiny_sd1), vae=str(tmp_path / "vae-ft-mse.safetensors")))
    for key, value in base.vae.state_dict().items():
        assert torch.equal(folder_bundle.vae.state_dict()[key], value + 1.0), key


def test_prediction_type_override_wins(tiny_sd1, single_files):
    bundle = load_model(ModelSection(path=str(single_files["sd1"]), config_dir=str(tiny_sd1), prediction_type="v_prediction"))
    assert bundle.prediction_type == "v_prediction"
    assert bundle.noise_scheduler.config.prediction_type == "v_prediction"
    assert bundle.extra["prediction_source"].startswith("your setting")


def test_unusual_sizes_ask_for_a_config_dir(single_files):
    with pytest.raises(ModelLoadError, match="model.config_dir"):
        load_model(ModelSection(path=str(single_files["sdxl"])))


def test_wrong_config_dir_is_a_clear_error(single_files, tiny_sd1):
    with pytest.raises(ModelLoadError, match="does not fit the configuration"):
        load_model(ModelSection(path=str(single_files["sdxl"]), config_dir=str(tiny_sd1)))


def test_half_precision_variant_folder_loads(tiny_sd1, tmp_path):
    folder = tmp_path / "fp16-only"
    shutil.copytree(tiny_sd1, folder)
    for weights in folder.rglob("*.safetensors"):
        tensors = load_file(weights)
        save_file({k: v.half() for k, v in tensors.items()}, str(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors"))))
        weights.unlink()
    bundle = load_model(ModelSection(path=str(folder)), dtype=torch.float16)
    assert bundle.denoiser.dtype == torch.float16


def test_inpainting_folder_is_refused(tiny_sd1, tmp_path):
    folder = tmp_path / "inpaint"
    shutil.copytree(tiny_sd1, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = 9
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="inpainting"):
        load_model(ModelSection(path=str(folder)))


# ------------------------------------------------------------------------------------------------ hub cache


def _fake_hub_cache(root: Path, repo_id: str, source: Path) -> Path:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    if source.is_dir():
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
        shutil.copy(source, snapshot / source.name)
    return snapshot


def test_hub_ids_resolve_from_the_local_cache_only(tiny_sd1, single_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _fake_hub_cache(tmp_path / "hub", "studio-test/tiny-sd1", tiny_sd1)
    _fake_hub_cache(tmp_path / "hub", "studio-test/tiny-sd1-single", single_files["sd1"])
    assert resolve_model_path("studio-test/tiny-sd1") == snapshot
    bundle = load_model(ModelSection(path="studio-test/tiny-sd1"))
    assert_same_weights(bundle, load_model(ModelSection(path=str(tiny_sd1))))
    single = load_model(ModelSection(path="studio-test/tiny-sd1-single", config_dir=str(tiny_sd1)))
    assert_same_weights(bundle, single)
    assert {m["id"] for m in cached_hub_models()} == {"studio-test/tiny-sd1", "studio-test/tiny-sd1-single"}
    assert inspect_path("studio-test/tiny-sd1")["hub_id"] == "studio-test/tiny-sd1"
    with pytest.raises(ModelLoadError, match="not a model in the local Hugging Face cache"):
        load_model(ModelSection(path="studio-test/not-downloaded"))


# ------------------------------------------------------------------------------------------------ detection


@pytest.fixture(scope="module")
def shapes():
    return {f: ldm_shapes(f) for f in ("sd1", "sd2", "sdxl")}


@pytest.mark.parametrize("family, name, metadata, expected, resolution", [
    ("sd1", "v1-5-pruned-emaonly.safetensors", {}, "epsilon", 512),
    ("sd2", "v2-1_768-ema-pruned.safetensors", {}, "v_prediction", 768),
    ("sd2", "768-v-ema.safetensors", {}, "v_prediction", 768),
    ("sd2", "v2-1_512-ema-pruned.safetensors", {}, "epsilon", 512),
    ("sd2", "512-base-ema.safetensors", {}, "epsilon", 512),
    ("sd2", "my-finetune.safetensors", {"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v_prediction", 768),
    ("sd2", "my-finetune.safetensors", {"modelspec.prediction_type": "epsilon"}, "epsilon", 512),
    ("sd2", "my-finetune.safetensors", {}, "v_prediction", 768),  # nothing to go on: SD2's common case
    ("sdxl", "sd_xl_base_1.0.safetensors", {}, "epsilon", 1024),
    ("sdxl", "noobai-xl-vpred-1.0.safetensors", {}, "v_prediction", 1024),
])
def test_family_and_prediction_from_the_header(shapes, family, name, metadata, expected, resolution):
    det = detect(shapes[family], metadata, name)
    assert det.usable and det.standard_size
    assert (det.family, det.prediction_type, det.native_resolution) == (family, expected, resolution)


def test_v_pred_marker_and_zero_snr(shapes):
    det = detect({**shapes["sdxl"], "v_pred": (0,), "ztsnr": (0,)}, {}, "model.safetensors")
    assert det.prediction_type == "v_prediction" and det.zero_terminal_snr
    assert det.prediction_source.startswith("marker")


@pytest.mark.parametrize("std, expected", [(0.2, "v_prediction"), (0.01, "epsilon")])
def test_sd2_without_hints_uses_the_weight_rule(shapes, tmp_path, std, expected):
    """Header-only SD2 file (sparse: no disk used) with just the probed bias written."""
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    bias = torch.randn(shapes["sd2"][probe], generator=torch.Generator().manual_seed(0)) * std
    path = write_sparse_safetensors(tmp_path / "finetune.safetensors", shapes["sd2"], data={probe: bias})
    w = open_weights(path)
    det = detect(w.shapes, w.metadata, path.name, tensor=w.tensor)
    assert det.prediction_type == expected and "weights" in det.prediction_source
    assert inspect_checkpoint(path)["prediction_type"] == expected


def test_full_size_sdxl_header_inspects_without_reading_the_data(shapes, tmp_path):
    path = write_sparse_safetensors(tmp_path / "sd_xl_base_1.0.safetensors", shapes["sdxl"],
                                    metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    info = inspect_checkpoint(path)
    assert (info["family"], info["native_resolution"], info["usable"]) == ("sdxl", 1024, True)
    assert round(info["components"]["unet"]["parameters"] / 1e6, 1) == 2567.5
    assert round(info["components"]["text_encoder_2"]["parameters"] / 1e6, 1) == 694.7
    assert info["size_bytes"] > 6e9 and info["read_time_s"] < 5


# ------------------------------------------------------------------------------------------------ inspecting


def test_inspect_checkpoint_reports_hashes(single_files):
    path = single_files["sd1"]
    info = inspect_checkpoint(path, hashes=True)
    data = path.read_bytes()
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["a1111_shorthash"] == info["sha256"][:10]
    assert info["a1111_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert info["kind"] == "checkpoint" and info["family"] == "sd1" and info["dtype"] == "float32"
    assert set(info["components"]) == {"unet", "vae", "text_encoder"}
    assert info["usable"] is False and "config_dir" in info["problem"]  # tiny sizes: not auto-loadable
    assert inspect_checkpoint(path, hashes=True)["sha256"] == info["sha256"]  # from the hash cache


def test_inspect_path_dispatches(tiny_sd1, tiny_dataset, single_files, tmp_path):
    folder = inspect_path(tiny_sd1)
    assert (folder["kind"], folder["format"], folder["family"], folder["native_resolution"]) == ("checkpoint", "diffusers", "sd1", 64)
    bundle = load_model(ModelSection(path=str(tiny_sd1)))
    lora, _ = random_kohya_lora(bundle, tmp_path / "style.safetensors")
    info = inspect_path(lora)
    assert info["kind"] == "lora" and info["rank"] == 4 and info["family"] == "sd1"
    data = inspect_path(tiny_dataset)
    assert data["kind"] == "dataset" and data["usable"] == 4
    with pytest.raises(ModelLoadError, match="does not exist"):
        inspect_path(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------------ merging


def _unet_out(bundle, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    config = bundle.denoiser.config
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 7, config.cross_attention_dim, generator=g)
    added = None
    if bundle.family.name == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return bundle.denoiser(x, torch.tensor([500]), ctx, added_cond_kwargs=added).sample


def _te_out(bundle) -> list[torch.Tensor]:
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    with torch.no_grad():
        return [encoder(ids)[0] for encoder in bundle.text_encoders]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merged_checkpoint_equals_base_plus_lora(request, single_files, tmp_path, family):
    from studio.engine.merge import merge_lora_into_checkpoint

    folder = _folder(request, family)
    base = ModelSection(path=str(single_files[family]), config_dir=str(folder))
    reference = load_model(base)
    lora, plan = random_kohya_lora(reference, tmp_path / "lora.safetensors", rank=4, alpha=2.0)
    base_out, base_te = _unet_out(reference), _te_out(reference)
    apply_with_peft(reference, plan, rank=4, alpha=2.0)
    expected_out, expected_te = _unet_out(reference), _te_out(reference)
    assert not torch.allclose(expected_out, base_out, atol=1e-4)  # the LoRA really changes the output

    result = merge_lora_into_checkpoint(base, lora, 1.0, tmp_path / "merged.safetensors", torch.float32)
    assert result["unmatched"] == [] and result["modules_merged"] == sum(len(v) for v in plan.values())
    merged = load_model(ModelSection(path=str(tmp_path / "merged.safetensors"), config_dir=str(folder)))
    torch.testing.assert_close(_unet_out(merged), expected_out, atol=1e-5, rtol=1e-4)
    for got, want in zip(_te_out(merged), expected_te):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    merge_lora_into_checkpoint(base, lora, 0.0, tmp_path / "zero.safetensors", torch.float32)
    unchanged = load_model(ModelSection(path=str(tmp_path / "zero.safetensors"), config_dir=str(folder)))
    assert_same_weights(unchanged, load_model(base))  # bit for bit
    # (Outputs only to rounding: CPU kernels may take another path for differently aligned memory.)
    torch.testing.assert_close(_unet_out(unchanged), base_out, atol=1e-6, rtol=1e-5)
    for got, want in zip(_te_out(unchanged), base_te):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # The written file is the original layout, with the metadata A1111/ComfyUI read.
    w = open_weights(tmp_path / "merged.safetensors")
    assert any(k.startswith("model.diffusion_model.") for k in w.shapes)
    assert w.metadata["modelspec.architecture"].startswith("stable-diffusion")


def test_merge_matches_diffusers_lora_loader(tiny_sd1, single_files, tmp_path):
    """diffusers' own kohya loader agrees with our baking: the key names are the ecosystem's."""
    from studio.engine.merge import merge_lora_into_checkpoint

    base = ModelSection(path=str(single_files["sd1"]), config_dir=str(tiny_sd1))
    bundle = load_model(base)
    lora, _ = random_kohya_lora(bundle, tmp_path / "lora.safetensors", rank=4, alpha=2.0)
    pipe = bundle.pipeline()
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=0.5)
    expected = _unet_out(bundle)
    merge_lora_into_checkpoint(base, lora, 0.5, tmp_path / "merged.safetensors", torch.float32)
    merged = load_model(ModelSection(path=str(tmp_path / "merged.safetensors"), config_dir=str(tiny_sd1)))
    torch.testing.assert_close(_unet_out(merged), expected, atol=1e-5, rtol=1e-4)


def test_merge_refuses_a_lora_for_another_family(tiny_sd1, tiny_sdxl, single_files, tmp_path):
    from studio.engine.merge import merge_lora_into_checkpoint

    xl = load_model(ModelSection(path=str(tiny_sdxl)))
    lora, _ = random_kohya_lora(xl, tmp_path / "xl-lora.safetensors")
    base = ModelSection(path=str(single_files["sd1"]), config_dir=str(tiny_sd1))
    with pytest.raises(ModelLoadError, match="trained for SDXL"):
        merge_lora_into_checkpoint(base, lora, 1.0, tmp_path / "out.safetensors")
    with pytest.raises(ModelLoadError, match=r"\.safetensors"):
        merge_lora_into_checkpoint(base, lora, 1.0, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layouts_round_trip_through_diffusers_converters(family):
    """Our diffusers → original names, read back by diffusers' own original → diffusers converters (shapes only)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from test_checkpoint_support import architecture, ldm_tensors

    unet, vae, _ = architecture(family)
    ldm = ldm_tensors(family, lambda key, meta: meta)
    for module, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        back = {k: tuple(v.shape) for k, v in convert(ldm, dict(module.config)).items()}
        assert back == expected
