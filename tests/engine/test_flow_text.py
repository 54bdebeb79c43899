"""FLUX.1's and SD3's text conditioning equals their pipelines' own ``encode_prompt``: long captions (past CLIP's
77 tokens), the empty caption (caption dropout; what the pipelines encode for an empty negative prompt), and SD3
without T5 (zeros of the pipeline's shape)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from studio.engine.checkpoint import load_model
from studio.engine.config import ModelSection

LONG = ", ".join(f"detail number {i} of a red circle on a blue square" for i in range(20))  # > 77 CLIP tokens
CAPTIONS = ["a red circle", "", LONG]


def test_long_caption_is_past_clip_s_window(tiny_model):
    bundle = load_model(ModelSection(path=str(tiny_model("flux-dev", "flow"))))
    assert len(bundle.tokenizers[0](LONG).input_ids) > 77


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_flux_text_equals_the_pipeline_s(tiny_model, name):
    bundle = load_model(ModelSection(path=str(tiny_model(name, "flow"))))
    pipe = bundle.pipeline()
    with torch.no_grad():
        cond = bundle.family.encode_text(bundle, CAPTIONS)
        embeds, pooled, _ = pipe.encode_prompt(CAPTIONS, prompt_2=None, device="cpu",
                                               max_sequence_length=bundle.family.t5_max_length(bundle))
    torch.testing.assert_close(cond["t5"], embeds)
    torch.testing.assert_close(cond["pooled"], pooled)
    assert bundle.family.t5_length == {"flux-dev": 512, "flux-schnell": 256}[name]


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_text_equals_the_pipeline_s(tiny_model, with_t5):
    bundle = load_model(ModelSection(path=str(tiny_model("sd3.5-medium", "flow"))))
    if not with_t5:
        bundle = dataclasses.replace(bundle, text_encoders=bundle.text_encoders[:2], tokenizers=bundle.tokenizers[:2])
    pipe = bundle.pipeline()
    assert (pipe.text_encoder_3 is None) is (not with_t5)
    with torch.no_grad():
        cond = bundle.family.encode_text(bundle, CAPTIONS)
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=256)
    assert cond["hidden"].shape == (3, 77 + 256, bundle.denoiser.config.joint_attention_dim)
    torch.testing.assert_close(cond["hidden"], embeds)
    torch.testing.assert_close(cond["pooled"], pooled)
