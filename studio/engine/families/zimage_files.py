"""Z-Image files as people keep them: diffusers folders (ZImagePipeline layout: transformer, text_encoder (Qwen3),
tokenizer, vae, scheduler), loaded offline straight into the training dtype.

Qwen3's tokenizer is not bundled (151 k BPE tokens, Qwen's own files): it comes from the folder's ``tokenizer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from studio.engine.families.base import ModelBundle
from studio.engine.families.loading import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, check_complete, weights_variant
from studio.engine.safe_load import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection
    from studio.engine.detect import Detection
    from studio.engine.families.zimage import ZImageFamily
    from studio.engine.safe_load import WeightsFile

FOLDER_PARTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


def _check_prediction(family: "ZImageFamily", model: "ModelSection") -> None:
    if model.prediction_type not in ("auto", "flow"):
        raise ModelLoadError(f"{family.label} models are trained as rectified flow, not '{model.prediction_type}'; "
                             "set model.prediction_type to 'auto'")


def load_tokenizer(folder: Path, what: str) -> Any:
    """Qwen3's tokenizer from a ``tokenizer`` folder, with the chat template the pipeline applies."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: the Qwen3 tokenizer in '{folder}' cannot be read ({exc}); it needs "
                             "tokenizer.json (or vocab.json + merges.txt) and tokenizer_config.json") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{what}: the tokenizer in '{folder}' has no chat template (Z-Image wraps every caption in "
                             "Qwen3's); use the tokenizer folder of the Z-Image download")
    return tokenizer


def load_folder(family: "ZImageFamily", path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    """A Z-Image diffusers folder, every part offline; the VAE stays fp32 (as the other flow families' do)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Model

    _check_prediction(family, model)
    missing = [sub for sub in FOLDER_PARTS if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(f"'{path.name}' is a Z-Image folder without its {', '.join(repr(m) for m in missing)} "
                             "folder(s); the download may be incomplete")
    try:
        transformer = ZImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=dtype, local_files_only=True,
            variant=weights_variant(path / "transformer", DIFFUSERS_WEIGHTS))
        check_complete(transformer, "transformer", path.name)
        text_encoder = Qwen3Model.from_pretrained(
            path / "text_encoder", dtype=dtype, local_files_only=True,
            variant=weights_variant(path / "text_encoder", TRANSFORMERS_WEIGHTS))
        check_complete(text_encoder, "Qwen3 text encoder", path.name)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, local_files_only=True,
                                            variant=weights_variant(path / "vae", DIFFUSERS_WEIGHTS))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{path}' looks like a Z-Image folder but a part could not be read: {exc}") from exc
    tokenizer = load_tokenizer(path / "tokenizer", f"'{path.name}'")
    if model.vae:
        vae = load_vae_file(family, Path(model.vae).expanduser())
    return ModelBundle(family=family, prediction_type="flow", denoiser=transformer, vae=vae,
                       text_encoders=[text_encoder], tokenizers=[tokenizer], noise_scheduler=scheduler,
                       source=str(path), extra={"format": "diffusers"})


def load_vae_file(family: "ZImageFamily", path: Path) -> Any:
    """FLUX.1's 16-channel VAE ("ae.safetensors", BFL or diffusers layout) through the bundled config, in fp32."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_single_file(str(path), config=str(family.bundled_config_dir()), subfolder="vae",
                                          torch_dtype=torch.float32, local_files_only=True)


# ------------------------------------------------------------------------------------------------ single files


def detect_zimage_file(family: "ZImageFamily", shapes: Mapping[str, tuple[int, ...]]) -> "Detection | None":
    """Single files are not read yet (see part_files); None leaves them to detect.py's "not supported" wording."""
    return None


def part_files(family: "ZImageFamily", path: Path, model: "ModelSection") -> dict[str, Path | None]:
    return {}


def load_single_file(family: "ZImageFamily", path: Path, weights: "WeightsFile", detection: "Detection",
                     model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    raise ModelLoadError(f"'{path.name}': Z-Image single files cannot be loaded yet; use the diffusers folder "
                         "(Tongyi-MAI/Z-Image-Turbo's layout: transformer, text_encoder, tokenizer, vae, scheduler)")
