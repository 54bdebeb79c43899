"""Z-Image: the tiny model trains from the CLI and learns; its LoRA files (ours and the diffusers layout) load in
ZImagePipeline with no key left over; the objective's conventions are the pipeline's (an oracle that knows the clean
latent has zero training loss and denoises exactly through the pipeline's loop); the exported names are the ones
ComfyUI's Z-Image branch maps onto the original model's keys, checked on the full-size architecture (meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from studio.engine.families import get_family
from studio.engine.families.zimage import ZIMAGE, templated


@pytest.fixture(scope="module")
def tiny_zimage(tiny_model) -> Path:
    return tiny_model("zimage", "flow")


def _latents_and_text(bundle, data: Path):
    from studio.engine.dataset import load_image, prepare_image

    items = sorted(data.glob("*.png"))
    with torch.no_grad():
        latents = torch.cat([bundle.family.encode_image(bundle, prepare_image(load_image(p), (64, 64))[0][None])[0]
                             for p in items])
        cond = bundle.family.encode_text(bundle, [p.with_suffix(".txt").read_text() for p in items])
    return latents, cond


def _fixed_noise_loss(bundle, latents, cond, training) -> float:
    with torch.no_grad():
        return sum(float(bundle.family.training_loss(bundle, bundle.denoiser, latents, cond, training=training,
                                                     generator=torch.Generator().manual_seed(100 + s),
                                                     weight_dtype=torch.float32)) for s in range(8)) / 8


def _image(pipe):
    return pipe("a red circle", num_inference_steps=4, height=64, width=64, guidance_scale=0.0,
                generator=torch.Generator().manual_seed(7), output_type="np", max_sequence_length=64).images


def test_bundled_zimage_config_matches_its_generator_and_the_reference_sizes(tmp_path):
    import filecmp
    import importlib.util

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoConfig, Qwen3Model

    from studio.paths import resource_path

    root = resource_path("model_configs")
    spec = importlib.util.spec_from_file_location("make_zimage_configs", root / "make_zimage_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_configs(tmp_path)
    for file in sorted((tmp_path / "z-image").rglob("*.json")):
        rel = file.relative_to(tmp_path / "z-image")
        assert filecmp.cmp(file, root / "z-image" / rel, shallow=False), rel
    cfg = ZIMAGE.bundled_config_dir()
    with init_empty_weights():
        transformer = ZImageTransformer2DModel.from_config(ZIMAGE.denoiser_config(cfg))
        qwen = Qwen3Model(AutoConfig.from_pretrained(cfg / "text_encoder", local_files_only=True))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
    counts = {"denoiser": sum(p.numel() for p in transformer.parameters()),
              "text_encoders": sum(p.numel() for p in qwen.parameters()), "vae": sum(p.numel() for p in vae.parameters())}
    for part, expected in ZIMAGE.full_size_parameters().items():
        assert abs(counts[part] - expected) / expected < 0.01, (part, counts[part])


def test_the_objective_follows_the_pipelines_conventions(tiny_zimage):
    """An oracle transformer that knows the clean latent x returns what training asks for (x - ε at t = 1 - σ): its
    training loss is zero, and ZImagePipeline's own loop (negation, scheduler, shift) lands exactly on x with it."""
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection, TrainingSection

    bundle = load_model(ModelSection(path=str(tiny_zimage)))
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))

    def oracle(images, t, captions, return_dict=True, **kwargs):
        out = []
        for i, image in enumerate(images):
            sigma = 1 - t[i].float()
            noise = (image[:, 0].float() - (1 - sigma) * x[i % len(x)]) / sigma
            out.append((x[i % len(x)] - noise).unsqueeze(1))
        return (out,)

    transformer = bundle.denoiser
    transformer.forward = oracle  # the instance's forward: the pipeline calls the module as it calls the real one
    with torch.no_grad():
        cond = ZIMAGE.encode_text(bundle, ["a red circle", "a blue square"])
        loss = ZIMAGE.training_loss(bundle, transformer, x, cond, training=TrainingSection(),
                                    generator=torch.Generator().manual_seed(1), weight_dtype=torch.float32)
    assert float(loss) < 1e-8
    pipe = bundle.pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe("a red circle", num_inference_steps=3, height=64, width=64, guidance_scale=0.0,
                   latents=torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(2)), output_type="latent",
                   max_sequence_length=64).images
    assert torch.allclose(out[0], x[0], atol=1e-4), (out[0] - x[0]).abs().max()


def test_tiny_zimage_trains_from_the_cli_and_its_loras_load_in_diffusers(tiny_zimage, tmp_path, capsys):
    from diffusers import ZImagePipeline

    from fixtures_data import make_dataset
    from studio.cli import main
    from studio.engine.checkpoint import load_model
    from studio.engine.config import load_job
    from studio.engine.export import describe_lora
    from studio.engine.lora import count_lora_modules
    from test_export import _key_problems, _load_messages

    data = make_dataset(tmp_path / "data", count=4)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_zimage), "--data", str(data), "--out", str(out), "--steps", "30",
                 "--lr", "5e-3", "--rank", "8", "--alpha", "8", "--resolution", "64", "--sample-every", "0",
                 "--name", "tiny", "--set", "dataset.bucket_step=16", "--set", "output.save_diffusers=true"])
    assert code == 0, capsys.readouterr().err
    job = load_job(out / "job.toml")
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["modelspec.architecture"] == "Z-Image/lora" and meta["ss_base_model_version"] == "zimage"
    assert {"diffusion_model.layers.0.attention.to_q.lora_down.weight", "diffusion_model.layers.0.attention.to_q.alpha",
            "diffusion_model.context_refiner.0.feed_forward.w2.lora_up.weight"} <= keys
    info = describe_lora(out / "tiny.safetensors")
    # 2 main layers + 1 noise refiner + 1 context refiner, 7 modules each (q, k, v, out, w1, w2, w3).
    assert (info["family"], info["layout"], sum(info["modules"].values())) == ("zimage", "kohya", 4 * 7), info

    bundle = load_model(job.model)
    latents, cond = _latents_and_text(bundle, data)
    before = _fixed_noise_loss(bundle, latents, cond, job.training)
    pipe = bundle.pipeline()
    assert isinstance(pipe, ZImagePipeline)
    pipe.set_progress_bar_config(disable=True)
    base_image = _image(pipe)
    for name, file in (("ours", out / "tiny.safetensors"), ("diffusers", out / "tiny-diffusers.safetensors")):
        with _load_messages() as messages:
            pipe.load_lora_weights(str(file), adapter_name=name)
        assert _key_problems(messages) == [], (name, messages)
        assert count_lora_modules(bundle.denoiser, name) == 4 * 7
    pipe.set_adapters(["ours"], adapter_weights=[1.0])
    ours_image = _image(pipe)
    after = _fixed_noise_loss(bundle, latents, cond, job.training)
    pipe.set_adapters(["diffusers"], adapter_weights=[1.0])
    assert abs(_fixed_noise_loss(bundle, latents, cond, job.training) - after) < 1e-4  # the same LoRA, two layouts
    print(f"zimage tiny: {4 * 7} LoRA modules, loss at fixed noise {before:.4f} -> {after:.4f} "
          f"(ratio {after / before:.3f})")
    assert after < 0.95 * before, (before, after)
    assert not (ours_image == base_image).all()  # scale 1 changes the image
    pipe.set_adapters(["ours"], adapter_weights=[0.0])
    assert (_image(pipe) == base_image).all()  # scale 0 is the base model exactly


def test_previews_are_encoded_as_training_encodes_them(tiny_zimage):
    """The family hands the pipeline its own caption states; the image is the one the pipeline's own encoding gives."""
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection

    bundle = load_model(ModelSection(path=str(tiny_zimage)))
    pipe = bundle.pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = ZIMAGE.preview_prompt_kwargs(bundle, ["a red circle"], "")
    assert [e.shape[0] for e in kwargs["prompt_embeds"]] == [31]  # the templated caption's real tokens only
    ours = pipe(**kwargs, num_inference_steps=2, height=64, width=64, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(3), output_type="np").images
    theirs = pipe("a red circle", num_inference_steps=2, height=64, width=64, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(3), output_type="np", max_sequence_length=64).images
    assert abs(ours - theirs).max() < 1e-6
    assert ZIMAGE.preview_batch_factor(0.0) == 1 and ZIMAGE.preview_batch_factor(1.0) == 2  # CFG for any g > 0
    # A tokenizer that pads on the left (the pipeline keeps states[mask] either way): the same caption states.
    bundle.tokenizers[0].padding_side = "left"
    left = ZIMAGE.preview_prompt_kwargs(bundle, ["a red circle"], "")
    assert [e.shape[0] for e in left["prompt_embeds"]] == [31]
    with torch.no_grad():
        tokens = bundle.tokenizers[0](templated(bundle.tokenizers[0], ["a red circle"]), padding="max_length",
                                      max_length=64, return_tensors="pt")
        mask = tokens.attention_mask.bool()
        theirs = bundle.text_encoders[0](input_ids=tokens.input_ids, attention_mask=mask,
                                         output_hidden_states=True).hidden_states[-2][0][mask[0]]
    assert torch.equal(left["prompt_embeds"][0], theirs)


# ------------------------------------------------------------------------------------------ the ComfyUI layout

# ComfyUI's Z-Image branch (comfy/lora.py model_lora_keys_unet for Lumina2, built by comfy.utils.z_image_to_diffusers):
# per block (layers, noise_refiner, context_refiner), the diffusers name it accepts after "diffusion_model." → the
# original checkpoint key it patches and, for q/k/v, which third of the fused qkv rows.
COMFY_BLOCK_MAP = {
    "attention.to_q": ("attention.qkv", 0), "attention.to_k": ("attention.qkv", 1),
    "attention.to_v": ("attention.qkv", 2), "attention.to_out.0": ("attention.out", None),
    "feed_forward.w1": ("feed_forward.w1", None), "feed_forward.w2": ("feed_forward.w2", None),
    "feed_forward.w3": ("feed_forward.w3", None), "adaLN_modulation.0": ("adaLN_modulation.0", None),
}
@pytest.fixture(scope="module")
def meta_zimage():
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    with init_empty_weights():
        return ZImageTransformer2DModel.from_config(ZIMAGE.denoiser_config(ZIMAGE.bundled_config_dir()))


def _original_layout(model) -> dict[str, tuple[int, ...]]:
    """The full-size model's keys and shapes as the original single files hold them (q/k/v fused), proven by diffusers'
    own single-file converter mapping them back onto exactly the diffusers model's state dict."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from test_zimage_files import original_state_dict

    state = model.state_dict()
    original = original_state_dict(state)
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in state.items()}
    return {k: tuple(v.shape) for k, v in original.items()}


def test_exported_names_are_the_ones_comfyui_maps_onto_the_full_size_model(meta_zimage):
    from studio.engine.lora import matching_modules

    original = _original_layout(meta_zimage)
    dim = meta_zimage.config.dim
    modules = dict(meta_zimage.named_modules())
    targets = matching_modules(meta_zimage, ZIMAGE.lora_targets("kohya-default", "transformer"))
    assert len(targets) == (30 + 2 + 2) * 7  # q, k, v, out, w1, w2, w3 in every block
    attention = matching_modules(meta_zimage, ZIMAGE.lora_targets("attention", "transformer"))
    assert len(attention) == 34 * 4
    # adaLN modulations are not trained by default but ComfyUI maps them, so files adapting them are named too.
    named = targets + [p for p, m in modules.items() if p.endswith("adaLN_modulation.0") and not p.startswith("all_final")
                       and isinstance(m, torch.nn.Linear)]
    for path in named:
        name = ZIMAGE.kohya_name("transformer", path)
        assert name.startswith("diffusion_model.")
        prefix = ".".join(path.split(".")[:2])
        suffix = path[len(prefix) + 1:]
        target, third = COMFY_BLOCK_MAP[suffix]
        key = f"{prefix}.{target}.weight"
        assert key in original, (name, key)
        rows = original[key][0]
        out_features = modules[path].out_features
        # q, k and v each patch one third of the fused rows (ComfyUI's offsets 0, dim, 2·dim); others the whole weight.
        assert (rows == 3 * dim and out_features == dim) if third is not None else rows == out_features, path
    assert len({ZIMAGE.kohya_name("transformer", p) for p in named}) == len(named)
    with pytest.raises(ValueError, match="not a Z-Image block layer"):
        ZIMAGE.kohya_name("transformer", "t_embedder.mlp.0")


def test_lora_files_of_the_peers_are_told_apart_by_their_keys():
    from studio.engine.families import lora_family

    ours = {"diffusion_model.noise_refiner.0.attention.to_q.lora_down.weight": (8, 3840)}
    assert lora_family({}, ours)[0] is ZIMAGE
    diffusers_layout = {"transformer.layers.0.feed_forward.w1.lora_A.weight": (8, 3840),
                        "transformer.context_refiner.1.attention.to_k.lora_A.weight": (8, 3840)}
    assert lora_family({}, diffusers_layout, "diffusers")[0] is ZIMAGE
    lumina = {"transformer.noise_refiner.0.attn.to_q.lora_A.weight": (8, 2304)}  # diffusers' Lumina 2 names
    assert lora_family({}, lumina, "diffusers")[0] is None
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (8, 3072)}
    assert lora_family({}, flux)[0] is get_family("flux-dev")
    assert lora_family({"modelspec.architecture": "Z-Image/lora"}, {})[0] is ZIMAGE
    assert json.loads(json.dumps(ZIMAGE.metadata_ids("flow")))["modelspec.architecture"] == "Z-Image/lora"


def test_the_repeated_blocks_compile_scope_and_memory_options(meta_zimage, tiny_zimage, tiny_dataset, tmp_path):
    from studio.engine.config import TrainingSection
    from studio.engine.events import RunFinished
    from test_trainer import collect, tiny_job

    assert len(ZIMAGE.compile_blocks(meta_zimage)) == 30 + 2 + 2  # every block: refiners and main layers
    # The 30 main layers are what block swap moves (fp8 halves what stays); 20 swapped leave about a third resident.
    full = ZIMAGE.denoiser_weight_bytes(TrainingSection(), 2)
    assert 0.3 < ZIMAGE.denoiser_weight_bytes(TrainingSection(block_swap=20), 2) / full < 0.45
    events = collect(tiny_job(tiny_zimage, tiny_dataset, tmp_path / "run", training__steps=2,
                              training__base_weights_fp8=True, training__block_swap=1,
                              training__gradient_checkpointing=True))
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])


def test_loha_files_preview_through_their_dotted_names_and_the_report_names_the_tools(tiny_zimage, tiny_dataset,
                                                                                       tmp_path):
    """A LoHa (diffusers cannot read it) is applied in place by its names, which hold dots ("diffusion_model.…");
    the export report says which tools take a Z-Image file."""
    from studio.engine.adapters import read_modules
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection
    from studio.engine.events import RunFinished
    from studio.engine.export import read_lora
    from studio.engine.inspection import inspect_path
    from studio.engine.sampling import generate
    from test_trainer import collect, tiny_job

    done = collect(tiny_job(tiny_zimage, tiny_dataset, tmp_path / "run", training__steps=2, lora__algorithm="loha",
                            training__lr=0.05))[-1]
    assert isinstance(done, RunFinished), getattr(done, "details", done)
    modules = read_modules(read_lora(done.lora_path)[0])
    assert len(modules) == 4 * 7 and "diffusion_model.layers.1.feed_forward.w3" in modules
    bundle = load_model(ModelSection(path=str(tiny_zimage)))
    assert set(modules) <= set(ZIMAGE.kohya_index(bundle))
    settings = dict(steps=2, guidance=0.0, width=64, height=64, seed=5)
    base = generate(bundle, "a red circle", **settings)
    with_loha = generate(bundle, "a red circle", lora_path=done.lora_path, **settings)
    assert base.tobytes() != with_loha.tobytes()
    assert generate(bundle, "a red circle", **settings).tobytes() == base.tobytes()  # the weights came back
    verdicts = {c["consumer"]: c["status"] for c in inspect_path(done.lora_path)["consumers"]}
    assert verdicts == {"A1111/Forge": "does not load", "ComfyUI": "loads fully", "InvokeAI": "loads fully",
                        "kohya": "does not load", "diffusers": "does not load"}


def test_asking_for_a_text_encoder_lora_is_said_and_the_captions_are_cached(tiny_zimage, tiny_dataset, tmp_path):
    """Z-Image has no text-encoder LoRA slot anywhere: the run says it ignores the switch, then treats Qwen3 as any
    frozen encoder (captions cached, no TE keys, metadata 'UNet only'), instead of running it every step for nothing."""
    from safetensors import safe_open

    from studio.engine.events import LogMessage, RunFinished, StatusChanged
    from test_trainer import collect, tiny_job

    job = tiny_job(tiny_zimage, tiny_dataset, tmp_path / "run", training__steps=2, lora__train_text_encoder=True)
    events = collect(job)
    assert isinstance(events[-1], RunFinished), events[-1]
    said = [e.message for e in events if isinstance(e, LogMessage) and e.level == "warning"]
    assert any("lora.train_text_encoder is ignored" in m for m in said), said
    assert any(isinstance(e, StatusChanged) and e.phase == "Caching text embeddings" for e in events)
    assert job.lora.train_text_encoder is True  # the caller's job is left as it was
    with safe_open(events[-1].lora_path, "pt") as f:
        assert f.metadata()["ss_network_train_unet_only"] == "True"
        assert all(k.startswith("diffusion_model.") for k in f.keys())
