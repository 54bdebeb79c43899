"""Stable Diffusion 3 Medium, 3.5 Medium and 3.5 Large: an MMDiT denoising 16-channel latents by rectified flow.

Three text encoders condition it: CLIP-L and CLIP-G (penultimate states side by side, their pooled outputs
joined as the pooled projection) and T5-XXL (optional: without it the pipeline uses zeros in its place, as
diffusers' StableDiffusion3Pipeline does when ``text_encoder_3`` is None). The three models differ only in data
(depth, width, q/k norm, SD3.5 Medium's second attention), so they are objects of one class, told apart by their
transformer's config or shapes. LoRA names: kohya's ``lora_sd3`` layout on Stability's MMDiT (sd3_names.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from studio.engine.families.base import Conditioning, Family, ModelBundle, Part, PreviewDefaults
from studio.engine.families.loading import quiet_diffusers
from studio.engine.families.sd import _TE_ALL, _TE_ATTENTION, tokenize
from studio.engine.families.sd3_names import mmdit_path, swaps_scale_shift
from studio.paths import resource_path

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection, TrainingSection
    from studio.engine.detect import Detection
    from studio.engine.safe_load import WeightsFile

PREDICTION = "flow"  # rectified flow: the network predicts the velocity noise - x
T5_MAX_LENGTH = 256  # the pipeline's default max_sequence_length, so training sees what previews see
TIMESTEP_SCALE = 1000  # the transformer takes σ · 1000 as its timestep (num_train_timesteps)

# Where each part lives in Stability's all-in-one single files (and ComfyUI checkpoints).
FILE_PREFIXES = {
    "transformer": ("model.diffusion_model.",),
    "vae": ("first_stage_model.",),
    "text_encoder": ("text_encoders.clip_l.",),
    "text_encoder_2": ("text_encoders.clip_g.",),
    "text_encoder_3": ("text_encoders.t5xxl.",),
}

# ------------------------------------------------------------------------------------------ LoRA targets
# kohya's lora_sd3 adapts every Linear inside the MMDiT's SingleDiTBlocks (the x_block and context_block of each
# joint block): attention qkv and proj (and SD3.5 Medium's attn2), both MLP layers and the adaLN modulation.
# In diffusers names that is the list below; a kohya "qkv" is three diffusers modules (to_q/to_k/to_v).
_BLOCK = r"transformer_blocks\.\d+\."
_ATTENTION = (_BLOCK + r"(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
              r"|attn2\.(?:to_q|to_k|to_v|to_out\.0))")
_KOHYA_DEFAULT = (_BLOCK + r"(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                  r"|attn2\.(?:to_q|to_k|to_v|to_out\.0)|ff(?:_context)?\.net\.(?:0\.proj|2)"
                  r"|norm1(?:_context)?\.linear)")
# T5 (kohya's T5Attention and T5DenseGatedActDense children), for completeness: not trained by default.
_T5_ATTENTION = r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.(?:q|k|v|o)"
_T5_ALL = r"encoder\.block\.\d+\.layer\.(?:0\.SelfAttention\.(?:q|k|v|o)|1\.DenseReluDense\.(?:wi_0|wi_1|wo))"
_KOHYA_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # kohya's id for SAI-named SD3 LoRAs


def tiny_t5_tokenizer() -> Any:
    """A small T5-style (Unigram, sentencepiece-like) tokenizer built in code, for the tiny test models.

    The real T5 vocabulary (google/t5-v1_1-xxl's spiece.model) is not bundled; tests need none of it.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "▁"] + list(string.ascii_lowercase) + [
        "▁" + c for c in string.ascii_lowercase] + list(string.digits) + list(".,!?'-:;()")
    # Unigram scores: longer "▁x" pieces are preferred over "▁" + "x" by being listed (scored) higher.
    vocab = [(piece, 0.0 if i < 3 else -float(i)) for i, piece in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=T5_MAX_LENGTH)


class SD3Family(Family):
    """SD3.x: MMDiT transformer, CLIP-L + CLIP-G (+ optional T5-XXL), 16-channel VAE; rectified flow, SD3 shift."""

    # DDPM ideas (noise offset, min-SNR weighting) and the CLIP-only caption options (75-token pieces, clip skip):
    # the flow objective weighs σ through training.flow_*, and T5 reads the long captions.
    ignored_training_options = ("noise_offset", "min_snr_gamma", "max_token_length", "clip_skip")
    denoiser_name = "transformer"
    compile_block_classes = ("JointTransformerBlock",)
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # kohya's lora_sd3 prefixes; lora_te3 (T5) is only read: lora.train_text_encoder adapts the CLIPs
    # (trainable_text_encoders), as kohya does unless asked, and diffusers' SD3 loader has no T5 LoRA.
    kohya_prefixes: Mapping[str, str] = {"transformer": "lora_unet", "text_encoder": "lora_te1",
                                         "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}
    prediction_types = (PREDICTION,)
    tiny_prediction_types = (PREDICTION,)
    vae_overflow_hint = "SD3's VAE overflows in fp16 — train in bf16 or keep the VAE in fp32"

    def __init__(self, *, name: str, label: str, short_label: str, listed_as: str, config_folder: str,
                 lora_ids: tuple[str, str], checkpoint_architecture: str, preview: PreviewDefaults,
                 qk_norm: bool, dual_attention: bool, depth: int, width: int,
                 parameters: Mapping[str, float], activations: tuple[float, float]):
        self.name, self.label, self.short_label, self.listed_as = name, label, short_label, listed_as
        self._config_folder = config_folder
        self._lora_ids = lora_ids  # (ss_base_model_version, modelspec.architecture without "/lora")
        self._checkpoint_architecture = checkpoint_architecture
        self.preview = preview
        self._qk_norm, self._dual_attention = qk_norm, dual_attention  # what tells the three apart
        self._depth, self._width = depth, width  # the reference size (a single file of other sizes needs a config)
        self._parameters = dict(parameters)
        self._activations = activations

    # ------------------------------------------------------------------------------------ what a model is

    def parts(self) -> tuple[Part, ...]:
        return (
            Part("transformer", "MMDiT transformer", "denoiser"),
            Part("text_encoder", "text encoder (CLIP-L)", "text_encoder"),
            Part("text_encoder_2", "second text encoder (CLIP-G)", "text_encoder"),
            Part("text_encoder_3", "third text encoder (T5-XXL, optional)", "text_encoder", required=False),
            Part("vae", "VAE (16 channels)", "vae"),
        )

    def trainable_text_encoders(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2")

    def native_resolution(self, prediction_type: str | None = None) -> int:
        return 1024

    def variant_matches(self, qk_norm: bool, dual_attention: bool) -> bool:
        """Whether a transformer with these traits is this family's model (they are told apart by them)."""
        return (qk_norm, dual_attention) == (self._qk_norm, self._dual_attention)

    # ------------------------------------------------------------------------------------------ detection

    def detect_file(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], filename: str,
                    tensor: Callable[[str], torch.Tensor] | None) -> "Detection | None":
        from studio.engine.families.sd3_loading import detect_sd3_file

        return detect_sd3_file(self, shapes, metadata, filename)

    def detect_folder(self, folder: Path, model_index: Mapping[str, Any]) -> bool:
        config = self.denoiser_config(folder)
        if not config or config.get("_class_name") != "SD3Transformer2DModel":
            return False
        return self.variant_matches(bool(config.get("qk_norm")), bool(config.get("dual_attention_layers")))

    def file_component_prefixes(self) -> Mapping[str, tuple[str, ...]]:
        return FILE_PREFIXES

    def lora_metadata_evidence(self, metadata: Mapping[str, str]) -> int:
        version, architecture = self._lora_ids
        arch = metadata.get("modelspec.architecture", "")
        if arch.startswith(architecture + "/") or arch == architecture or metadata.get("ss_base_model_version") == version:
            return 2
        return 0

    def lora_key_evidence(self, shapes: Mapping[str, tuple[int, ...]], layout: str) -> int:
        keys = list(shapes)
        sd3 = any("joint_blocks_" in k or ("transformer_blocks." in k and ("add_q_proj" in k or "to_add_out" in k))
                  for k in keys)
        if not sd3:
            return 0
        widths = {shape[1] for k, shape in shapes.items()
                  if re.search(r"(attn_qkv|attn\.to_q)\.(lora_down|lora_A)\.weight$", k) and len(shape) == 2}
        attn2 = any("attn2" in k for k in keys)
        if self._width not in widths and widths:
            return 0
        if self._dual_attention:
            return 3 if attn2 else 1
        return 2 if not attn2 else 0

    # -------------------------------------------------------------------------------------------- loading

    def part_files(self, path: Path, model: "ModelSection") -> dict[str, Path | None]:
        """CLIP-L, CLIP-G, T5-XXL (optional) and VAE files a single file lacks (or the job names), found or chosen."""
        from studio.engine.families.sd3_loading import resolve_parts
        from studio.engine.safe_load import open_weights

        path = Path(path).expanduser()
        if not path.is_file():
            return {}  # a diffusers folder has every part
        shapes = open_weights(path).shapes
        if not any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in shapes):
            return {}
        return resolve_parts(self, path, shapes, model)

    def bundled_config_dir(self, prediction_type: str | None = None) -> Path:
        return resource_path("model_configs", self._config_folder)

    def load_folder(self, path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
        from studio.engine.families import sd3_loading

        with quiet_diffusers():
            return sd3_loading.load_folder(self, path, model, dtype)

    def load_single_file(self, path: Path, weights: "WeightsFile", detection: "Detection", model: "ModelSection",
                         dtype: torch.dtype) -> ModelBundle:
        from studio.engine.families import sd3_loading

        with quiet_diffusers():
            return sd3_loading.load_single_file(self, path, weights, detection, model, dtype)

    # -------------------------------------------------------------------------------------- conditioning

    def encode_text(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """As StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G penultimate states side by side, zero-padded
        to T5's width, then T5's states (or zeros without T5) after them; pooled = both CLIP pooled outputs."""
        states, pooled = [], []
        for encoder, tokenizer in zip(bundle.text_encoders[:2], bundle.tokenizers[:2]):
            out = encoder(tokenize(tokenizer, captions).to(encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        width = bundle.denoiser.config.joint_attention_dim
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        t5 = bundle.text_encoders[2] if len(bundle.text_encoders) > 2 else None
        if t5 is None:
            t5_states = torch.zeros(len(captions), T5_MAX_LENGTH, width, device=clip.device, dtype=clip.dtype)
        else:
            ids = bundle.tokenizers[2](captions, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                                       add_special_tokens=True, return_tensors="pt").input_ids
            t5_states = t5(ids.to(t5.device))[0].to(clip.dtype)
        return Conditioning(hidden=torch.cat([clip, t5_states.to(clip.device)], dim=1), pooled=torch.cat(pooled, dim=-1))

    # ---------------------------------------------------------------------------------------- objective

    def training_loss(self, bundle: ModelBundle, denoiser: Any, latents: torch.Tensor, cond: Conditioning, *,
                      training: "TrainingSection", generator: torch.Generator,
                      weight_dtype: torch.dtype) -> torch.Tensor:
        """Rectified flow as diffusers' train_dreambooth_lora_sd3.py: σ from the job's density with the model's
        scheduler's shift (SD3: the constant 3.0; ``resolution`` as StableDiffusion3Pipeline's dynamic shifting, from
        the patched latent's token count), ``(1 - σ) x + σ ε`` in, the velocity ``ε - x`` out, optionally weighted."""
        from studio.engine.families import flow

        latents = flow.even_part(latents)
        sched = bundle.noise_scheduler.config
        sampling = flow.family_sampling(training, sched, training.flow_shift_value)
        patch = bundle.denoiser.config.patch_size
        tokens = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        draw = flow.draw(latents, sampling, generator, tokens, flow.scheduler_shift(sched))
        timesteps = (draw.sigmas * TIMESTEP_SCALE).to(latents.device)
        pred = denoiser(hidden_states=draw.noisy.to(weight_dtype), timestep=timesteps,
                        encoder_hidden_states=cond["hidden"], pooled_projections=cond["pooled"],
                        return_dict=False)[0]
        return flow.flow_loss(pred, draw.target, draw.weights)

    # --------------------------------------------------------------------------------------------- LoRA

    def lora_targets(self, preset: str, component: str) -> str:
        if component == "transformer":
            # The MMDiT has no convolutions in its blocks (only the patch embedding), so "+conv" adds nothing.
            return _ATTENTION if preset == "attention" else _KOHYA_DEFAULT
        if component == "text_encoder_3":
            return _T5_ATTENTION if preset == "attention" else _T5_ALL
        if component in self.component_names():
            return _TE_ATTENTION if preset == "attention" else _TE_ALL
        raise ValueError(f"unknown model component '{component}'; expected one of: {', '.join(self.component_names())}")

    def apply_speed_options(self, bundle: ModelBundle, training: "TrainingSection", train_text_encoder: bool) -> None:
        from studio.engine.families import memory

        denoiser = bundle.denoiser
        # SD3.5 Large (8 B) on a consumer GPU: flux's fp8 storage and block swap apply to the joint blocks alike.
        if training.base_weights_fp8:  # on the host in a run (see place_denoiser): only fp8 reaches the device
            memory.store_frozen_in_fp8(denoiser, denoiser.dtype)
        if training.gradient_checkpointing:
            bundle.denoiser.enable_gradient_checkpointing()
            if train_text_encoder:
                for te in bundle.text_encoders[:2]:
                    te.gradient_checkpointing_enable()

    def store_frozen_on_host(self, bundle: ModelBundle, training: "TrainingSection") -> None:
        from studio.engine.families import memory

        t5 = (bundle.text_encoders[2] if len(bundle.text_encoders) > 2 else None)
        if training.base_weights_fp8 and t5 is not None:  # T5 is never trained here (trainable_text_encoders)
            memory.store_t5_in_fp8(t5, t5.dtype)
            bundle.extra["text_storage"] = "t5-fp8"

    def text_encoder_weight_bytes(self, training: "TrainingSection", weight_bytes: int) -> float:
        from studio.engine.families import memory

        others = self._parameters["text_encoders"] - memory.T5_XXL_PARAMETERS
        return others * weight_bytes + memory.t5_bytes(training.base_weights_fp8, weight_bytes)

    def place_denoiser(self, bundle: ModelBundle, training: "TrainingSection", device: "torch.device | str") -> None:
        from studio.engine.families import memory

        memory.place_swapping(bundle, list(bundle.denoiser.transformer_blocks), training.block_swap, device)

    # ------------------------------------------------------------------------------------------- export
    # kohya layout (sd-scripts networks/lora_sd3.py; ComfyUI's model_lora_keys_unet maps lora_unet_<MMDiT path>
    # onto the model's own keys, lora_te1_/lora_te2_ onto clip_l/clip_g): lora_unet_joint_blocks_N_x_block_attn_qkv
    # etc., one fused qkv per stream. CLIP-L/G names keep `text_model_` as in SDXL.

    def kohya_name(self, component: str, module_path: str, denoiser_config: Any = None) -> str:
        if component == "transformer":
            return "lora_unet_" + mmdit_path(module_path)[0].replace(".", "_")
        if component == "text_encoder_3":
            return "lora_te3_" + module_path.replace(".", "_")  # ComfyUI: lora_te3_ + t5xxl.transformer.<path>
        if component not in self.component_names():
            raise ValueError(f"{self.label} has no LoRA-capable component '{component}'")
        path = module_path.removeprefix("text_model.")
        return f"{self.kohya_prefixes[component]}_text_model_{path.replace('.', '_')}"

    def kohya_modules(self, layers: list[tuple[str, str, torch.Tensor, torch.Tensor, float]],
                      denoiser_config: Any = None) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
        """q, k and v of one attention become one ``qkv`` LoRA (down stacked, up block-diagonal); the modulation
        halves diffusers keeps as (scale, shift) are swapped back to the MMDiT's (shift, scale)."""
        groups: dict[str, list[tuple[str, torch.Tensor, torch.Tensor, float]]] = {}
        for component, path, down, up, alpha in layers:
            name = self.kohya_name(component, path, denoiser_config)
            if component == "transformer":
                layers_total = _config_value(denoiser_config, "num_layers")
                if layers_total is not None and swaps_scale_shift(path, layers_total):
                    half = up.shape[0] // 2
                    up = torch.cat([up[half:], up[:half]])
            groups.setdefault(name, []).append((path, down, up, alpha))
        out = []
        for name, parts in groups.items():
            if name.startswith("lora_unet_") and name.endswith("_qkv"):
                out.append(_fused_qkv(name, parts))
            elif len(parts) == 1:
                out.append((name, *parts[0][1:]))
            else:
                raise ValueError(f"{len(parts)} modules share the kohya name '{name}'")
        return out

    def pipeline_lora(self, bundle: ModelBundle, path: Path) -> Any:
        """diffusers has no reader for kohya's SD3 layout: its modules are split back onto the diffusers layers
        (q/k/v rows of a fused qkv, modulation halves swapped), ``alpha / rank`` folded into ``up``."""
        from studio.engine.export import read_lora

        tensors, _ = read_lora(Path(path))
        if not any(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in tensors):
            return str(path)  # the diffusers layout diffusers reads itself
        return self._kohya_to_diffusers(bundle, tensors, Path(path).name)

    def _kohya_to_diffusers(self, bundle: ModelBundle, tensors: Mapping[str, torch.Tensor],
                            file_name: str) -> dict[str, torch.Tensor]:
        config = bundle.denoiser.config
        index: dict[str, list[tuple[str, str]]] = {}
        for component, model in bundle.components().items():
            if component not in (self.denoiser_name, *self.trainable_text_encoders()):
                continue
            for path, module in model.named_modules():
                if isinstance(module, torch.nn.Linear):
                    try:
                        index.setdefault(self.kohya_name(component, path, config), []).append((component, path))
                    except ValueError:
                        pass  # a layer kohya's layout has no name for
        out: dict[str, torch.Tensor] = {}
        unknown = []
        for key in tensors:
            if not key.endswith(".lora_down.weight") or key.startswith("lora_te3_"):
                continue  # T5 LoRAs: diffusers' SD3 loader has no place for them
            name = key[: -len(".lora_down.weight")]
            targets = index.get(name)
            if not targets:
                unknown.append(name)
                continue
            down, up = tensors[key], tensors[f"{name}.lora_up.weight"]
            alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(down.shape[0])
            up = up.float() * (alpha / down.shape[0])
            rows = up.shape[0] // len(targets)
            ordered = sorted(targets, key=lambda t: mmdit_path(t[1])[1] or 0 if t[0] == "transformer" else 0)
            for i, (component, path) in enumerate(ordered):
                part = up[i * rows:(i + 1) * rows]
                if component == "transformer" and swaps_scale_shift(path, config.num_layers):
                    part = torch.cat([part[rows // 2:], part[:rows // 2]])
                prefix = f"{component}.{self.diffusers_lora_key(component, path)}"
                out[f"{prefix}.lora_A.weight"] = down.float()
                out[f"{prefix}.lora_B.weight"] = part.contiguous()
        if unknown:
            raise ValueError(f"'{file_name}' has {len(unknown)} LoRA module(s) this {self.short_label} model has no "
                             f"layer for (e.g. {unknown[0]}); it was trained for another model")
        return out

    def diffusers_lora_key(self, component: str, name: str) -> str:
        from studio.engine.families.sd import SD1

        return name if component == "transformer" else SD1.diffusers_lora_key("text_encoder", name)

    def metadata_ids(self, prediction_type: str) -> dict[str, str]:
        version, architecture = self._lora_ids
        return {
            "ss_base_model_version": version,  # what kohya's sd3 trainer writes (its model type)
            "ss_v2": "False",
            "modelspec.architecture": architecture + "/lora",
            "modelspec.implementation": _KOHYA_IMPLEMENTATION,
            "modelspec.prediction_type": PREDICTION,
        }

    def checkpoint_metadata_ids(self, prediction_type: str) -> dict[str, str]:
        return {"modelspec.architecture": self._checkpoint_architecture,
                "modelspec.implementation": _KOHYA_IMPLEMENTATION, "modelspec.prediction_type": PREDICTION}

    def single_file_state_dict(self, bundle: ModelBundle, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Stability's all-in-one layout: MMDiT, VAE (LDM names) and ``text_encoders.clip_l/clip_g/t5xxl``."""
        from studio.engine.families.sd3_names import mmdit_state_dict
        from studio.engine.ldm import vae_to_ldm

        transformer = bundle.denoiser
        state = {FILE_PREFIXES["transformer"][0] + k: v
                 for k, v in mmdit_state_dict(transformer.state_dict(), transformer.config.num_layers).items()}
        state.update(vae_to_ldm(bundle.vae.state_dict(), bundle.vae.config))
        for sub, encoder in zip(self.text_encoder_names, bundle.text_encoders):
            prefix = FILE_PREFIXES[sub][0] + "transformer."
            # T5's embed_tokens is its `shared` embedding (tied): the files hold it once, as shared.weight.
            state.update({prefix + k: v for k, v in encoder.state_dict().items()
                          if not k.endswith("position_ids") and k != "encoder.embed_tokens.weight"})
        return {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
                for k, v in state.items()}

    # ------------------------------------------------------------------------------------------ preview

    def job_defaults(self) -> dict[str, Any]:
        # diffusers' SD3 LoRA script and kohya's sd3 trainer: rank 16, lr 1e-4, no SNR weighting or noise offset
        # (those are DDPM ideas; the flow objective weighs σ through training.flow_*).
        return {**super().job_defaults(), "lora.rank": 16, "lora.alpha": 16.0, "training.lr": 1e-4,
                "training.min_snr_gamma": 0.0, "training.noise_offset": 0.0}

    def pipeline(self, bundle: ModelBundle) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        t5 = bundle.text_encoders[2] if len(bundle.text_encoders) > 2 else None
        return StableDiffusion3Pipeline(
            transformer=bundle.denoiser, vae=bundle.vae,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(bundle.noise_scheduler.config),
            text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0],
            text_encoder_2=bundle.text_encoders[1], tokenizer_2=bundle.tokenizers[1],
            text_encoder_3=t5, tokenizer_3=bundle.tokenizers[2] if t5 is not None else None,
        )

    def image_size_multiple(self, bundle: ModelBundle) -> int:
        from studio.engine.families import flow

        return flow.patched_pixels(bundle.vae)

    def preview_embeds(self, bundle: ModelBundle, prompts: list[str], negative_prompt: str) -> dict[str, Any] | None:
        n = len(prompts)  # the pipeline's classifier-free guidance needs the negative prompt's too ("" when none)
        cond = self.encode_text(bundle, [*prompts, negative_prompt or ""])
        hidden, pooled = cond["hidden"], cond["pooled"]
        return {"prompt_embeds": hidden[:n], "pooled_prompt_embeds": pooled[:n],
                "negative_prompt_embeds": hidden[n:].expand(n, -1, -1),
                "negative_pooled_prompt_embeds": pooled[n:].expand(n, -1)}

    def pipeline_kwargs(self, *, negative_prompt: str, guidance: float, lora_scale: float | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"negative_prompt": negative_prompt or None, "guidance_scale": guidance}
        if lora_scale is not None:
            kwargs["joint_attention_kwargs"] = {"scale": lora_scale}
        return kwargs

    # --------------------------------------------------------------------------------------- cost model

    def meta_denoiser(self, config: Mapping[str, Any]) -> Any:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_config(dict(config)).eval()

    def denoiser_example_inputs(self, config: Mapping[str, Any], batch: int, latent_h: int,
                                latent_w: int) -> tuple[tuple, dict]:
        x = torch.empty(batch, config["in_channels"], latent_h, latent_w)
        kwargs = {
            "encoder_hidden_states": torch.empty(batch, 77 + T5_MAX_LENGTH, config["joint_attention_dim"]),
            "pooled_projections": torch.empty(batch, config["pooled_projection_dim"]),
            "timestep": torch.zeros(batch),
        }
        return (x,), kwargs

    def text_encoder_flops(self, folder: Path, batch: int) -> int:
        from studio.engine.families.sd import _clip_flops

        return sum(_clip_flops(str(Path(folder) / name), batch) for name in self.text_encoder_names[:2]
                   if (Path(folder) / name / "config.json").is_file())

    def full_size_parameters(self) -> dict[str, float]:
        return dict(self._parameters)

    def denoiser_weight_bytes(self, training: "TrainingSection", weight_bytes: int) -> float:
        """fp8 keeps 1 byte per frozen weight; swapped joint blocks live in CPU memory (one on the GPU at a time).
        The joint blocks hold ~97 % of an MMDiT's parameters (the rest: embedders and the final layer)."""
        params = self._parameters["denoiser"]
        per_param = 1 if training.base_weights_fp8 else weight_bytes
        block_share = 0.97 * params / self._depth
        return (params - block_share * max(0, min(training.block_swap, self._depth) - 1)) * per_param

    def activation_gib(self, gradient_checkpointing: bool) -> float:
        return self._activations[1 if gradient_checkpointing else 0]

    # ---------------------------------------------------------------------------------------- test model

    def _tiny_transformer(self) -> Any:
        from diffusers import SD3Transformer2DModel

        from studio.engine.tiny import TINY_RESOLUTION

        return SD3Transformer2DModel(
            sample_size=TINY_RESOLUTION // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
            pooled_projection_dim=64, pos_embed_max_size=32, qk_norm="rms_norm" if self._qk_norm else None,
            dual_attention_layers=(0,) if self._dual_attention else (),
        )

    def build_tiny(self, prediction_type: str = PREDICTION, seed: int = 0) -> Any:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from studio.engine.tiny import TINY_RESOLUTION
        from studio.engine.tokenizers import load_tokenizer

        def clip(mlp: int) -> Any:
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=32, intermediate_size=mlp, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=1, hidden_act="gelu"))

        torch.manual_seed(seed)
        # The two CLIPs differ in shape, as the real ones do (768 / 1280 wide): part files are told apart by it.
        clip_l, clip_g = clip(37), clip(48)
        with torch.no_grad():
            # SD3 uses CLIP-L's pooled output unprojected (diffusers' single-file loader sets this projection to
            # the identity), so a tiny model that round-trips through a single file must have it too.
            clip_l.text_projection.weight.copy_(torch.eye(clip_l.text_projection.weight.shape[0]))
        tokenizer_3 = tiny_t5_tokenizer()
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=64, d_ff=37, d_kv=16, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
            is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=TINY_RESOLUTION, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
            use_post_quant_conv=False,
        )
        with torch.no_grad():
            # A random encoder's posterior is as wide as its mean (std ~1, times SD3's 1.53 scale): every step's
            # latent sample would be mostly noise no model can learn. Real VAEs are sharp; so is this one.
            vae.encoder.conv_out.bias[vae.config.latent_channels:] = -12.0
        return StableDiffusion3Pipeline(
            transformer=self._tiny_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=clip_l, tokenizer=load_tokenizer("clip-l"), text_encoder_2=clip_g,
            tokenizer_2=load_tokenizer("clip-g"), text_encoder_3=t5, tokenizer_3=tokenizer_3,
        )

    def save_tiny(self, folder: Path, prediction_type: str = PREDICTION, seed: int = 0) -> Path:
        import shutil

        from studio.engine.tokenizers import write_tokenizer

        folder = super().save_tiny(folder, prediction_type, seed)
        # As real SD3 folders: CLIP vocab + merges (not the 3.6 MB tokenizer.json save_pretrained writes).
        for sub, name in (("tokenizer", "clip-l"), ("tokenizer_2", "clip-g")):
            shutil.rmtree(folder / sub)
            write_tokenizer(name, folder / sub)
        return folder

    def warm_up(self) -> None:
        import diffusers
        import transformers

        for module, names in ((diffusers, ("AutoencoderKL", "FlowMatchEulerDiscreteScheduler", "SD3Transformer2DModel",
                                            "StableDiffusion3Pipeline")),
                              (transformers, ("CLIPTextModelWithProjection", "CLIPTokenizer", "T5EncoderModel",
                                              "T5TokenizerFast"))):
            for name in names:
                getattr(module, name)


def _config_value(config: Any, key: str) -> Any:
    if config is None:
        return None
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _fused_qkv(name: str, parts: list[tuple[str, torch.Tensor, torch.Tensor, float]]
               ) -> tuple[str, torch.Tensor, torch.Tensor, float]:
    """One kohya ``qkv`` LoRA from the q, k and v LoRAs: ``down = [A_q; A_k; A_v]``, ``up = diag(B_q, B_k, B_v)``.

    Then ``up @ down`` stacks ``B_q A_q``, ``B_k A_k``, ``B_v A_v`` row-wise, exactly the fused layer's change.
    Consumers scale by ``alpha / rows(down)``; each part was trained at ``alpha_i / r_i``, so the parts' scales
    are folded into their ``up`` blocks when they differ, and otherwise kept in ``alpha`` (times the parts).
    """
    by_index = {mmdit_path(path)[1]: (down, up, alpha) for path, down, up, alpha in parts}
    if len(by_index) != len(parts) or None in by_index:
        raise ValueError(f"'{name}': expected the q, k and v modules of one attention, got {[p[0] for p in parts]}")
    present = [by_index[i] for i in sorted(by_index)]
    out_dim = present[0][1].shape[0]
    scales = {alpha / down.shape[0] for down, _, alpha in present}
    fold = len(scales) > 1
    downs, ups = [], []
    for index in range(3):
        if index not in by_index:
            continue  # a q, k or v without a LoRA: its rows of the fused up stay zero
        down, up, alpha = by_index[index]
        downs.append(down)
        ups.append((index, up * (alpha / down.shape[0]) if fold else up))
    rank = sum(d.shape[0] for d in downs)
    fused_up = torch.zeros(3 * out_dim, rank, dtype=ups[0][1].dtype, device=ups[0][1].device)
    column = 0
    for index, up in ups:
        fused_up[index * out_dim:(index + 1) * out_dim, column:column + up.shape[1]] = up
        column += up.shape[1]
    alpha = float(rank) if fold else next(iter(scales)) * rank
    return name, torch.cat(downs), fused_up, alpha


# Reference sizes: parameters counted from the bundled configs on the meta device (tests/engine/test_sd3.py);
# activations per 1024 px image in bf16, without and with gradient checkpointing (see sd3_loading's note).
_TEXT = 123.7e6 + 694.7e6 + 4762.3e6  # CLIP-L and CLIP-G with projections, T5-XXL's encoder
SD3_MEDIUM = SD3Family(
    name="sd3", label="Stable Diffusion 3 Medium", short_label="SD3 Medium", listed_as="SD3 Medium",
    config_folder="sd3-medium", lora_ids=("medium", "stable-diffusion-3-medium"),
    checkpoint_architecture="stable-diffusion-3-medium",
    preview=PreviewDefaults(steps=28, guidance=7.0, sampler="flow-euler"),
    qk_norm=False, dual_attention=False, depth=24, width=1536,
    parameters={"denoiser": 2028.3e6, "text_encoders": _TEXT, "vae": 83.8e6}, activations=(10.0, 0.8),
)
SD35_MEDIUM = SD3Family(
    name="sd3.5-medium", label="Stable Diffusion 3.5 Medium", short_label="SD3.5 Medium", listed_as="SD3.5 Medium",
    config_folder="sd3.5-medium", lora_ids=("5-medium", "stable-diffusion-3-5-medium"),
    checkpoint_architecture="stable-diffusion-3-5-medium",
    preview=PreviewDefaults(steps=40, guidance=4.5, sampler="flow-euler"),
    qk_norm=True, dual_attention=True, depth=24, width=1536,
    parameters={"denoiser": 2243.2e6, "text_encoders": _TEXT, "vae": 83.8e6}, activations=(11.5, 0.85),
)
SD35_LARGE = SD3Family(
    name="sd3.5-large", label="Stable Diffusion 3.5 Large", short_label="SD3.5 Large", listed_as="SD3.5 Large",
    config_folder="sd3.5-large", lora_ids=("5-large", "stable-diffusion-3-5-large"),
    checkpoint_architecture="stable-diffusion-3-5-large",
    preview=PreviewDefaults(steps=28, guidance=3.5, sampler="flow-euler"),
    qk_norm=True, dual_attention=False, depth=38, width=2432,
    parameters={"denoiser": 8056.6e6, "text_encoders": _TEXT, "vae": 83.8e6}, activations=(25.0, 1.6),
)
