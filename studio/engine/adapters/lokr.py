"""LoKr (peft LoKrConfig, LyCORIS's algorithm): ΔW = w1 ⊗ w2 (Kronecker), each factor full or a low-rank pair."""

# peft's LoKr parameters carry LyCORIS's names and shapes. The scale is where they differ: peft always scales by
# alpha / r, LyCORIS and every consumer (ComfyUI, A1111/Forge, InvokeAI) by alpha / rank only when a factor is
# decomposed (rank = lokr_w1_b's or lokr_w2_b's rows) and by 1 when both factors are full matrices. The export
# folds peft's scale into lokr_w1 in that case, so the file means what was trained everywhere. Full-matrix mode
# (LyCORIS's full_matrix) is peft with a rank above every factor's size and alpha equal to it (scale 1).

from __future__ import annotations

from typing import Any

import torch

from studio.engine.adapters.base import ADAPTER_NAME, Adapter, AdapterFileError, FileModule, targets

FULL_MATRIX_RANK = 1 << 16  # above half of any factor's side, so peft keeps both factors whole


class LokrAdapter(Adapter):
    name = "lokr"
    label = "LoKr (LyCORIS)"
    network_module = "lycoris.kohya"
    algo = "lokr"
    file_keys = ("lokr_w1", "lokr_w1_a")

    def peft_config(self, lora, family, component, model) -> Any:
        from peft import LoKrConfig

        found = targets(lora, family, component, model)
        rank, alpha = lora.rank, lora.alpha
        rank_pattern, alpha_pattern = found.rank_pattern, found.alpha_pattern
        if lora.lokr_full_matrix:
            rank, alpha, rank_pattern, alpha_pattern = FULL_MATRIX_RANK, float(FULL_MATRIX_RANK), {}, {}
        return LoKrConfig(
            r=rank,
            alpha=alpha,
            module_dropout=lora.dropout,
            target_modules=found.pattern,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            decompose_both=lora.lokr_decompose_both,
            decompose_factor=lora.lokr_factor,
            use_effective_conv2d=False,
            init_weights=True,  # w1 = 0: the untrained LoKr changes nothing
        )

    def owns_layer(self, layer) -> bool:
        from peft.tuners.lokr import LoKrLayer

        return isinstance(layer, LoKrLayer) and (ADAPTER_NAME in layer.lokr_w1 or ADAPTER_NAME in layer.lokr_w1_a)

    def export_tensors(self, layer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for part in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            if ADAPTER_NAME in getattr(layer, part):
                out[part] = getattr(layer, part)[ADAPTER_NAME].detach().float()
        decomposed = "lokr_w1_b" in out or "lokr_w2_b" in out
        alpha = float(layer.alpha[ADAPTER_NAME])
        if not decomposed:
            out["lokr_w1"] = out["lokr_w1"] * layer.scaling[ADAPTER_NAME]
            alpha = float(layer.r[ADAPTER_NAME])  # consumers ignore it here; kept equal to r like LyCORIS's buffer
        tensors = {k: v.to("cpu", dtype).contiguous() for k, v in out.items()}
        tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return tensors

    def export_suffixes(self, layer) -> list[str]:
        parts = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        return [p for p in parts if ADAPTER_NAME in getattr(layer, p)] + ["alpha"]

    def trained_delta(self, layer) -> torch.Tensor:
        return layer.get_delta_weight(ADAPTER_NAME).detach().float()

    def network_args(self, lora) -> dict[str, str]:
        args = {"algo": "lokr", "preset": "full", "factor": str(lora.lokr_factor),
                "decompose_both": str(bool(lora.lokr_decompose_both)), "full_matrix": str(bool(lora.lokr_full_matrix))}
        if lora.targets == "+conv":
            args.update(conv_dim=str(lora.conv_rank or lora.rank), conv_alpha=str(float(lora.conv_alpha or lora.alpha)))
        return args

    # ------------------------------------------------------------------------------------------ file side

    def file_module(self, name: str, tensors: dict[str, torch.Tensor]) -> FileModule:
        def factor(i: int) -> tuple[int, int] | None:
            if f"lokr_w{i}" in tensors:
                w = tensors[f"lokr_w{i}"]
                return int(w.shape[0]), int(w.shape[1])
            a, b = tensors.get(f"lokr_w{i}_a"), tensors.get(f"lokr_w{i}_b")
            if a is None or b is None:
                return None
            if f"lokr_t{i}" in tensors:
                return int(a.shape[1]), int(b.shape[1])
            if a.shape[1] != b.shape[0]:
                raise AdapterFileError(f"LoKr module {name}: lokr_w{i}_a {tuple(a.shape)} and lokr_w{i}_b "
                                       f"{tuple(b.shape)} do not fit together (rank {a.shape[1]} vs {b.shape[0]})")
            return int(a.shape[0]), int(b.shape[1])

        for i in (1, 2):
            if factor(i) is None:
                raise AdapterFileError(f"LoKr module {name} lacks its lokr_w{i} (or lokr_w{i}_a/_b) factor; the file "
                                       "is incomplete")
        dim = self.file_rank_of(tensors)
        alpha = float(tensors["alpha"].float().item()) if "alpha" in tensors else None
        return FileModule(name, self, tensors, alpha if alpha is not None else (float(dim) if dim else None))

    @staticmethod
    def file_rank_of(tensors: dict[str, torch.Tensor]) -> int | None:
        for key in ("lokr_w1_b", "lokr_w2_b"):
            if key in tensors:
                return int(tensors[key].shape[0])
        return None

    def file_rank(self, module: FileModule) -> int | None:
        return self.file_rank_of(module.tensors)

    def file_update(self, module: FileModule) -> torch.Tensor:
        t = {k: v.float() for k, v in module.tensors.items()}
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        dim = self.file_rank(module)
        scale = module.alpha / dim if dim and module.alpha is not None else 1.0
        return torch.kron(w1, w2) * scale


LOKR = LokrAdapter()
