"""The family protocol: everything that differs between model families, asked for by the core (which never names one).

A family is one object (``Family`` subclass) in one module under ``studio/engine/families/``; the registry in
``__init__`` lists it. The trainer, the sampler, the estimate, export and the pages call the members below and
never test a family's name. Kept import-light (no torch at import): the job configuration lists family names.
See README.md in this folder for how to add one.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from studio.engine.config import ModelSection, TrainingSection
    from studio.engine.detect import Detection
    from studio.engine.safe_load import WeightsFile


# ------------------------------------------------------------------------------------------------ containers


@dataclass(frozen=True)
class Part:
    """One part a model of the family consists of, by the name the family, the files and the user call it."""

    name: str  # component key: "unet", "transformer", "text_encoder", "text_encoder_2", "vae"
    label: str  # for people: "UNet", "text encoder (CLIP ViT-L)"
    role: str  # "denoiser" | "text_encoder" | "vae"
    required: bool = True


@dataclass(frozen=True)
class PreviewDefaults:
    """How the family's previews are made when the job does not say: steps, guidance and the sampler's name."""

    steps: int = 20
    guidance: float = 7.0
    sampler: str = "euler"


class Conditioning:
    """What the denoiser needs besides the noisy latents: named tensors, each with the batch as its first dim.

    The family decides the names (SD: ``hidden``; SDXL adds ``pooled`` and ``time_ids``; a flow family might
    carry T5 states and masks); the core only moves, slices, joins and caches them.
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Mapping[str, "torch.Tensor"] | None = None, **named: "torch.Tensor"):
        self.tensors: dict[str, torch.Tensor] = {**(tensors or {}), **named}

    def __getitem__(self, name: str) -> "torch.Tensor":
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, default: Any = None) -> Any:
        return self.tensors.get(name, default)

    def with_tensors(self, **more: "torch.Tensor") -> "Conditioning":
        return Conditioning({**self.tensors, **more})

    def to(self, device: Any, dtype: "torch.dtype | None" = None) -> "Conditioning":
        """Move every tensor; ``dtype`` casts the floating ones only (masks and ids keep theirs)."""
        return Conditioning({k: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
                             for k, v in self.tensors.items()})

    def index(self, idx: Any) -> "Conditioning":
        return Conditioning({k: v[idx] for k, v in self.tensors.items()})

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @staticmethod
    def cat(items: Iterable["Conditioning"]) -> "Conditioning":
        import torch

        items = list(items)
        return Conditioning({k: torch.cat([c.tensors[k] for c in items]) for k in items[0].tensors})


@dataclass
class ModelBundle:
    """A loaded base model: the family's parts by role, plus what training and sampling need to know."""

    family: "Family"
    prediction_type: str  # "epsilon" | "v_prediction" (flow families: their own)
    denoiser: Any  # the network LoRA trains: SD's UNet, a DiT's transformer
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any  # the training noise schedule
    source: str
    load_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def pipeline(self) -> Any:
        """A diffusers pipeline sharing these modules (no copies), for sampling."""
        return self.family.pipeline(self)

    def components(self) -> dict[str, Any]:
        """The LoRA-capable parts by the family's component names (denoiser first)."""
        out = {self.family.denoiser_name: self.denoiser}
        out.update(zip(self.family.text_encoder_names, self.text_encoders))
        return out

    def modules(self) -> list[Any]:
        """Every network of the model (denoiser, VAE, text encoders), for moving and freeing them."""
        return [m for m in (self.denoiser, self.vae, *self.text_encoders) if m is not None]


# ------------------------------------------------------------------------------------------------ the protocol


class Family(abc.ABC):
    """One model family. Data attributes describe it; methods are the behaviour the core asks for."""

    name: str  # registry key, job value (model.family), metadata: "sd1"
    label: str  # "Stable Diffusion 1.x"
    short_label: str  # "SD 1.x"
    listed_as: str  # how a list of supported families names it after another: "2.x" in "Stable Diffusion 1.x, 2.x"
    denoiser_name: str  # component key and diffusers subfolder of the denoiser: "unet" | "transformer"
    text_encoder_names: tuple[str, ...]  # component keys / subfolders of the text encoders, in order
    kohya_prefixes: Mapping[str, str]  # component → kohya LoRA key prefix: {"unet": "lora_unet", ...}
    prediction_types: tuple[str, ...] = ("epsilon",)
    preview: PreviewDefaults = PreviewDefaults()
    # Whether frozen text-encoder outputs may be computed once per caption and reused (they may, for any
    # deterministic encoder); the trainer still re-encodes when the captions change per step.
    text_cacheable: bool = True
    # Shown with a non-finite loss or latent: why this family's VAE may overflow, and what to do ("" = nothing known).
    vae_overflow_hint: str = ""
    # Prediction types the tiny test model is built with (each gets its own training test).
    tiny_prediction_types: tuple[str, ...] = ("epsilon",)
    # What training_loss must read back on the host each step, and why ("" = nothing: the hot-loop test traps every
    # read). Z-Image's transformer takes one caption tensor per image, so the captions' token counts are Python ints.
    step_host_read: str = ""

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ------------------------------------------------------------------------------------ what a model is

    @abc.abstractmethod
    def parts(self) -> tuple[Part, ...]:
        """The parts a complete model has (the Model page asks for missing ones by these names)."""

    @abc.abstractmethod
    def native_resolution(self, prediction_type: str | None = None) -> int:
        """The square size in pixels the family's base models were trained at."""

    def component_names(self) -> tuple[str, ...]:
        """Denoiser and text encoders: the components a LoRA can adapt."""
        return (self.denoiser_name, *self.text_encoder_names)

    def trainable_text_encoders(self) -> tuple[str, ...]:
        """The text encoders ``lora.train_text_encoder`` adapts (Flux: CLIP-L only, not its 4.7 B T5)."""
        return self.text_encoder_names

    # ------------------------------------------------------------------------------------------ detection

    @abc.abstractmethod
    def detect_file(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], filename: str,
                    tensor: Callable[[str], "torch.Tensor"] | None) -> "Detection | None":
        """A Detection if this single file is a model of this family (usable or with a problem), else None."""

    @abc.abstractmethod
    def detect_folder(self, folder: Path, model_index: Mapping[str, Any]) -> bool:
        """Whether a diffusers folder (its model_index.json and configs) holds a model of this family."""

    def folder_problem(self, folder: Path) -> str | None:
        """Why a folder of this family cannot be trained (e.g. an inpainting variant), or None."""
        return None

    def file_component_prefixes(self) -> Mapping[str, tuple[str, ...]]:
        """Component → key prefixes in this family's single files (for sizes and dtypes per part)."""
        return {}

    def lora_metadata_evidence(self, metadata: Mapping[str, str]) -> int:
        """How strongly a LoRA file's metadata (ss_base_model_version, modelspec.architecture) names this
        family: 0 not at all, 1 a weak flag, 2 its ids."""
        return 0

    def lora_metadata_prediction(self, metadata: Mapping[str, str]) -> str | None:
        """A prediction type this family's LoRA metadata ids imply (e.g. SD2's ``sd_v2_v``), or None."""
        return None

    def lora_key_evidence(self, shapes: Mapping[str, tuple[int, ...]], layout: str) -> int:
        """How strongly a LoRA's key names/shapes point to this family: 0 not at all … 3 certain."""
        return 0

    # -------------------------------------------------------------------------------------------- loading

    def part_files(self, path: Path, model: "ModelSection") -> dict[str, Path | None]:
        """Parts a model file of this family lacks, each with the file chosen (``model.<part>``) or found nearby,
        None when not found; the Model page asks for these by ``parts()`` label. SD files carry every part: {}."""
        return {}

    @abc.abstractmethod
    def bundled_config_dir(self, prediction_type: str | None = None) -> Path:
        """The shipped diffusers config folder single files of this family load through (offline)."""

    @abc.abstractmethod
    def load_folder(self, path: Path, model: "ModelSection", dtype: "torch.dtype") -> ModelBundle:
        """Load a diffusers folder of this family, offline, straight into ``dtype``."""

    @abc.abstractmethod
    def load_single_file(self, path: Path, weights: "WeightsFile", detection: "Detection", model: "ModelSection",
                         dtype: "torch.dtype") -> ModelBundle:
        """Load a single-file checkpoint of this family (detected already), offline, straight into ``dtype``."""

    # -------------------------------------------------------------------------------------- conditioning

    @abc.abstractmethod
    def encode_text(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """Tokenise and encode captions the way the family's pipeline does (batch first)."""

    def example_conditioning(self, examples: list[Mapping[str, "torch.Tensor"]],
                             size_hw: tuple[int, int]) -> dict[str, "torch.Tensor"]:
        """Per-image conditioning beyond the text (SDXL's size/crop ids), from the cached latent entries.

        Per image: a batch's is the concatenation of its images' (the core computes it once per cached image)."""
        return {}

    def encode_image(self, bundle: ModelBundle, pixels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Mean and std of the VAE's latent distribution, normalised the way the denoiser expects.

        A KL VAE's sample is ``mean + std * ε``; the normalisation ``(x - shift) * scale`` is linear, so it is
        applied to the mean (shift and scale) and the std (scale) here, and each step draws a fresh sample.
        """
        vae = bundle.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        mean = (dist.mean - shift) * scale if shift is not None else dist.mean * scale
        return mean, dist.std * scale

    # ---------------------------------------------------------------------------------------- objective

    @abc.abstractmethod
    def training_loss(self, bundle: ModelBundle, denoiser: Any, latents: "torch.Tensor", cond: Conditioning, *,
                      training: "TrainingSection", generator: "torch.Generator",
                      weight_dtype: "torch.dtype") -> "torch.Tensor":
        """The batch's mean training loss: draw noise and timesteps from ``generator`` (on the run's device: draw with
        ``device=generator.device``, so the step copies nothing from the host), noise the latents,
        run ``denoiser`` (possibly DDP-wrapped), compare with the family's target, weight per timestep.

        Only the generator may be used for randomness, so a step is a pure function of its seed (exact resume).
        """

    # --------------------------------------------------------------------------------------------- LoRA

    @abc.abstractmethod
    def lora_targets(self, preset: str, component: str) -> str:
        """The peft ``target_modules`` expression (full-match regex) of a preset for one component."""

    # TrainingSection fields this family's objective and text encoding never read (the trainer says so when one is
    # set, and the LoRA's metadata records what training did instead of the ignored value).
    ignored_training_options: tuple[str, ...] = ()

    def unused_training_options(self, training: "TrainingSection") -> list[str]:
        """The ``training.*`` fields set away from their defaults that this family ignores."""
        default = type(training)()  # the section's defaults
        return [f"training.{name}" for name in self.ignored_training_options
                if getattr(training, name) != getattr(default, name)]

    def apply_speed_options(self, bundle: ModelBundle, training: "TrainingSection", train_text_encoder: bool) -> None:
        """Gradient checkpointing, attention kernel, memory format and compilation as the job asks."""
        if training.gradient_checkpointing:
            bundle.denoiser.enable_gradient_checkpointing()
            if train_text_encoder:
                for te in bundle.text_encoders:
                    te.gradient_checkpointing_enable()

    # Class names of the denoiser's repeated blocks: what ``training.compile_scope = "blocks"`` compiles
    # (engine/compiling.py; each block's code compiles once and is reused by its siblings).
    compile_block_classes: tuple[str, ...] = ()

    def compile_blocks(self, denoiser: Any) -> list[Any]:
        """The denoiser's repeated blocks, in order (the "blocks" compile scope); none means compile all of it."""
        return [m for _, m in denoiser.named_modules() if type(m).__name__ in self.compile_block_classes]

    def store_frozen_on_host(self, bundle: ModelBundle, training: "TrainingSection") -> None:
        """Right after a run loads the model, before anything moves to the device: store frozen parts that are never
        trained as the job asks (Flux/SD3 with ``training.base_weights_fp8``: T5-XXL in fp8). The denoiser waits for
        ``apply_speed_options`` (its LoRA comes first). Tag ``bundle.extra['text_storage']`` when the text encodings
        change, so cached ones made otherwise are not reused. SD: nothing."""

    def place_denoiser(self, bundle: ModelBundle, training: "TrainingSection", device: "torch.device | str") -> None:
        """Move the denoiser to the run's device. The run keeps it on the host from loading until the LoRA is added
        and ``apply_speed_options`` ran, so a family storing frozen weights in fp8 casts them on the host and only
        fp8 reaches the device (Flux/SD3: tensor by tensor, swapped blocks' frozen weights left on the host)."""
        bundle.denoiser.to(device)

    # ------------------------------------------------------------------------------------------- export

    @abc.abstractmethod
    def kohya_name(self, component: str, module_path: str, denoiser_config: Any = None) -> str:
        """The kohya LoRA name (key without ``.lora_down.weight``) of one adapted module."""

    def kohya_modules(self, layers: list[tuple[str, str, "torch.Tensor", "torch.Tensor", float]],
                      denoiser_config: Any = None) -> list[tuple[str, "torch.Tensor", "torch.Tensor", float]]:
        """The kohya modules a file carries, from the adapted layers ``(component, module path, down, up, alpha)``:
        ``(kohya name, down, up, alpha)``. One each here; a family whose original model fuses layers diffusers
        keeps apart (Flux's q/k/v) joins their LoRAs into one."""
        return [(self.kohya_name(c, path, denoiser_config), down, up, alpha) for c, path, down, up, alpha in layers]

    def diffusers_lora_key(self, component: str, name: str) -> str:
        """A peft state-dict key as diffusers' ``save_lora_weights`` layout writes it (without the component)."""
        return name

    @abc.abstractmethod
    def metadata_ids(self, prediction_type: str) -> dict[str, str]:
        """The ids a LoRA file carries for this family: ss_base_model_version, ss_v2, modelspec.architecture,
        modelspec.implementation, modelspec.prediction_type (the values A1111/ComfyUI/Civitai sort by)."""

    def checkpoint_metadata_ids(self, prediction_type: str) -> dict[str, str]:
        """modelspec.architecture/implementation of a full checkpoint of this family (merge writes one)."""
        raise NotImplementedError(f"{self.label} models cannot be written as one checkpoint file yet")

    def single_file_state_dict(self, bundle: ModelBundle, dtype: "torch.dtype | None" = None) -> dict[str, "torch.Tensor"]:
        """The whole model in the single-file layout other tools load (merge, conversions)."""
        raise NotImplementedError(f"{self.label} models cannot be written as one checkpoint file yet")

    def single_file_extras(self, bundle: ModelBundle, original: Path | None, written: set[str],
                           dtype: "torch.dtype | None" = None) -> dict[str, "torch.Tensor"]:
        """Tensors a written checkpoint should also carry: markers (v-prediction …) and keys of the original file
        the conversion does not produce but the original loaders expect (those cast to ``dtype``)."""
        return {}

    def consumer_problems(self) -> Mapping[str, str]:
        """Tools (adapters.consumers.CONSUMERS) that cannot load this family's LoRA files at all, each with the reason
        (the export report says so instead of "loads fully"); none for SD, which every tool reads."""
        return {}

    def kohya_index(self, bundle: ModelBundle) -> dict[str, tuple[str, Any]]:
        """Every kohya name a layer may carry in files of the wild → (component, module), for baking a LoRA."""
        raise NotImplementedError(f"baking a LoRA into a {self.label} model is not supported yet")

    # ------------------------------------------------------------------------------------------ preview

    @abc.abstractmethod
    def pipeline(self, bundle: ModelBundle) -> Any:
        """A diffusers pipeline over the bundle's modules (no copies) with the family's preview sampler."""

    def job_defaults(self) -> dict[str, Any]:
        """Where a job for this family starts (dotted job fields → values): its native size and preview sampler.
        The Settings page offers it as a preset named after the family."""
        return {"dataset.resolution": self.native_resolution(), "sampling.steps": self.preview.steps,
                "sampling.guidance": self.preview.guidance}

    def pipeline_lora(self, bundle: ModelBundle, path: Path) -> Any:
        """What the family's pipeline ``load_lora_weights`` gets for a LoRA file (Try & Export): the path here, a
        diffusers-layout state dict where diffusers cannot read the file's own layout (SD3's kohya files)."""
        return str(path)

    def preview_prompt_kwargs(self, bundle: ModelBundle, prompts: list[str],
                              negative_prompt: str) -> dict[str, Any] | None:
        """The prompts (and the negative prompt, one per prompt) as the pipeline's ``*_embeds`` arguments when the job
        encodes text its own way (long captions, clip skip), so previews see what training saw; None lets the
        pipeline encode the prompts itself."""
        return None

    def preview_embeds(self, bundle: ModelBundle, prompts: list[str], negative_prompt: str) -> dict[str, Any] | None:
        """The prompts as the pipeline's ``*_embeds`` arguments, encoded now so previews can run later without the text
        encoders on the device (a run encodes its preview prompts once, beside the captions, when it caches text:
        Flux's and SD3's T5-XXL would not fit beside the model on a 12 GB card). None: previews need the encoders."""
        return None

    def pipeline_kwargs(self, *, negative_prompt: str, guidance: float, lora_scale: float | None) -> dict[str, Any]:
        """Keyword arguments of the pipeline call besides prompt, steps, size and generator."""
        kwargs: dict[str, Any] = {"negative_prompt": negative_prompt or None, "guidance_scale": guidance}
        if lora_scale is not None:
            kwargs["cross_attention_kwargs"] = {"scale": lora_scale}
        return kwargs

    # --------------------------------------------------------------------------------------- cost model

    @abc.abstractmethod
    def meta_denoiser(self, config: Mapping[str, Any]) -> Any:
        """The denoiser of this config built on the current (meta) device: shapes only, for counting FLOPs."""

    @abc.abstractmethod
    def denoiser_example_inputs(self, config: Mapping[str, Any], batch: int, latent_h: int,
                                latent_w: int) -> tuple[tuple, dict]:
        """Positional and keyword inputs of one denoiser forward (meta tensors) at this latent size."""

    def text_encoder_flops(self, folder: Path, batch: int) -> int:
        """FLOPs of the text encoders (config folder) over ``batch`` captions; 0 if unknown."""
        return 0

    def image_size_multiple(self, bundle: ModelBundle) -> int:
        """What a generated image's sides must be a multiple of (previews round down to it): the VAE's downsampling
        here; transformer families on 2 x 2 latent patches need twice that (SD3's pipeline refuses other sizes)."""
        return 2 ** (len(bundle.vae.config.block_out_channels) - 1)

    def preview_batch_factor(self, guidance: float) -> int:
        """Denoiser batch per preview image: 2 under classifier-free guidance (scale > 1: the pipeline runs the
        prompt and the negative prompt together), 1 for a family whose guidance is an input (distilled)."""
        return 2 if guidance > 1 else 1

    @abc.abstractmethod
    def full_size_parameters(self) -> dict[str, float]:
        """Parameter counts of the family's reference model: {"denoiser", "text_encoders", "vae"}."""

    def denoiser_weight_bytes(self, training: "TrainingSection", weight_bytes: int) -> float:
        """GPU bytes of the frozen denoiser weights under the job's memory options (SD: all resident, as computed)."""
        return self.full_size_parameters()["denoiser"] * weight_bytes

    def text_encoder_weight_bytes(self, training: "TrainingSection", weight_bytes: int) -> float:
        """GPU bytes of the text encoders' weights as the run stores them (SD: all in the load dtype)."""
        return self.full_size_parameters()["text_encoders"] * weight_bytes

    @abc.abstractmethod
    def activation_gib(self, gradient_checkpointing: bool) -> float:
        """Activation memory kept for backward per image at the native resolution, bf16, GiB (measured)."""

    def denoiser_config(self, folder: Path) -> dict[str, Any] | None:
        """The denoiser's config of a diffusers (or bundled config) folder, or None."""
        from studio.engine.jsonfile import JsonFileError, read_json_object

        try:
            return read_json_object(Path(folder) / self.denoiser_name / "config.json")
        except JsonFileError:
            return None

    # ---------------------------------------------------------------------------------------- test model

    @abc.abstractmethod
    def build_tiny(self, prediction_type: str = "epsilon", seed: int = 0) -> Any:
        """A random diffusers pipeline of the family's architecture, small enough to train on a CPU in seconds."""

    def save_tiny(self, folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
        """Build the tiny model and save it as a diffusers folder; returns the folder."""
        self.build_tiny(prediction_type, seed).save_pretrained(folder, safe_serialization=True)
        return Path(folder)

    def warm_up(self) -> None:
        """Touch the lazily imported library classes the family uses (one thread at a time, see ui.backend)."""
