"""`lora-studio grid RUN`: a real run's saved steps × strengths in one labelled PNG, cached in the run folder."""

from __future__ import annotations

import pytest
from PIL import Image

from fixtures_runs import make_tiny_run
from studio.cli import main
from studio.engine.grid import GRID_FOLDER, GridError, compose_grid, grid_rows, mean_difference, parse_strengths


@pytest.fixture(scope="module")
def run_dir(tiny_sd1, tmp_path_factory):
    from fixtures_data import make_dataset

    data = make_dataset(tmp_path_factory.mktemp("data"))
    return make_tiny_run(tiny_sd1, data, tmp_path_factory.mktemp("runs") / "run")


def test_rows_are_the_saved_steps_then_the_final_lora(run_dir):
    rows = grid_rows(run_dir)
    assert [(r.step, r.final) for r in rows] == [(2, False), (4, True)]
    assert [r.label for r in rows] == ["step 2", "step 4 (final)"]
    assert rows[-1].path.name == "tiny.safetensors"


def test_grid_png_has_a_cell_per_step_and_strength_and_the_cells_are_cached(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["grid", str(run_dir), "--strengths", "0, 1", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip().endswith(str(out))
    assert "4/4 step 4 (final) at 1×" in printed and "(cached)" in printed  # strength 0 is one base picture
    cells = sorted((run_dir / GRID_FOLDER).glob("*.png"))
    assert len(cells) == 3  # base once + two LoRAs at 1×
    sheet = Image.open(out)
    assert sheet.width > 2 * 128 and sheet.height > 2 * 128  # two columns, two rows of ≥128 px cells, labels
    # Again: every cell from the cache, so nothing is generated (and the run folder gains no files).
    assert main(["grid", str(run_dir), "--strengths", "0, 1", "--steps", "2", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("(cached)") == 4
    assert sorted((run_dir / GRID_FOLDER).glob("*.png")) == cells


def test_lora_cells_differ_from_the_base_cell(run_dir, tiny_sd1):
    from studio.engine.checkpoint import load_model
    from studio.engine.grid import GridSpec, render_grid, run_job

    job = run_job(run_dir)
    spec = GridSpec(prompt="zzshape, a red circle", strengths=(0.0, 1.0), steps=2, size=64)
    grid = render_grid(load_model(job.model), run_dir, spec, grid_rows(run_dir), model_path=job.model.path)
    base, final = grid.image(1, 0), grid.image(1, 1)
    assert grid.paths[0][0] == grid.paths[1][0]  # the base picture is shared by every row
    assert mean_difference(base, final) > 0.5
    assert compose_grid(grid).size == compose_grid(grid, cell=128).size


def test_bad_input_is_a_sentence(run_dir, tmp_path, capsys):
    with pytest.raises(GridError, match="'x' is not a number"):
        parse_strengths("0, x")
    assert main(["grid", str(run_dir), "--strengths", "9"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert main(["grid", str(tmp_path)]) == 1
    assert "not a run folder" in capsys.readouterr().err
