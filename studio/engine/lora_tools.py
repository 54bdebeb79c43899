"""LoRA tools on files: resize to a lower rank by SVD (with the kept Frobenius-norm fraction), merge several LoRAs."""

# Both work on the kohya layout's LoRA/LoCon modules (ΔW = up @ down × alpha / rank), where the result is again a
# LoRA every consumer loads. LoHa, LoKr and DoRA modules are refused with the reason (their ΔW is not a low-rank
# product, or depends on the base weights); bake those into a checkpoint instead (studio.engine.merge).

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.engine.adapters import FileModule, read_modules
from studio.engine.adapters.base import AdapterFileError
from studio.engine.export import LoraFileError, _write_chunks, read_lora, serialize_with_hashes


class LoraToolError(ValueError):
    """A resize/merge that cannot be done; the message says why and what to do."""


@dataclass
class ResizeResult:
    path: Path
    modules: int
    rank_before: int
    rank_after: int  # the largest kept rank
    kept_fraction: float  # ‖kept ΔW‖_F / ‖ΔW‖_F over all modules together
    worst_module_fraction: float
    ranks: dict[int, int] = field(default_factory=dict)  # kept rank → module count


def _lora_modules(path: Path) -> tuple[dict[str, FileModule], dict[str, str], torch.dtype]:
    try:
        tensors, metadata = read_lora(path)
        modules = read_modules(tensors) if any(k.endswith(".lora_down.weight") or ".hada_" in k or ".lokr_" in k
                                               for k in tensors) else None
    except (LoraFileError, AdapterFileError) as exc:
        raise LoraToolError(str(exc)) from None
    if modules is None:
        raise LoraToolError(f"'{path.name}' is in the diffusers/PEFT layout; the LoRA tools work on the kohya layout "
                            "LoRA Studio exports by default")
    for name, module in modules.items():
        if module.adapter.name != "lora" or "dora_scale" in module.tensors:
            kind = "DoRA" if "dora_scale" in module.tensors else module.adapter.label
            raise LoraToolError(f"'{path.name}' holds {kind} modules (e.g. {name}); resize and merge work on "
                                "LoRA/LoCon only. Bake it into a checkpoint instead")
    dtype = next(iter(modules.values())).tensors["lora_down.weight"].dtype
    return modules, metadata, dtype


def _delta(module: FileModule) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(ΔW as out × in·k·k, up's trailing shape, down's trailing shape)."""
    down, up = module.tensors["lora_down.weight"], module.tensors["lora_up.weight"]
    return module.adapter.file_update(module), tuple(up.shape[2:]), tuple(down.shape[2:])


def _keep(s: torch.Tensor, rank: int | None, fraction: float | None) -> int:
    """How many singular values to keep: at most ``rank``, and enough for ``fraction`` of the norm."""
    total = float((s ** 2).sum())
    limit = len(s) if rank is None else max(1, min(rank, len(s)))
    if fraction is None or total == 0.0:
        return limit
    cumulative = torch.cumsum(s ** 2, 0) / total
    # the smallest k whose kept norm fraction sqrt(cum[k-1]) reaches the asked fraction
    needed = int(torch.searchsorted(cumulative, torch.tensor(fraction ** 2, dtype=cumulative.dtype) - 1e-12)) + 1
    return max(1, min(needed, len(s))) if rank is None else max(1, min(needed, limit))


def _factors(delta: torch.Tensor, k: int, up_tail: tuple[int, ...], down_tail: tuple[int, ...]):
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:k].sqrt()
    up = (u[:, :k] * root).reshape(delta.shape[0], k, *up_tail)
    down = (root[:, None] * vh[:k]).reshape(k, delta.shape[1] // math.prod(down_tail), *down_tail)
    return up, down, s


def _write(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], metadata: dict[str, str],
           dtype: torch.dtype, rank: int, extra: dict[str, str]) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for name, (up, down, alpha) in modules.items():
        tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    meta.update({"ss_network_dim": str(rank), "ss_network_alpha": str(float(rank)), **extra})
    path = Path(path)
    _write_chunks(path, serialize_with_hashes(tensors, meta))
    return path


def resize_lora(src: str | Path, dst: str | Path, *, rank: int | None = None, fraction: float | None = None) -> ResizeResult:
    """Write ``src`` with each module cut to ``rank`` and/or to the fewest ranks keeping ``fraction`` of ‖ΔW‖_F.

    With a fraction, every module keeps at least that fraction (so the whole file does too); with only a rank,
    the kept fraction is reported. Alpha is set to the new rank (scale 1): the singular values carry the scale.
    """
    src, dst = Path(src), Path(dst)
    if rank is None and fraction is None:
        raise LoraToolError("give a rank (--rank) or a norm fraction to keep (--fraction), or both")
    if rank is not None and rank < 1:
        raise LoraToolError(f"rank must be at least 1, got {rank}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise LoraToolError(f"fraction must be in (0, 1], got {fraction:g}")
    modules, metadata, dtype = _lora_modules(src)
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    kept_sq = total_sq = 0.0
    worst = 1.0
    ranks: dict[int, int] = {}
    before = max(m.rank for m in modules.values())
    for name, module in modules.items():
        delta, up_tail, down_tail = _delta(module)
        s = torch.linalg.svdvals(delta)
        k = _keep(s, rank, fraction)
        up, down, s = _factors(delta, k, up_tail, down_tail)
        out[name] = (up, down, float(k))
        kept, total = float((s[:k] ** 2).sum()), float((s ** 2).sum())
        kept_sq, total_sq = kept_sq + kept, total_sq + total
        worst = min(worst, math.sqrt(kept / total) if total else 1.0)
        ranks[k] = ranks.get(k, 0) + 1
    kept_fraction = math.sqrt(kept_sq / total_sq) if total_sq else 1.0
    new_rank = max(ranks)
    info = {"from": src.name, "rank": rank, "fraction": fraction, "kept_fraction": round(kept_fraction, 6)}
    _write(dst, out, metadata, dtype, new_rank, {"lora_studio.resize": json.dumps(info)})
    return ResizeResult(dst, len(out), before, new_rank, kept_fraction, worst, dict(sorted(ranks.items())))


def merge_loras(sources: list[tuple[str | Path, float]], dst: str | Path, *, rank: int | None = None) -> dict:
    """One LoRA equal to Σ strength_i · ΔW_i (exact: the factors are stacked); ``rank`` then resizes it by SVD."""
    if len(sources) < 2:
        raise LoraToolError("merging needs at least two LoRA files")
    dst = Path(dst)
    read = [(Path(p), float(s), *_lora_modules(Path(p))) for p, s in sources]
    families = {m.get("ss_base_model_version") for _, _, _, m, _ in read if m.get("ss_base_model_version")}
    if len(families) > 1:
        raise LoraToolError(f"the LoRAs were trained for different base models ({', '.join(sorted(families))}); "
                            "merge only LoRAs of one model family")
    names = sorted({n for _, _, mods, _, _ in read for n in mods})
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name in names:
        ups, downs = [], []
        for path, strength, mods, _, _ in read:
            if name not in mods:
                continue
            m = mods[name]
            up, down = m.tensors["lora_up.weight"].float(), m.tensors["lora_down.weight"].float()
            # Fold strength × alpha / rank into up: the stacked LoRA then has scale 1 (alpha = total rank).
            ups.append(up * (strength * m.alpha / m.rank))
            downs.append(down)
        shapes = {(u.shape[0], *d.shape[1:]) for u, d in zip(ups, downs)}
        if len(shapes) > 1:
            raise LoraToolError(f"module {name} has different shapes in the files ({sorted(shapes)}); they were "
                                "made for different models")
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)
        out[name] = (up, down, float(up.shape[1]))
    first_meta, dtype = read[0][3], read[0][4]
    total_rank = max(u.shape[1] for u, _, _ in out.values())
    info = {"sources": [{"file": p.name, "strength": s} for p, s, *_ in read]}
    path = _write(dst, out, first_meta, dtype, total_rank, {"lora_studio.merge_loras": json.dumps(info),
                                                             "ss_output_name": dst.stem, "modelspec.title": dst.stem})
    result = {"path": str(path), "modules": len(out), "rank": total_rank, "sources": len(read)}
    if rank is not None and rank < total_rank:
        resized = resize_lora(path, path, rank=rank)
        result.update(rank=resized.rank_after, kept_fraction=resized.kept_fraction)
    return result
