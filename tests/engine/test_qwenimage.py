"""Qwen-Image: the tiny model trains from the CLI and learns; its LoRA files (ours and the diffusers layout) load in
QwenImagePipeline with no key left over; captions are encoded as the pipeline encodes them; the objective's conventions
are the pipeline's (an oracle that knows the clean latent has zero training loss and denoises exactly through the
pipeline's loop); the exported names are the ones ComfyUI and diffusers map onto the full-size model (meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from studio.engine.families import get_family
from studio.engine.families.qwenimage import QWEN_IMAGE, pack


@pytest.fixture(scope="module")
def tiny_qwen(tiny_model) -> Path:
    return tiny_model("qwen-image", "flow")


@pytest.fixture(scope="module")
def bundle(tiny_qwen):
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection

    return load_model(ModelSection(path=str(tiny_qwen)))


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
    return pipe("a red circle", num_inference_steps=3, height=64, width=64, true_cfg_scale=1.0,
                generator=torch.Generator().manual_seed(7), output_type="np").images


def test_bundled_qwenimage_config_matches_its_generator_and_the_reference_sizes(tmp_path):
    import filecmp
    import importlib.util

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from studio.paths import resource_path

    root = resource_path("model_configs")
    spec = importlib.util.spec_from_file_location("make_qwenimage_configs", root / "make_qwenimage_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_configs(tmp_path)
    for file in sorted((tmp_path / "qwen-image").rglob("*.json")):
        rel = file.relative_to(tmp_path / "qwen-image")
        assert filecmp.cmp(file, root / "qwen-image" / rel, shallow=False), rel
    cfg = QWEN_IMAGE.bundled_config_dir()
    with init_empty_weights():
        transformer = QwenImageTransformer2DModel.from_config(QWEN_IMAGE.denoiser_config(cfg))
        qwen = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(cfg / "text_encoder", local_files_only=True))
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(cfg, subfolder="vae"))
    counts = {"denoiser": sum(p.numel() for p in transformer.parameters()),
              "text_encoders": sum(p.numel() for p in qwen.parameters()), "vae": sum(p.numel() for p in vae.parameters())}
    for part, expected in QWEN_IMAGE.full_size_parameters().items():
        assert abs(counts[part] - expected) / expected < 0.01, (part, counts[part])
    assert vae.spatial_compression_ratio == 8 and transformer.config.in_channels == 4 * vae.config.z_dim


def test_captions_are_encoded_as_the_pipeline_encodes_them(bundle):
    """Fixed length with a mask here, variable length there: the real tokens' states are the same, template dropped."""
    pipe = bundle.pipeline()
    captions = ["a red circle", "a much longer caption about a blue square on a green field"]
    with torch.no_grad():
        ours = QWEN_IMAGE.encode_text(bundle, captions)
        theirs, theirs_mask = pipe.encode_prompt(captions, device="cpu")
    lengths = ours["prompt_mask"].sum(1).tolist()
    assert lengths == theirs_mask.sum(1).tolist() and lengths[0] < lengths[1]
    assert lengths[0] == len(bundle.tokenizers[0]("a red circle<|im_end|>\n<|im_start|>assistant\n").input_ids)
    for i, n in enumerate(lengths):
        assert torch.allclose(ours["prompt"][i, :n], theirs[i, :n], atol=1e-5)
        assert (ours["prompt"][i, n:] == 0).all()
    # Cached captions join: every caption has the same padded length.
    assert ours["prompt"].shape[1] == QWEN_IMAGE.max_length(bundle)


def test_latents_are_the_vaes_one_frame_normalised_per_channel(bundle):
    """encode_image's mean decodes (after the pipeline's own de-normalisation) to what the VAE decodes from its latent."""
    vae = bundle.vae
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, std = QWEN_IMAGE.encode_image(bundle, pixels)
        raw = vae.encode(pixels.unsqueeze(2)).latent_dist.mean
    assert mean.shape == (1, 16, 16, 16) and std.shape == mean.shape  # 4x down in the tiny VAE, frames squeezed
    shape = (1, 16, 1, 1)
    restored = mean * torch.tensor(vae.config.latents_std).view(shape) + torch.tensor(vae.config.latents_mean).view(shape)
    assert torch.allclose(restored, raw[:, :, 0], atol=1e-5)
    assert not torch.allclose(mean, raw[:, :, 0])


def test_the_objective_follows_the_pipelines_conventions(bundle):
    """An oracle transformer that knows the clean latent x returns what training asks for (ε - x at timestep σ, 2x2
    packed): its training loss is zero, and QwenImagePipeline's own loop (t / 1000, dynamic shift, shift_terminal,
    Euler) lands exactly on x with it."""
    from studio.engine.config import TrainingSection

    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []

    def oracle(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_mask=None, img_shapes=None,
               return_dict=True, **kwargs):
        seen.append((img_shapes, encoder_hidden_states_mask))
        sigma = timestep.float().view(-1, 1, 1)
        clean = pack(x)[: hidden_states.shape[0]]
        noise = (hidden_states.float() - (1 - sigma) * clean) / sigma
        return (noise - clean,)

    transformer = bundle.denoiser
    real_forward = transformer.forward
    transformer.forward = oracle  # the instance's forward: the pipeline calls the module as it calls the real one
    try:
        with torch.no_grad():
            cond = QWEN_IMAGE.encode_text(bundle, ["a red circle", "a blue square"])
            loss = QWEN_IMAGE.training_loss(bundle, transformer, x, cond, training=TrainingSection(),
                                            generator=torch.Generator().manual_seed(1), weight_dtype=torch.float32)
            assert float(loss) < 1e-8
            assert seen[-1][0] == [[(1, 8, 8)]] * 2 and seen[-1][1].dtype == torch.bool
            pipe = bundle.pipeline()
            pipe.set_progress_bar_config(disable=True)
            start = pack(torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2)))
            out = pipe("a red circle", num_inference_steps=3, height=64, width=64, true_cfg_scale=1.0, latents=start,
                       output_type="latent").images
    finally:
        transformer.forward = real_forward
    assert torch.allclose(out[0], pack(x)[0], atol=1e-4), (out[0] - pack(x)[0]).abs().max()


def test_auto_shift_is_the_schedulers_dynamic_shift_at_the_images_size(bundle):
    """σ drawn at 1024 px (4096 tokens) lie above those at 256 px: mu follows Qwen-Image's 0.5 → 0.9 over 256 → 8192."""
    from studio.engine.config import TrainingSection
    from studio.engine.families import flow

    sched = bundle.noise_scheduler.config
    sampling = QWEN_IMAGE.flow_sampling(TrainingSection(), sched)
    assert sampling.shift == "resolution"
    shift = QWEN_IMAGE.shift_config(sched)
    assert (shift["max_seq_len"], shift["max_shift"]) == (8192, 0.9)
    assert abs(flow.flux_mu(8192, **shift) - 0.9) < 1e-9 and abs(flow.flux_mu(256, **shift) - 0.5) < 1e-9
    small = flow.sample_sigmas(64, sampling, torch.Generator().manual_seed(0), 256, shift)
    large = flow.sample_sigmas(64, sampling, torch.Generator().manual_seed(0), 4096, shift)
    assert (large > small).all()


def test_tiny_qwenimage_trains_from_the_cli_and_its_loras_load_in_diffusers(tiny_qwen, tmp_path, capsys):
    from diffusers import QwenImagePipeline

    from fixtures_data import make_dataset
    from studio.cli import main
    from studio.engine.checkpoint import load_model
    from studio.engine.config import load_job
    from studio.engine.export import describe_lora
    from studio.engine.lora import count_lora_modules
    from test_export import _key_problems, _load_messages

    data = make_dataset(tmp_path / "data", count=4)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_qwen), "--data", str(data), "--out", str(out), "--steps", "30",
                 "--lr", "5e-3", "--rank", "8", "--alpha", "8", "--resolution", "64", "--sample-every", "0",
                 "--name", "tiny", "--set", "dataset.bucket_step=16", "--set", "output.save_diffusers=true",
                 "--set", "training.base_weights_fp8=false", "--set", "training.gradient_checkpointing=false"])
    assert code == 0, capsys.readouterr().err
    job = load_job(out / "job.toml")
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["modelspec.architecture"] == "Qwen-Image/lora" and meta["ss_base_model_version"] == "qwen_image"
    assert {"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight", "lora_unet_transformer_blocks_0_attn_to_q.alpha",
            "lora_unet_transformer_blocks_1_attn_add_k_proj.lora_up.weight",
            "lora_unet_transformer_blocks_1_txt_mlp_net_0_proj.lora_down.weight"} <= keys
    info = describe_lora(out / "tiny.safetensors")
    # 2 blocks, 12 modules each (both streams' q, k, v, out and both feed-forwards' two Linears).
    assert (info["family"], sum(info["modules"].values())) == ("qwen-image", 2 * 12), info

    bundle = load_model(job.model)
    latents, cond = _latents_and_text(bundle, data)
    before = _fixed_noise_loss(bundle, latents, cond, job.training)
    pipe = bundle.pipeline()
    assert isinstance(pipe, QwenImagePipeline)
    pipe.set_progress_bar_config(disable=True)
    base_image = _image(pipe)
    for name, file in (("ours", out / "tiny.safetensors"), ("diffusers", out / "tiny-diffusers.safetensors")):
        with _load_messages() as messages:
            pipe.load_lora_weights(str(file), adapter_name=name)
        assert _key_problems(messages) == [], (name, messages)
        assert count_lora_modules(bundle.denoiser, name) == 2 * 12
    pipe.set_adapters(["ours"], adapter_weights=[1.0])
    ours_image = _image(pipe)
    after = _fixed_noise_loss(bundle, latents, cond, job.training)
    pipe.set_adapters(["diffusers"], adapter_weights=[1.0])
    assert abs(_fixed_noise_loss(bundle, latents, cond, job.training) - after) < 1e-4  # the same LoRA, two layouts
    print(f"qwen-image tiny: {2 * 12} LoRA modules, loss at fixed noise {before:.4f} -> {after:.4f} "
          f"(ratio {after / before:.3f})")
    assert after < 0.95 * before, (before, after)
    assert not (ours_image == base_image).all()  # scale 1 changes the image
    pipe.set_adapters(["ours"], adapter_weights=[0.0])
    assert (_image(pipe) == base_image).all()  # scale 0 is the base model exactly


def test_previews_are_encoded_as_training_encodes_them(bundle):
    """The family hands the pipeline its own (padded, masked) caption states; the image is the pipeline's own."""
    pipe = bundle.pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = QWEN_IMAGE.preview_prompt_kwargs(bundle, ["a red circle"], "blurry")
    ours = pipe(**kwargs, num_inference_steps=2, height=64, width=64, true_cfg_scale=3.0,
                generator=torch.Generator().manual_seed(3), output_type="np").images
    theirs = pipe("a red circle", negative_prompt="blurry", num_inference_steps=2, height=64, width=64,
                  true_cfg_scale=3.0, generator=torch.Generator().manual_seed(3), output_type="np").images
    assert abs(ours - theirs).max() < 1e-5
    assert QWEN_IMAGE.preview_batch_factor(1.0) == 1 and QWEN_IMAGE.preview_batch_factor(4.0) == 2
    assert QWEN_IMAGE.pipeline_kwargs(negative_prompt="", guidance=4.0, lora_scale=None)["true_cfg_scale"] == 4.0


# ------------------------------------------------------------------------------------ the full-size names


@pytest.fixture(scope="module")
def meta_qwen():
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        return QwenImageTransformer2DModel.from_config(QWEN_IMAGE.denoiser_config(QWEN_IMAGE.bundled_config_dir()))


# ComfyUI's QwenImage model (comfy/ldm/qwen_image/model.py), per block: each Linear's path and its (out, in) in units of
# the width (3072): both streams' q/k/v/out, the GELU feed-forwards (net.0.proj up 4x, net.2 down) and the modulations.
COMFY_BLOCK_LINEARS = {
    "attn.to_q": (1, 1), "attn.to_k": (1, 1), "attn.to_v": (1, 1), "attn.to_out.0": (1, 1),
    "attn.add_q_proj": (1, 1), "attn.add_k_proj": (1, 1), "attn.add_v_proj": (1, 1), "attn.to_add_out": (1, 1),
    "img_mlp.net.0.proj": (4, 1), "img_mlp.net.2": (1, 4), "txt_mlp.net.0.proj": (4, 1), "txt_mlp.net.2": (1, 4),
    "img_mod.1": (6, 1), "txt_mod.1": (6, 1),
}


def test_exported_names_are_the_ones_comfyui_and_diffusers_map_onto_the_full_size_model(meta_qwen):
    """ComfyUI's LoRA key map (comfy/lora.py model_lora_keys_unet) accepts "lora_unet_" + the model path with
    underscores for every diffusion_model weight; its QwenImage model's paths are listed above. diffusers' Qwen
    converter must split each name back to the diffusers path of the same Linear."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    from studio.engine.lora import matching_modules

    dim = meta_qwen.config.num_attention_heads * meta_qwen.config.attention_head_dim
    comfy = {}  # ComfyUI's key map over its model's block weights: LoRA name -> (model key, weight shape)
    for n in range(meta_qwen.config.num_layers):
        for path, (rows, cols) in COMFY_BLOCK_LINEARS.items():
            key = f"diffusion_model.transformer_blocks.{n}.{path}.weight"
            comfy["lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")] = (key, (rows * dim, cols * dim))
    modules = dict(meta_qwen.named_modules())
    targets = matching_modules(meta_qwen, QWEN_IMAGE.lora_targets("kohya-default", "transformer"))
    # Every block's 12, but the last block's text query, text output and text feed-forward (they feed nothing).
    assert len(targets) == 60 * 12 - 4
    assert len(matching_modules(meta_qwen, QWEN_IMAGE.lora_targets("attention", "transformer"))) == 60 * 8 - 2
    # The modulations are not trained by default but the loaders map them, so files adapting them are named too.
    named = targets + [p for p in modules if p.endswith(("img_mod.1", "txt_mod.1"))]
    assert len(named) == len(comfy) - 4
    state = {}
    for path in named:
        name = QWEN_IMAGE.kohya_name("transformer", path)
        key, shape = comfy[name]
        assert key == f"diffusion_model.{path}.weight" and tuple(modules[path].weight.shape) == shape, name
        rank, module = 4, modules[path]
        state[name + ".lora_down.weight"] = torch.zeros(rank, module.in_features)
        state[name + ".lora_up.weight"] = torch.zeros(module.out_features, rank)
        state[name + ".alpha"] = torch.tensor(4.0)
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(state)
    assert {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in converted if "lora_A" in k} == set(named)
    with pytest.raises(ValueError, match="not a Qwen-Image block layer"):
        QWEN_IMAGE.kohya_name("transformer", "img_in")


def test_the_last_blocks_text_stream_is_not_adapted_because_it_gets_no_gradient(bundle):
    """Backward through a real (tiny) transformer: exactly the last block's text query, text output and text
    feed-forward get no (or a zero) gradient; the targets leave exactly those out of the full model's last block."""
    import copy
    import re

    from studio.engine.families.qwenimage import DEAD_IN_LAST_BLOCK

    transformer = copy.deepcopy(bundle.denoiser).requires_grad_(True)
    last = transformer.config.num_layers - 1
    with torch.no_grad():
        cond = QWEN_IMAGE.encode_text(bundle, ["a red circle"])
    out = transformer(hidden_states=torch.randn(1, 64, 64), timestep=torch.tensor([0.5]),
                      encoder_hidden_states=cond["prompt"], encoder_hidden_states_mask=cond["prompt_mask"],
                      img_shapes=[[(1, 8, 8)]], return_dict=False)[0]
    out.square().mean().backward()
    # No gradient at all (the text output and feed-forward), or exactly zero (the text query: its rows of the joint
    # attention only reach the text tokens).
    dead = {name.removeprefix(f"transformer_blocks.{last}.") for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and (m.weight.grad is None or not m.weight.grad.any())}
    assert dead == set(DEAD_IN_LAST_BLOCK)
    pattern = re.compile(QWEN_IMAGE.lora_targets("kohya-default", "transformer"))
    assert not any(pattern.fullmatch(f"transformer_blocks.59.{d}") for d in dead)
    assert all(pattern.fullmatch(f"transformer_blocks.58.{d}") for d in dead)


def test_lora_files_of_the_peers_are_told_apart_by_their_keys():
    from studio.engine.families import lora_family

    ours = {"lora_unet_transformer_blocks_0_img_mlp_net_2.lora_down.weight": (8, 12288)}
    assert lora_family({}, ours)[0] is QWEN_IMAGE
    ai_toolkit = {"diffusion_model.transformer_blocks.0.txt_mod.1.lora_A.weight": (8, 3072)}
    assert lora_family({}, ai_toolkit)[0] is QWEN_IMAGE
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (8, 3072)}
    assert lora_family({}, flux)[0] is get_family("flux-dev")
    assert lora_family({"modelspec.architecture": "Qwen-Image/lora"}, {})[0] is QWEN_IMAGE


def test_a_full_size_transformer_file_is_detected_and_asks_for_its_parts(tmp_path):
    from test_checkpoint_support import write_sparse_safetensors
    from studio.engine.checkpoint import load_model
    from studio.engine.inspection import inspect_path
    from studio.engine.config import ModelSection
    from studio.engine.safe_load import ModelLoadError

    keys = {"model.diffusion_model.txt_norm.weight": (3584,), "model.diffusion_model.img_in.weight": (3072, 64),
            "model.diffusion_model.transformer_blocks.0.img_mod.1.weight": (18432, 3072)}
    path = write_sparse_safetensors(tmp_path / "qwen_image_bf16.safetensors", keys)
    info = inspect_path(path)
    assert info["family"] == "qwen-image", info
    with pytest.raises(ModelLoadError, match="holds the Qwen-Image transformer without its text encoder .*"
                                             "qwen_2.5_vl_7b.safetensors, qwen_image_vae.safetensors"):
        load_model(ModelSection(path=str(path)))


# ------------------------------------------------------------------------------------------- fitting 20 B


def test_the_presets_memory_options_train_the_tiny_model(tiny_qwen, tiny_dataset, tmp_path):
    """The family's preset (fp8 frozen weights, gradient checkpointing) plus one swapped block trains two real steps."""
    from studio.engine.config import set_value
    from studio.engine.events import RunFinished, StepCompleted
    from test_trainer import collect, tiny_job

    defaults = QWEN_IMAGE.job_defaults()
    assert defaults["training.base_weights_fp8"] and defaults["training.gradient_checkpointing"]
    job = tiny_job(tiny_qwen, tiny_dataset, tmp_path / "run", training__steps=2)
    for key, value in defaults.items():
        if not key.startswith(("dataset.resolution", "training.mixed_precision", "sampling.")):
            set_value(job, key, value)
    job.training.block_swap = 1
    events = collect(job)
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])
    losses = [e.loss for e in events if isinstance(e, StepCompleted)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_the_estimate_counts_fp8_and_block_swap():
    from studio.engine.config import Job
    from studio.engine.estimate import memory_phases

    job = Job()
    job.model.family = "qwen-image"
    job.dataset.resolution = 1024
    job.training.gradient_checkpointing = True
    job.training.mixed_precision = "bf16"
    base = memory_phases(job, "qwen-image", 20_000_000)
    job.training.base_weights_fp8 = True
    fp8 = memory_phases(job, "qwen-image", 20_000_000)
    job.training.block_swap = 30
    swapped = memory_phases(job, "qwen-image", 20_000_000)
    gib = 2**30
    print(f"Qwen-Image 1024 px estimate, training: bf16 {base.training / gib:.1f} GiB, fp8 {fp8.training / gib:.1f} GiB, "
          f"fp8 + 30 blocks swapped {swapped.training / gib:.1f} GiB; loading {swapped.loading / gib:.1f} GiB "
          f"(Qwen2.5-VL in bf16 and the VAE); peak {swapped.peak_phase}")
    # fp8 saves one byte per transformer weight (20.4 GB = 19.0 GiB, times the allocator's slack); 29 more blocks
    # off the GPU save ~1 byte x 29/60 x 99 % of them.
    assert 19.0 * gib < base.training - fp8.training < 22.0 * gib
    assert 9.0 * gib < fp8.training - swapped.training < 11.0 * gib
    # Loading holds the 8.3 B text encoder in bf16 (the denoiser waits on the host): 16.6 GB before any slack.
    assert 15.4 * gib < swapped.loading < 19.0 * gib


# ------------------------------------------------------------------------------------------- single files


def _comfy_files(folder: Path, out: Path) -> dict[str, Path]:
    """The tiny model as ComfyUI keeps Qwen-Image: the transformer under "model.diffusion_model.", Qwen2.5-VL in
    transformers' older layout ("model." language model, "visual.", "lm_head."), the VAE alone."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    transformer = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in transformer.items()}, str(out / "qwen_image_bf16.safetensors"))
    te = load_file(str(folder / "text_encoder" / "model.safetensors"))
    old = {}
    for k, v in te.items():
        k = k.replace("model.language_model.", "model.", 1) if k.startswith("model.language_model.") else k
        old[k.replace("model.visual.", "visual.", 1) if k.startswith("model.visual.") else k] = v
    assert any(k.startswith("visual.") for k in old) and any(k.startswith("model.layers.") for k in old)
    (out / "text_encoders").mkdir(exist_ok=True)
    save_file(old, str(out / "text_encoders" / "qwen_2.5_vl_7b.safetensors"))
    (out / "vae").mkdir(exist_ok=True)
    save_file(load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")),
              str(out / "vae" / "qwen_image_vae.safetensors"))
    return {"transformer": out / "qwen_image_bf16.safetensors",
            "text_encoder": out / "text_encoders" / "qwen_2.5_vl_7b.safetensors",
            "vae": out / "vae" / "qwen_image_vae.safetensors"}


def test_comfyui_files_load_as_the_folder_does_and_train(tiny_qwen, bundle, tiny_dataset, tmp_path):
    import shutil

    from studio.engine.checkpoint import load_model
    from studio.engine.inspection import inspect_path
    from studio.engine.config import ModelSection
    from studio.engine.events import RunFinished
    from test_trainer import collect, tiny_job

    files = _comfy_files(tiny_qwen, tmp_path / "comfy")
    assert inspect_path(files["transformer"])["family"] == "qwen-image"
    # The tiny sizes need their configs (model.config_dir); the parts and the tokenizer are found beside the model.
    configs = tmp_path / "configs"
    shutil.copytree(tiny_qwen, configs, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer"))
    shutil.copytree(tiny_qwen / "tokenizer", tmp_path / "comfy" / "tokenizer")
    section = ModelSection(path=str(files["transformer"]), config_dir=str(configs))
    assert QWEN_IMAGE.part_files(files["transformer"], section) == {"text_encoder": files["text_encoder"],
                                                                     "vae": files["vae"]}
    single = load_model(section)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for b in (bundle, single):
            assert b.family is QWEN_IMAGE
        ours, theirs = (QWEN_IMAGE.encode_text(b, ["a red circle"]) for b in (single, bundle))
        assert torch.equal(ours["prompt"], theirs["prompt"])
        losses = [float(QWEN_IMAGE.training_loss(b, b.denoiser, x, ours, training=tiny_job(tiny_qwen, tiny_dataset,
                  tmp_path / "x").training, generator=torch.Generator().manual_seed(1), weight_dtype=torch.float32))
                  for b in (single, bundle)]
        assert losses[0] == losses[1]
        pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        assert torch.equal(QWEN_IMAGE.encode_image(single, pixels)[0], QWEN_IMAGE.encode_image(bundle, pixels)[0])
    job = tiny_job(files["transformer"], tiny_dataset, tmp_path / "run", training__steps=1)
    job.model.config_dir = str(configs)
    events = collect(job)
    assert isinstance(events[-1], RunFinished), getattr(events[-1], "details", events[-1])


def test_a_transformer_file_without_its_parts_names_what_is_missing(tiny_qwen, tmp_path):
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection
    from studio.engine.safe_load import ModelLoadError

    files = _comfy_files(tiny_qwen, tmp_path / "comfy")
    lonely = tmp_path / "alone" / files["transformer"].name
    lonely.parent.mkdir()
    files["transformer"].rename(lonely)
    with pytest.raises(ModelLoadError, match=r"without its text encoder \(Qwen2.5-VL-7B\) and VAE .*Choose them on the Model page"):
        load_model(ModelSection(path=str(lonely), config_dir=str(tiny_qwen)))
    # ComfyUI's scaled-fp8 text encoder keeps per-weight scales a cast would drop: refused, with the file to use.
    from safetensors.torch import load_file, save_file

    scaled = tmp_path / "alone" / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    save_file({**load_file(str(files["text_encoder"])), "scaled_fp8": torch.zeros(0)}, str(scaled))
    with pytest.raises(ModelLoadError, match="model.text_encoder.*scaled-fp8.*qwen_2.5_vl_7b.safetensors"):
        load_model(ModelSection(path=str(lonely), config_dir=str(tiny_qwen), text_encoder=str(scaled),
                                vae=str(files["vae"])))
    # A text encoder file that is not Qwen2.5-VL is named with its field.
    with pytest.raises(ModelLoadError, match="model.text_encoder: .*qwen_image_vae.safetensors.* choose the qwen_2.5_vl_7b"):
        load_model(ModelSection(path=str(lonely), config_dir=str(tiny_qwen), text_encoder=str(files["vae"])))


# Wan 2.1's original VAE names (ComfyUI's qwen_image_vae.safetensors) from diffusers' AutoencoderKLQwenImage names:
# the fixture that writes such a file; the test proves diffusers' own Wan converter maps every name back.
_WAN_RESIDUAL = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
                 "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
                 "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
_WAN_FIXED = {"encoder.conv_in.": "encoder.conv1.", "decoder.conv_in.": "decoder.conv1.", "quant_conv.": "conv1.",
              "post_quant_conv.": "conv2.", "encoder.norm_out.": "encoder.head.0.", "decoder.norm_out.": "decoder.head.0.",
              "encoder.conv_out.": "encoder.head.2.", "decoder.conv_out.": "decoder.head.2."}


def _wan_name(key: str) -> str:
    import re

    for ours, wan in _WAN_FIXED.items():
        if key.startswith(ours):
            return wan + key[len(ours):]
    if m := re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)", key):
        side, kind, i, rest = m.groups()
        return (f"{side}.middle.1.{rest}" if kind == "attentions" else
                f"{side}.middle.{2 * int(i)}.{_WAN_RESIDUAL[rest]}")
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.{_WAN_RESIDUAL.get(m[2], m[2])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_WAN_RESIDUAL[m[3]]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key)
    return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"


def test_the_vae_loads_from_wan_21s_original_layout(tmp_path):
    """A VAE of Qwen-Image's full structure (four levels, two residual blocks; narrow, so small) written with Wan 2.1's
    names is read through diffusers' Wan converter into AutoencoderKLQwenImage and encodes exactly as the original."""
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import save_file

    from studio.engine.families.qwenimage_files import load_vae_file, part_kind

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True]).eval()
    vae.save_config(tmp_path / "configs" / "vae")
    state = vae.state_dict()
    wan = {_wan_name(k): v.contiguous() for k, v in state.items()}
    assert len(wan) == len(state) and "encoder.head.2.weight" in wan and "decoder.upsamples.14.residual.6.weight" in wan
    save_file(wan, str(tmp_path / "qwen_image_vae.safetensors"))
    save_file(state, str(tmp_path / "diffusers_vae.safetensors"))
    pixels = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean
        for name in ("qwen_image_vae.safetensors", "diffusers_vae.safetensors"):
            assert part_kind({k: tuple(v.shape) for k, v in (wan if "qwen" in name else state).items()}) == "vae"
            loaded = load_vae_file(tmp_path / "configs", tmp_path / name)
            assert torch.equal(loaded.encode(pixels).latent_dist.mean, expected), name


def test_loha_files_are_named_for_comfyui_previewed_in_place_and_the_report_names_the_tools(tiny_qwen, tiny_dataset,
                                                                                              tmp_path):
    """A LoHa trains and is written under the same kohya names (kohya_index knows every one); diffusers cannot read
    it, so Try & Export adds its update to the weights in place for the picture and takes it off after
    (merge.patches_loras); the export report says which tools take a Qwen-Image file."""
    from studio.engine.adapters import read_modules
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection
    from studio.engine.events import RunFinished
    from studio.engine.export import read_lora
    from studio.engine.inspection import inspect_path
    from studio.engine.sampling import generate
    from test_trainer import collect, tiny_job

    done = collect(tiny_job(tiny_qwen, tiny_dataset, tmp_path / "run", training__steps=2, lora__algorithm="loha",
                            training__lr=0.05))[-1]
    assert isinstance(done, RunFinished), getattr(done, "details", done)
    modules = read_modules(read_lora(done.lora_path)[0])
    assert len(modules) == 2 * 12 and "lora_unet_transformer_blocks_1_txt_mlp_net_2" in modules
    bundle = load_model(ModelSection(path=str(tiny_qwen)))
    assert set(modules) <= set(QWEN_IMAGE.kohya_index(bundle))
    settings = dict(steps=2, guidance=1.0, width=64, height=64, seed=5)
    base = generate(bundle, "a red circle", **settings)
    assert generate(bundle, "a red circle", lora_path=done.lora_path, **settings).tobytes() != base.tobytes()
    assert generate(bundle, "a red circle", **settings).tobytes() == base.tobytes()  # the weights came back
    verdicts = {c["consumer"]: c["status"] for c in inspect_path(done.lora_path)["consumers"]}
    assert verdicts == {"A1111/Forge": "does not load", "ComfyUI": "loads fully", "InvokeAI": "loads fully",
                        "kohya": "does not load", "diffusers": "does not load"}
