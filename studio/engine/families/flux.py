"""FLUX.1 [dev] and [schnell]: a rectified-flow MMDiT over packed 16-channel latents, CLIP-L pooled text + T5-XXL states.

Both are one class; they differ in data: dev embeds a guidance value (trained with a fixed one, the job's
``training.guidance``), schnell has no guidance input and samples in 4 steps. The objective is the shared
rectified flow (flow.py) with Flux's resolution-dependent shift; latents are packed into 2x2 patches as
diffusers' FluxPipeline does (its static ``_pack_latents``/``_prepare_latent_image_ids`` are used, not copied).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from studio.engine.families import flow
from studio.engine.families.base import Conditioning, Family, ModelBundle, Part, PreviewDefaults
from studio.engine.families.loading import quiet_diffusers
from studio.engine.tiny import TINY_RESOLUTION
from studio.paths import resource_path

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection, TrainingSection
    from studio.engine.detect import Detection
    from studio.engine.safe_load import WeightsFile

PREDICTION = "flow"  # Flux has one objective of its own: the velocity ε - x
_TINY_TEXT_DIM = 32
_TINY_T5_LENGTH = 32  # the tiny T5 tokenizer's model_max_length: keeps the tiny joint attention short

# ------------------------------------------------------------------------------------------ LoRA targets
# kohya's Flux LoRA (sd-scripts networks/lora_flux.py) wraps every Linear inside DoubleStreamBlock and
# SingleStreamBlock: per double block img/txt attn qkv, attn proj, mlp.0, mlp.2, mod.lin (10), per single block
# linear1, linear2, modulation.lin (3): 19 x 10 + 38 x 3 = 304 modules on FLUX.1. In diffusers' modules that is
# the expression below (q/k/v are separate there; export fuses them back, see kohya_modules).
_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
_DOUBLE_ATTN = r"attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DOUBLE_ALL = _DOUBLE + r"(?:" + _DOUBLE_ATTN + r"|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2)|norm1\.linear|norm1_context\.linear)"
_SINGLE_ATTN = _SINGLE + r"attn\.(?:to_q|to_k|to_v)"
_SINGLE_ALL = _SINGLE + r"(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)"
_CLIP_PREFIX = r"(?:text_model\.)?encoder\.layers\.\d+\."
_CLIP_ATTENTION = _CLIP_PREFIX + r"self_attn\.(?:q_proj|k_proj|v_proj|out_proj)"
_CLIP_ALL = _CLIP_PREFIX + r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"
# T5 (never trained by default: kohya trains it only with --train_t5xxl); kohya's T5Attention + T5DenseGatedActDense.
_T5_ATTENTION = r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.(?:q|k|v|o)"
_T5_ALL = r"encoder\.block\.\d+\.layer\.(?:0\.SelfAttention\.(?:q|k|v|o)|1\.DenseReluDense\.(?:wi_0|wi_1|wo))"

# diffusers module (relative to its block) → BFL module name (kohya/ComfyUI), for double and single blocks.
_DOUBLE_NAMES = {
    "attn.to_q": "img_attn_qkv", "attn.to_k": "img_attn_qkv", "attn.to_v": "img_attn_qkv",
    "attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin",
    "attn.add_q_proj": "txt_attn_qkv", "attn.add_k_proj": "txt_attn_qkv", "attn.add_v_proj": "txt_attn_qkv",
    "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2",
    "norm1_context.linear": "txt_mod_lin",
}
_SINGLE_NAMES = {"attn.to_q": "linear1", "attn.to_k": "linear1", "attn.to_v": "linear1", "proj_mlp": "linear1",
                 "proj_out": "linear2", "norm.linear": "modulation_lin"}
# The fused BFL modules, their diffusers parts in the order of the fused output rows.
_FUSED_DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FUSED_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_BLOCK_PATH = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def bfl_name(module_path: str) -> tuple[str, tuple[str, ...] | None, int]:
    """(BFL module name with '_' separators, the fused group it belongs to or None, index in that group)."""
    match = _BLOCK_PATH.fullmatch(module_path)
    if match is None:
        raise ValueError(f"'{module_path}' is not in a Flux double or single block (kohya names only those)")
    kind, index, rest = match.groups()
    names, fused, prefix = ((_DOUBLE_NAMES, _FUSED_DOUBLE, "double_blocks") if kind == "transformer_blocks"
                            else (_SINGLE_NAMES, _FUSED_SINGLE, "single_blocks"))
    try:
        name = names[rest]
    except KeyError:
        raise ValueError(f"'{module_path}' has no BFL/kohya name") from None
    group = fused.get(name)
    return f"{prefix}_{index}_{name}", group, group.index(rest) if group else 0


def _fused_widths(config: Mapping[str, Any], name: str) -> tuple[int, ...]:
    """Output widths of a fused module's parts: qkv = 3 x inner; linear1 = 3 x inner + the MLP width (4 x inner)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return (inner,) * 3 + ((4 * inner,) if name.endswith("linear1") else ())


class FluxFamily(Family):
    """FLUX.1: FluxTransformer2DModel, CLIP-L (pooled) + T5-XXL (states), the 16-channel VAE with shift/scale."""

    # DDPM ideas (noise offset, min-SNR weighting) and the CLIP-only caption options (75-token pieces, clip skip):
    # the flow objective weighs σ through training.flow_*, and T5 reads the long captions.
    ignored_training_options = ("noise_offset", "min_snr_gamma", "max_token_length", "clip_skip")
    denoiser_name = "transformer"
    compile_block_classes = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}
    prediction_types = (PREDICTION,)
    tiny_prediction_types = (PREDICTION,)
    vae_overflow_hint = "the Flux VAE is run in fp32 here; a non-finite latent means the image or the VAE file is damaged"

    def __init__(self, *, name: str, label: str, short_label: str, listed_as: str, variant: str, guidance: bool,
                 t5_length: int, preview: PreviewDefaults, config_folder: str, parameters: Mapping[str, float],
                 activations: tuple[float, float]):
        self.name, self.label, self.short_label, self.listed_as = name, label, short_label, listed_as
        self.variant = variant  # "dev" | "schnell": the modelspec id and kohya's model_config
        self.guidance_embeds = guidance
        self.t5_length = t5_length  # FluxPipeline's max_sequence_length: dev 512, schnell 256
        self.preview = preview
        self._config_folder = config_folder
        self._parameters = dict(parameters)
        self._activations = activations

    # ------------------------------------------------------------------------------------ what a model is

    def parts(self) -> tuple[Part, ...]:
        return (Part("transformer", "transformer (FLUX.1 DiT)", "denoiser"),
                Part("text_encoder", "text encoder (CLIP ViT-L)", "text_encoder"),
                Part("text_encoder_2", "second text encoder (T5-XXL)", "text_encoder"),
                Part("vae", "VAE (16-channel autoencoder, 'ae')", "vae"))

    def native_resolution(self, prediction_type: str | None = None) -> int:
        return 1024

    def trainable_text_encoders(self) -> tuple[str, ...]:
        # kohya trains T5 only on request (--train_t5xxl): 4.7 B parameters, and diffusers' Flux loader has no
        # T5 LoRA slot. "Train the text encoder" means CLIP-L here.
        return ("text_encoder",)

    # ------------------------------------------------------------------------------------------ detection

    def detect_file(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], filename: str,
                    tensor: Callable[[str], torch.Tensor] | None) -> "Detection | None":
        from studio.engine.families.flux_files import detect_flux_file

        return detect_flux_file(self, shapes, metadata, filename)

    def detect_folder(self, folder: Path, model_index: Mapping[str, Any]) -> bool:
        config = self.denoiser_config(folder)
        if not config or config.get("_class_name") != "FluxTransformer2DModel":
            return False
        return bool(config.get("guidance_embeds")) == self.guidance_embeds

    def lora_metadata_evidence(self, metadata: Mapping[str, str]) -> int:
        arch = metadata.get("modelspec.architecture", "")
        if arch.startswith(f"flux-1-{self.variant}"):
            return 2
        # kohya writes ss_base_model_version "flux1" for both; [dev] is the one most LoRAs are for.
        return 1 if self.guidance_embeds and metadata.get("ss_base_model_version", "").startswith("flux1") else 0

    def lora_key_evidence(self, shapes: Mapping[str, tuple[int, ...]], layout: str) -> int:
        keys = list(shapes)
        if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys) or any(
                ".single_transformer_blocks." in k or k.startswith("single_transformer_blocks.") for k in keys):
            # The two variants share every LoRA key; ties go to the earlier family (dev).
            return 3
        return 0

    # -------------------------------------------------------------------------------------------- loading

    def part_files(self, path: Path, model: "ModelSection") -> dict[str, Path | None]:
        from studio.engine.families.flux_files import transformer_layout, resolve_parts
        from studio.engine.safe_load import open_weights

        path = Path(path).expanduser()
        if not path.is_file():
            return {}  # a diffusers folder has every part
        shapes = open_weights(path).shapes
        if transformer_layout(shapes) is None:
            return {}
        parts = resolve_parts(self, path, model)
        return {name: parts[name] for name in ("text_encoder", "text_encoder_2", "vae") if name in parts}

    def bundled_config_dir(self, prediction_type: str | None = None) -> Path:
        return resource_path("model_configs", self._config_folder)

    def load_folder(self, path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
        from studio.engine.families import flux_files

        with quiet_diffusers():
            return flux_files.load_folder(self, path, model, dtype)

    def load_single_file(self, path: Path, weights: "WeightsFile", detection: "Detection", model: "ModelSection",
                         dtype: torch.dtype) -> ModelBundle:
        from studio.engine.families import flux_files

        with quiet_diffusers():
            return flux_files.load_single_file(self, path, weights, detection, model, dtype)

    # -------------------------------------------------------------------------------------- conditioning

    def t5_max_length(self, bundle: ModelBundle) -> int:
        """The T5 sequence length: the family's (FluxPipeline's max_sequence_length), capped by the tokenizer's."""
        return min(self.t5_length, int(getattr(bundle.tokenizers[1], "model_max_length", self.t5_length)))

    def encode_text(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """As FluxPipeline.encode_prompt: CLIP-L's pooled output, T5's last hidden states (padded to max length)."""
        clip, t5 = bundle.text_encoders
        clip_tok, t5_tok = bundle.tokenizers
        ids = clip_tok(captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
        length = self.t5_max_length(bundle)
        t5_ids = t5_tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        states = t5(t5_ids.to(t5.device), output_hidden_states=False)[0]
        return Conditioning(t5=states, pooled=pooled)

    # ---------------------------------------------------------------------------------------- objective

    def flow_sampling(self, training: "TrainingSection", scheduler_config: Mapping[str, Any]) -> flow.FlowSampling:
        """The job's σ sampling; ``auto`` follows the model's scheduler: dev shifts by resolution, schnell's
        schedule is unshifted (a constant shift of 1)."""
        return flow.family_sampling(training, scheduler_config, 1.0)

    def training_loss(self, bundle: ModelBundle, denoiser: Any, latents: torch.Tensor, cond: Conditioning, *,
                      training: "TrainingSection", generator: torch.Generator,
                      weight_dtype: torch.dtype) -> torch.Tensor:
        """Rectified flow on packed latents, as diffusers' train_dreambooth_lora_flux.py and kohya's flux trainer."""
        from diffusers import FluxPipeline

        latents = flow.even_part(latents)
        b, c, h, w = latents.shape
        sched = bundle.noise_scheduler.config
        draw = flow.draw(latents, self.flow_sampling(training, sched), generator, (h // 2) * (w // 2),
                         flow.scheduler_shift(sched))
        device = latents.device
        packed = FluxPipeline._pack_latents(draw.noisy, b, c, h, w).to(weight_dtype)
        target = FluxPipeline._pack_latents(draw.target, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, weight_dtype)
        states = cond["t5"]
        txt_ids = torch.zeros(states.shape[1], 3, device=device, dtype=weight_dtype)
        # The transformer multiplies timestep and guidance by 1000 itself: it takes σ, and the guidance value.
        guidance = (torch.full((b,), training.guidance, device=device, dtype=weight_dtype)
                    if bundle.denoiser.config.guidance_embeds else None)
        pred = denoiser(hidden_states=packed, timestep=draw.sigmas.to(device, weight_dtype), guidance=guidance,
                        pooled_projections=cond["pooled"], encoder_hidden_states=states, txt_ids=txt_ids,
                        img_ids=img_ids, return_dict=False)[0]
        return flow.flow_loss(pred, target, draw.weights)

    # --------------------------------------------------------------------------------------------- LoRA

    def lora_targets(self, preset: str, component: str) -> str:
        if component == "transformer":
            if preset == "attention":
                return f"(?:{_DOUBLE}{_DOUBLE_ATTN}|{_SINGLE_ATTN})"
            return f"(?:{_DOUBLE_ALL}|{_SINGLE_ALL})"  # no convolutions in a DiT: "+conv" is kohya-default
        if component == "text_encoder":
            return _CLIP_ATTENTION if preset == "attention" else _CLIP_ALL
        if component == "text_encoder_2":
            return _T5_ATTENTION if preset == "attention" else _T5_ALL
        raise ValueError(f"unknown model component '{component}'; expected one of: {', '.join(self.component_names())}")

    def apply_speed_options(self, bundle: ModelBundle, training: "TrainingSection", train_text_encoder: bool) -> None:
        from studio.engine.families import memory

        denoiser = bundle.denoiser
        if training.base_weights_fp8:  # on the host in a run (see place_denoiser): only fp8 reaches the device
            memory.store_frozen_in_fp8(denoiser, denoiser.dtype)
        if training.gradient_checkpointing:
            bundle.denoiser.enable_gradient_checkpointing()
            if train_text_encoder:
                bundle.text_encoders[0].gradient_checkpointing_enable()

    def store_frozen_on_host(self, bundle: ModelBundle, training: "TrainingSection") -> None:
        from studio.engine.families import memory

        t5 = bundle.text_encoders[1]
        if training.base_weights_fp8 and t5 is not None:  # T5 is never trained here (trainable_text_encoders)
            memory.store_t5_in_fp8(t5, t5.dtype)
            bundle.extra["text_storage"] = "t5-fp8"

    def text_encoder_weight_bytes(self, training: "TrainingSection", weight_bytes: int) -> float:
        from studio.engine.families import memory

        others = self._parameters["text_encoders"] - memory.T5_XXL_PARAMETERS
        return others * weight_bytes + memory.t5_bytes(training.base_weights_fp8, weight_bytes)

    def place_denoiser(self, bundle: ModelBundle, training: "TrainingSection", device: "torch.device | str") -> None:
        from studio.engine.families import memory

        denoiser = bundle.denoiser
        blocks = [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]
        memory.place_swapping(bundle, blocks, training.block_swap, device)

    # ------------------------------------------------------------------------------------------- export
    # kohya layout (sd-scripts networks/lora_flux.py; ComfyUI's comfy/lora.py maps these to the BFL model's keys;
    # diffusers' _convert_kohya_flux_lora_to_diffusers splits them back): ``lora_unet_`` + BFL module path with
    # '_' separators, e.g. ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_3_linear1``.
    # diffusers keeps q, k, v (and the single blocks' MLP input) as separate Linears where BFL has one fused
    # Linear; their LoRAs become one fused LoRA of rank n·r: down = the n downs stacked, up = block-diagonal,
    # alpha = n·α (so alpha/rank is unchanged). That is exactly the fused update, and the form kohya's own
    # split_qkv option writes, which diffusers recognises as "sparse" and splits losslessly.
    # CLIP-L is ``lora_te1_text_model_…`` as in kohya; T5 (when trained) ``lora_te3_encoder_…``.

    def kohya_name(self, component: str, module_path: str, denoiser_config: Any = None) -> str:
        if component == "transformer":
            return "lora_unet_" + bfl_name(module_path)[0]
        if component == "text_encoder":
            return "lora_te1_text_model_" + module_path.removeprefix("text_model.").replace(".", "_")
        if component == "text_encoder_2":
            return "lora_te3_" + module_path.replace(".", "_")
        raise ValueError(f"{self.label} has no component '{component}'")

    def kohya_modules(self, layers: list[tuple[str, str, torch.Tensor, torch.Tensor, float]],
                      denoiser_config: Any = None) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
        fused: dict[str, list] = {}
        out: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []
        for component, path, down, up, alpha in layers:
            if component != "transformer":
                out.append((self.kohya_name(component, path), down, up, alpha))
                continue
            name, group, index = bfl_name(path)
            if group is None:
                out.append(("lora_unet_" + name, down, up, alpha))
            else:
                fused.setdefault(name, [None] * len(group))[index] = (down, up, alpha)
        for name, members in fused.items():
            out.append(("lora_unet_" + name, *_fuse(members, _fused_widths(denoiser_config, name), name)))
        return out

    def diffusers_lora_key(self, component: str, name: str) -> str:
        if component == "text_encoder" and not name.startswith("text_model."):
            name = "text_model." + name  # the layout diffusers' Flux loader and ComfyUI expect for CLIP-L
        return name

    def metadata_ids(self, prediction_type: str) -> dict[str, str]:
        return {
            "ss_base_model_version": "flux1",  # kohya's MODEL_VERSION_FLUX_V1, for dev and schnell alike
            "ss_v2": "False",
            "modelspec.architecture": f"flux-1-{self.variant}/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
            # kohya writes no prediction type for Flux; "flow" says what the model predicts without claiming eps/v.
            "modelspec.prediction_type": PREDICTION,
        }

    # ------------------------------------------------------------------------------------------ preview

    def pipeline(self, bundle: ModelBundle) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(bundle.noise_scheduler.config), vae=bundle.vae,
            text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0],
            text_encoder_2=bundle.text_encoders[1], tokenizer_2=bundle.tokenizers[1], transformer=bundle.denoiser,
        )

    def image_size_multiple(self, bundle: ModelBundle) -> int:
        return flow.patched_pixels(bundle.vae)

    def preview_embeds(self, bundle: ModelBundle, prompts: list[str], negative_prompt: str) -> dict[str, Any] | None:
        cond = self.encode_text(bundle, prompts)  # what FluxPipeline.encode_prompt computes (no negative: distilled)
        return {"prompt_embeds": cond["t5"], "pooled_prompt_embeds": cond["pooled"]}

    def pipeline_kwargs(self, *, negative_prompt: str, guidance: float, lora_scale: float | None) -> dict[str, Any]:
        # Flux is guidance-distilled: guidance_scale feeds dev's guidance embedding (schnell ignores it); no
        # negative prompt without true CFG. T5 length as the family's pipeline uses it.
        kwargs: dict[str, Any] = {"guidance_scale": guidance if self.guidance_embeds else 0.0,
                                  "max_sequence_length": self.t5_length}
        if lora_scale is not None:
            kwargs["joint_attention_kwargs"] = {"scale": lora_scale}
        return kwargs

    # --------------------------------------------------------------------------------------- cost model

    def meta_denoiser(self, config: Mapping[str, Any]) -> Any:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_config(dict(config)).eval()

    def denoiser_example_inputs(self, config: Mapping[str, Any], batch: int, latent_h: int,
                                latent_w: int) -> tuple[tuple, dict]:
        tokens = (latent_h // 2) * (latent_w // 2)
        kwargs = {
            "hidden_states": torch.empty(batch, tokens, config["in_channels"]),
            "encoder_hidden_states": torch.empty(batch, self.t5_length, config["joint_attention_dim"]),
            "pooled_projections": torch.empty(batch, config["pooled_projection_dim"]),
            "timestep": torch.zeros(batch), "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(self.t5_length, 3),
            "guidance": torch.zeros(batch) if config.get("guidance_embeds") else None,
        }
        return (), kwargs

    def full_size_parameters(self) -> dict[str, float]:
        return dict(self._parameters)

    def job_defaults(self) -> dict[str, Any]:
        # kohya's flux_train_network and diffusers' Flux DreamBooth LoRA script: 1024 px, rank 16, lr 1e-4 constant,
        # logit-normal σ; dev trains at guidance 1 (its distilled guidance input); fp8 base weights and gradient
        # checkpointing to fit ~16 GB (block swap on top for 12 GB). No SNR weighting or noise offset: DDPM ideas.
        values = {**super().job_defaults(), "lora.rank": 16, "lora.alpha": 16.0, "training.lr": 1e-4,
                  "training.scheduler": "constant", "training.flow_timestep_sampling": "logit_normal",
                  "training.flow_shift": "auto", "training.gradient_checkpointing": True,
                  "training.base_weights_fp8": True, "training.mixed_precision": "bf16",
                  "training.min_snr_gamma": 0.0, "training.noise_offset": 0.0}
        if self.guidance_embeds:
            values["training.guidance"] = 1.0
        return values

    def preview_batch_factor(self, guidance: float) -> int:
        return 1  # guidance-distilled: the guidance value is an input, one forward per step

    def denoiser_weight_bytes(self, training: "TrainingSection", weight_bytes: int) -> float:
        """fp8 storage keeps 1 byte per frozen weight; swapped blocks live in CPU memory (one on the GPU at a time).
        FLUX.1's 57 blocks hold ~96 % of its parameters."""
        params = self._parameters["denoiser"]
        per_param = 1 if training.base_weights_fp8 else weight_bytes
        block_share = 0.96 * params / 57
        resident = params - block_share * max(0, min(training.block_swap, 57) - 1)
        return resident * per_param

    def activation_gib(self, gradient_checkpointing: bool) -> float:
        return self._activations[1 if gradient_checkpointing else 0]

    # ---------------------------------------------------------------------------------------- test model

    def build_tiny(self, prediction_type: str = PREDICTION, seed: int = 0) -> Any:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from studio.engine.families.flux_files import SCHEDULER_CONFIGS
        from studio.engine.families.t5_tiny import tiny_t5_tokenizer
        from studio.engine.tokenizers import load_tokenizer

        torch.manual_seed(seed)
        # 4 latent channels (Flux: 16) packed 2x2 → 16 transformer channels; head dim 16 = the rope axes' sum.
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=_TINY_TEXT_DIM, pooled_projection_dim=_TINY_TEXT_DIM,
            guidance_embeds=self.guidance_embeds, axes_dims_rope=(4, 4, 8),
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=TINY_RESOLUTION,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )
        with torch.no_grad():
            # A trained VAE's posterior is narrow; a random one's (log-variance ≈ 0) would bury the images in
            # sampling noise and leave nothing to learn. Its encoder's last conv outputs mean, then log-variance.
            vae.encoder.conv_out.bias[4:] = -12.0
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=_TINY_TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=_TINY_TEXT_DIM,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        ))
        t5_tokenizer = tiny_t5_tokenizer(_TINY_T5_LENGTH)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=_TINY_TEXT_DIM, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        ))
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[self.variant]), vae=vae, text_encoder=clip,
            tokenizer=load_tokenizer("clip-l"), text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer,
        )

    def save_tiny(self, folder: Path, prediction_type: str = PREDICTION, seed: int = 0) -> Path:
        import shutil

        from studio.engine.tokenizers import write_tokenizer

        folder = super().save_tiny(folder, prediction_type, seed)
        shutil.rmtree(folder / "tokenizer")  # vocab + merges, as real folders ship CLIP's tokenizer
        write_tokenizer("clip-l", folder / "tokenizer")
        return folder

    def warm_up(self) -> None:
        import diffusers
        import transformers

        for module, names in ((diffusers, ("AutoencoderKL", "FlowMatchEulerDiscreteScheduler", "FluxPipeline",
                                            "FluxTransformer2DModel")),
                              (transformers, ("CLIPTextModel", "CLIPTokenizer", "T5EncoderModel", "T5TokenizerFast"))):
            for name in names:
                getattr(module, name)


def _fuse(members: list, widths: tuple[int, ...], name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA for a fused Linear from its parts' LoRAs: stacked downs, block-diagonal up, alpha x parts."""
    present = [m for m in members if m is not None]
    rank = present[0][0].shape[0]
    alpha = present[0][2]
    if any(m[0].shape[0] != rank or m[2] != alpha for m in present):
        raise ValueError(f"{name}: the fused parts' LoRAs differ in rank or alpha; kohya's layout needs them equal")
    n, in_features = len(members), present[0][0].shape[1]
    down = present[0][0].new_zeros(n * rank, in_features)
    up = present[0][1].new_zeros(sum(widths), n * rank)
    row = 0
    for i, (member, width) in enumerate(zip(members, widths)):
        if member is not None:  # a part without a LoRA (e.g. the MLP input under "attention") stays zero
            down[i * rank:(i + 1) * rank] = member[0]
            up[row:row + width, i * rank:(i + 1) * rank] = member[1]
        row += width
    return down, up, alpha * n


# Reference sizes: FLUX.1 transformer 11.90 B parameters, CLIP-L 123 M + T5-XXL encoder 4.76 B, the VAE 83.8 M.
# Activations per 1024 px image (bf16, GiB, without/with gradient checkpointing) are NOT measured yet (no GPU was
# available): 30 / 2 are estimates from 4096 image + 512 text tokens x 3072 wide x 57 blocks; measure them on a GPU
# (benchmarks/) before trusting the estimate's ≤ 12 GB claims.
_PARAMETERS = {"denoiser": 11.90e9, "text_encoders": 123.1e6 + 4.76e9, "vae": 83.8e6}
FLUX_DEV = FluxFamily(
    name="flux-dev", label="FLUX.1 [dev]", short_label="FLUX.1 dev", listed_as="FLUX.1 [dev]", variant="dev",
    guidance=True, t5_length=512, preview=PreviewDefaults(steps=28, guidance=3.5, sampler="flow-euler"),
    config_folder="flux-dev", parameters=_PARAMETERS, activations=(30.0, 2.0),
)
FLUX_SCHNELL = FluxFamily(
    name="flux-schnell", label="FLUX.1 [schnell]", short_label="FLUX.1 schnell", listed_as="[schnell]",
    variant="schnell", guidance=False, t5_length=256, preview=PreviewDefaults(steps=4, guidance=0.0, sampler="flow-euler"),
    config_folder="flux-schnell", parameters=_PARAMETERS, activations=(30.0, 2.0),
)
