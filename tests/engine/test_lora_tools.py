"""LoRA tools: SVD resize keeps at least the asked norm fraction (and reports it), merge equals the strength-weighted
sum, both refuse what they cannot do; bad LyCORIS files are refused with the module and the problem named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.cli import main
from studio.engine.adapters import AdapterFileError, read_modules
from studio.engine.checkpoint import load_model
from studio.engine.config import Job, LoraSection, ModelSection
from studio.engine.export import export_lora, read_lora
from studio.engine.lora import components, inject_lora
from studio.engine.lora_tools import LoraToolError, merge_loras, resize_lora


def _trained_file(model_dir: Path, path: Path, lora: LoraSection, seed: int) -> Path:
    bundle = load_model(ModelSection(path=str(model_dir)))
    inject_lora(bundle, lora, train_text_encoder=lora.train_text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in components(bundle).values():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    job = Job()
    job.lora = lora
    return export_lora(bundle, job, path, steps=1, dtype="fp32")


@pytest.fixture(scope="module")
def loras(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {
        "a": _trained_file(tiny_sd1, folder / "a.safetensors", LoraSection(rank=8, alpha=4.0, targets="+conv"), 1),
        "b": _trained_file(tiny_sd1, folder / "b.safetensors", LoraSection(rank=4, alpha=4.0, targets="+conv",
                                                                          train_text_encoder=True), 2),
        "loha": _trained_file(tiny_sd1, folder / "loha.safetensors", LoraSection(algorithm="loha", rank=4), 3),
    }


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_lora(path)
    return {n: m.adapter.file_update(m) for n, m in read_modules(tensors).items()}


def _fraction(full: dict[str, torch.Tensor], cut: dict[str, torch.Tensor]) -> float:
    # Frobenius norm of the kept part: the SVD cut is orthogonal to what was dropped, so ‖cut‖ / ‖full‖.
    return (sum(float(c.norm() ** 2) for c in cut.values()) / sum(float(f.norm() ** 2) for f in full.values())) ** 0.5


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.95])
def test_resize_by_fraction_keeps_at_least_the_asked_norm_fraction(loras, tmp_path, fraction):
    out = resize_lora(loras["a"], tmp_path / "cut.safetensors", fraction=fraction)
    full, cut = _deltas(loras["a"]), _deltas(out.path)
    measured = _fraction(full, cut)
    assert measured >= fraction - 1e-6 and out.kept_fraction == pytest.approx(measured, abs=1e-5)
    assert out.worst_module_fraction >= fraction - 1e-6
    assert out.rank_after < 8  # random rank-8 updates: 95 % of the norm fits in fewer ranks
    for name in full:  # each kept part is the best approximation: the residual is orthogonal to it
        residual = full[name] - cut[name]
        assert float((residual * cut[name]).sum()).__abs__() < 1e-4 * float(full[name].norm() ** 2)


def test_resize_by_rank_reports_the_kept_fraction_and_loads_as_a_plain_lora(loras, tmp_path):
    out = resize_lora(loras["a"], tmp_path / "r2.safetensors", rank=2)
    tensors, meta = read_lora(out.path)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")} == {2}
    assert meta["ss_network_dim"] == "2" and json.loads(meta["lora_studio.resize"])["rank"] == 2
    assert 0 < out.kept_fraction < 1 and out.kept_fraction == pytest.approx(
        _fraction(_deltas(loras["a"]), _deltas(out.path)), abs=1e-5)


def test_merge_equals_the_strength_weighted_sum(loras, tmp_path):
    result = merge_loras([(loras["a"], 0.7), (loras["b"], -0.4)], tmp_path / "m.safetensors")
    a, b, merged = _deltas(loras["a"]), _deltas(loras["b"]), _deltas(Path(result["path"]))
    assert set(merged) == set(a) | set(b)
    for name, delta in merged.items():
        expected = 0.7 * a.get(name, 0) + -0.4 * b.get(name, 0)
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    small = merge_loras([(loras["a"], 1.0), (loras["b"], 1.0)], tmp_path / "m4.safetensors", rank=4)
    assert small["rank"] == 4 and 0 < small["kept_fraction"] < 1


def test_tools_refuse_lycoris_modules_and_bad_requests(loras, tmp_path):
    with pytest.raises(LoraToolError, match="LoHa.*LoRA/LoCon only"):
        resize_lora(loras["loha"], tmp_path / "x.safetensors", rank=2)
    with pytest.raises(LoraToolError, match="rank .* or a norm fraction"):
        resize_lora(loras["a"], tmp_path / "x.safetensors")
    with pytest.raises(LoraToolError, match="at least two"):
        merge_loras([(loras["a"], 1.0)], tmp_path / "x.safetensors")


def test_cli_resize_and_merge_print_what_they_kept(loras, tmp_path, capsys):
    assert main(["lora", "resize", str(loras["a"]), "--out", str(tmp_path / "c.safetensors"), "--fraction", "0.9"]) == 0
    assert "of the LoRA's Frobenius norm" in capsys.readouterr().out
    assert main(["lora", "merge", f"{loras['a']}:0.5", str(loras["b"]), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "Merged 2 LoRAs" in capsys.readouterr().out
    assert main(["lora", "resize", str(loras["loha"]), "--out", str(tmp_path / "d.safetensors"), "--rank", "1"]) == 2
    assert "LoRA/LoCon only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad LyCORIS files


def _edited(src: Path, dst: Path, edit) -> Path:
    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst), metadata=read_lora(src)[1])
    return dst


def test_bad_lycoris_files_are_refused_naming_the_module_and_the_problem(loras, tmp_path, capsys):
    name = next(k for k in load_file(str(loras["loha"])) if k.endswith(".hada_w1_a")).partition(".")[0]

    def unknown(t):
        t[f"{name}.oft_blocks"] = torch.zeros(2, 2, 2)

    def mismatched(t):
        t[f"{name}.hada_w1_b"] = torch.zeros(3, t[f"{name}.hada_w1_b"].shape[1])

    bad_algo = _edited(loras["loha"], tmp_path / "oft.safetensors", unknown)
    bad_factors = _edited(loras["loha"], tmp_path / "factors.safetensors", mismatched)
    with pytest.raises(AdapterFileError, match=f"{name} uses the LyCORIS algorithm OFT"):
        read_modules(load_file(str(bad_algo)))
    with pytest.raises(AdapterFileError, match=f"LoHa module {name}: the factors do not fit"):
        read_modules(load_file(str(bad_factors)))
    for path, words in ((bad_algo, "OFT"), (bad_factors, "do not fit")):
        assert main(["inspect", str(path), "--no-hash"]) == 0
        out = capsys.readouterr().out
        assert "Problem: " in out and name in out and words in out and "✗ ComfyUI: does not load" in out


def test_baking_refuses_bad_lycoris_files_and_another_base_model(loras, tiny_sd1, tiny_sdxl, tmp_path):
    from studio.engine.merge import merge_lora_into_checkpoint
    from studio.engine.safe_load import ModelLoadError

    name = next(k for k in load_file(str(loras["loha"])) if k.endswith(".hada_w1_a")).partition(".")[0]
    bad = _edited(loras["loha"], tmp_path / "bad.safetensors",
                  lambda t: t.__setitem__(f"{name}.hada_w2_a", torch.zeros(5, 4)))
    with pytest.raises(ModelLoadError, match=f"bad.safetensors': LoHa module {name}"):
        merge_lora_into_checkpoint(ModelSection(path=str(tiny_sd1)), bad, 1.0, tmp_path / "o.safetensors")
    with pytest.raises(ModelLoadError, match="trained for SD 1.x but the base model is Stable Diffusion XL"):
        merge_lora_into_checkpoint(ModelSection(path=str(tiny_sdxl)), loras["loha"], 1.0, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_baking_a_loha_into_a_checkpoint_adds_its_delta(loras, tiny_sd1, tmp_path):
    from studio.engine.merge import merge_lora_into_checkpoint

    out = tmp_path / "baked.safetensors"
    result = merge_lora_into_checkpoint(ModelSection(path=str(tiny_sd1)), loras["loha"], 0.5, out,
                                        dtype=torch.float32)
    assert result["modules_merged"] == result["modules_in_lora"] and not result["unmatched"]
    base = load_model(ModelSection(path=str(tiny_sd1)))
    baked = load_model(ModelSection(path=str(out), config_dir=str(tiny_sd1)))
    modules = read_modules(read_lora(loras["loha"])[0])
    index_base, index_baked = base.family.kohya_index(base), baked.family.kohya_index(baked)
    name = next(n for n in modules if n.startswith("lora_unet_"))
    weight = index_base[name][1].weight.detach()
    torch.testing.assert_close(index_baked[name][1].weight.detach(), weight + modules[name].delta(weight, 0.5),
                               atol=1e-5, rtol=1e-5)
