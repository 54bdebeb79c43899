"""Captions past 75 tokens (kohya's 150/225, in 75-token pieces) and clip skip: training, previews, metadata."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from studio.engine.checkpoint import load_model
from studio.engine.config import Job, ModelSection, validate
from studio.engine.events import RunFinished, SampleReady
from studio.engine.families.sd import TEXT_OPTIONS
from studio.engine.trainer import run_training
from test_trainer import tiny_job

# 130 CLIP tokens: one word each, distinct, so every position carries something.
LONG = " ".join(f"w{i}" for i in range(130))


def _piece(tokenizer, tokens: list[int]) -> torch.Tensor:
    """One CLIP prompt by hand: BOS, the tokens, EOS, padding to 77."""
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
    return torch.tensor([ids + [tokenizer.pad_token_id] * (77 - len(ids))])


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, truncation=False).input_ids[1:-1]


def test_long_captions_are_read_in_75_token_pieces(tiny_sd1):
    bundle = load_model(ModelSection(path=str(tiny_sd1)))
    tok, te = bundle.tokenizers[0], bundle.text_encoders[0]
    tokens = _tokens(tok, LONG)
    assert len(tokens) > 120
    with torch.no_grad():
        cut = bundle.family.encode_text(bundle, [LONG])["hidden"]
        bundle.extra[TEXT_OPTIONS] = (150, 1)
        long = bundle.family.encode_text(bundle, [LONG])["hidden"]
        first = te(_piece(tok, tokens[:75]))[0]
        second = te(_piece(tok, tokens[75:150]))[0]
    assert cut.shape[1] == 77 and long.shape[1] == 152
    assert torch.allclose(long[:, :76], first[:, :76], atol=1e-6)  # BOS + the first 75
    assert torch.allclose(long[:, 76:151], second[:, 1:76], atol=1e-6)  # the next 75, each piece encoded alone
    assert torch.allclose(cut, first, atol=1e-6), "75 tokens: the plain encoding, unchanged"


def test_clip_skip_matches_diffusers_and_sdxl_pools_the_first_piece(tiny_sd1, tiny_sdxl):
    """Clip skip counts like A1111 (2 = the penultimate layer, through the final layer norm: A1111's
    CLIP_stop_at_last_layers), i.e. diffusers' clip_skip + 1; SDXL's pooled text is the second encoder's on the
    first 75-token piece, as kohya's sd-scripts takes it. (diffusers' SD pipeline cannot be the reference for SD1:
    its clip_skip path reads ``text_encoder.text_model``, which transformers >= 5.6 removed from CLIPTextModel.)"""
    sd = load_model(ModelSection(path=str(tiny_sd1)))
    sd.extra[TEXT_OPTIONS] = (75, 2)
    te, tok = sd.text_encoders[0], sd.tokenizers[0]
    with torch.no_grad():
        ours = sd.family.encode_text(sd, ["a red circle"])["hidden"]
        states = te(_piece(tok, _tokens(tok, "a red circle")), output_hidden_states=True).hidden_states
        penultimate = te.final_layer_norm(states[-2])
    assert torch.allclose(ours, penultimate, atol=1e-6)
    assert not torch.allclose(ours, te(_piece(tok, _tokens(tok, "a red circle")))[0], atol=1e-3)

    xl = load_model(ModelSection(path=str(tiny_sdxl)))
    xl.extra[TEXT_OPTIONS] = (75, 2)
    with torch.no_grad():
        cond = xl.family.encode_text(xl, ["a red circle"])
        embeds, _, pooled, _ = xl.pipeline().encode_prompt("a red circle", device="cpu",
                                                           do_classifier_free_guidance=False, clip_skip=1)
    assert torch.allclose(cond["hidden"], embeds, atol=1e-6) and torch.allclose(cond["pooled"], pooled, atol=1e-6)

    xl.extra[TEXT_OPTIONS] = (225, 1)
    tok2, te2 = xl.tokenizers[1], xl.text_encoders[1]
    with torch.no_grad():
        cond = xl.family.encode_text(xl, [LONG])
        first_pool = te2(_piece(tok2, _tokens(tok2, LONG)[:75]))[0]
    assert cond["hidden"].shape[1] == 227 and torch.allclose(cond["pooled"], first_pool, atol=1e-6)


def test_a_run_with_long_captions_and_clip_skip_trains_previews_and_records_them(tiny_sd1, tmp_path):
    from fixtures_data import make_dataset

    data = make_dataset(tmp_path / "data", count=2)
    for caption in data.glob("*.txt"):
        caption.write_text(LONG)
    job = tiny_job(tiny_sd1, data, tmp_path / "run", training__steps=2, training__max_token_length=225,
                   training__clip_skip=2, sampling__every=2, sampling__prompts=[LONG])
    events = list(run_training(job))
    assert isinstance(events[-1], RunFinished), events[-1]
    assert {e.step for e in events if isinstance(e, SampleReady)} == {0, 2}
    with safe_open(events[-1].lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_max_token_length"] == "225" and meta["ss_clip_skip"] == "2"


def test_the_options_are_declared_once_and_checked():
    job = Job()
    job.training.max_token_length = 100
    job.training.clip_skip = 0
    fields = {p.field for p in validate(job, check_paths=False)}
    assert {"training.max_token_length", "training.clip_skip"} <= fields
    job.training.max_token_length, job.training.clip_skip = 150, 2
    assert not {"training.max_token_length", "training.clip_skip"} & {p.field for p in validate(job, check_paths=False)}


def test_clip_skip_past_the_encoder_says_so(tiny_sd1):
    bundle = load_model(ModelSection(path=str(tiny_sd1)))
    bundle.extra[TEXT_OPTIONS] = (75, 5)
    with pytest.raises(ValueError, match="training.clip_skip is 5.*only 2 layers"):
        bundle.family.encode_text(bundle, ["a red circle"])
