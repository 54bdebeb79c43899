"""Z-Image (Tongyi-MAI Z-Image and Z-Image-Turbo): a 6 B single-stream DiT over FLUX.1's 16-channel latents, by
rectified flow, conditioned on Qwen3-4B's second-to-last hidden states of the chat-templated caption.

What differs from the other flow families, as diffusers' ZImagePipeline and ZImageTransformer2DModel do it:
- the caption is wrapped in Qwen3's chat template (user turn + the assistant's opening), tokenised to at most 512
  tokens, and only its real tokens (the attention mask's) reach the transformer, one variable-length tensor each;
- the transformer takes lists (one latent ``(C, 1, H, W)`` and one caption per image) and a timestep running the
  other way, ``t = 1 - σ`` (it multiplies by 1000 itself);
- it predicts ``x - ε``: the pipeline negates its output before the Euler step, so the target is the negated
  velocity of flow.py.
Z-Image-Turbo (distilled: 8 steps, no guidance) and the base model share the architecture and this module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from studio.engine.families import flow
from studio.engine.families.base import Conditioning, Family, ModelBundle, Part, PreviewDefaults
from studio.engine.families.loading import quiet_diffusers
from studio.engine.families.zimage_files import CHAT_TEMPLATE
from studio.paths import resource_path

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection, TrainingSection
    from studio.engine.detect import Detection
    from studio.engine.safe_load import WeightsFile

PREDICTION = "flow"
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's max_sequence_length default: training sees what previews see
# The LoRA key prefix ComfyUI's Lumina2/Z-Image branch (comfy/lora.py, via comfy.utils.z_image_to_diffusers) and
# diffusers' Z-Image LoRA converter both read: "diffusion_model." + the diffusers module path. The core's kohya-key
# pattern is "<prefix>_<name>", so the prefix is registered as "diffusion" and names start "diffusion_model.".
KOHYA_PREFIX = "diffusion"
_KEY_PREFIX = "diffusion_model."
_TINY_CAPTION_TOKENS = 64

# ------------------------------------------------------------------------------------------ LoRA targets
# Every ZImageTransformerBlock (30 main layers, 2 noise refiners, 2 context refiners): "attention" adapts q/k/v/out,
# kohya-default adds the SwiGLU feed-forward w1/w2/w3 (7 modules a block, 238 in all). No convolutions anywhere:
# "+conv" equals kohya-default. The adaLN modulations are left frozen (they carry the timestep, not the content);
# export still names them, as ComfyUI maps them, for files that adapt them.
_BLOCK = r"(?:layers|noise_refiner|context_refiner)\.\d+\."
_ATTENTION = _BLOCK + r"attention\.(?:to_q|to_k|to_v|to_out\.0)"
_FEED_FORWARD = _BLOCK + r"feed_forward\.(?:w1|w2|w3)"
_LORA_PATH = re.compile(_BLOCK + r"(?:attention\.(?:to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)")


def tiny_qwen_tokenizer(model_max_length: int = _TINY_CAPTION_TOKENS) -> Any:
    """The tiny models' Qwen tokenizer with Z-Image's chat template (Qwen3's real one comes from the user's files)."""
    from studio.engine.families.qwen_tokenizer import tiny_qwen_tokenizer as build

    return build(model_max_length, CHAT_TEMPLATE)


def templated(tokenizer: Any, captions: list[str]) -> list[str]:
    """The captions as ZImagePipeline hands them to the tokenizer: one user turn, then the assistant's opening."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True,
                                          enable_thinking=True) for c in captions]


def caption_lengths(mask: torch.Tensor) -> list[int]:
    """Each caption's real token count, on the host: diffusers' transformer takes one tensor per caption (a list), so
    its length must be a Python int. The one host read of a Z-Image step (see Family.step_host_read)."""
    return (mask != 0).sum(dim=1).tolist()  # the mask may arrive cast (caches store floats): count, don't add


class ZImageFamily(Family):
    """Z-Image: ZImageTransformer2DModel, Qwen3-4B (text_encoder), FLUX.1's VAE with shift/scale; rectified flow."""

    # DDPM-only settings the flow objective and Qwen3 encoding never read (said at the start, not in the metadata).
    ignored_training_options = ("noise_offset", "min_snr_gamma", "max_token_length", "clip_skip")
    denoiser_name = "transformer"
    compile_block_classes = ("ZImageTransformerBlock",)  # refiners and main layers alike
    text_encoder_names = ("text_encoder",)
    kohya_prefixes = {"transformer": KOHYA_PREFIX, "text_encoder": "lora_te"}
    prediction_types = (PREDICTION,)
    tiny_prediction_types = (PREDICTION,)
    vae_overflow_hint = ("the Z-Image (FLUX.1) VAE is run in fp32 here; a non-finite latent means the image or the VAE "
                         "file is damaged")
    step_host_read = ("each caption's token count (ZImageTransformer2DModel takes one caption tensor per image, "
                      "so the lengths are Python ints): one read of the batch's mask sums per step")

    def __init__(self, *, name: str, label: str, short_label: str, listed_as: str, preview: PreviewDefaults,
                 parameters: Mapping[str, float], activations: tuple[float, float]):
        self.name, self.label, self.short_label, self.listed_as = name, label, short_label, listed_as
        self.preview = preview
        self._parameters = dict(parameters)
        self._activations = activations

    # ------------------------------------------------------------------------------------ what a model is

    def parts(self) -> tuple[Part, ...]:
        return (Part("transformer", "transformer (Z-Image DiT)", "denoiser"),
                Part("text_encoder", "text encoder (Qwen3-4B)", "text_encoder"),
                Part("vae", "VAE (FLUX.1 ae, 16 channels)", "vae"))

    def native_resolution(self, prediction_type: str | None = None) -> int:
        return 1024

    def trainable_text_encoders(self) -> tuple[str, ...]:
        # Qwen3-4B is 4 B parameters and diffusers' Z-Image LoRA loader has no text-encoder slot (nor do the peers).
        return ()

    # ------------------------------------------------------------------------------------------ detection

    def detect_file(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], filename: str,
                    tensor: Callable[[str], torch.Tensor] | None) -> "Detection | None":
        from studio.engine.families.zimage_files import detect_zimage_file

        return detect_zimage_file(self, shapes)

    def detect_folder(self, folder: Path, model_index: Mapping[str, Any]) -> bool:
        config = self.denoiser_config(folder)
        return bool(config) and config.get("_class_name") == "ZImageTransformer2DModel"

    def lora_metadata_evidence(self, metadata: Mapping[str, str]) -> int:
        arch = metadata.get("modelspec.architecture", "")
        version = metadata.get("ss_base_model_version", "")
        return 2 if arch.lower().startswith("z-image") or version.startswith("zimage") else 0

    def lora_key_evidence(self, shapes: Mapping[str, tuple[int, ...]], layout: str) -> int:
        names = {k.removeprefix(_KEY_PREFIX).removeprefix("transformer.") for k in shapes}
        # Refiner blocks are Z-Image's and Lumina 2's; diffusers names Lumina 2's layers attn.* / feed_forward.linear_*.
        if any(re.match(r"(?:noise_refiner|context_refiner)\.\d+\.(?:attention\.to_|feed_forward\.w[123])", k)
               for k in names):
            return 3
        return 0

    # -------------------------------------------------------------------------------------------- loading

    def part_files(self, path: Path, model: "ModelSection") -> dict[str, Path | None]:
        from studio.engine.families import zimage_files

        return zimage_files.part_files(self, Path(path), model)

    def bundled_config_dir(self, prediction_type: str | None = None) -> Path:
        return resource_path("model_configs", "z-image")

    def load_folder(self, path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
        from studio.engine.families import zimage_files

        with quiet_diffusers():
            return zimage_files.load_folder(self, Path(path), model, dtype)

    def load_single_file(self, path: Path, weights: "WeightsFile", detection: "Detection", model: "ModelSection",
                         dtype: torch.dtype) -> ModelBundle:
        from studio.engine.families import zimage_files

        with quiet_diffusers():
            return zimage_files.load_single_file(self, Path(path), weights, detection, model, dtype)

    # -------------------------------------------------------------------------------------- conditioning

    def max_length(self, bundle: ModelBundle) -> int:
        """Tokens per caption: the pipeline's 512, capped by the tokenizer's own limit (the tiny one's 64)."""
        return min(MAX_SEQUENCE_LENGTH, int(getattr(bundle.tokenizers[0], "model_max_length", MAX_SEQUENCE_LENGTH)))

    def encode_text(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """As ZImagePipeline._encode_prompt: chat template, padded to max length, Qwen3's second-to-last hidden states.
        Batch-first and fixed-length (so captions cache and join): ``cap`` (zero past each caption) and ``cap_mask``."""
        encoder, tokenizer = bundle.text_encoders[0], bundle.tokenizers[0]
        tokens = tokenizer(templated(tokenizer, list(captions)), padding="max_length", max_length=self.max_length(bundle),
                           truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(encoder.device)
        mask = tokens.attention_mask.to(encoder.device).bool()
        states = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        # Real tokens first, in order, whichever side the tokenizer pads (the pipeline keeps states[mask]): a stable
        # sort of the mask, on the device, so caption_list can take each caption's first n states.
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        states = torch.gather(states, 1, order.unsqueeze(-1).expand_as(states))
        mask = torch.gather(mask, 1, order)
        return Conditioning(cap=states * mask.unsqueeze(-1).to(states.dtype), cap_mask=mask)

    @staticmethod
    def caption_list(cond: Conditioning) -> list[torch.Tensor]:
        """The captions as the transformer takes them: each one's real tokens only."""
        lengths = caption_lengths(cond["cap_mask"])
        return [cond["cap"][i, :n] for i, n in enumerate(lengths)]

    # ---------------------------------------------------------------------------------------- objective

    def flow_sampling(self, training: "TrainingSection", scheduler_config: Mapping[str, Any]) -> flow.FlowSampling:
        """``auto`` follows the model's scheduler, as its previews do: Z-Image-Turbo's is a constant shift of 3."""
        if scheduler_config.get("use_dynamic_shifting"):
            return flow.FlowSampling.from_training(training, "resolution")
        return flow.FlowSampling.from_training(training, "constant", float(scheduler_config.get("shift", 3.0)))

    def training_loss(self, bundle: ModelBundle, denoiser: Any, latents: torch.Tensor, cond: Conditioning, *,
                      training: "TrainingSection", generator: torch.Generator,
                      weight_dtype: torch.dtype) -> torch.Tensor:
        """Rectified flow as ZImagePipeline samples it: ``x_σ = (1 - σ) x + σ ε`` in, timestep ``1 - σ``, the network's
        output compared with ``x - ε`` (the pipeline negates it into the velocity ``ε - x`` its scheduler steps)."""
        latents = flow.even_part(latents)  # 2 x 2 patches, as for Flux and SD3
        b, c, h, w = latents.shape
        sched = bundle.noise_scheduler.config
        shift = {"base_seq_len": sched.get("base_image_seq_len", 256), "max_seq_len": sched.get("max_image_seq_len", 4096),
                 "base_shift": sched.get("base_shift", 0.5), "max_shift": sched.get("max_shift", 1.15)}
        draw = flow.draw(latents, self.flow_sampling(training, sched), generator, (h // 2) * (w // 2), shift)
        # float32, as the pipeline passes it: the sinusoidal embedding of t · 1000 is computed in float anyway, and a
        # bf16 t would be off by up to 4 of the 1000 steps near t = 1.
        timestep = (1 - draw.sigmas).to(latents.device, torch.float32)
        images = list(draw.noisy.to(weight_dtype).unsqueeze(2).unbind(0))  # (C, 1, H, W): one frame each
        out = denoiser(images, timestep, self.caption_list(cond), return_dict=False)[0]
        pred = torch.stack(out).squeeze(2)
        return flow.flow_loss(pred, -draw.target, draw.weights)

    # --------------------------------------------------------------------------------------------- LoRA

    def lora_targets(self, preset: str, component: str) -> str:
        if component == "transformer":
            return _ATTENTION if preset == "attention" else f"(?:{_ATTENTION}|{_FEED_FORWARD})"
        if component == "text_encoder":
            attention = r"layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
            return attention if preset == "attention" else (
                r"layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:gate_proj|up_proj|down_proj))")
        raise ValueError(f"unknown model component '{component}'; expected one of: {', '.join(self.component_names())}")

    def apply_speed_options(self, bundle: ModelBundle, training: "TrainingSection", train_text_encoder: bool) -> None:
        from studio.engine.families import memory

        denoiser = bundle.denoiser
        if training.base_weights_fp8:
            memory.store_frozen_in_fp8(denoiser, denoiser.dtype)
        swap = memory.swap_blocks(list(denoiser.layers), training.block_swap, denoiser.device)
        if swap is not None:
            bundle.extra["block_swap"] = swap
        if training.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()

    # ------------------------------------------------------------------------------------------- export
    # The layout ComfyUI and diffusers both load: "diffusion_model." + the diffusers module path, with kohya's
    # .lora_down/.lora_up/.alpha. ComfyUI's Lumina2 branch maps "diffusion_model.layers.N.attention.to_q" onto the
    # rows of the original model's fused "layers.N.attention.qkv" (and to_out.0 onto attention.out), so q, k and v
    # stay separate LoRAs here and nothing needs fusing; diffusers strips the prefix and folds alpha / rank.

    def kohya_name(self, component: str, module_path: str, denoiser_config: Any = None) -> str:
        if component == "transformer":
            if not _LORA_PATH.fullmatch(module_path):
                raise ValueError(f"'{module_path}' is not a Z-Image block layer ComfyUI maps (attention, feed-forward, "
                                 "adaLN modulation)")
            return _KEY_PREFIX + module_path
        if component == "text_encoder":
            return "lora_te_" + module_path.replace(".", "_")
        raise ValueError(f"{self.label} has no component '{component}'")

    def consumer_problems(self) -> Mapping[str, str]:
        # Only what is known not to load; ComfyUI and diffusers are checked by tests/engine/test_zimage.py.
        return {"A1111/Forge": "A1111 has no Z-Image model (Forge forks that add one are not checked here)",
                "kohya": "sd-scripts has no Z-Image model (musubi-tuner, kohya's video/DiT trainer, is a separate tool)"}

    def kohya_index(self, bundle: ModelBundle) -> dict[str, tuple[str, Any]]:
        """Every block Linear by its file name ("diffusion_model." + path), for previews of LoHa/LoKr files."""
        return {self.kohya_name("transformer", path): ("transformer", module)
                for path, module in bundle.denoiser.named_modules()
                if isinstance(module, torch.nn.Linear) and _LORA_PATH.fullmatch(path)}

    def metadata_ids(self, prediction_type: str) -> dict[str, str]:
        return {
            # musubi-tuner's Z-Image ids (musubi_tuner/utils/sai_model_spec.py: ARCH_Z_IMAGE "Z-Image" + "/lora",
            # IMPL_Z_IMAGE); kohya's ss_base_model_version has no Z-Image value, so the family's name stands in.
            "ss_base_model_version": "zimage",
            "ss_v2": "False",
            "modelspec.architecture": "Z-Image/lora",
            "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image",
            "modelspec.prediction_type": PREDICTION,
        }

    # ------------------------------------------------------------------------------------------ preview

    def image_size_multiple(self, bundle: ModelBundle) -> int:
        return flow.patched_pixels(bundle.vae)  # 2 x 2 patches of the VAE's latent: 16 px

    def pipeline(self, bundle: ModelBundle) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        return ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(bundle.noise_scheduler.config), vae=bundle.vae,
            text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], transformer=bundle.denoiser,
        )

    def preview_prompt_kwargs(self, bundle: ModelBundle, prompts: list[str],
                              negative_prompt: str) -> dict[str, Any] | None:
        # The job's own encoding (and length cap), one tensor per prompt as the pipeline's prompt_embeds take them.
        with torch.no_grad():
            positive = self.caption_list(self.encode_text(bundle, prompts))
            negative = self.caption_list(self.encode_text(bundle, [negative_prompt] * len(prompts)))
        dtype = bundle.denoiser.dtype
        return {"prompt_embeds": [p.to(dtype) for p in positive], "negative_prompt_embeds": [n.to(dtype) for n in negative]}

    def pipeline_kwargs(self, *, negative_prompt: str, guidance: float, lora_scale: float | None) -> dict[str, Any]:
        # ZImagePipeline runs CFG for any guidance_scale > 0 (as pos + g·(pos - neg)); Turbo samples with 0.
        kwargs: dict[str, Any] = {"negative_prompt": negative_prompt or None, "guidance_scale": guidance}
        if lora_scale is not None:
            kwargs["joint_attention_kwargs"] = {"scale": lora_scale}
        return kwargs

    def preview_batch_factor(self, guidance: float) -> int:
        return 2 if guidance > 0 else 1

    def job_defaults(self) -> dict[str, Any]:
        # ai-toolkit's and musubi-tuner's Z-Image LoRA recipes: 1024 px, rank 16, lr 1e-4 constant, logit-normal σ
        # with the model's own shift, bf16, gradient checkpointing, the transformer's frozen weights in fp8 (ai-toolkit
        # quantizes it by default): 6.2 GB instead of 12.3 GB, so 16 GB cards fit.
        return {**super().job_defaults(), "lora.rank": 16, "lora.alpha": 16.0, "training.lr": 1e-4,
                "training.scheduler": "constant", "training.flow_timestep_sampling": "logit_normal",
                "training.flow_shift": "auto", "training.gradient_checkpointing": True,
                "training.base_weights_fp8": True, "training.mixed_precision": "bf16", "training.min_snr_gamma": 0.0,
                "training.noise_offset": 0.0}

    # --------------------------------------------------------------------------------------- cost model

    def meta_denoiser(self, config: Mapping[str, Any]) -> Any:
        from diffusers import ZImageTransformer2DModel

        return ZImageTransformer2DModel.from_config(dict(config)).eval()

    def denoiser_example_inputs(self, config: Mapping[str, Any], batch: int, latent_h: int,
                                latent_w: int) -> tuple[tuple, dict]:
        images = [torch.empty(config["in_channels"], 1, latent_h, latent_w) for _ in range(batch)]
        captions = [torch.empty(128, config["cap_feat_dim"]) for _ in range(batch)]
        return (images, torch.zeros(batch), captions), {}

    def full_size_parameters(self) -> dict[str, float]:
        return dict(self._parameters)

    def denoiser_weight_bytes(self, training: "TrainingSection", weight_bytes: int) -> float:
        """fp8 keeps 1 byte per frozen weight; swapped main layers live in CPU memory (one on the GPU at a time).
        The 30 main layers hold 88 % of the transformer's 6.15 B parameters (the refiners and embedders the rest)."""
        params = self._parameters["denoiser"]
        per_param = 1 if training.base_weights_fp8 else weight_bytes
        block_share = 0.88 * params / 30
        return (params - block_share * max(0, min(training.block_swap, 30) - 1)) * per_param

    def activation_gib(self, gradient_checkpointing: bool) -> float:
        return self._activations[1 if gradient_checkpointing else 0]

    # ---------------------------------------------------------------------------------------- test model

    def build_tiny(self, prediction_type: str = PREDICTION, seed: int = 0) -> Any:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from studio.engine.tiny import TINY_RESOLUTION

        torch.manual_seed(seed)
        tokenizer = tiny_qwen_tokenizer()
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True))
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
        with torch.no_grad():
            # diffusers leaves the pad tokens uninitialised (torch.empty): a random model needs finite ones.
            transformer.x_pad_token.normal_(0, 0.02)
            transformer.cap_pad_token.normal_(0, 0.02)
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=TINY_RESOLUTION, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False)
        with torch.no_grad():
            # A random encoder's posterior is as wide as its mean: the latents would be mostly noise. Real VAEs are sharp.
            vae.encoder.conv_out.bias[vae.config.latent_channels:] = -12.0
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
        return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)

    def warm_up(self) -> None:
        import diffusers
        import transformers

        for module, names in ((diffusers, ("AutoencoderKL", "FlowMatchEulerDiscreteScheduler", "ZImagePipeline",
                                            "ZImageTransformer2DModel")),
                              (transformers, ("AutoTokenizer", "Qwen3Model"))):
            for name in names:
                getattr(module, name)


# Reference sizes, counted from the bundled configs on the meta device (tests/engine/test_zimage.py): the transformer
# 6.15 B, Qwen3-4B without its LM head 4.02 B, the VAE 83.8 M. Activations per 1024 px image (bf16, GiB, without / with
# gradient checkpointing) are estimates (4096 image + ~300 caption tokens x 3840 wide x 34 blocks), not measured yet.
ZIMAGE = ZImageFamily(
    name="zimage", label="Z-Image", short_label="Z-Image", listed_as="Z-Image",
    preview=PreviewDefaults(steps=8, guidance=0.0, sampler="flow-euler"),
    parameters={"denoiser": 6.15e9, "text_encoders": 4.02e9, "vae": 83.8e6}, activations=(24.0, 1.5),
)
