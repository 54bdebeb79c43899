"""SDXL's second text encoder: a LoRA trained on it must reach diffusers whole, in both of our file layouts.

transformers 5.6.0-5.10.1 stripped `text_model.` from every key loaded into a CLIP text model, the projection
model included, so diffusers injected TE2's adapters and left every lora_B at zero: no error, no effect. A key
check cannot see that; comparing TE2's output with the trained one can.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from studio.engine.checkpoint import load_model
from studio.engine.config import ModelSection
from studio.engine.events import CheckpointSaved, RunCancelled, StepCompleted
from studio.engine.export import export_diffusers_lora
from studio.engine.lora import inject_lora, load_lora_state_dicts
from studio.engine.state import load_checkpoint
from studio.engine.trainer import run_training
from test_trainer import tiny_job

PROMPT = "a red circle"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def te2_output(pipe_or_encoder, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled projection, penultimate hidden states): what SDXL conditions on from its second encoder."""
    ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe_or_encoder(ids, output_hidden_states=True)
    return out.text_embeds.float(), out.hidden_states[-2].float()


def test_a_trained_second_text_encoder_loads_whole_in_diffusers_from_both_layouts(tiny_sdxl, tiny_dataset, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    job = tiny_job(tiny_sdxl, tiny_dataset, out, training__steps=5, output__save_every=3, output__save_dtype="fp32",
                   lora__train_text_encoder=True, lora__text_encoder_lr=1e-2)
    stop = threading.Event()
    for event in run_training(job, stop):
        if isinstance(event, CheckpointSaved):
            stop.set()  # the state of step 3 and the kohya file of step 3: the same weights
        assert not (isinstance(event, StepCompleted) and event.step > 3)
    assert isinstance(event, RunCancelled) and event.step == 3
    kohya = out / "tiny-step000003.safetensors"

    # The trained model, rebuilt from the checkpoint: what the files must reproduce.
    trained = load_model(ModelSection(path=str(tiny_sdxl)))
    inject_lora(trained, job.lora, train_text_encoder=True)
    _, lora, _ = load_checkpoint(out / "checkpoints" / "step-000003")
    load_lora_state_dicts(trained, lora)
    want = te2_output(trained.text_encoders[1], trained.tokenizers[1])
    diffusers_file = export_diffusers_lora(trained, tmp_path / "tiny-diffusers.safetensors")

    for path in (kohya, diffusers_file):
        pipe = DiffusionPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
        base = te2_output(pipe.text_encoder_2, pipe.tokenizer_2)
        pipe.load_lora_weights(str(path))
        got = te2_output(pipe.text_encoder_2, pipe.tokenizer_2)
        loaded_b = [n for n, p in pipe.text_encoder_2.named_parameters() if ".lora_B." in n and p.abs().max() > 0]
        assert len(loaded_b) == 12, f"{path.name}: {len(loaded_b)} of 12 TE2 lora_B weights loaded"
        assert (got[0] - base[0]).abs().max() > 1e-3, f"{path.name}: TE2's output must change"
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{path.name}: TE2 as trained")
