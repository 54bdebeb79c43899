"""Adapters the kohya layout cannot join on fused layers (Flux's and SD3's q/k/v) are refused before training.

kohya's and ComfyUI's Flux/SD3 models have one fused ``qkv`` Linear where diffusers has three; a plain LoRA of the
three joins exactly (stacked down, block-diagonal up), a LoHa, LoKr or DoRA of each does not. Such a job used to
train to the end and then fail at the export with "cannot be written for … fused layers".
"""

from __future__ import annotations

import pytest
import torch

from fixtures_data import make_dataset
from fixtures_runs import tiny_job
from studio.engine.events import RunFailed, RunFinished, StepCompleted
from studio.engine.trainer import run_training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fused-data") / "data", count=2)


@pytest.mark.parametrize("family,algorithm,dora", [("flux-dev", "loha", False), ("sd3.5-medium", "lokr", False),
                                                   ("flux-dev", "lora", True)])
def test_an_adapter_the_fused_layout_cannot_hold_is_refused_before_the_first_step(tiny_model, data, tmp_path,
                                                                                  family, algorithm, dora):
    torch.set_num_threads(1)
    job = tiny_job(tiny_model(family, "flow"), data, tmp_path / "run", lora__algorithm=algorithm, lora__dora=dora,
                   training__steps=2)
    events = list(run_training(job))
    assert isinstance(events[-1], RunFailed)
    assert not [e for e in events if isinstance(e, StepCompleted)], "refused before training, not at the export"
    message = events[-1].message
    assert "fused" in message and "qkv" in message and "lora.algorithm" in message, message
    assert "Traceback" not in message


def test_a_plain_lora_on_the_same_layers_still_trains(tiny_model, data, tmp_path):
    torch.set_num_threads(1)
    job = tiny_job(tiny_model("flux-dev", "flow"), data, tmp_path / "run", training__steps=1)
    assert isinstance(list(run_training(job))[-1], RunFinished)


@pytest.mark.parametrize("family", ["flux-dev", "sd3.5-medium"])
def test_baking_a_flow_family_lora_into_a_checkpoint_is_refused_with_a_reason(tiny_model, data, tmp_path, capsys,
                                                                             monkeypatch, family):
    """FLUX.1/SD3 have no baking yet (their fused layers need splitting); `lora-studio merge` says so before it
    loads the base model, instead of a NotImplementedError traceback after loading it."""
    import studio.engine.checkpoint as checkpoint
    from studio.cli import main

    torch.set_num_threads(1)
    model = tiny_model(family, "flow")
    job = tiny_job(model, data, tmp_path / "run", training__steps=1)
    assert isinstance(list(run_training(job))[-1], RunFinished)
    loads = []
    real_load = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    code = main(["merge", str(model), str(tmp_path / "run" / "tiny.safetensors"), "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "not supported" in err and "ComfyUI" in err, err
    assert loads == [], "refused from the LoRA's metadata, before loading the base model"
    assert not (tmp_path / "m.safetensors").exists()


def test_trying_a_loha_file_on_flux_says_why_it_cannot_be_previewed(tiny_model, tmp_path):
    """LyCORIS files (LoHa here, as other trainers write them for FLUX.1) cannot go through diffusers' loader, and
    adding their update to the weights needs the baking FLUX.1 lacks: Try & Export says so (a LoraFileError naming
    the file and where to use it), not "baking … is not supported" from deep inside."""
    from safetensors.torch import save_file

    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection
    from studio.engine.export import LoraFileError
    from studio.engine.sampling import generate

    name = "lora_unet_double_blocks_0_img_attn_proj"
    g = torch.Generator().manual_seed(0)
    tensors = {f"{name}.{k}": torch.randn(shape, generator=g) for k, shape in
               (("hada_w1_a", (32, 2)), ("hada_w1_b", (2, 32)), ("hada_w2_a", (32, 2)), ("hada_w2_b", (2, 32)))}
    tensors[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "wild-loha.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1"})
    bundle = load_model(ModelSection(path=str(tiny_model("flux-dev", "flow"))))
    with pytest.raises(LoraFileError, match="wild-loha.safetensors.*LoHa.*ComfyUI"):
        generate(bundle, "a red circle", steps=1, width=64, height=64, lora_path=path)
