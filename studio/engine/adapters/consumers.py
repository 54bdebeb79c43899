"""The export report: per consumer (A1111/Forge, ComfyUI, InvokeAI, kohya, diffusers), whether a LoRA file loads fully.

Derived from the same key conventions the tests check (tests/engine/test_export.py, test_adapters.py,
test_dora_consumers.py): the layout (kohya or diffusers/PEFT), the algorithm of each module, DoRA's axis, and the
family's support in each tool. Every entry carries a reason when the answer is not a plain yes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

CONSUMERS = ("A1111/Forge", "ComfyUI", "InvokeAI", "kohya", "diffusers")

FULL, PARTIAL, NO, APPROX = "loads fully", "loads partly", "does not load", "loads, differs"


@dataclass(frozen=True)
class ConsumerVerdict:
    consumer: str
    status: str  # FULL | PARTIAL | NO | APPROX
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == FULL

    def line(self) -> str:
        mark = "✓" if self.ok else ("~" if self.status in (PARTIAL, APPROX) else "✗")
        return f"{mark} {self.consumer}: {self.status}" + (f" ({self.reason})" if self.reason else "")


def _kohya_verdicts(network_type: str, metadata: dict[str, str], tucker: bool) -> list[ConsumerVerdict]:
    if tucker:
        return [ConsumerVerdict(c, PARTIAL if c != "diffusers" else NO, "Tucker (lora_mid/hada_t/lokr_t) modules; "
                                "not checked in this tool") for c in CONSUMERS]
    if network_type in ("lora", "locon"):
        return [ConsumerVerdict(c, FULL) for c in CONSUMERS]
    if network_type in ("loha", "lokr"):
        label = "LoHa" if network_type == "loha" else "LoKr"
        return [
            ConsumerVerdict("A1111/Forge", FULL, f"built-in Lora extension reads LyCORIS {label}"),
            ConsumerVerdict("ComfyUI", FULL, f"comfy/weight_adapter/{network_type}.py"),
            ConsumerVerdict("InvokeAI", FULL, f"reads LyCORIS {label} keys"),
            ConsumerVerdict("kohya", FULL, "with LyCORIS installed (ss_network_module = lycoris.kohya); plain "
                            "sd-scripts networks.lora cannot read it"),
            ConsumerVerdict("diffusers", NO, f"load_lora_weights converts only lora_down/lora_up keys, not {label}"),
        ]
    if network_type == "dora":
        comfy_exact = metadata.get("lora_studio.dora_target") == "comfyui"
        comfy = (ConsumerVerdict("ComfyUI", FULL, "dora_scale rescaled for ComfyUI's formula; exact on the base model "
                                 "it was trained on") if comfy_exact else
                 ConsumerVerdict("ComfyUI", APPROX, "its output-axis DoRA divides by ‖W‖, not ‖W + ΔW‖; export with "
                                 "DoRA target 'comfyui' for an exact file"))
        return [
            ConsumerVerdict("A1111/Forge", NO if not comfy_exact else APPROX,
                            "A1111 applies only the input-column DoRA decomposition, so an output-axis dora_scale "
                            "gives another model; Forge behaves like ComfyUI"),
            comfy,
            ConsumerVerdict("InvokeAI", NO, "does not apply dora_scale (not verified by a test here)"),
            ConsumerVerdict("kohya", FULL if not comfy_exact else APPROX,
                            "LyCORIS (wd_on_output) reproduces it exactly" if not comfy_exact else
                            "the magnitudes are rescaled for ComfyUI; LyCORIS applies them as written"),
            ConsumerVerdict("diffusers", NO, "drops dora_scale with a warning and loads a plain LoRA; use the "
                            "diffusers-layout copy"),
        ]
    return [ConsumerVerdict(c, NO, f"unknown network type {network_type}") for c in CONSUMERS]


def report(info: dict[str, Any]) -> list[ConsumerVerdict]:
    """The verdict per consumer for a file described by ``studio.engine.export.describe_lora``."""
    layout, network_type = info.get("layout"), info.get("network_type")
    metadata = info.get("metadata") or {}
    if layout == "diffusers":
        dora = " (DoRA included)" if network_type == "dora" else ""
        return [
            ConsumerVerdict("A1111/Forge", NO, "A1111 ignores diffusers/PEFT keys (lora_A/lora_B) without a message"),
            ConsumerVerdict("ComfyUI", PARTIAL, "applies part of the PEFT layout, warns 'lora key not loaded'; "
                            "the alpha lives only in metadata it ignores"),
            ConsumerVerdict("InvokeAI", NO, "expects the kohya layout (not verified by a test here)"),
            ConsumerVerdict("kohya", NO, "sd-scripts reads only lora_unet_/lora_te_ keys"),
            ConsumerVerdict("diffusers", FULL, "load_lora_weights rebuilds the exact adapter config" + dora),
        ]
    verdicts = _kohya_verdicts(str(network_type), metadata, bool(info.get("tucker")))
    family = info.get("family")
    from studio.engine.families import get_family, names

    if family in names():  # a registered family (the preflight passes the job's, which may be "auto")
        problems = get_family(family).consumer_problems()
        verdicts = [ConsumerVerdict(v.consumer, NO, problems[v.consumer]) if v.consumer in problems else v
                    for v in verdicts]
    if family is None:
        verdicts = [v if not v.ok else ConsumerVerdict(v.consumer, PARTIAL, "the base model family could not be "
                                                        "told from the file; tools may hide it") for v in verdicts]
    return verdicts


def report_dicts(info: dict[str, Any]) -> list[dict[str, str]]:
    return [asdict(v) for v in report(info)]


def report_text(info: dict[str, Any]) -> str:
    return "\n".join(v.line() for v in report(info))
