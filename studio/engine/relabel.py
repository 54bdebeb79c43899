"""Re-export a finished LoRA file: new title, trigger words and description, or the diffusers layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from studio.engine.export import _write_chunks, export_diffusers_lora, read_lora, serialize_with_hashes

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.families import ModelBundle

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights(folder) looks for


def relabel_lora(
    src: Path,
    dst: Path,
    *,
    title: str | None = None,
    trigger_words: list[str] | None = None,
    description: str | None = None,
) -> Path:
    """Copy ``src`` to ``dst`` atomically with updated ``modelspec.*``/``ss_*`` metadata; tensors are unchanged.

    ``None`` keeps a value as it is; an empty string or list clears it. The file hashes (``sshs_*``) are
    recomputed, and ``ss_output_name`` follows the new file name, which is how A1111 lists the LoRA.
    """
    tensors, metadata = read_lora(Path(src))  # refuses anything that is not a LoRA
    dst = Path(dst)
    metadata["ss_output_name"] = dst.stem
    if title is not None:
        metadata["modelspec.title"] = title.strip() or dst.stem
    if trigger_words is not None:
        metadata["modelspec.trigger_phrase"] = ", ".join(w.strip() for w in trigger_words if w.strip())
    if description is not None:
        if description.strip():
            metadata["modelspec.description"] = description.strip()
        else:
            metadata.pop("modelspec.description", None)
        metadata["ss_training_comment"] = description.strip()
    _write_chunks(dst, serialize_with_hashes(tensors, metadata))  # atomic, as the trainer's own export
    return dst


def lora_file_to_diffusers(bundle: "ModelBundle", src: Path, out_dir: Path, *, title: str | None = None,
                           trigger_words: list[str] | None = None, description: str | None = None) -> Path:
    """Write ``src`` (any layout diffusers reads) in the diffusers/PEFT layout, as ``out_dir/pytorch_lora_weights.safetensors``.

    The file is loaded onto ``bundle`` under the trainer's adapter name, so the engine's own diffusers writer
    serves both paths; the adapter is removed again afterwards. Title, trigger words and description are
    written as in :func:`relabel_lora`.
    """
    from studio.engine.lora import ADAPTER_NAME, components, lora_layers

    if any(lora_layers(m) for m in components(bundle).values()):
        raise RuntimeError("this model already carries a LoRA being trained; load a fresh copy to convert files")
    _, metadata = read_lora(Path(src))
    pipe = bundle.pipeline()
    pipe.load_lora_weights(str(src), adapter_name=ADAPTER_NAME)
    try:
        keep = {k: v for k, v in metadata.items() if k.startswith(("modelspec.", "ss_output_name"))}
        if title is not None:
            keep["modelspec.title"] = title.strip() or Path(src).stem
        if trigger_words is not None:
            keep["modelspec.trigger_phrase"] = ", ".join(w.strip() for w in trigger_words if w.strip())
        if description is not None:
            keep["modelspec.description"] = description.strip()
        return export_diffusers_lora(bundle, Path(out_dir) / DIFFUSERS_WEIGHT_NAME, metadata=keep)
    finally:
        pipe.delete_adapters(ADAPTER_NAME)
