"""SD3.5 as people keep it: the model file (MMDiT + VAE) without text encoders, and clip_l / clip_g / t5xxl files beside
it (Stability's text_encoders/ folder) or in ComfyUI's folders, told apart by their shapes; wrong and missing parts
named by file and field; a run from the CLI on such a file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.cli import main
from studio.engine.checkpoint import load_model
from studio.engine.config import ModelSection
from studio.engine.ldm import save_safetensors
from studio.engine.safe_load import ModelLoadError

TINY = "sd3.5-medium"
_TE = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}


def _part(state: dict, part: str, dtype: torch.dtype | None = None) -> dict:
    """One encoder of an all-in-one file as its own file holds it (transformers names, no prefix)."""
    prefix = f"text_encoders.{part}.transformer."
    return {k[len(prefix):]: (v.to(dtype) if dtype is not None else v) for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """The tiny SD3.5 Medium as an all-in-one file, and split as Stability's repository and a ComfyUI tree hold it."""
    from studio.engine.merge import diffusers_folder_to_single_file

    folder = tiny_model(TINY, "flow")
    tmp = tmp_path_factory.mktemp("sd3-parts")
    full = diffusers_folder_to_single_file(folder, tmp / "tiny-sd35m-all-in-one.safetensors")
    state = load_file(str(full))
    bare = {k: v for k, v in state.items() if not k.startswith("text_encoders.")}
    # Stability's layout: sd3.5_medium.safetensors (MMDiT + VAE) and text_encoders/{clip_l,clip_g,t5xxl_fp16}.
    repo = tmp / "stable-diffusion-3.5-medium"
    save_safetensors(bare, repo / "sd3.5_medium.safetensors")
    for name, part in _TE.items():
        save_safetensors(_part(state, part), repo / "text_encoders" / f"{part}{'_fp32' if part == 't5xxl' else ''}.safetensors")
    # ComfyUI: the checkpoint in models/checkpoints, the encoders in models/clip under names that say nothing
    # (they are told apart by their shapes), T5 in fp8.
    models = tmp / "ComfyUI" / "models"
    save_safetensors(bare, models / "checkpoints" / "sd35m.safetensors")
    save_safetensors(_part(state, "clip_g"), models / "clip" / "encoder_a.safetensors")
    save_safetensors(_part(state, "clip_l"), models / "clip" / "encoder_b.safetensors")
    save_safetensors(_part(state, "t5xxl", torch.float8_e4m3fn), models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")
    # The MMDiT alone (ComfyUI's diffusion_models/ layout: no prefix, no VAE).
    prefix = "model.diffusion_model."
    save_safetensors({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                     tmp / "mmdit-only" / "sd35m-mmdit.safetensors")
    return {"folder": folder, "full": full, "state": state, "repo": repo, "models": models, "tmp": tmp,
            "mmdit": tmp / "mmdit-only" / "sd35m-mmdit.safetensors"}


def _outputs(bundle):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        cond = bundle.family.encode_text(bundle, ["a red circle"])
        out = bundle.denoiser(x, cond["hidden"], cond["pooled"], torch.tensor([400.0]), return_dict=False)[0]
        image = bundle.vae.decode(x[:, :, :4, :4]).sample
    return [cond["hidden"], cond["pooled"], out, image]


def test_the_split_file_with_its_text_encoders_folder_loads_like_the_all_in_one(files):
    reference = load_model(ModelSection(path=str(files["full"]), config_dir=str(files["folder"])))
    split = load_model(ModelSection(path=str(files["repo"] / "sd3.5_medium.safetensors"), config_dir=str(files["folder"])))
    encoders = files["repo"] / "text_encoders"
    assert split.extra["parts"] == {"text_encoder": str(encoders / "clip_l.safetensors"),
                                    "text_encoder_2": str(encoders / "clip_g.safetensors"),
                                    "text_encoder_3": str(encoders / "t5xxl_fp32.safetensors")}
    assert len(split.text_encoders) == 3 and "warning" not in split.extra
    for ours, theirs in zip(_outputs(split), _outputs(reference)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_comfyui_folders_are_searched_and_the_clips_told_apart_by_shape(files):
    models = files["models"]
    bundle = load_model(ModelSection(path=str(models / "checkpoints" / "sd35m.safetensors"), config_dir=str(files["folder"])))
    assert bundle.extra["parts"] == {"text_encoder": str(models / "clip" / "encoder_b.safetensors"),
                                     "text_encoder_2": str(models / "clip" / "encoder_a.safetensors"),
                                     "text_encoder_3": str(models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")}
    reference = load_model(ModelSection(path=str(files["full"]), config_dir=str(files["folder"])))
    for ours, theirs in zip(bundle.text_encoders[:2], reference.text_encoders[:2]):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    # The fp8 T5 file is the original rounded to e4m3 and read back in the run's dtype.
    fp8 = _part(files["state"], "t5xxl", torch.float8_e4m3fn)["encoder.block.0.layer.0.SelfAttention.q.weight"]
    ours = bundle.text_encoders[2].encoder.block[0].layer[0].SelfAttention.q.weight
    assert ours.dtype == torch.float32 and torch.equal(ours, fp8.float())


def test_full_size_clip_l_clip_g_and_t5_are_told_apart_by_their_shapes():
    from transformers import AutoConfig, CLIPTextModelWithProjection, T5EncoderModel

    from studio.engine.families import get_family
    from studio.engine.families.parts import holding
    from studio.engine.families.sd3_loading import part_specs

    family = get_family("sd3.5-large")
    config_dir = family.bundled_config_dir()
    specs = {s.name: s for s in part_specs(family, config_dir)}
    found = {}
    for sub, cls in (("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection),
                     ("text_encoder_3", T5EncoderModel)):
        with torch.device("meta"):
            model = cls(AutoConfig.from_pretrained(config_dir / sub, local_files_only=True))
        found[sub] = holding({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert [found[s].describe() for s in specs if s != "vae"] == [
        "a CLIP-L text encoder (width 768, 12 layers, MLP 3072)",
        "a CLIP-G (OpenCLIP bigG) text encoder (width 1280, 32 layers, MLP 5120)",
        "a T5-XXL text encoder (width 4096, 24 layers, MLP 10240)"]
    for name, spec in specs.items():
        if name != "vae":
            assert [other for other, h in found.items() if spec.accepts(h)] == [name]


def test_a_wrong_part_is_refused_naming_the_file_and_the_field(files, tiny_model, tmp_path):
    from studio.engine.families import get_family

    repo, folder = files["repo"], files["folder"]
    model = repo / "sd3.5_medium.safetensors"
    clip_l = repo / "text_encoders" / "clip_l.safetensors"
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSection(path=str(model), config_dir=str(folder), text_encoder_2=str(clip_l)))
    assert str(err.value).startswith("'clip_l.safetensors' (model.text_encoder_2) holds a CLIP text encoder (width 32, "
                                     "2 layers, MLP 37), not the second text encoder (CLIP-G) (a CLIP text encoder "
                                     "(width 32, 2 layers, MLP 48))")
    t5 = repo / "text_encoders" / "t5xxl_fp32.safetensors"
    with pytest.raises(ModelLoadError, match=r"'t5xxl_fp32.safetensors' \(model.text_encoder\) holds a T5 text encoder"):
        load_model(ModelSection(path=str(model), config_dir=str(folder), text_encoder=str(t5)))
    # A whole model of another family (a FLUX.1 transformer file) given as T5.
    flux = load_model(ModelSection(path=str(tiny_model("flux-dev", "flow"))))
    flux_file = tmp_path / "flux1-dev.safetensors"
    save_safetensors({k: v.contiguous() for k, v in flux.denoiser.state_dict().items()}, flux_file)
    with pytest.raises(ModelLoadError, match=r"'flux1-dev.safetensors' \(model.text_encoder_3\) holds a FLUX.1 \[dev\] "
                                             r"model, not the third text encoder \(T5-XXL, optional\)"):
        load_model(ModelSection(path=str(model), config_dir=str(folder), text_encoder_3=str(flux_file)))
    # SD1's 4-channel VAE given as the VAE.
    sd1_vae = next((tiny_model("sd1", "epsilon") / "vae").glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match=r"\(model.vae\) holds a VAE with 4 latent channels, not the VAE \(16 "
                                             r"channels\)"):
        load_model(ModelSection(path=str(model), config_dir=str(folder), vae=str(sd1_vae)))
    # The Model page asks the same question and gets the same sentence.
    with pytest.raises(ModelLoadError, match="model.text_encoder_2"):
        get_family(TINY).part_files(model, ModelSection(path=str(model), config_dir=str(folder),
                                                        text_encoder_2=str(clip_l)))


def test_missing_clips_are_named_and_t5_stays_optional(files, tmp_path):
    folder, encoders = files["folder"], files["repo"] / "text_encoders"
    alone = tmp_path / "downloads" / "sd3.5_medium.safetensors"
    alone.parent.mkdir()
    shutil.copy(files["repo"] / "sd3.5_medium.safetensors", alone)
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSection(path=str(alone), config_dir=str(folder)))
    message = str(err.value)
    assert message.startswith("'sd3.5_medium.safetensors' holds the Stable Diffusion 3.5 Medium transformer without its "
                              "text encoder (CLIP-L) and second text encoder (CLIP-G). Choose them on the Model page "
                              "(or set model.text_encoder / model.text_encoder_2)")
    assert "T5" not in message.split(". Choose")[0]
    # Both CLIPs named, no T5 anywhere: it trains with zeros in T5's place, as the all-in-one file without T5 does.
    bundle = load_model(ModelSection(path=str(alone), config_dir=str(folder), text_encoder=str(encoders / "clip_l.safetensors"),
                                     text_encoder_2=str(encoders / "clip_g.safetensors")))
    assert len(bundle.text_encoders) == 2 and bundle.extra["parts"]["text_encoder_3"] is None
    cond = bundle.family.encode_text(bundle, ["a red circle"])
    assert cond["hidden"].shape[1] == 77 + 256 and not cond["hidden"][:, 77:].any()


def test_a_file_without_its_vae_finds_the_repositorys_vae_folder_or_names_it(files, tmp_path):
    folder = files["folder"]
    home = tmp_path / "sd35"
    shutil.copytree(files["repo"] / "text_encoders", home / "text_encoders")
    shutil.copy(files["mmdit"], home / "sd35m-mmdit.safetensors")
    with pytest.raises(ModelLoadError, match=r"without its VAE \(16 channels\)\. Choose them on the Model page \(or set "
                                             r"model.vae\)"):
        load_model(ModelSection(path=str(home / "sd35m-mmdit.safetensors"), config_dir=str(folder)))
    # Stability's repository has the diffusers VAE in vae/ beside the model file.
    shutil.copytree(folder / "vae", home / "vae")
    bundle = load_model(ModelSection(path=str(home / "sd35m-mmdit.safetensors"), config_dir=str(folder)))
    assert Path(bundle.extra["parts"]["vae"]).parent == home / "vae"
    reference = load_model(ModelSection(path=str(files["full"]), config_dir=str(folder)))
    for ours, theirs in zip(_outputs(bundle), _outputs(reference)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_inspect_says_which_parts_were_found(files, capsys, tmp_path):
    models = files["models"]
    # The tiny model's sizes need its config folder (real files are sized by the bundled one).
    assert main(["inspect", str(models / "checkpoints" / "sd35m.safetensors"), "--json", "--no-hash",
                 "--set", f"model.config_dir={files['folder']}"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {p["name"]: (Path(p["file"]).name, p["required"]) for p in info["parts"]} == {
        "text_encoder": ("encoder_b.safetensors", True), "text_encoder_2": ("encoder_a.safetensors", True),
        "text_encoder_3": ("t5xxl_fp8_e4m3fn.safetensors", False)}
    alone = tmp_path / "sd3.5_medium.safetensors"
    shutil.copy(files["repo"] / "sd3.5_medium.safetensors", alone)
    assert main(["inspect", str(alone), "--no-hash", "--set", f"model.config_dir={files['folder']}"]) == 0
    out = capsys.readouterr().out
    assert ("text encoder (CLIP-L): not found (model.text_encoder); second text encoder (CLIP-G): not found "
            "(model.text_encoder_2); third text encoder (T5-XXL, optional): not found, optional (model.text_encoder_3)"
            in out)
    assert "needs its text encoder (CLIP-L) (model.text_encoder), second text encoder (CLIP-G) (model.text_encoder_2) first" in out
    # A wrong part named on the command line is told as the loader would.
    assert main(["inspect", str(alone), "--no-hash", "--set", f"model.config_dir={files['folder']}",
                 "--set", f"model.text_encoder_3={files['repo'] / 'text_encoders' / 'clip_g.safetensors'}"]) == 0
    assert "(model.text_encoder_3) holds a CLIP text encoder" in capsys.readouterr().out
    assert main(["inspect", str(alone), "--set", "training.lr=1"]) == 1
    assert "is not model.KEY=VALUE" in capsys.readouterr().err


def test_a_split_file_trains_from_the_cli_with_the_t5_file_set(files, tmp_path):
    """A few steps on the split file with the third encoder named by --set; the run's job keeps the parts."""
    from fixtures_data import make_dataset

    from studio.engine.config import load_job

    data = make_dataset(tmp_path / "data", count=2)
    out = tmp_path / "run"
    t5 = files["repo"] / "text_encoders" / "t5xxl_fp32.safetensors"
    alone = tmp_path / "models" / "sd3.5_medium.safetensors"
    alone.parent.mkdir()
    shutil.copy(files["repo"] / "sd3.5_medium.safetensors", alone)
    code = main(["train", "--model", str(alone), "--data", str(data), "--out", str(out), "--steps", "3", "--rank", "4",
                 "--resolution", "64", "--sample-every", "0", "--name", "split",
                 "--set", f"model.config_dir={files['folder']}", "--set", "dataset.bucket_step=16",
                 "--set", f"model.text_encoder={files['repo'] / 'text_encoders' / 'clip_l.safetensors'}",
                 "--set", f"model.text_encoder_2={files['repo'] / 'text_encoders' / 'clip_g.safetensors'}",
                 "--set", f"model.text_encoder_3={t5}"])
    assert code == 0
    lora = load_file(str(out / "split.safetensors"))
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv") for k in lora)
    assert load_job(out / "job.toml").model.text_encoder_3 == str(t5)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # three real steps, no NaN


def test_a_scaled_fp8_t5_is_refused_rather_than_read_without_its_scales(files, tmp_path):
    """ComfyUI's t5xxl_fp8_e4m3fn_scaled.safetensors keeps a scale per weight; cast alone, T5 would be silently wrong."""
    state = _part(files["state"], "t5xxl", torch.float8_e4m3fn)
    state.update({k.removesuffix(".weight") + ".scale_weight": torch.ones(1) for k in list(state)
                  if k.endswith(".weight") and state[k].ndim == 2})
    state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    scaled = save_safetensors(state, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    with pytest.raises(ModelLoadError, match=r"'t5xxl_fp8_e4m3fn_scaled.safetensors' \(model.text_encoder_3\) is a "
                                             r"scaled-fp8 file"):
        load_model(ModelSection(path=str(files["repo"] / "sd3.5_medium.safetensors"), config_dir=str(files["folder"]),
                                text_encoder_3=str(scaled)))


def test_t5s_tokenizer_comes_from_comfyuis_own_copy(files, tmp_path):
    """ComfyUI users have no tokenizer_3 folder, but ComfyUI ships T5's tokenizer in comfy/text_encoders/t5_tokenizer."""
    folder = files["folder"]
    configs = shutil.copytree(folder, tmp_path / "configs", ignore=shutil.ignore_patterns("tokenizer_3", "*.safetensors"))
    root = tmp_path / "ComfyUI"
    shutil.copytree(files["models"], root / "models")
    section = ModelSection(path=str(root / "models" / "checkpoints" / "sd35m.safetensors"), config_dir=str(configs))
    without = load_model(section)
    assert len(without.text_encoders) == 2 and "tokenizer_3" in without.extra["warning"]
    shutil.copytree(folder / "tokenizer_3", root / "comfy" / "text_encoders" / "t5_tokenizer")
    bundle = load_model(section)
    assert len(bundle.text_encoders) == 3 and "warning" not in bundle.extra
    reference = load_model(ModelSection(path=str(files["full"]), config_dir=str(folder)))
    assert bundle.tokenizers[2]("a red circle").input_ids == reference.tokenizers[2]("a red circle").input_ids


def test_an_openclip_layout_file_is_described_not_taken():
    from studio.engine.families import get_family
    from studio.engine.families.parts import holding
    from studio.engine.families.sd3_loading import part_specs

    shapes = {f"transformer.resblocks.{i}.attn.in_proj_weight": (3 * 1280, 1280) for i in range(32)}
    shapes["token_embedding.weight"] = (49408, 1280)
    found = holding(shapes)
    spec = part_specs(get_family("sd3.5-large"), get_family("sd3.5-large").bundled_config_dir())[1]
    assert not spec.accepts(found)
    assert found.describe().startswith("an OpenCLIP-layout text encoder (width 1280, 32 layers")
