"""Write the bundled Z-Image diffusers config folder (z-image) that single files and the estimate load through.

The values are those of Tongyi-MAI/Z-Image-Turbo's own configs (transformer, FLUX.1's VAE "ae", Qwen3-4B as a
Qwen3Model, scheduler). No tokenizer: Qwen3's BPE files are taken from the user's model folder. Run::

    python resources/model_configs/make_zimage_configs.py

and commit the result; tests/engine/test_zimage.py checks the folder matches this script.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("z-image",)

TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel", "_diffusers_version": "0.42.1", "all_f_patch_size": [1],
    "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560,
    "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2,
    "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0,
}

QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560, "initializer_range": 0.02,
    "intermediate_size": 9728, "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}

# Z-Image-Turbo samples on a constant shift of 3 (no resolution-dependent shift).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
             "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}

MODEL_INDEX = {
    "_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _flux_vae() -> dict:
    # FLUX.1's VAE: one definition (make_flux_configs.py) for both families.
    spec = importlib.util.spec_from_file_location("make_flux_configs", HERE / "make_flux_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VAE


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_configs(root: Path) -> None:
    folder = root / "z-image"
    _write_json(folder / "model_index.json", MODEL_INDEX)
    _write_json(folder / "transformer" / "config.json", TRANSFORMER)
    _write_json(folder / "vae" / "config.json", _flux_vae())
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER)
    _write_json(folder / "text_encoder" / "config.json", QWEN3_4B)


if __name__ == "__main__":
    write_configs(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
