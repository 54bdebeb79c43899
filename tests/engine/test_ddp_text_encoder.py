"""Two CPU processes (torchrun, gloo) training the text encoders too: every LoRA stays identical on both ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from studio.engine.config import save_job
from test_trainer import tiny_job

# Runs under torchrun: trains the job, and just before the run lets go of its model, saves this rank's LoRA.
_RANK_SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch

    import studio.engine.trainer as trainer
    from studio.engine.config import load_job
    from studio.engine.lora import lora_state_dicts

    out = Path(sys.argv[2])
    real_release = trainer.release

    def save_then_release(run):
        if run.bundle is not None and run.step:
            weights = {c: {k: v.cpu() for k, v in sd.items()} for c, sd in lora_state_dicts(run.bundle).items()}
            torch.save(weights, out / f"rank{run.accelerator.process_index}.pt")
        real_release(run)

    trainer.release = save_then_release
    events = list(trainer.run_training(load_job(sys.argv[1])))
    assert type(events[-1]).__name__ == "RunFinished", events[-1]
''')


def test_text_encoder_lora_is_synchronised_across_processes(tiny_sdxl, tiny_dataset, tmp_path):
    """SDXL: two text encoders, the first read at its penultimate layer (its last layer's LoRA gets no gradient).
    Each rank trains on other images with other noise; DDP must all-reduce the text encoders' gradients as it
    does the UNet's, or the ranks' LoRAs drift apart."""
    job = tiny_job(tiny_sdxl, tiny_dataset, tmp_path / "run", training__steps=3, training__lr=1e-2,
                   lora__train_text_encoder=True, lora__text_encoder_lr=1e-2, training__cache_to_disk=False)
    save_job(job, tmp_path / "job.toml")
    (tmp_path / "rank_script.py").write_text(_RANK_SCRIPT)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29531", str(tmp_path / "rank_script.py"),
           str(tmp_path / "job.toml"), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert set(ranks[0]) == {"unet", "text_encoder", "text_encoder_2"} == set(ranks[1])
    for component, weights in ranks[0].items():
        trained = [k for k in weights if "lora_B" in k and weights[k].abs().sum() > 0]
        assert trained, f"{component}: no LoRA weight moved"
        differ = [k for k in weights if not torch.equal(weights[k], ranks[1][component][k])]
        assert not differ, f"{component}: {len(differ)} LoRA tensors differ between the ranks, e.g. {differ[:3]}"
