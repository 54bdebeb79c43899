"""LoHa (peft LoHaConfig, LyCORIS's algorithm): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) × alpha / rank."""

# peft's LoHa parameters carry LyCORIS's names and shapes (hada_w1_a is out × rank, hada_w1_b rank × in·k·k), so
# the file holds them as they are, with the module's alpha; ComfyUI, A1111/Forge, InvokeAI and LyCORIS all
# scale by alpha / rank with rank = hada_w1_b's rows. Convolutions use the flattened form (no Tucker hada_t1/t2),
# LyCORIS's default.

from __future__ import annotations

from typing import Any

import torch

from studio.engine.adapters.base import ADAPTER_NAME, Adapter, AdapterFileError, FileModule, targets

_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # LyCORIS's CP form for convolutions: t (r, r, k, k), wa (r, out), wb (r, in) → (out, in, k, k)
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


class LohaAdapter(Adapter):
    name = "loha"
    label = "LoHa (LyCORIS)"
    network_module = "lycoris.kohya"
    algo = "loha"
    file_keys = ("hada_w1_a",)

    def peft_config(self, lora, family, component, model) -> Any:
        from peft import LoHaConfig

        found = targets(lora, family, component, model)
        return LoHaConfig(
            r=lora.rank,
            alpha=lora.alpha,
            module_dropout=lora.dropout,
            target_modules=found.pattern,
            rank_pattern=found.rank_pattern,
            alpha_pattern=found.alpha_pattern,
            use_effective_conv2d=False,
            init_weights=True,  # w2_b = 0: the untrained LoHa changes nothing
        )

    def owns_layer(self, layer) -> bool:
        from peft.tuners.loha import LoHaLayer

        return isinstance(layer, LoHaLayer) and ADAPTER_NAME in layer.hada_w1_a

    def export_tensors(self, layer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {part: getattr(layer, part)[ADAPTER_NAME].detach().to("cpu", dtype).contiguous() for part in _PARTS}
        out["alpha"] = torch.tensor(float(layer.alpha[ADAPTER_NAME]), dtype=torch.float32)
        return out

    def export_suffixes(self, layer) -> list[str]:
        return [*_PARTS, "alpha"]

    def trained_delta(self, layer) -> torch.Tensor:
        return layer.get_delta_weight(ADAPTER_NAME).detach().float()

    def network_args(self, lora) -> dict[str, str]:
        args = {"algo": "loha", "preset": "full"}
        if lora.targets == "+conv":
            args.update(conv_dim=str(lora.conv_rank or lora.rank), conv_alpha=str(float(lora.conv_alpha or lora.alpha)))
        return args

    # ------------------------------------------------------------------------------------------ file side

    def file_module(self, name: str, tensors: dict[str, torch.Tensor]) -> FileModule:
        missing = [p for p in _PARTS if p not in tensors]
        if missing:
            raise AdapterFileError(f"LoHa module {name} lacks {', '.join(missing)}; the file is incomplete")
        w1a, w1b, w2a, w2b = (tensors[p] for p in _PARTS)
        cp = "hada_t1" in tensors or "hada_t2" in tensors
        if cp and not ("hada_t1" in tensors and "hada_t2" in tensors):
            raise AdapterFileError(f"LoHa module {name} has only one of hada_t1/hada_t2")
        rank = w1b.shape[0]
        if cp:
            ok = w1a.shape[0] == w1b.shape[0] == w2a.shape[0] == w2b.shape[0] == tensors["hada_t1"].shape[0] and \
                w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1]
        else:
            ok = (w1a.shape[1] == rank and w2a.shape[1] == w2b.shape[0]
                  and w1a.shape[0] == w2a.shape[0] and w1b.shape[1] == w2b.shape[1])
        if not ok:
            shapes = ", ".join(f"{p} {tuple(tensors[p].shape)}" for p in _PARTS)
            raise AdapterFileError(f"LoHa module {name}: the factors do not fit together ({shapes})")
        alpha = float(tensors["alpha"].float().item()) if "alpha" in tensors else float(rank)
        return FileModule(name, self, tensors, alpha)

    def file_rank(self, module: FileModule) -> int:
        return int(module.tensors["hada_w1_b"].shape[0])

    def file_update(self, module: FileModule) -> torch.Tensor:
        t = {k: v.float() for k, v in module.tensors.items()}
        if "hada_t1" in t:
            w = _cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * _cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return w * (module.alpha / self.file_rank(module))


LOHA = LohaAdapter()
