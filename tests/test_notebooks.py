"""The notebooks: each committed .ipynb is its jupytext source notebooks/<name>.py without
outputs, and both run top to bottom on their tiny defaults (as CI runs them) writing only into a
temporary directory.

Each run injects `WORK_DIR` into the papermill-style parameters cell and appends one probe cell
that prints the notebook's results as JSON, so the values it computed are checked, not just that
no cell raised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jupytext
import nbformat
import pytest

from tests.conftest import ROOT

NB_DIR = ROOT / "notebooks"
NOTEBOOKS = ("01_tour.ipynb", "02_inspect_run.ipynb")
# Where a notebook that ignored WORK_DIR would write by default (train.py's paths, Lightning, W&B).
REPO_OUTPUTS = ("logs", ".cache", "wandb", "lightning_logs", "outputs", "notebooks")


def cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, list[str]]]:
    """What a notebook is made of: (cell type, source, tags) of every cell."""
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]


def repo_outputs() -> dict[str, float]:
    """Files (with mtimes) under the repository paths a notebook could write to by mistake."""
    found = {}
    for name in REPO_OUTPUTS:
        root = ROOT / name
        if root.is_dir():
            found.update(
                {
                    str(p): p.stat().st_mtime
                    for p in root.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts
                }
            )
    return found


def execute(name: str, tmp_path: Path, probe: str) -> tuple[nbformat.NotebookNode, dict]:
    """Run notebook `name` with WORK_DIR=tmp_path/work; returns it executed and the probe's JSON."""
    from nbclient import NotebookClient

    nb = nbformat.read(NB_DIR / name, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += f"\nWORK_DIR = {str(tmp_path / 'work')!r}  # injected by the test\n"
    nb.cells.append(
        nbformat.v4.new_code_cell(f"import json\nprint('PROBE ' + json.dumps({probe}))")
    )
    before = repo_outputs()
    # cwd is tmp_path too, so even a relative path written by mistake lands there.
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert repo_outputs() == before, "the notebook wrote into the repository"
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    return nb, json.loads(text.split("PROBE ", 1)[1])


def count_images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_its_source_without_outputs(name):
    nb = nbformat.read(NB_DIR / name, as_version=4)
    source = NB_DIR / name.replace(".ipynb", ".py")
    assert cells(nb) == cells(jupytext.read(source)), (
        f"notebooks/{name} differs from {source.name}; "
        f"run `jupytext --update --to ipynb notebooks/{source.name}`"
    )
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    # First cell: what it is and how to run it on full settings; second: the parameters.
    assert nb.cells[0].cell_type == "markdown" and "**How to run.**" in nb.cells[0].source
    assert nb.cells[1].metadata.get("tags") == ["parameters"]
    assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])] == [nb.cells[1]]


@pytest.mark.slow
def test_tour_runs_on_quick_settings(tmp_path):
    nb, out = execute(
        "01_tour.ipynb",
        tmp_path,
        "{'work': str(WORK), 'ae_ckpt': str(AE_CKPT), 'ldm_ckpt': str(LDM_CKPT), 'T': T, "
        "'schedules': sorted(schedules), 'scaled_std': float(scaled.std()), 'psnr': float(psnr), "
        "'samplers': {k: v.nfe for k, v in samplers.items()}, "
        "'grid_shapes': [list(g.shape) for g in grids.values()], "
        "'trajectory': list(decoded.shape), 'rows': rows, 'floor': floor, 'N': N}",
    )
    assert count_images(nb) == 8  # figures 1-8
    work = tmp_path / "work"
    assert out["work"] == str(work)
    assert out["ae_ckpt"].startswith(str(work)) and Path(out["ae_ckpt"]).is_file()
    assert out["ldm_ckpt"].startswith(str(work)) and Path(out["ldm_ckpt"]).is_file()
    assert out["schedules"] == ["cosine", "linear", "scaled_linear", "sigmoid"]
    assert 0.7 < out["scaled_std"] < 1.3  # scale_factor brings latents to about unit variance
    assert math.isfinite(out["psnr"])
    assert out["T"] == 100 and out["samplers"] == {"ddpm": 100, "ddim": 50, "dpm_solver": 20}
    assert out["grid_shapes"] == [[30, 1, 32, 32]] * 3
    assert out["trajectory"] == [4 * 8, 1, 32, 32]  # 4 samples x 8 steps
    assert [(r["sampler"], r["nfe"]) for r in out["rows"]] == [
        *[("ddim", n) for n in (2, 4, 8)],
        *[("dpm_solver", n) for n in (2, 4, 8)],
        ("ddpm", 100),
    ]
    assert out["N"] == 100
    assert 0 <= out["floor"] < 100  # held-out real digits against the train split
    assert all(
        math.isfinite(r["fid"]) and r["fid"] > out["floor"] for r in out["rows"]
    )  # untrained model
    assert all(0 <= r["cas"] <= 1 for r in out["rows"])


@pytest.mark.slow
def test_inspect_run_reads_a_fresh_run(tmp_path):
    nb, out = execute(
        "02_inspect_run.ipynb",
        tmp_path,
        "{'run': str(RUN), "
        "'csv': {s: {k: v[1] for k, v in m.items()} for s, m in csv_metrics.items()}, "
        "'wandb': {s: {k: v[1] for k, v in m.items()} for s, m in wandb_metrics.items()}, "
        "'grids': {k: [p.name for p in v] for k, v in grids.items()}, 'seed': manifest['seed']}",
    )
    assert count_images(nb) == 5  # losses, FID/CAS, two kinds of grids, final samples
    assert out["run"] == str(tmp_path / "work" / "run") and out["seed"] == 42
    csv_metrics, wandb_metrics = out["csv"], out["wandb"]
    assert set(csv_metrics) == set(wandb_metrics) == {"autoencoder", "diffusion"}
    ae, dm = csv_metrics["autoencoder"], csv_metrics["diffusion"]
    assert len(ae["train/loss"]) == 6 and len(ae["val/rec_loss"]) == 2  # 2 epochs x 3 batches
    assert len(dm["train/loss"]) == 9 and len(dm["val/fid"]) == 3  # 3 epochs, FID every epoch
    assert all(v > 0 for v in dm["val/fid"]) and dm["val/fid_num_samples"] == [32] * 3
    assert dm["ref/fid_real_floor"][0] < dm["ref/fid_noise_ceiling"][0]
    # The W&B offline log holds the same numbers as the CSV logger.
    for stage, series in csv_metrics.items():
        for key in ("train/loss", "val/loss"):
            assert wandb_metrics[stage][key] == pytest.approx(series[key], rel=1e-6)
    assert out["grids"] == {
        "val_reconstructions": [
            "val_reconstructions_0000003.png",
            "val_reconstructions_0000006.png",
        ],
        "val_samples": [
            "val_samples_0000003.png",
            "val_samples_0000006.png",
            "val_samples_0000009.png",
        ],
    }
