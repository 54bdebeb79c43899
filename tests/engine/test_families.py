"""Every registered family, from the registry: the whole protocol, and a tiny model that is found, loads and trains.

A new family is covered here by registering it; its own file/format tests live beside it (see
studio/engine/families/README.md). Below: SDXL v-prediction single files (NoobAI-XL V-Pred and kin).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from studio.engine import families
from studio.engine.config import ModelSection
from studio.engine.events import RunFinished, StepCompleted
from studio.engine.families import Conditioning, Family, ModelBundle, get_family, names, registered
from studio.engine.families.base import Part
from test_trainer import collect, tiny_job

TINY = [(name, prediction) for name in names() for prediction in get_family(name).tiny_prediction_types]


# ------------------------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize("name", names())
def test_every_family_provides_the_whole_protocol(name):
    family = get_family(name)
    # Every abstract member of the protocol is implemented (a missing one leaves the class abstract).
    assert isinstance(family, Family) and not inspect.isabstract(type(family)), type(family).__abstractmethods__
    assert family.name == name and families.family_label(name) == family.label
    for text in (family.label, family.short_label, family.listed_as):
        assert isinstance(text, str) and text
    # Parts: one denoiser under the family's denoiser name, its text encoders in order, a VAE.
    parts = family.parts()
    assert all(isinstance(p, Part) for p in parts)
    assert [p.name for p in parts if p.role == "denoiser"] == [family.denoiser_name]
    assert tuple(p.name for p in parts if p.role == "text_encoder") == family.text_encoder_names
    assert [p.name for p in parts if p.role == "vae"] == ["vae"]
    assert set(family.component_names()) <= set(family.kohya_prefixes)
    assert set(family.tiny_prediction_types) <= set(family.prediction_types)
    for prediction in family.prediction_types:
        assert family.native_resolution(prediction) >= 256
        ids = family.metadata_ids(prediction)
        assert set(ids) == {"ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation",
                            "modelspec.prediction_type"} and all(isinstance(v, str) and v for v in ids.values())
        config = family.denoiser_config(family.bundled_config_dir(prediction))
        assert config, f"{name}: the bundled config folder has no {family.denoiser_name} config"
    for preset in ("attention", "kohya-default", "+conv"):
        for component in family.component_names():
            assert isinstance(family.lora_targets(preset, component), str)
    with pytest.raises(ValueError):
        family.lora_targets("attention", "no-such-component")
    sizes = family.full_size_parameters()
    assert set(sizes) == {"denoiser", "text_encoders", "vae"} and all(v > 0 for v in sizes.values())
    assert 0 < family.activation_gib(True) < family.activation_gib(False)
    assert family.preview.steps >= 1 and family.preview.sampler


def test_the_registry_lists_and_finds_each_family_once():
    assert [f.name for f in registered()] == list(names())
    assert len({f.label for f in registered()}) == len(names())
    with pytest.raises(ValueError, match="unknown model family 'nope'; supported: " + ", ".join(names())):
        get_family("nope")
    assert families.supported_text() == ("Stable Diffusion 1.x, 2.x, SDXL, FLUX.1 [dev], [schnell], SD3 Medium, "
                                         "SD3.5 Medium, SD3.5 Large, Z-Image and Qwen-Image")


def test_the_meta_denoiser_runs_on_its_example_inputs():
    """The estimate counts FLOPs this way: a full-size denoiser on the meta device, fed the family's inputs."""
    for family in registered():
        config = family.denoiser_config(family.bundled_config_dir())
        with torch.device("meta"):
            denoiser = family.meta_denoiser(config)
            args, kwargs = family.denoiser_example_inputs(config, 1, 8, 8)
            with torch.no_grad():
                out = denoiser(*args, **kwargs)
        # A batch tensor, or one tensor per image (Z-Image's transformer takes and returns lists).
        samples = out.sample if isinstance(out.sample, list) else list(out.sample)
        assert len(samples) == 1 and all(s.is_meta for s in samples), family


# ------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name, prediction", TINY)
def test_every_family_tiny_model_is_found_loads_encodes_and_trains_a_step(name, prediction, tiny_model, tiny_dataset,
                                                                        tmp_path):
    family = get_family(name)
    folder = tiny_model(name, prediction)
    assert families.family_of_folder(folder) is family
    from studio.engine.checkpoint import load_model

    bundle = load_model(ModelSection(path=str(folder)))
    assert isinstance(bundle, ModelBundle) and bundle.family is family and bundle.prediction_type == prediction
    assert list(bundle.components()) == list(family.component_names())
    with torch.no_grad():
        cond = family.encode_text(bundle, ["a red circle", "a blue square"])
    assert isinstance(cond, Conditioning) and cond.batch_size == 2
    assert Conditioning.cat([cond.index(slice(0, 1)), cond.index(slice(1, 2))]).tensors.keys() == cond.tensors.keys()

    events = collect(tiny_job(folder, tiny_dataset, tmp_path / "run", training__steps=1))
    done = events[-1]
    assert isinstance(done, RunFinished), getattr(done, "details", done)
    assert [e.step for e in events if isinstance(e, StepCompleted)] == [1]
    from studio.engine.export import describe_lora

    info = describe_lora(done.lora_path)
    assert (info["family"], info["family_source"]) == (name, "metadata")
    with safe_open(str(done.lora_path), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in family.metadata_ids(prediction)} == family.metadata_ids(prediction)


# ------------------------------------------------------------------------------------- SDXL v-prediction


@pytest.fixture(scope="module")
def xl_vpred_file(tiny_sdxl, tmp_path_factory) -> Path:
    """A tiny SDXL single file with ComfyUI's ``v_pred`` and ``ztsnr`` markers, as NoobAI-XL V-Pred ships them."""
    from studio.engine.merge import diffusers_folder_to_single_file

    path = tmp_path_factory.mktemp("xl-vpred") / "tiny-xl-vpred.safetensors"
    return diffusers_folder_to_single_file(tiny_sdxl, path, extra={"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})


def test_sdxl_single_file_with_v_pred_and_ztsnr_markers_trains_as_v_prediction(xl_vpred_file, tiny_sdxl, tiny_dataset,
                                                                               tmp_path, monkeypatch):
    from studio.engine.checkpoint import load_model
    from studio.engine.detect import detect
    from studio.engine.safe_load import open_weights

    w = open_weights(xl_vpred_file)
    det = detect(w.shapes, w.metadata, xl_vpred_file.name)
    assert (det.family, det.prediction_type, det.zero_terminal_snr) == ("sdxl", "v_prediction", True)
    assert det.prediction_source.startswith("marker")

    # The tiny model's own config folder says epsilon: the file's marker still wins. Auto-detection cannot
    # size a tiny file, hence the config folder.
    model = ModelSection(path=str(xl_vpred_file), config_dir=str(tiny_sdxl))
    bundle = load_model(model)
    assert bundle.prediction_type == "v_prediction"
    sched = bundle.noise_scheduler
    assert sched.config.rescale_betas_zero_snr is True
    # Zero terminal SNR (Lin et al. 2024): the last timestep is (almost) pure noise; without the rescale it is not.
    plain = type(sched).from_config(sched.config, rescale_betas_zero_snr=False)
    snr = lambda s: float(s.alphas_cumprod[-1] / (1 - s.alphas_cumprod[-1]))  # noqa: E731
    assert snr(sched) < 1e-6 < 1e-3 < snr(plain)

    family = get_family("sdxl")
    seen = []
    real_loss = type(family).training_loss

    def spy(self, bundle, *args, **kwargs):
        seen.append((bundle.prediction_type, bundle.noise_scheduler.config.rescale_betas_zero_snr))
        return real_loss(self, bundle, *args, **kwargs)

    monkeypatch.setattr(type(family), "training_loss", spy)
    job = tiny_job(xl_vpred_file, tiny_dataset, tmp_path / "run", model__config_dir=str(tiny_sdxl), training__steps=2)
    done = collect(job)[-1]
    assert isinstance(done, RunFinished), getattr(done, "details", done)
    assert seen == [("v_prediction", True)] * 2  # every step trained the v target on the rescaled schedule
    with safe_open(str(done.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v"
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("sdxl_base_v1-0",
                                                                              "stable-diffusion-xl-v1-base/lora")
