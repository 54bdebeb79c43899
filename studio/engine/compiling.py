"""torch.compile for the denoiser: which modules (its repeated blocks or all of it), which backend, and CUDA graphs.

One place for what every family used to do itself. The family only says which of its modules are the repeated
blocks (``Family.compile_blocks``); the scope, backend and CUDA-graph choices are the job's (``training.compile*``,
``training.cuda_graphs``) and mean the same for every family.

CUDA graphs are torch.compile's own (Inductor's "reduce-overhead" mode, or the "cudagraphs" backend after
``aot_eager``): each distinct input shape — in training, one per aspect bucket and batch size — is recorded once
and replayed after, so a step costs a few graph launches instead of thousands of kernel launches from Python.
That matters where a GPU is faster than the host can feed it (small batches, SD1.5 at batch 1).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from studio.engine.config import TrainingSection

log = logging.getLogger(__name__)

# Graph variants one bucket shape can need: training, its partial last batch, validation (no grad) and previews
# (no grad, CFG doubles the batch). Dynamo's default of 8 recompiles would fall back to eager past a few buckets.
_VARIANTS_PER_SHAPE = 4
_SPARE_RECOMPILES = 8


def compile_kwargs(training: "TrainingSection") -> dict[str, Any]:
    """What ``nn.Module.compile`` is called with for this job."""
    if training.compile_backend == "aot_eager":
        # AOT autograd without code generation: no C++ compiler or Triton needed. CUDA graphs then come from
        # torch's "cudagraphs" backend, which is AOT autograd + graph capture.
        return {"backend": "cudagraphs" if training.cuda_graphs else "aot_eager"}
    return {"mode": "reduce-overhead"} if training.cuda_graphs else {}


def compile_denoiser(denoiser: "torch.nn.Module", blocks: list["torch.nn.Module"], training: "TrainingSection",
                     shapes: int) -> int:
    """Compile the denoiser in place as the job asks; returns how many modules were compiled.

    In place (``nn.Module.compile``), so every holder of the module (peft, accelerate, the preview pipeline) runs
    the compiled code. ``blocks`` are the family's repeated blocks, for ``compile_scope = "blocks"`` (each block's
    code compiles once and is reused by its siblings: the quicker start); ``shapes`` is the number of distinct
    bucket shapes the run will feed, which raises dynamo's recompile limit so none of them falls back to eager.
    """
    if not training.compile:
        return 0
    import torch._dynamo

    limit = shapes * _VARIANTS_PER_SHAPE + _SPARE_RECOMPILES
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    kwargs = compile_kwargs(training)
    # A family without repeated blocks to name gets the whole denoiser compiled, not nothing.
    modules = blocks if training.compile_scope == "blocks" and blocks else [denoiser]
    for module in modules:
        module.compile(**kwargs)
    log.info("compiled %s (%d module%s, %s)", "the whole denoiser" if modules == [denoiser] else "the repeated blocks",
             len(modules), "" if len(modules) == 1 else "s", kwargs or "inductor, default mode")
    return len(modules)


def begin_step(training: "TrainingSection") -> None:
    """Tell CUDA graphs a new forward/backward starts, so the previous one's graph outputs (gradients already
    applied, a loss already read) may be overwritten. Without it, cudagraph trees can refuse to replay when a
    micro-batch's outputs are still referenced."""
    if training.compile and training.cuda_graphs:
        import torch

        torch.compiler.cudagraph_mark_step_begin()


def cuda_graph_skips() -> int:
    """How many compiled graphs Inductor declined to capture as CUDA graphs (CPU tensors, mutated inputs, dynamic
    shapes …): a run with CUDA graphs on should report 0."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cudagraph_skips", 0))
