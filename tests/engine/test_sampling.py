"""Try & Export generation: base vs LoRA at one seed, strength scaling, nothing reloaded between calls."""

from __future__ import annotations

import numpy as np

from studio.engine.checkpoint import load_model
from studio.engine.config import ModelSection
from studio.engine.sampling import generate, native_resolution, preview_prompts
from studio.engine.config import SamplingSection


def test_base_vs_lora_at_the_same_seed(tiny_sd1, tiny_dataset, tmp_path):
    from test_trainer import collect, tiny_job

    done = collect(tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", training__steps=3, training__lr=5e-2))[-1]
    bundle = load_model(ModelSection(path=str(tiny_sd1)))
    assert native_resolution(bundle) == 64
    kw = dict(seed=5, steps=2)
    base = np.asarray(generate(bundle, "a red circle", **kw))
    lora = np.asarray(generate(bundle, "a red circle", lora_path=done.lora_path, **kw))
    half = np.asarray(generate(bundle, "a red circle", lora_path=done.lora_path, lora_scale=0.5, **kw))
    zero = np.asarray(generate(bundle, "a red circle", lora_path=done.lora_path, lora_scale=0.0, **kw))
    again = np.asarray(generate(bundle, "a red circle", **kw))
    assert base.shape == (64, 64, 3)
    assert not np.array_equal(base, lora) and not np.array_equal(lora, half)
    assert np.array_equal(base, zero) and np.array_equal(base, again)
    assert len(bundle.extra["try_adapters"]) == 1, "the LoRA file is loaded once and reused"


def test_preview_prompts_fill_the_trigger_or_use_captions():
    s = SamplingSection(prompts=["{trigger} on a beach", " "])
    assert preview_prompts(s, "ohwx", ["x"]) == ["ohwx on a beach"]
    assert preview_prompts(SamplingSection(), "", ["a", "a", "b", "c"]) == ["a", "b"]
    assert preview_prompts(SamplingSection(), "ohwx", []) == ["ohwx"]
