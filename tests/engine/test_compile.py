"""torch.compile and CUDA graphs (engine/compiling.py): compiled runs train exactly as eager ones, every family names
its repeated blocks, and the CUDA-graph switch is refused where it cannot work.

The CPU runs use the ``aot_eager`` backend: dynamo traces the peft-wrapped denoiser and AOT autograd builds its
backward — the parts that break on a graph break or a LoRA layer dynamo cannot follow — without Inductor's C++
build, which takes minutes per model on this CPU (its speed is the GPU suite's business: benchmarks/gpu_suite.py).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fixtures_data import make_dataset
from studio.engine import compiling
from studio.engine.config import Job, validate
from studio.engine.events import RunFinished, StepCompleted
from studio.engine.families import REGISTRY, get_family
from studio.engine.trainer import run_training
from test_trainer import tiny_job

# conftest lets skips with this reason through in CI: a CPU cannot record CUDA graphs.
NO_CUDA = "needs a CUDA GPU: CUDA graphs are recorded on the device"


def _two_bucket_dataset(root):
    """Square and landscape images: two bucket shapes, so a compiled denoiser meets two input shapes."""
    make_dataset(root, count=2, size=(64, 64))
    make_dataset(root / "wide", count=2, size=(96, 48), seed=1)
    return root


def _run(job: Job) -> tuple[list[float], dict[str, torch.Tensor]]:
    events = list(run_training(job))
    assert isinstance(events[-1], RunFinished), events[-1]
    losses = [e.loss for e in events if isinstance(e, StepCompleted)]
    return losses, load_file(events[-1].lora_path)


@pytest.fixture
def dynamo_counters():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("family, prediction, scope", [("sd1", "epsilon", "denoiser"), ("flux-dev", "flow", "blocks")])
def test_a_compiled_run_trains_exactly_like_an_eager_one(family, prediction, scope, tiny_model, tmp_path,
                                                         dynamo_counters):
    model, data = tiny_model(family, prediction), _two_bucket_dataset(tmp_path / "data")
    common = dict(dataset__default_repeats=2, training__steps=4, training__batch_size=2, dataset__bucket_step=16)
    eager_losses, eager_lora = _run(tiny_job(model, data, tmp_path / "eager", **common))
    losses, lora = _run(tiny_job(model, data, tmp_path / "compiled", training__compile=True,
                                 training__compile_scope=scope, training__compile_backend="aot_eager", **common))
    # Compiled for real: dynamo captured graphs and AOT autograd built their backward.
    assert dynamo_counters["stats"]["unique_graphs"] >= 1
    assert dynamo_counters["aot_autograd"]["total"] >= 1
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    assert lora.keys() == eager_lora.keys()
    worst = max((lora[k].float() - eager_lora[k].float()).abs().max().item() for k in lora)
    assert worst < 1e-5, f"compiled LoRA differs from eager by {worst}"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_family_names_its_repeated_blocks_for_the_blocks_scope(name, tiny_model):
    """A diffusers class rename must not quietly turn 'blocks' into 'compile everything' (a longer start)."""
    from studio.engine.checkpoint import load_model
    from studio.engine.config import ModelSection

    family = get_family(name)
    prediction = family.tiny_prediction_types[0]
    bundle = load_model(ModelSection(path=str(tiny_model(name, prediction))))
    blocks = family.compile_blocks(bundle.denoiser)
    assert len(blocks) >= 2 and len({type(b) for b in blocks}) <= 2
    assert all(b is not bundle.denoiser for b in blocks)


def test_blocks_scope_without_named_blocks_compiles_the_whole_denoiser():
    job = Job()
    job.training.compile = True
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert compiling.compile_denoiser(module, [], job.training, shapes=1) == 1
    assert getattr(module, "_compiled_call_impl", None) is not None


def test_many_bucket_shapes_raise_the_recompile_limit_instead_of_falling_back_to_eager():
    import torch._dynamo

    job = Job()
    job.training.compile = True
    before = torch._dynamo.config.recompile_limit
    try:
        compiling.compile_denoiser(torch.nn.Linear(2, 2), [], job.training, shapes=20)
        assert torch._dynamo.config.recompile_limit >= 20 * 2  # every shape, with and without gradients
    finally:
        torch._dynamo.config.recompile_limit = before


# ------------------------------------------------------------------------------------------ CUDA graphs


def _graph_problems(device_type: str | None, **training) -> list[str]:
    job = Job()
    job.training.cuda_graphs = True
    for key, value in training.items():
        setattr(job.training, key, value)
    return [p.message for p in validate(job, check_paths=False, device_type=device_type)
            if p.field == "training.cuda_graphs"]


def test_cuda_graphs_are_refused_where_they_cannot_work():
    assert any("turn on training.compile" in m for m in _graph_problems("cuda"))
    assert any("no NVIDIA GPU" in m for m in _graph_problems("cpu", compile=True))
    assert any("training.device is 'mps'" in m for m in _graph_problems("mps", compile=True, device="mps"))
    assert any("block_swap to 0" in m for m in _graph_problems("cuda", compile=True, block_swap=4))
    assert _graph_problems("cuda", compile=True) == []


def test_cuda_graphs_on_a_cpu_stop_before_the_model_loads(tiny_sd1, tiny_dataset, tmp_path):
    from studio.engine.events import RunFailed

    job = tiny_job(tiny_sd1, tiny_dataset, tmp_path / "run", training__device="cpu", training__compile=True,
                   training__cuda_graphs=True)
    events = list(run_training(job))
    assert isinstance(events[-1], RunFailed) and "training.cuda_graphs" in events[-1].message
    assert not any(isinstance(e, StepCompleted) for e in events)


def test_cuda_graphs_record_every_bucket_shape_and_train_like_eager(tiny_sd1, tmp_path, dynamo_counters):
    """On a GPU: nothing falls out of graph capture (0 skips), and the losses are eager's within bf16-free fp32
    rounding (Inductor fuses differently)."""
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    data = _two_bucket_dataset(tmp_path / "data")
    common = dict(dataset__default_repeats=2, training__steps=6, training__batch_size=2, training__device="cuda",
                  training__tf32=False)
    eager_losses, _ = _run(tiny_job(tiny_sd1, data, tmp_path / "eager", **common))
    losses, _ = _run(tiny_job(tiny_sd1, data, tmp_path / "graphs", training__compile=True,
                              training__compile_scope="denoiser", training__cuda_graphs=True, **common))
    assert compiling.cuda_graph_skips() == 0, dict(dynamo_counters["inductor"])
    assert losses == pytest.approx(eager_losses, rel=2e-3)
