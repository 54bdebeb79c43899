"""Stable Diffusion 1.x and 2.x: a UNet denoising with CLIP text states, epsilon or v-prediction (DDPM training).

SD1 and SD2 differ only in data (text encoder, bundled configs, metadata ids, reference sizes), so both are
objects of one class; SDXL (sdxl.py) extends it with its second encoder and micro-conditioning.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F

from studio.engine.families.base import Conditioning, Family, ModelBundle, Part, PreviewDefaults
from studio.engine.families.loading import quiet_diffusers
from studio.engine.tiny import TINY_RESOLUTION
from studio.engine.ldm import COMPONENT_PREFIXES, ldm_state_dict, unet_module_path, unet_prefix_map
from studio.paths import resource_path

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection, TrainingSection
    from studio.engine.detect import Detection
    from studio.engine.safe_load import WeightsFile

_TINY_TEXT_DIM = 32
# The DDPM schedule of every SD1/SD2/SDXL base model (scaled-linear betas), as the tiny models use it.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# ------------------------------------------------------------------------------------------ LoRA targets
# Module paths below are diffusers/transformers names; peft full-matches `target_modules` (a string) against
# every module name. kohya's own LoRA picks layers by the class of their parent (Transformer2DModel,
# CLIPAttention/CLIPMLP, and with conv_dim also ResnetBlock2D/Downsample2D/Upsample2D); these expressions
# select exactly the Linear/Conv2d children of those parents, so counts match kohya's (SD1.5: 192 UNet +
# 72 text encoder modules; SD2: 192 + 138; SDXL: 722 + 264; "+conv" on SD1.5: 278 UNet modules).
_UNET_BLOCK = r"(?:down_blocks\.\d+\.|mid_block\.|up_blocks\.\d+\.)"
_UNET_ATTENTION = _UNET_BLOCK + r"attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
_UNET_TRANSFORMER = (
    _UNET_BLOCK + r"attentions\.\d+\.(?:proj_in|proj_out|transformer_blocks\.\d+\."
    r"(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2)))"
)
# LoCon as kohya does it: every Linear/Conv2d inside ResnetBlock2D (conv1, conv2, the 1x1 conv_shortcut and
# the Linear time_emb_proj) and the down/upsampler convs.
_UNET_CONV = (
    _UNET_BLOCK + r"(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)|downsamplers\.0\.conv|upsamplers\.0\.conv)"
)
# transformers >= 5.6 dropped the `text_model.` segment from CLIPTextModel's module names but kept it in
# CLIPTextModelWithProjection, so it is optional here.
_TE_PREFIX = r"(?:text_model\.)?encoder\.layers\.\d+\."
_TE_ATTENTION = _TE_PREFIX + r"self_attn\.(?:q_proj|k_proj|v_proj|out_proj)"
_TE_ALL = _TE_PREFIX + r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ----------------------------------------------------------------------------------- long captions, clip skip
# Where the job's text options live on a loaded bundle (run setup puts them there; a bundle without them encodes
# as the base pipelines do: 75 tokens, the last layer).
TEXT_OPTIONS = "text_options"


def text_options(bundle: ModelBundle) -> tuple[int, int]:
    """(caption tokens: 75, 150 or 225; clip skip: 1 = the last layer) the bundle encodes with."""
    return bundle.extra.get(TEXT_OPTIONS, (75, 1))


def chunked_ids(tokenizer: Any, prompts: list[str], max_tokens: int) -> torch.Tensor:
    """Token ids as (batch, chunks, 77): the caption's first ``max_tokens`` tokens in 75-token pieces, each
    wrapped in BOS … EOS so CLIP (77 positions) reads it as a prompt of its own (kohya's long-caption scheme).

    A piece the caption fills to its end closes with EOS; one past the caption's end is BOS, EOS, padding.
    With 75 tokens this is exactly the plain tokenisation.
    """
    width = tokenizer.model_max_length - 2  # 75
    ids = tokenizer(prompts, padding="max_length", max_length=max_tokens + 2, truncation=True,
                    return_tensors="pt").input_ids
    if max_tokens == width:
        return ids[:, None]
    bos, eos, pad = ids[:, :1], tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_tokens + 1, width):
        body = ids[:, start:start + width].clone()
        ended = (body[:, :1] == eos) | (body[:, :1] == pad)  # the caption ended before this piece
        body[:, :1] = torch.where(ended, torch.full_like(body[:, :1], eos), body[:, :1])
        last = body[:, -1:]
        closing = torch.where((last == eos) | (last == pad), torch.full_like(last, pad), torch.full_like(last, eos))
        chunks.append(torch.cat([bos, body, closing], dim=1))
    return torch.stack(chunks, dim=1)


def join_chunks(states: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch × chunks, 77, d) encoder states → (batch, 75 × chunks + 2, d): the first piece's BOS, every piece's
    75 inner states, the last piece's final state (kohya's layout; 77 states for one piece, unchanged)."""
    states = states.reshape(batch, -1, *states.shape[1:])
    inner = states[:, :, 1:-1].reshape(batch, -1, states.shape[-1])
    return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)


def _skip_problem(encoder: Any, clip_skip: int) -> None:
    layers = encoder.config.num_hidden_layers
    if clip_skip > layers + 1:  # hidden_states holds the embeddings and every layer's output
        raise ValueError(f"training.clip_skip is {clip_skip}, but the text encoder has only {layers} layers; "
                         "use 1 (the last layer) or 2")


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ) / SNR for ε-prediction, / (SNR + 1) for v.

    Written as min(γ / SNR, 1) for ε so a zero-terminal-SNR schedule's last timestep (SNR 0) gets its limit, 1,
    instead of 0 / 0 = NaN (diffusers' scripts set that weight to 1 as well); no device value is read back.
    """
    if v_prediction:
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(gamma / snr, max=1.0)


def _inner(encoder: Any) -> Any:
    """The encoder itself when accelerate wrapped it in DDP (training the text encoder on several processes)."""
    return getattr(encoder, "module", encoder)


def _final_norm(encoder: Any) -> Any:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model`); CLIPTextModelWithProjection kept it.
    return getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm


def lora_widths(shapes: Mapping[str, tuple[int, ...]], layout: str, pattern: str) -> set[int]:
    """Input widths of the LoRA down/A matrices of modules whose key matches ``pattern`` (e.g. attn2's to_k)."""
    down = "lora_down" if layout == "kohya" else "lora_A"
    return {shape[1] for k, shape in shapes.items()
            if re.search(pattern, k) and f"{down}.weight" in k and len(shape) >= 2}


@functools.lru_cache(maxsize=8)
def _clip_flops(config_dir: str, batch: int = 1) -> int:
    """FLOPs of one CLIP text encoder (config folder) over ``batch`` 77-token captions, on the meta device."""
    if batch != 1:
        return _clip_flops(config_dir, 1) * batch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir))
        ids = torch.zeros(batch, 77, dtype=torch.long)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(ids)
    return flops.get_total_flops()


class StableDiffusionFamily(Family):
    """SD1.x / SD2.x: one UNet, one CLIP text encoder, the VAE; DDPM noise, epsilon or v target, min-SNR."""

    denoiser_name = "unet"
    compile_block_classes = ("BasicTransformerBlock",)
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    kohya_prefixes: Mapping[str, str] = {"unet": "lora_unet", "text_encoder": "lora_te"}
    prediction_types = ("epsilon", "v_prediction")
    preview = PreviewDefaults(steps=20, guidance=7.0, sampler="euler")

    def __init__(self, *, name: str, label: str, short_label: str, listed_as: str, text_encoder_label: str,
                 tokenizer_names: tuple[str, ...], ldm_text_encoder_prefixes: tuple[str, ...],
                 config_folders: Mapping[str, str], default_prediction: str, resolutions: Mapping[str, int],
                 lora_ids: Mapping[str, tuple[str, str]], lora_id_prefixes: tuple[str, str],
                 checkpoint_architectures: Mapping[str, str],
                 implementation: str, checkpoint_implementation: str, ss_v2: bool,
                 parameters: Mapping[str, float], activations: tuple[float, float], text_width: int,
                 tiny_unet: Mapping[str, Any], tiny_prediction_types: tuple[str, ...]):
        self.name, self.label, self.short_label, self.listed_as = name, label, short_label, listed_as
        self.text_encoder_label = text_encoder_label
        self.tokenizer_names = tokenizer_names  # bundled tokenizers (studio.engine.tokenizers), one per encoder
        self.ldm_text_encoder_prefixes = ldm_text_encoder_prefixes  # where the encoders go in a single file
        self._config_folders = dict(config_folders)  # prediction type → resources/model_configs/<folder>
        self._default_prediction = default_prediction  # what most models of the family are
        self._resolutions = dict(resolutions)
        self._lora_ids = dict(lora_ids)  # prediction → (ss_base_model_version, modelspec.architecture)
        self._lora_id_prefixes = lora_id_prefixes  # how those ids of any variant begin, for reading LoRA files
        self._checkpoint_architectures = dict(checkpoint_architectures)
        self._implementation, self._checkpoint_implementation = implementation, checkpoint_implementation
        self._ss_v2 = ss_v2
        self._parameters = dict(parameters)
        self._activations = activations
        self._text_width = text_width  # the cross-attention input width: tells its LoRAs apart
        self._tiny_unet_kwargs = dict(tiny_unet)
        self.tiny_prediction_types = tiny_prediction_types

    # ------------------------------------------------------------------------------------ what a model is

    def parts(self) -> tuple[Part, ...]:
        encoders = [Part(n, label, "text_encoder") for n, label in zip(self.text_encoder_names, self._encoder_labels())]
        return (Part("unet", "UNet", "denoiser"), *encoders, Part("vae", "VAE", "vae"))

    def _encoder_labels(self) -> tuple[str, ...]:
        return (f"text encoder ({self.text_encoder_label})",)

    def native_resolution(self, prediction_type: str | None = None) -> int:
        return self._resolutions.get(prediction_type or self._default_prediction, self._resolutions["epsilon"])

    def text_encoder_classes(self) -> list[type]:
        from transformers import CLIPTextModel

        return [CLIPTextModel]

    # ------------------------------------------------------------------------------------------ detection

    def detect_file(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], filename: str,
                    tensor: Callable[[str], torch.Tensor] | None) -> "Detection | None":
        from studio.engine.families.sd_detect import detect_sd_checkpoint

        return detect_sd_checkpoint(self, shapes, metadata, filename, tensor)

    def detect_folder(self, folder: Path, model_index: Mapping[str, Any]) -> bool:
        from studio.engine.families.sd_loading import unet_family_name

        config = self.denoiser_config(folder)
        if config is None:
            return False
        return unet_family_name(config, 2 if (Path(folder) / "text_encoder_2").is_dir() else 1) == self.name

    def folder_problem(self, folder: Path) -> str | None:
        from studio.engine.families.sd_loading import unet_in_channels_problem

        return unet_in_channels_problem(folder)

    def file_component_prefixes(self) -> Mapping[str, tuple[str, ...]]:
        return COMPONENT_PREFIXES

    def lora_metadata_evidence(self, metadata: Mapping[str, str]) -> int:
        version, arch = metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", "")
        version_prefix, arch_prefix = self._lora_id_prefixes
        if version.startswith(version_prefix) or arch.startswith(arch_prefix):
            return 2
        if self._ss_v2 and metadata.get("ss_v2") == "True":
            return 1  # A1111's own SD2 flag: weaker evidence than the ids
        return 0

    def lora_metadata_prediction(self, metadata: Mapping[str, str]) -> str | None:
        if "v_prediction" not in self._lora_ids:
            return None
        version, architecture = self._lora_ids["v_prediction"]
        if metadata.get("ss_base_model_version") == version or "768-v" in metadata.get("modelspec.architecture", ""):
            return "v_prediction"
        return None

    def lora_key_evidence(self, shapes: Mapping[str, tuple[int, ...]], layout: str) -> int:
        # The cross-attention input width tells the text encoder: CLIP-L 768 (SD1), OpenCLIP-H 1024 (SD2).
        if self._text_width in lora_widths(shapes, layout, r"attn2[._]to_k[._]"):
            return 2
        if self._text_width in lora_widths(shapes, layout, r"self_attn[._]q_proj[._]"):
            return 1
        return 0

    # -------------------------------------------------------------------------------------------- loading

    def bundled_config_dir(self, prediction_type: str | None = None) -> Path:
        folder = self._config_folders.get(prediction_type or self._default_prediction, self._config_folders["epsilon"])
        return resource_path("model_configs", folder)

    def load_folder(self, path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
        from studio.engine.families import sd_loading

        with quiet_diffusers():
            return sd_loading.load_folder(self, path, model, dtype)

    def load_single_file(self, path: Path, weights: "WeightsFile", detection: "Detection", model: "ModelSection",
                         dtype: torch.dtype) -> ModelBundle:
        from studio.engine.families import sd_loading

        with quiet_diffusers():
            return sd_loading.load_single_file(self, path, weights, detection, model, dtype)

    # -------------------------------------------------------------------------------------- conditioning

    def encode_text(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """CLIP's last layer (or, with clip skip k, the k-th from last through the final layer norm, as A1111 and
        diffusers' clip_skip do), over 75-token pieces joined for longer captions."""
        max_tokens, clip_skip = text_options(bundle)
        encoder = bundle.text_encoders[0]
        ids = chunked_ids(bundle.tokenizers[0], captions, max_tokens)
        flat = ids.reshape(-1, ids.shape[-1]).to(encoder.device)
        if clip_skip <= 1:
            states = encoder(flat, output_hidden_states=False)[0]
        else:
            _skip_problem(_inner(encoder), clip_skip)
            out = encoder(flat, output_hidden_states=True)
            states = _final_norm(_inner(encoder))(out.hidden_states[-clip_skip])
        return Conditioning(hidden=join_chunks(states, len(captions)))

    def preview_prompt_kwargs(self, bundle: ModelBundle, prompts: list[str], negative_prompt: str) -> dict | None:
        if text_options(bundle) == (75, 1):
            return None  # the pipeline's own encoding is the same
        n = len(prompts)
        hidden = self.encode_text(bundle, [*prompts, negative_prompt or ""])["hidden"]
        return {"prompt_embeds": hidden[:n], "negative_prompt_embeds": hidden[n:].expand(n, -1, -1)}

    def added_cond_kwargs(self, cond: Conditioning) -> dict | None:
        """The UNet's extra inputs besides the text states (SDXL's pooled text and time ids; none here)."""
        return None

    # ---------------------------------------------------------------------------------------- objective

    def training_loss(self, bundle: ModelBundle, denoiser: Any, latents: torch.Tensor, cond: Conditioning, *,
                      training: "TrainingSection", generator: torch.Generator,
                      weight_dtype: torch.dtype) -> torch.Tensor:
        """The denoising loss of diffusers' train_text_to_image_lora.py, with noise offset and min-SNR weighting."""
        from diffusers.training_utils import compute_snr

        sched = bundle.noise_scheduler
        # Drawn where the generator lives (the run's device): no host→device copy in the step.
        where = generator.device
        noise = torch.randn(latents.shape, generator=generator, device=where)
        if training.noise_offset:
            noise += training.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=where)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                                  device=where)
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        noisy = sched.add_noise(latents, noise, timesteps)
        v_prediction = bundle.prediction_type == "v_prediction"
        target = sched.get_velocity(latents, noise, timesteps) if v_prediction else noise
        pred = denoiser(noisy.to(weight_dtype), timesteps, cond["hidden"],
                        added_cond_kwargs=self.added_cond_kwargs(cond)).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if training.min_snr_gamma > 0:
            loss = loss * min_snr_weight(compute_snr(sched, timesteps), training.min_snr_gamma, v_prediction)
        return loss.mean()

    # --------------------------------------------------------------------------------------------- LoRA

    def lora_targets(self, preset: str, component: str) -> str:
        if component == "unet":
            if preset == "attention":
                return _UNET_ATTENTION
            if preset == "kohya-default":
                return _UNET_TRANSFORMER
            return f"(?:{_UNET_TRANSFORMER}|{_UNET_CONV})"
        if component in self.text_encoder_names:
            return _TE_ATTENTION if preset == "attention" else _TE_ALL
        raise ValueError(f"unknown model component '{component}'; expected one of: {', '.join(self.component_names())}")

    def apply_speed_options(self, bundle: ModelBundle, training: "TrainingSection", train_text_encoder: bool) -> None:
        super().apply_speed_options(bundle, training, train_text_encoder)
        unet = bundle.denoiser
        if training.attention == "classic":
            from diffusers.models.attention_processor import AttnProcessor

            unet.set_attn_processor(AttnProcessor())
        if training.channels_last:
            unet.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------------------------- export
    # Key layout (checked against each consumer's loader, see FACTS.md "Which LoRA file format travels"):
    #
    # * SD1.x / SD2.x UNet: ``lora_unet_<diffusers module path, '.' → '_'>``, e.g.
    #   ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``. This is what kohya's sd-scripts
    #   itself writes for SD1/SD2 (it trains the diffusers UNet there). A1111 converts these names to its LDM
    #   modules (``convert_diffusers_name_to_compvis``), ComfyUI maps them through ``unet_to_diffusers``, and
    #   diffusers' SD1 loader expects them (it does not remap LDM block numbers for SD1/SD2).
    # * SDXL UNet: ``lora_unet_<LDM/SGM module path>``, e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``.
    #   kohya trains SDXL on the SGM UNet, so every SDXL LoRA in the wild uses these names: A1111 applies them
    #   directly, ComfyUI maps them from the model's own keys, and diffusers' SDXL loader renumbers them with
    #   ``_maybe_map_sgm_blocks_to_diffusers`` (given the UNet config). The diffusers-path variant is *not* safe
    #   for SDXL: A1111's converter assumes SD1's layout for up-samplers (``output_blocks_2_1_conv``), which is
    #   wrong for SDXL, whose first up block has attentions (``output_blocks_2_2_conv``).
    # * Text encoders: ``lora_te_`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL) followed by
    #   ``text_model_encoder_layers_N_…``. transformers ≥ 5.6 dropped ``text_model.`` from CLIPTextModel's module
    #   names (CLIPTextModelWithProjection kept it); every consumer expects the segment, so it is normalised here.
    # * ``.alpha`` is the alpha the module was trained with (conv alpha for LoCon convolutions): every consumer
    #   scales by ``alpha / rank`` exactly like peft's ``lora_alpha / r``.
    #

    def kohya_unet_path(self, module_path: str, unet_config: Any) -> str:
        """kohya trains SD1/SD2 on the diffusers UNet, so its LoRAs name UNet layers by diffusers paths."""
        return module_path

    def kohya_name(self, component: str, module_path: str, denoiser_config: Any = None) -> str:
        if component == "unet":
            return "lora_unet_" + self.kohya_unet_path(module_path, denoiser_config).replace(".", "_")
        if component not in self.text_encoder_names:
            raise ValueError(f"{self.label} has no text encoder component '{component}'")
        # transformers >= 5.6 dropped "text_model." from CLIPTextModel's names; every consumer expects it.
        path = module_path.removeprefix("text_model.")
        return f"{self.kohya_prefixes[component]}_text_model_{path.replace('.', '_')}"

    def diffusers_lora_key(self, component: str, name: str) -> str:
        if component != "unet" and not name.startswith("text_model."):
            # The layout older transformers/diffusers and ComfyUI expect; current diffusers strips it again
            # for the flattened CLIPTextModel.
            name = "text_model." + name
        if component != "unet" and name.endswith(".lora_magnitude_vector"):
            # transformers' load_adapter inserts the adapter name before the last segment, so a bare
            # `lora_magnitude_vector` key ends up unexpected and the DoRA magnitudes are silently not
            # loaded; with `.weight` it lands on `lora_magnitude_vector.<adapter>.weight`.
            name += ".weight"
        return name

    def metadata_ids(self, prediction_type: str) -> dict[str, str]:
        version, architecture = self._lora_ids.get(prediction_type, self._lora_ids["epsilon"])
        return {
            "ss_base_model_version": version,  # by which A1111 decides where a LoRA is listed
            "ss_v2": "True" if self._ss_v2 else "False",  # A1111 lists a LoRA under SD2 only when exactly "True"
            "modelspec.architecture": architecture,
            "modelspec.implementation": self._implementation,
            "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        }

    def checkpoint_metadata_ids(self, prediction_type: str) -> dict[str, str]:
        return {
            "modelspec.architecture": self._checkpoint_architectures.get(prediction_type, f"stable-diffusion-{self.name}"),
            "modelspec.implementation": self._checkpoint_implementation,
            "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        }

    def single_file_state_dict(self, bundle: ModelBundle, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return ldm_state_dict(self.ldm_text_encoder_prefixes, bundle.denoiser, bundle.vae, bundle.text_encoders, dtype)

    def single_file_extras(self, bundle: ModelBundle, original: Path | None, written: set[str],
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """OpenCLIP keys of the original file the conversion does not write (SD2's unused last layer,
        ``text_projection``, ``logit_scale``: A1111 builds the full OpenCLIP model and would report them
        missing), then ComfyUI's ``v_pred``/``ztsnr`` markers (other tools ignore them)."""
        from studio.engine.safe_load import open_weights

        out: dict[str, torch.Tensor] = {}
        if original is not None and Path(original).is_file():
            w = open_weights(Path(original))
            open_clip = tuple(p for p in self.ldm_text_encoder_prefixes if p.endswith(".model."))
            keep = [k for k in w.shapes if k not in written and k.startswith(open_clip) and not k.startswith("model_ema.")]
            if keep:
                out.update({k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                            for k, v in w.tensors(keep).items()})
        if bundle.prediction_type == "v_prediction":
            out["v_pred"] = torch.zeros(0)
        if bundle.noise_scheduler.config.get("rescale_betas_zero_snr"):
            out["ztsnr"] = torch.zeros(0)
        return out

    def kohya_index(self, bundle: ModelBundle) -> dict[str, tuple[str, Any]]:
        """Both UNet naming styles are accepted (kohya's SD1/SD2 LoRAs use diffusers paths, its SDXL LoRAs the
        SGM paths); text-encoder names include ``text_model_`` except in some files written via diffusers on
        transformers ≥ 5.6."""
        unet = bundle.denoiser
        index: dict[str, tuple[str, Any]] = {}
        rows = unet_prefix_map(unet.config)
        for name, module in unet.named_modules():
            if not isinstance(getattr(module, "weight", None), torch.Tensor) or not name:
                continue
            index["lora_unet_" + name.replace(".", "_")] = ("unet", module)
            try:
                index["lora_unet_" + unet_module_path(name, unet.config, rows).replace(".", "_")] = ("unet", module)
            except ValueError:
                pass
        single = len(self.text_encoder_names) == 1
        for component, encoder in zip(self.text_encoder_names, bundle.text_encoders):
            aliases = [self.kohya_prefixes[component]] + (["lora_te1"] if single else [])
            for name, module in encoder.named_modules():
                if not isinstance(getattr(module, "weight", None), torch.Tensor) or not name:
                    continue
                path = name.removeprefix("text_model.").replace(".", "_")
                for alias in aliases:
                    index[f"{alias}_text_model_{path}"] = (component, module)
                    index.setdefault(f"{alias}_{path}", (component, module))
        return index

    # ------------------------------------------------------------------------------------------ preview

    def pipeline(self, bundle: ModelBundle) -> Any:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.denoiser,
            scheduler=EulerDiscreteScheduler.from_config(bundle.noise_scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    # --------------------------------------------------------------------------------------- cost model

    def meta_denoiser(self, config: Mapping[str, Any]) -> Any:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(dict(config)).eval()

    def denoiser_example_inputs(self, config: Mapping[str, Any], batch: int, latent_h: int,
                                latent_w: int) -> tuple[tuple, dict]:
        x = torch.empty(batch, config["in_channels"], latent_h, latent_w)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, 77, config["cross_attention_dim"])
        return (x, t, ctx), {"added_cond_kwargs": self._example_added_cond(config, batch)}

    def _example_added_cond(self, config: Mapping[str, Any], batch: int) -> dict | None:
        return None

    def text_encoder_flops(self, folder: Path, batch: int) -> int:
        return sum(_clip_flops(str(Path(folder) / name), batch) for name in self.text_encoder_names
                   if (Path(folder) / name / "config.json").is_file())

    def full_size_parameters(self) -> dict[str, float]:
        return dict(self._parameters)

    def activation_gib(self, gradient_checkpointing: bool) -> float:
        return self._activations[1 if gradient_checkpointing else 0]

    # ---------------------------------------------------------------------------------------- test model

    def _tiny_text_config(self, projection: bool) -> Any:
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=49408, hidden_size=_TINY_TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=_TINY_TEXT_DIM if projection else 512,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        )

    def _tiny_unet(self) -> Any:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, **self._tiny_unet_kwargs,
        )

    def _tiny_vae(self, scaling_factor: float = 0.18215) -> Any:
        from diffusers import AutoencoderKL

        return AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=TINY_RESOLUTION,
            scaling_factor=scaling_factor,
        )

    def _tiny_scheduler(self, prediction_type: str) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler(**SCHEDULER_CONFIG, prediction_type=prediction_type)

    def build_tiny(self, prediction_type: str = "epsilon", seed: int = 0) -> Any:
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel

        from studio.engine.tokenizers import load_tokenizer

        torch.manual_seed(seed)
        unet, vae = self._tiny_unet(), self._tiny_vae()
        return StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(self._tiny_text_config(False)),
            tokenizer=load_tokenizer(self.tokenizer_names[0]), unet=unet,
            scheduler=self._tiny_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_tiny(self, folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
        import shutil

        from studio.engine.families.sd_loading import tokenizer_folder
        from studio.engine.tokenizers import write_tokenizer

        folder = super().save_tiny(folder, prediction_type, seed)
        # Real SD folders ship vocab.json + merges.txt, not the 3.6 MB tokenizer.json save_pretrained writes; that
        # file also costs ~100 ms of GIL-holding JSON parsing per load, which the window's thread would feel.
        for encoder, name in zip(self.text_encoder_names, self.tokenizer_names):
            shutil.rmtree(folder / tokenizer_folder(encoder))
            write_tokenizer(name, folder / tokenizer_folder(encoder))
        return folder

    def warm_up(self) -> None:
        import diffusers
        import transformers

        for module, names in ((diffusers, ("AutoencoderKL", "DDPMScheduler", "EulerDiscreteScheduler",
                                            "UNet2DConditionModel", "StableDiffusionPipeline",
                                            "StableDiffusionXLPipeline")),
                              (transformers, ("CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection",
                                              "CLIPTokenizer"))):
            for name in names:
                getattr(module, name)


# Reference sizes (parameters: SD1.5, SD2.1; activations per image at the native size, bf16, GiB, without and
# with gradient checkpointing: FACTS.md "Cost model").
SD1 = StableDiffusionFamily(
    name="sd1", label="Stable Diffusion 1.x", short_label="SD 1.x", listed_as="Stable Diffusion 1.x",
    text_encoder_label="CLIP ViT-L", tokenizer_names=("clip-l",),
    ldm_text_encoder_prefixes=("cond_stage_model.transformer.",),
    config_folders={"epsilon": "sd1"}, default_prediction="epsilon", resolutions={"epsilon": 512},
    lora_ids={"epsilon": ("sd_v1", "stable-diffusion-v1/lora")}, lora_id_prefixes=("sd_v1", "stable-diffusion-v1"),
    checkpoint_architectures={"epsilon": "stable-diffusion-v1"},
    implementation="diffusers", checkpoint_implementation="https://github.com/CompVis/stable-diffusion", ss_v2=False,
    parameters={"denoiser": 859.5e6, "text_encoders": 123.1e6, "vae": 83.7e6}, activations=(0.84, 0.14),
    text_width=768, tiny_unet={"cross_attention_dim": _TINY_TEXT_DIM, "attention_head_dim": 8},
    tiny_prediction_types=("epsilon",),
)
SD2 = StableDiffusionFamily(
    name="sd2", label="Stable Diffusion 2.x", short_label="SD 2.x", listed_as="2.x",
    text_encoder_label="OpenCLIP ViT-H", tokenizer_names=("clip-g",),
    ldm_text_encoder_prefixes=("cond_stage_model.model.",),
    # Most SD2 models are 768-v (SD2.1); the 512 base predicts epsilon.
    config_folders={"epsilon": "sd2", "v_prediction": "sd2-v"}, default_prediction="v_prediction",
    resolutions={"epsilon": 512, "v_prediction": 768},
    lora_ids={"epsilon": ("sd_v2", "stable-diffusion-v2-512/lora"),
              "v_prediction": ("sd_v2_v", "stable-diffusion-v2-768-v/lora")},
    lora_id_prefixes=("sd_v2", "stable-diffusion-v2"),
    checkpoint_architectures={"epsilon": "stable-diffusion-v2-512", "v_prediction": "stable-diffusion-v2-768-v"},
    implementation="diffusers", checkpoint_implementation="https://github.com/Stability-AI/stablediffusion", ss_v2=True,
    parameters={"denoiser": 865.9e6, "text_encoders": 340.4e6, "vae": 83.7e6}, activations=(1.9, 0.32),
    text_width=1024,
    tiny_unet={"cross_attention_dim": _TINY_TEXT_DIM, "attention_head_dim": (2, 4), "use_linear_projection": True},
    tiny_prediction_types=("v_prediction",),
)
