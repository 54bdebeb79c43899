"""LoRA export: golden kohya keys of the real architectures, loading in diffusers, metadata, hashes, atomicity, reading."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.engine.checkpoint import load_model
from studio.engine.config import Job, LoraSection, ModelSection
from studio.engine.export import (
    LoraExportError,
    LoraFileError,
    NotALoraError,
    build_metadata,
    describe_lora,
    export_diffusers_lora,
    export_lora,
    kohya_delta,
    kohya_export_problem,
    kohya_module_name,
    read_lora,
)
from studio.engine.lora import components, count_lora_modules, inject_lora, lora_layers, matching_modules, target_modules


def _load_architectures():
    path = Path(__file__).parent / "golden" / "architectures.py"
    spec = importlib.util.spec_from_file_location("golden_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


arch = _load_architectures()

# Keys FACTS.md says A1111, ComfyUI and Civitai read.
REQUIRED_METADATA = (
    "ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_resolution",
    "ss_steps", "ss_tag_frequency", "ss_output_name", "modelspec.sai_model_spec", "modelspec.architecture",
    "modelspec.implementation", "modelspec.title", "modelspec.resolution", "modelspec.date",
    "modelspec.trigger_phrase", "modelspec.prediction_type", "sshs_model_hash",
)


# ------------------------------------------------------------------------------------------------ helpers


def _selected_kohya_names(bundle, preset: str) -> list[str]:
    return sorted(
        kohya_module_name(bundle.family, key, name, bundle.denoiser.config)
        for key, model in components(bundle).items()
        for name in matching_modules(model, target_modules(bundle.family, preset, key))
    )


def _trained(folder: Path, lora: LoraSection, *, train_te: bool = True, seed: int = 0):
    """A tiny bundle with a LoRA whose weights (lora_B included) are moved away from their no-op init."""
    bundle = load_model(ModelSection(path=str(folder)))
    params = inject_lora(bundle, lora, train_text_encoder=train_te)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in params.values():
            for p in group:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return bundle


def _job(lora: LoraSection, **kw) -> Job:
    job = Job()
    job.lora = lora
    job.dataset.resolution = 64
    job.dataset.trigger_word = kw.get("trigger", "sks")
    job.output.name = "tiny"
    job.model.path = "/models/tiny-model"
    return job


def _fresh_pipeline(folder: Path):
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    # The same sampler ModelBundle.pipeline() uses, so images of the live and the reloaded LoRA compare exactly.
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(7)
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np").images


@contextlib.contextmanager
def _load_messages():
    """Collect warnings and WARNING+ log records of diffusers/transformers/peft (their loggers do not propagate)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def _key_problems(messages: list[str]) -> list[str]:
    """Messages that report LoRA keys as unexpected, missing or not loaded."""
    bad = []
    for message in messages:
        low = message.lower()
        if "load report" in low:
            # transformers' report also lists the base weights as MISSING when an adapter is loaded; only
            # lines naming LoRA parameters matter.
            bad += [line for line in message.splitlines() if "lora" in line.lower() and ("MISSING" in line or "UNEXPECTED" in line)]
        elif any(w in low for w in ("unexpected", "missing", "not loaded", "not compatible", "not been correctly")):
            bad.append(message)
    return bad


# ------------------------------------------------------------------------------------------------ golden keys


@pytest.fixture(scope="module")
def meta_bundles():
    return {name: arch.meta_bundle(name) for name in arch.ARCHITECTURES}


@pytest.mark.parametrize("name", arch.ARCHITECTURES)
@pytest.mark.parametrize("preset", ["attention", "kohya-default", "+conv"])
def test_kohya_keys_of_full_size_models_match_the_golden_lists(meta_bundles, name, preset):
    golden = arch.golden_path(name, preset).read_text(encoding="utf-8").split()
    assert _selected_kohya_names(meta_bundles[name], preset) == golden
    if preset == "kohya-default":
        unet = sum(n.startswith("lora_unet_") for n in golden)
        te = len(golden) - unet
        assert (unet, te) == {"sd1": (192, 72), "sd2-v": (192, 138), "sdxl": (722, 264)}[name]


def test_golden_names_follow_each_familys_kohya_convention():
    sd1 = arch.golden_path("sd1", "+conv").read_text().split()
    sdxl = arch.golden_path("sdxl", "+conv").read_text().split()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in sd1
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in sd1
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in sd1
    # SDXL uses the SGM/LDM block names (what kohya writes and A1111 applies as they are).
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in sdxl
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in sdxl
    assert {"lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_unet_output_blocks_0_0_skip_connection", "lora_unet_input_blocks_1_0_emb_layers_1"} <= set(sdxl)
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for n in sdxl)
    assert "lora_te1_text_model_encoder_layers_11_self_attn_q_proj" in sdxl
    assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in sdxl


@pytest.mark.parametrize("name", arch.ARCHITECTURES)
def test_diffusers_loader_maps_full_size_kohya_names_back_to_the_trained_modules(meta_bundles, name):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    bundle = meta_bundles[name]
    sd = {}
    for n in arch.golden_path(name, "+conv").read_text().split():
        sd.update({f"{n}.lora_down.weight": torch.zeros(1, 1), f"{n}.lora_up.weight": torch.zeros(1, 1),
                   f"{n}.alpha": torch.tensor(1.0)})
    modules = len(sd) // 3  # the loader consumes the dict
    if bundle.family.name == "sdxl":
        converted, alphas = StableDiffusionXLPipeline.lora_state_dict(sd, unet_config=bundle.denoiser.config)
    else:
        converted, alphas = StableDiffusionPipeline.lora_state_dict(sd)
    assert len(alphas) == modules
    for key, model in components(bundle).items():
        part = {k[len(key) + 1:]: v for k, v in converted.items() if k.startswith(key + ".")}
        part = convert_unet_state_dict_to_peft(part) if key == "unet" else convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        got = {k.split(".lora_A.")[0].removeprefix("text_model.") for k in part if ".lora_A." in k}
        want = {m.removeprefix("text_model.") for m in matching_modules(model, target_modules(bundle.family, "+conv", key))}
        assert got == want, (key, sorted(got ^ want)[:5])


# ------------------------------------------------------------------------------------------------ diffusers round trip


@pytest.mark.parametrize("fixture,lora", [
    ("tiny_sd1", LoraSection(rank=8, alpha=4.0, targets="+conv", conv_rank=4, conv_alpha=1.0, train_text_encoder=True)),
    ("tiny_sd2v", LoraSection(rank=8, alpha=4.0, targets="kohya-default", train_text_encoder=True)),
    ("tiny_sdxl", LoraSection(rank=8, alpha=4.0, targets="+conv", conv_rank=4, conv_alpha=1.0, train_text_encoder=True)),
], ids=["sd1-conv", "sd2v", "sdxl-conv"])
def test_exported_lora_loads_in_diffusers_and_reproduces_the_trained_model(request, tmp_path, fixture, lora):
    folder = request.getfixturevalue(fixture)
    bundle = _trained(folder, lora)
    path = export_lora(bundle, _job(lora), tmp_path / "lora.safetensors", steps=7, dtype="fp32")
    tensors, meta = read_lora(path)

    live = _image(bundle.pipeline())
    pipe = _fresh_pipeline(folder)
    base = _image(pipe)
    with _load_messages() as messages:
        pipe.load_lora_weights(str(path), adapter_name="studio")
    assert not _key_problems(messages), _key_problems(messages)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if bundle.family.name == "sdxl" else [])
    assert count_lora_modules(pipe.unet) == count_lora_modules(bundle.denoiser) > 0
    for ours, theirs in zip(bundle.text_encoders, encoders):
        assert count_lora_modules(theirs) == count_lora_modules(ours) == 12

    with_lora = _image(pipe)
    assert np.abs(with_lora - base).max() > 1e-2, "the LoRA must change the image"
    # Same rank/alpha semantics: the reloaded file gives the trained model's image.
    np.testing.assert_allclose(with_lora, live, atol=1e-5)
    pipe.set_adapters(["studio"], adapter_weights=[0.0])
    assert np.array_equal(_image(pipe), base), "at LoRA scale 0 the image must be the base image"

    # What every consumer merges (up @ down * alpha / rank) is peft's delta on the live model.
    for key, model in components(bundle).items():
        for module_path, layer in lora_layers(model).items():
            name = kohya_module_name(bundle.family, key, module_path, bundle.denoiser.config)
            expected_alpha = 1.0 if layer.r["default"] == 4 else 4.0
            assert tensors[f"{name}.alpha"].item() == layer.lora_alpha["default"] == expected_alpha
            delta = kohya_delta(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                                tensors[f"{name}.alpha"].item(), layer.get_base_layer().weight.shape)
            torch.testing.assert_close(delta, layer.get_delta_weight("default").float(), rtol=1e-5, atol=1e-6)

    info = describe_lora(path)
    assert info["family"] == bundle.family.name and info["network_type"] == ("locon" if lora.targets == "+conv" else "lora")
    te_keys = ["te1", "te2"] if bundle.family.name == "sdxl" else ["te"]
    assert info["modules"] == {"unet": count_lora_modules(bundle.denoiser), **{k: 12 for k in te_keys}}


# ------------------------------------------------------------------------------------------------ metadata & hashes


def test_metadata_alpha_dtype_and_file_hashes(tiny_sd1, tmp_path):
    lora = LoraSection(rank=8, alpha=4.0)
    bundle = _trained(tiny_sd1, lora, train_te=False)
    tags = {"10_shapes": {"red circle": 3, "blue square": 1}}
    path = export_lora(bundle, _job(lora), tmp_path / "tiny.safetensors", steps=12, tag_frequency=tags,
                       extra_metadata={"ss_num_train_images": 4, "studio_note": "x"})
    tensors, meta = read_lora(path)

    assert all(isinstance(v, str) for v in meta.values())
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    assert not missing
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4.0")
    assert (meta["ss_steps"], meta["ss_resolution"], meta["ss_output_name"]) == ("12", "(64, 64)", "tiny")
    assert json.loads(meta["ss_tag_frequency"]) == tags
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (meta["modelspec.resolution"], meta["modelspec.prediction_type"]) == ("64x64", "epsilon")
    assert (meta["modelspec.title"], meta["modelspec.trigger_phrase"]) == ("tiny", "sks")
    assert meta["ss_num_train_images"] == "4" and meta["studio_note"] == "x"

    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert len(alphas) == count_lora_modules(bundle.denoiser) and all(a.item() == 4.0 and a.dim() == 0 for a in alphas)
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(".alpha"))
    assert all(k.startswith("lora_unet_") for k in tensors)  # the text encoder was not trained

    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[header:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("meta_size", [10, 1_200_000])
def test_embedded_hashes_match_the_file_as_a1111_hashes_it(tmp_path, meta_size):
    from safetensors import safe_open

    from studio.engine.export import serialize_with_hashes

    tensors = {"a.lora_down.weight": torch.arange(600_000, dtype=torch.float32).reshape(1000, 600)}
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"".join(bytes(c) for c in serialize_with_hashes(tensors, {"note": "x" * meta_size})))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("a.lora_down.weight"), tensors["a.lora_down.weight"])
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[header:]).hexdigest() and meta["note"] == "x" * meta_size
    if header < 0x100000:
        assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    else:  # the legacy window would cover the header, which holds the hash itself
        assert "sshs_legacy_hash" not in meta


@pytest.mark.parametrize("family,prediction,version,architecture,v2", [
    ("sd2", "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "True"),
    ("sd2", "epsilon", "sd_v2", "stable-diffusion-v2-512/lora", "True"),
    ("sdxl", "epsilon", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False"),
])
def test_metadata_names_the_base_model_the_way_a1111_and_comfyui_read_it(family, prediction, version, architecture, v2):
    lora = LoraSection(rank=16, alpha=8.0, targets="+conv", conv_rank=4)
    meta = build_metadata(job=_job(lora, trigger=""), family=family, prediction_type=prediction, steps=100,
                          tag_frequency=None, resolution=(768, 512), trigger_words=["ohwx", "style"], title="T",
                          training_started=1_700_000_000.0)
    assert all(isinstance(v, str) for v in meta.values())
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_v2"]) == (version, architecture, v2)
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert (meta["ss_resolution"], meta["modelspec.resolution"]) == ("(768, 512)", "768x512")
    assert meta["modelspec.trigger_phrase"] == "ohwx, style" and meta["modelspec.title"] == "T"
    assert meta["ss_tag_frequency"] == "{}"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "8.0"}
    assert meta["modelspec.date"].startswith("2023-11-")
    assert meta["modelspec.implementation"] == (
        "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers")


def test_a_failing_write_leaves_no_file_under_the_final_name(tiny_sd1, tmp_path, monkeypatch):
    lora = LoraSection(rank=4, alpha=4.0)
    bundle = _trained(tiny_sd1, lora, train_te=False)
    final = tmp_path / "out" / "tiny.safetensors"
    earlier = tmp_path / "out" / "kept.safetensors"
    earlier.parent.mkdir()
    earlier.write_bytes(b"earlier export")
    import studio.engine.export as export

    class DiskFullAfterFirstChunk(list):
        def __iter__(self):
            yield self[0]
            raise OSError(28, "No space left on device")

    real_write_chunks = export._write_chunks
    monkeypatch.setattr(export, "_write_chunks", lambda path, chunks: real_write_chunks(path, DiskFullAfterFirstChunk(chunks)))
    with pytest.raises(OSError, match="No space"):
        export_lora(bundle, _job(lora), final, steps=1)
    with pytest.raises(OSError, match="No space"):
        export_lora(bundle, _job(lora), earlier, steps=1)
    with pytest.raises(OSError, match="No space"):
        export_diffusers_lora(bundle, final)
    monkeypatch.undo()
    assert not final.exists()
    assert earlier.read_bytes() == b"earlier export"
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["kept.safetensors"]  # no partial files left


# ------------------------------------------------------------------------------------------------ DoRA & diffusers layout


def test_dora_is_written_in_the_lycoris_kohya_layout_and_round_trips_in_the_diffusers_layout(tiny_sd1, tmp_path):
    lora = LoraSection(rank=4, alpha=2.0, dora=True, train_text_encoder=True)
    assert kohya_export_problem(lora) is None and kohya_export_problem(LoraSection()) is None
    bundle = _trained(tiny_sd1, lora)
    kohya = export_lora(bundle, _job(lora), tmp_path / "dora.safetensors", steps=1)
    info = describe_lora(kohya)
    assert (info["layout"], info["network_type"]) == ("kohya", "dora")
    assert info["metadata"]["ss_network_module"] == "lycoris.kohya"
    assert json.loads(info["metadata"]["ss_network_args"]) == {"algo": "locon", "dora_wd": "True", "wd_on_output": "True"}

    path = export_diffusers_lora(bundle, tmp_path / "dora-diffusers.safetensors", metadata={"modelspec.title": "d"})
    info = describe_lora(path)
    assert (info["layout"], info["network_type"], info["rank"], info["alpha"]) == ("diffusers", "dora", 4, 2.0)
    assert info["modules"] == {"unet": count_lora_modules(bundle.denoiser), "te": 12} and info["title"] == "d"

    pipe = _fresh_pipeline(tiny_sd1)
    with _load_messages() as messages:
        pipe.load_lora_weights(str(path))
    assert not _key_problems(messages), _key_problems(messages)
    torch.manual_seed(0)
    x, t, ctx, ids = torch.randn(1, 4, 32, 32), torch.tensor([300]), torch.randn(1, 77, 32), torch.randint(0, 49406, (1, 77))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ctx).sample, bundle.denoiser(x, t, ctx).sample, rtol=1e-5, atol=1e-5)
        # The DoRA magnitudes of the text encoder load too (transformers drops bare `lora_magnitude_vector` keys).
        torch.testing.assert_close(pipe.text_encoder(ids)[0], bundle.text_encoders[0](ids)[0], rtol=1e-5, atol=1e-5)


def test_diffusers_layout_has_diffusers_own_keys_and_adapter_config(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    lora = LoraSection(rank=4, alpha=8.0, train_text_encoder=True)
    bundle = _trained(tiny_sdxl, lora)
    path = export_diffusers_lora(bundle, tmp_path / "x.safetensors")
    tensors, meta = read_lora(path)
    def peft_sd(model):
        return get_peft_model_state_dict(model, save_embedding_layers=False)

    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "ref", unet_lora_layers=peft_sd(bundle.denoiser), text_encoder_lora_layers=peft_sd(bundle.text_encoders[0]),
        text_encoder_2_lora_layers=peft_sd(bundle.text_encoders[1]),
    )
    reference, _ = read_lora(tmp_path / "ref" / "pytorch_lora_weights.safetensors")
    # Ours always spells the text encoders' `text_model.` segment (ComfyUI and older diffusers need it); diffusers'
    # own writer follows the module names, which lost it in transformers >= 5.6 for the first encoder only.
    assert all(".text_model.encoder." in k for k in tensors if k.startswith("text_encoder"))
    assert {k.replace(".text_model.", ".") for k in tensors} == {k.replace(".text_model.", ".") for k in reference}
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 8.0 and adapter["text_encoder_2.r"] == 4
    assert describe_lora(path)["modules"] == {"unet": count_lora_modules(bundle.denoiser), "te1": 12, "te2": 12}


# ------------------------------------------------------------------------------------------------ reading & describing


def test_describe_reports_locon_rank_alpha_and_metadata(tiny_sd1, tmp_path):
    lora = LoraSection(rank=4, alpha=2.0, targets="+conv", conv_rank=2, conv_alpha=1.0, train_text_encoder=True)
    bundle = _trained(tiny_sd1, lora)
    path = export_lora(bundle, _job(lora), tmp_path / "locon.safetensors", steps=33)
    info = describe_lora(path)
    assert info["layout"] == "kohya" and info["network_type"] == "locon"
    assert (info["rank"], info["alpha"], info["conv_rank"], info["conv_alpha"]) == (4, 2.0, 2, 1.0)
    assert info["modules"] == {"unet": count_lora_modules(bundle.denoiser), "te": 12}
    assert info["module_count"] == count_lora_modules(bundle.denoiser) + 12
    assert (info["family"], info["family_source"], info["prediction_type"]) == ("sd1", "metadata", "epsilon")
    assert (info["steps"], info["title"], info["trigger_phrase"], info["dtype"]) == (33, "tiny", "sks", "F16")
    assert info["metadata"]["ss_network_dim"] == "4" and info["size_bytes"] == path.stat().st_size
    json.dumps({k: v for k, v in info.items()})  # `inspect --json` prints it as is


@pytest.mark.parametrize("keys,family", [
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768)}, "sd1"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 1024)}, "sd2"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024)}, "sd2"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048)}, "sdxl"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": (3072, 768)}, "sdxl"),
])
def test_describe_tells_the_family_from_key_names_and_shapes_without_metadata(tmp_path, keys, family):
    sd = {}
    for name, (out_dim, in_dim) in keys.items():
        sd.update({f"{name}.lora_down.weight": torch.zeros(4, in_dim), f"{name}.lora_up.weight": torch.zeros(out_dim, 4)})
    save_file(sd, tmp_path / "bare.safetensors")
    info = describe_lora(tmp_path / "bare.safetensors")
    assert (info["family"], info["family_source"]) == (family, "keys")
    assert (info["rank"], info["alpha"], info["network_type"]) == (4, 4.0, "lora")  # no .alpha: kohya reads alpha = rank


def test_non_lora_files_are_refused_with_a_reason(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.safetensors")
    save_file({"whatever": torch.zeros(2)}, tmp_path / "other.safetensors")
    save_file({"emb_params": torch.zeros(2, 768)}, tmp_path / "embedding.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "old.ckpt").write_bytes(b"PK")
    with pytest.raises(NotALoraError, match="full Stable Diffusion checkpoint"):
        describe_lora(tmp_path / "ckpt.safetensors")
    with pytest.raises(NotALoraError, match="not a LoRA"):
        read_lora(tmp_path / "other.safetensors")
    with pytest.raises(NotALoraError, match="textual-inversion"):
        describe_lora(tmp_path / "embedding.safetensors")
    with pytest.raises(LoraFileError, match="cannot be read"):
        describe_lora(tmp_path / "broken.safetensors")
    with pytest.raises(LoraFileError, match=r"not a \.safetensors"):
        describe_lora(tmp_path / "old.ckpt")
    with pytest.raises(LoraFileError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")


def test_export_of_a_model_without_lora_is_refused(tiny_sd1, tmp_path):
    bundle = load_model(ModelSection(path=str(tiny_sd1)))
    with pytest.raises(LoraExportError, match="no LoRA"):
        export_lora(bundle, Job(), tmp_path / "x.safetensors", steps=1)
    with pytest.raises(ValueError, match="save dtype"):
        export_lora(bundle, Job(), tmp_path / "x.safetensors", steps=1, dtype="fp8")
