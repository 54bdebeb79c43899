"""Qwen-Image (Qwen/Qwen-Image): a 20 B MMDiT over its own 16-channel VAE's latents, by rectified flow, conditioned on
Qwen2.5-VL-7B's last hidden states of the chat-templated caption.

What differs from the other flow families, as diffusers' QwenImagePipeline and QwenImageTransformer2DModel do it:
- the caption is wrapped in a fixed system prompt + user turn + the assistant's opening; the template's leading tokens
  (34 with Qwen2.5's tokenizer: the system prompt and "<|im_start|>user\\n") are dropped from the hidden states, and
  at most 512 caption tokens reach the transformer with a mask (padding is masked out of the joint attention);
- the VAE (AutoencoderKLQwenImage, Wan 2.1's causal 3-D VAE) takes and returns frames: ``(B, C, 1, H, W)``, and its
  latents are normalised per channel by ``latents_mean``/``latents_std`` (no single scale/shift);
- latents are packed in 2×2 patches (64 channels a token), with ``img_shapes`` telling the RoPE the grid;
- the timestep is σ itself (the pipeline passes the scheduler's ``t / 1000``), the target the velocity ``ε - x``, and
  σ is shifted by the image's token count (the scheduler's dynamic shift: base 0.5 at 256 tokens, 0.9 at 8192).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from studio.engine.families import flow
from studio.engine.families.base import Conditioning, Family, ModelBundle, Part, PreviewDefaults
from studio.engine.families.loading import (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, check_complete, quiet_diffusers,
                                            weights_variant)
from studio.engine.safe_load import ModelLoadError
from studio.paths import resource_path

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection, TrainingSection
    from studio.engine.detect import Detection
    from studio.engine.safe_load import WeightsFile

PREDICTION = "flow"
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's max_sequence_length default: training sees what previews see
# QwenImagePipeline.prompt_template_encode: the caption goes where "{}" is.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
FOLDER_PARTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
_TINY_CAPTION_TOKENS = 256  # the tiny byte-level tokenizer spends ~150 tokens on the system prompt alone

# ------------------------------------------------------------------------------------------ LoRA targets
# Every QwenImageTransformerBlock (60 in the full model) has two streams: the image's (attn.to_q/k/v, attn.to_out.0,
# img_mlp) and the text's (attn.add_q/k/v_proj, attn.to_add_out, txt_mlp), each with its own modulation (img_mod.1,
# txt_mod.1). "attention" adapts both streams' attention (8 a block); kohya-default adds both feed-forwards (12 a
# block, 716 in all: see _DEAD) as ai-toolkit and musubi-tuner do; the modulations stay frozen (they carry the timestep).
_BLOCK = r"transformer_blocks\.\d+\."
_ATTENTION = _BLOCK + r"attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_FEED_FORWARD = _BLOCK + r"(?:img_mlp|txt_mlp)\.net\.(?:0\.proj|2)"
# The last block's text stream feeds nothing (only the image tokens reach norm_out): its text output and text
# feed-forward get no gradient, its text query a zero one, so they are not adapted (DDP stops on parameters without
# gradients; a LoRA there would be exported as zeros).
# Qwen-Image and its Edit models have 60 blocks (the bundled config's num_layers).
_LAST_BLOCK = 59
DEAD_IN_LAST_BLOCK = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
_DEAD = rf"(?!transformer_blocks\.{_LAST_BLOCK}\.(?:attn\.add_q_proj$|attn\.to_add_out$|txt_mlp\.))"
_LORA_PATH = re.compile(_BLOCK + r"(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                                 r"|(?:img_mlp|txt_mlp)\.net\.(?:0\.proj|2)|(?:img_mod|txt_mod)\.1)")
# ComfyUI, diffusers and musubi-tuner name a Qwen-Image LoRA module kohya's way: "lora_unet_" + the module path with
# dots as underscores (the diffusers names are the original model's: ComfyUI's QwenImage model has the same paths).
KOHYA_PREFIX = "lora_unet"
# Tokens the tiny tokenizer must know besides bytes: Qwen2.5-VL's chat and vision markers.
_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_tokenizer() -> Any:
    """Qwen's byte-level tokenizer built in code (qwen_tokenizer), with Qwen2.5-VL's vision markers, for the tiny models."""
    from studio.engine.families.qwen_tokenizer import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer(_TINY_CAPTION_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIAL_TOKENS})
    return tokenizer


def template_tokens(tokenizer: Any) -> int:
    """How many leading tokens of the templated caption the pipeline drops: the template before the caption (34 with
    Qwen2.5's tokenizer, QwenImagePipeline.prompt_template_encode_start_idx)."""
    return len(tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, H/2 · W/2, 4C)``: 2×2 patches, as QwenImagePipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _load_tokenizer(folder: Path, what: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: the Qwen2.5 tokenizer in '{folder}' cannot be read ({exc}); it needs "
                             "vocab.json + merges.txt (or tokenizer.json) and tokenizer_config.json") from exc


class QwenImageFamily(Family):
    """Qwen-Image: QwenImageTransformer2DModel, Qwen2.5-VL-7B (text_encoder), AutoencoderKLQwenImage; rectified flow."""

    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder",)
    kohya_prefixes = {"transformer": KOHYA_PREFIX, "text_encoder": "lora_te"}
    prediction_types = (PREDICTION,)
    tiny_prediction_types = (PREDICTION,)
    # DDPM-only ideas, and CLIP-only caption options (the Qwen2.5-VL caption is the pipeline's, capped at 512 tokens).
    ignored_training_options = ("noise_offset", "min_snr_gamma", "max_token_length", "clip_skip")
    vae_overflow_hint = "the Qwen-Image VAE is run in fp32 here; a non-finite latent means the image or the VAE file is damaged"

    def __init__(self, *, name: str, label: str, short_label: str, listed_as: str, preview: PreviewDefaults,
                 parameters: Mapping[str, float], activations: tuple[float, float]):
        self.name, self.label, self.short_label, self.listed_as = name, label, short_label, listed_as
        self.preview = preview
        self._parameters = dict(parameters)
        self._activations = activations

    # ------------------------------------------------------------------------------------ what a model is

    def parts(self) -> tuple[Part, ...]:
        return (Part("transformer", "transformer (Qwen-Image MMDiT)", "denoiser"),
                Part("text_encoder", "text encoder (Qwen2.5-VL-7B)", "text_encoder"),
                Part("vae", "VAE (Qwen-Image, 16 channels)", "vae"))

    def native_resolution(self, prediction_type: str | None = None) -> int:
        return 1024  # QwenImagePipeline's default size (128 latent px x 8); trained up to 1328 px

    def trainable_text_encoders(self) -> tuple[str, ...]:
        # Qwen2.5-VL-7B is 8 B parameters and QwenImagePipeline's LoRA loader has no text-encoder slot (nor do peers).
        return ()

    # ------------------------------------------------------------------------------------------ detection

    def detect_file(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], filename: str,
                    tensor: Callable[[str], torch.Tensor] | None) -> "Detection | None":
        from studio.engine.families.qwenimage_files import detect_file

        return detect_file(self, shapes)

    def detect_folder(self, folder: Path, model_index: Mapping[str, Any]) -> bool:
        config = self.denoiser_config(folder)
        return bool(config) and config.get("_class_name") == "QwenImageTransformer2DModel"

    def lora_metadata_evidence(self, metadata: Mapping[str, str]) -> int:
        arch = metadata.get("modelspec.architecture", "")
        return 2 if arch.lower().startswith("qwen-image") or metadata.get("ss_base_model_version", "") == "qwen_image" else 0

    def lora_key_evidence(self, shapes: Mapping[str, tuple[int, ...]], layout: str) -> int:
        # Only Qwen-Image names its streams' modulations and feed-forwards img_mod/txt_mod/img_mlp/txt_mlp.
        marks = ("img_mlp", "txt_mlp", "img_mod", "txt_mod")
        return 3 if any(m in k for k in shapes for m in marks) else 0

    # -------------------------------------------------------------------------------------------- loading

    def bundled_config_dir(self, prediction_type: str | None = None) -> Path:
        return resource_path("model_configs", "qwen-image")

    def load_folder(self, path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
        """A Qwen-Image diffusers folder, every part offline; the VAE stays fp32 (as the other flow families' do)."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration

        path = Path(path)
        if model.prediction_type not in ("auto", PREDICTION):
            raise ModelLoadError(f"{self.label} models are trained as rectified flow, not '{model.prediction_type}'; "
                                 "set model.prediction_type to 'auto'")
        missing = [sub for sub in FOLDER_PARTS if not (path / sub).is_dir()]
        if missing:
            raise ModelLoadError(f"'{path.name}' is a Qwen-Image folder without its "
                                 f"{', '.join(repr(m) for m in missing)} folder(s); the download may be incomplete")
        with quiet_diffusers():
            try:
                transformer = QwenImageTransformer2DModel.from_pretrained(
                    path, subfolder="transformer", torch_dtype=dtype, local_files_only=True,
                    variant=weights_variant(path / "transformer", DIFFUSERS_WEIGHTS))
                check_complete(transformer, "transformer", path.name)
                text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    path / "text_encoder", dtype=dtype, local_files_only=True,
                    variant=weights_variant(path / "text_encoder", TRANSFORMERS_WEIGHTS))
                check_complete(text_encoder, "Qwen2.5-VL text encoder", path.name)
                vae = AutoencoderKLQwenImage.from_pretrained(
                    path, subfolder="vae", torch_dtype=torch.float32, local_files_only=True,
                    variant=weights_variant(path / "vae", DIFFUSERS_WEIGHTS))
                scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler",
                                                                            local_files_only=True)
            except ModelLoadError:
                raise
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"'{path}' looks like a Qwen-Image folder but a part could not be read: {exc}") from exc
        tokenizer = _load_tokenizer(path / "tokenizer", f"'{path.name}'")
        if model.vae:  # a VAE file chosen over the folder's own (qwen_image_vae.safetensors, either layout)
            from studio.engine.families.qwenimage_files import load_vae_file

            vae = load_vae_file(path, Path(model.vae).expanduser())
        return ModelBundle(family=self, prediction_type=PREDICTION, denoiser=transformer, vae=vae,
                           text_encoders=[text_encoder], tokenizers=[tokenizer], noise_scheduler=scheduler,
                           source=str(path), extra={"format": "diffusers"})

    def load_single_file(self, path: Path, weights: "WeightsFile", detection: "Detection", model: "ModelSection",
                         dtype: torch.dtype) -> ModelBundle:
        from studio.engine.families import qwenimage_files

        with quiet_diffusers():
            return qwenimage_files.load_single_file(self, Path(path), weights, detection, model, dtype)

    def part_files(self, path: Path, model: "ModelSection") -> dict[str, Path | None]:
        from studio.engine.families import qwenimage_files

        return qwenimage_files.part_files(self, Path(path), model)

    # -------------------------------------------------------------------------------------- conditioning

    def max_length(self, bundle: ModelBundle) -> int:
        """Caption tokens per caption: the pipeline's 512, capped by what the tokenizer holds after the template."""
        tokenizer = bundle.tokenizers[0]
        room = int(getattr(tokenizer, "model_max_length", 10 ** 6)) - template_tokens(tokenizer)
        return max(1, min(MAX_SEQUENCE_LENGTH, room))

    def encode_text(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """As QwenImagePipeline.encode_prompt: template, Qwen2.5-VL's last hidden states, the template's leading tokens
        dropped, at most 512 left. Fixed-length here (so captions cache and join): ``prompt`` (zero past each caption)
        and ``prompt_mask``; the transformer masks the padding, so the result is the pipeline's unpadded one."""
        encoder, tokenizer = bundle.text_encoders[0], bundle.tokenizers[0]
        drop = template_tokens(tokenizer)
        tokens = tokenizer([PROMPT_TEMPLATE.format(c) for c in captions], padding="max_length",
                           max_length=drop + self.max_length(bundle), truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(encoder.device)
        mask = tokens.attention_mask.to(encoder.device)
        states = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][:, drop:]
        mask = mask[:, drop:].bool()
        return Conditioning(prompt=states * mask.unsqueeze(-1).to(states.dtype), prompt_mask=mask)

    def encode_image(self, bundle: ModelBundle, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's posterior of one frame, normalised per channel as QwenImagePipeline does: ``(z - mean) / std``."""
        vae = bundle.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist  # (B, 3, 1, H, W): one frame
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=vae.device, dtype=vae.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=vae.device, dtype=vae.dtype).view(shape)
        return (dist.mean[:, :, 0] - mean) / std, dist.std[:, :, 0] / std

    # ---------------------------------------------------------------------------------------- objective

    @staticmethod
    def shift_config(scheduler_config: Mapping[str, Any]) -> dict[str, float]:
        """The scheduler's dynamic-shift parameters (Qwen-Image's: mu from 0.5 at 256 tokens to 0.9 at 8192)."""
        return {"base_seq_len": scheduler_config.get("base_image_seq_len", 256),
                "max_seq_len": scheduler_config.get("max_image_seq_len", 4096),
                "base_shift": scheduler_config.get("base_shift", 0.5), "max_shift": scheduler_config.get("max_shift", 1.15)}

    def flow_sampling(self, training: "TrainingSection", scheduler_config: Mapping[str, Any]) -> flow.FlowSampling:
        """``auto`` follows the model's scheduler, as its previews do: Qwen-Image's shifts by the image's size."""
        if scheduler_config.get("use_dynamic_shifting", True):
            return flow.FlowSampling.from_training(training, "resolution")
        return flow.FlowSampling.from_training(training, "constant", float(scheduler_config.get("shift", 3.0)))

    def training_loss(self, bundle: ModelBundle, denoiser: Any, latents: torch.Tensor, cond: Conditioning, *,
                      training: "TrainingSection", generator: torch.Generator,
                      weight_dtype: torch.dtype) -> torch.Tensor:
        """Rectified flow as QwenImagePipeline samples it: ``x_σ = (1 - σ) x + σ ε`` packed into 2×2 patches, the
        timestep σ (the pipeline's ``t / 1000``), the caption states with their mask, the output compared with ε - x."""
        latents = flow.even_part(latents)  # whole 2 x 2 patches (a 1000 px side is a 125-row latent)
        b, c, h, w = latents.shape
        sched = bundle.noise_scheduler.config
        tokens = (h // 2) * (w // 2)
        draw = flow.draw(latents, self.flow_sampling(training, sched), generator, tokens, self.shift_config(sched))
        pred = denoiser(hidden_states=pack(draw.noisy.to(weight_dtype)),
                        timestep=draw.sigmas.to(latents.device, weight_dtype),
                        encoder_hidden_states=cond["prompt"].to(weight_dtype), encoder_hidden_states_mask=cond["prompt_mask"],
                        img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return flow.flow_loss(pred, pack(draw.target), draw.weights)

    # --------------------------------------------------------------------------------------------- LoRA

    def lora_targets(self, preset: str, component: str) -> str:
        if component == "transformer":
            return _DEAD + (_ATTENTION if preset == "attention" else f"(?:{_ATTENTION}|{_FEED_FORWARD})")
        if component == "text_encoder":
            attention = r"(?:model\.)?(?:language_model\.)?layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
            return attention
        raise ValueError(f"unknown model component '{component}'; expected one of: {', '.join(self.component_names())}")

    def apply_speed_options(self, bundle: ModelBundle, training: "TrainingSection", train_text_encoder: bool) -> None:
        from studio.engine.families import memory

        denoiser = bundle.denoiser
        if training.base_weights_fp8:  # on the host in a run (see place_denoiser): only fp8 reaches the device
            memory.store_frozen_in_fp8(denoiser, denoiser.dtype)
        if training.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()

    def place_denoiser(self, bundle: ModelBundle, training: "TrainingSection", device: "torch.device | str") -> None:
        # 20 B parameters: 41 GB in bf16, so it moves tensor by tensor after the fp8 cast, swapped blocks left behind.
        from studio.engine.families import memory

        memory.place_swapping(bundle, list(bundle.denoiser.transformer_blocks), training.block_swap, device)

    compile_block_classes = ("QwenImageTransformerBlock",)  # the 60 dual-stream blocks

    # ------------------------------------------------------------------------------------------- export
    # kohya's names over diffusers' paths ("lora_unet_transformer_blocks_0_attn_to_q"), with .lora_down/.lora_up/
    # .alpha: the layout musubi-tuner writes; ComfyUI maps "lora_unet_" + the model path with underscores for every
    # diffusion_model key, and diffusers' Qwen LoRA converter splits the names back (keeping to_q, add_q_proj,
    # img_mlp … whole) and folds alpha / rank. q, k and v are separate Linears in the original model too: no fusing.

    def kohya_name(self, component: str, module_path: str, denoiser_config: Any = None) -> str:
        if component == "transformer":
            if not _LORA_PATH.fullmatch(module_path):
                raise ValueError(f"'{module_path}' is not a Qwen-Image block layer the LoRA loaders map (attention, "
                                 "feed-forward, modulation)")
            return KOHYA_PREFIX + "_" + module_path.replace(".", "_")
        if component == "text_encoder":
            return "lora_te_" + module_path.replace(".", "_")
        raise ValueError(f"{self.label} has no component '{component}'")

    def consumer_problems(self) -> Mapping[str, str]:
        # Only what is known not to load; ComfyUI and diffusers are checked by tests/engine/test_qwenimage.py.
        return {"A1111/Forge": "A1111 has no Qwen-Image model (Forge forks that add one are not checked here)",
                "kohya": "sd-scripts has no Qwen-Image model (musubi-tuner, kohya's DiT trainer, is a separate tool)"}

    def kohya_index(self, bundle: ModelBundle) -> dict[str, tuple[str, Any]]:
        """Every block Linear by its file name ("lora_unet_" + path), for previews of LoHa/LoKr files."""
        return {self.kohya_name("transformer", path): ("transformer", module)
                for path, module in bundle.denoiser.named_modules()
                if isinstance(module, torch.nn.Linear) and _LORA_PATH.fullmatch(path)}

    def metadata_ids(self, prediction_type: str) -> dict[str, str]:
        return {
            # musubi-tuner's ids (musubi_tuner/utils/sai_model_spec.py: ARCH_QWEN_IMAGE "Qwen-Image" + "/lora",
            # IMPL_QWEN_IMAGE); kohya's ss_base_model_version has no Qwen-Image value, so the family's name stands in.
            "ss_base_model_version": "qwen_image",
            "ss_v2": "False",
            "modelspec.architecture": "Qwen-Image/lora",
            "modelspec.implementation": "https://github.com/QwenLM/Qwen-Image",
            "modelspec.prediction_type": PREDICTION,
        }

    # ------------------------------------------------------------------------------------------ preview

    def pipeline(self, bundle: ModelBundle) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(bundle.noise_scheduler.config), vae=bundle.vae,
            text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], transformer=bundle.denoiser,
        )
        # The pipeline's 34 is Qwen2.5's count; counted from the bundle's tokenizer, prompts encode as training's.
        pipe.prompt_template_encode_start_idx = template_tokens(bundle.tokenizers[0])
        return pipe

    def preview_prompt_kwargs(self, bundle: ModelBundle, prompts: list[str],
                              negative_prompt: str) -> dict[str, Any] | None:
        # The job's own encoding (and length cap), as the pipeline's prompt_embeds + mask; the negative prompt is " "
        # when empty, as pipeline_kwargs hands the pipeline (any negative turns true CFG on).
        with torch.no_grad():
            cond = self.encode_text(bundle, [*prompts, negative_prompt or " "])
        n, dtype = len(prompts), bundle.denoiser.dtype
        states, mask = cond["prompt"].to(dtype), cond["prompt_mask"].long()
        return {"prompt_embeds": states[:n], "prompt_embeds_mask": mask[:n],
                "negative_prompt_embeds": states[n:].expand(n, -1, -1), "negative_prompt_embeds_mask": mask[n:].expand(n, -1)}

    def preview_embeds(self, bundle: ModelBundle, prompts: list[str], negative_prompt: str) -> dict[str, Any] | None:
        # Encoded once beside the captions, so previews need no 8 B text encoder on the device later.
        return self.preview_prompt_kwargs(bundle, prompts, negative_prompt)

    def pipeline_kwargs(self, *, negative_prompt: str, guidance: float, lora_scale: float | None) -> dict[str, Any]:
        # Qwen-Image is not guidance-distilled: its CFG is true_cfg_scale (> 1 with a negative prompt, even " ").
        kwargs: dict[str, Any] = {"negative_prompt": (negative_prompt or " ") if guidance > 1 else None,
                                  "true_cfg_scale": guidance}
        if lora_scale is not None:
            kwargs["attention_kwargs"] = {"scale": lora_scale}
        return kwargs

    def preview_batch_factor(self, guidance: float) -> int:
        return 2 if guidance > 1 else 1

    def image_size_multiple(self, bundle: ModelBundle) -> int:
        # The pipeline's vae_scale_factor (2 per temporal-downsample entry: 8 for the real VAE) x the 2x2 patches.
        return 2 ** len(bundle.vae.temperal_downsample) * 2

    def job_defaults(self) -> dict[str, Any]:
        # ai-toolkit's and musubi-tuner's Qwen-Image LoRA recipes: 1024 px, rank 16, lr 1e-4 constant, logit-normal σ
        # with the model's dynamic shift, bf16; the 20 B transformer needs fp8 base weights and gradient
        # checkpointing even on 24 GB (block swap on top for less).
        return {**super().job_defaults(), "lora.rank": 16, "lora.alpha": 16.0, "training.lr": 1e-4,
                "training.scheduler": "constant", "training.flow_timestep_sampling": "logit_normal",
                "training.flow_shift": "auto", "training.gradient_checkpointing": True,
                "training.base_weights_fp8": True, "training.mixed_precision": "bf16",
                "training.min_snr_gamma": 0.0, "training.noise_offset": 0.0}

    # --------------------------------------------------------------------------------------- cost model

    def meta_denoiser(self, config: Mapping[str, Any]) -> Any:
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel.from_config(dict(config)).eval()

    def denoiser_example_inputs(self, config: Mapping[str, Any], batch: int, latent_h: int,
                                latent_w: int) -> tuple[tuple, dict]:
        tokens = (latent_h // 2) * (latent_w // 2)
        return (), {"hidden_states": torch.empty(batch, tokens, config["in_channels"]),
                    "encoder_hidden_states": torch.empty(batch, 128, config["joint_attention_dim"]),
                    "timestep": torch.zeros(batch), "img_shapes": [[(1, latent_h // 2, latent_w // 2)]] * batch}

    def full_size_parameters(self) -> dict[str, float]:
        return dict(self._parameters)

    def denoiser_weight_bytes(self, training: "TrainingSection", weight_bytes: int) -> float:
        """fp8 keeps 1 byte per frozen weight; swapped blocks live in CPU memory (one on the GPU at a time).
        The 60 blocks hold ~99 % of the transformer's parameters."""
        params = self._parameters["denoiser"]
        per_param = 1 if training.base_weights_fp8 else weight_bytes
        block_share = 0.99 * params / 60
        return (params - block_share * max(0, min(training.block_swap, 60) - 1)) * per_param

    def activation_gib(self, gradient_checkpointing: bool) -> float:
        return self._activations[1 if gradient_checkpointing else 0]

    # ---------------------------------------------------------------------------------------- test model

    def build_tiny(self, prediction_type: str = PREDICTION, seed: int = 0) -> Any:
        from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                               QwenImageTransformer2DModel)
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        ids = tokenizer.convert_tokens_to_ids
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
                         "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                         "pad_token_id": tokenizer.pad_token_id},
            vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32,
                           "fullatt_block_indexes": [0]},
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>")))
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True])
        with torch.no_grad():
            # A random encoder's posterior is as wide as its mean: the latents would be mostly noise. Real VAEs are sharp.
            vae.quant_conv.bias[vae.config.z_dim:] = -12.0
        # Qwen/Qwen-Image's scheduler: the dynamic (resolution) shift, exponential, to σ = 0.02 at the last step.
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
        return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 transformer=transformer)

    def warm_up(self) -> None:
        import diffusers
        import transformers

        for module, names in ((diffusers, ("AutoencoderKLQwenImage", "FlowMatchEulerDiscreteScheduler",
                                            "QwenImagePipeline", "QwenImageTransformer2DModel")),
                              (transformers, ("AutoTokenizer", "Qwen2_5_VLForConditionalGeneration"))):
            for name in names:
                getattr(module, name)


# Reference sizes, counted from the bundled configs on the meta device (tests/engine/test_qwenimage.py). Activations per
# 1024 px image (bf16, GiB, without / with gradient checkpointing) are estimates (4096 image + ~300 caption tokens x
# 3072 wide x 60 blocks), not measured yet.
QWEN_IMAGE = QwenImageFamily(
    name="qwen-image", label="Qwen-Image", short_label="Qwen-Image", listed_as="Qwen-Image",
    preview=PreviewDefaults(steps=30, guidance=4.0, sampler="flow-euler"),
    parameters={"denoiser": 20.43e9, "text_encoders": 8.29e9, "vae": 126.9e6}, activations=(40.0, 2.5),
)
