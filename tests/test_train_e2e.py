"""`python train.py debug=fast` end to end, as a user runs it: both stages, W&B offline, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ldm.utils.wandb_offline import read_history
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One debug=fast run of both stages with the W&B logger in offline mode, from a fresh cwd."""
    work = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "debug=fast",
            "logger=wandb",
            f"paths.root_dir={work}",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    runs = sorted((work / "logs" / "train" / "runs").glob("*"))
    return result, runs[-1] if runs else work


@pytest.mark.slow
def test_debug_fast_trains_both_stages(fast_run):
    result, run_dir = fast_run
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("autoencoder", "diffusion"):
        assert (run_dir / "checkpoints" / stage / "last.ckpt").is_file()
        assert f"{stage} checkpoint (best): {run_dir}" in result.stdout
    assert (run_dir / "final_samples.png").stat().st_size > 0
    assert "final sample grid:" in result.stdout and "val/fid=" in result.stdout
    # The run dir holds what is needed to rerun it.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["data_fingerprint"].startswith("mnist5k-32-")
    assert manifest["packages"]["torch"].startswith("2.14")
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert resolved["paths"]["output_dir"] == str(run_dir)
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_stage2_checkpoint_is_self_contained(fast_run):
    _, run_dir = fast_run
    ckpt = torch.load(
        run_dir / "checkpoints" / "diffusion" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["ldm"]["stage"] == "diffusion"
    assert (
        ckpt["ldm"]["config"]["model"]["autoencoder"]["_target_"]
        == "ldm.models.autoencoder.KLAutoencoder"
    )
    state = ckpt["state_dict"]
    assert any(k.startswith("autoencoder.") for k in state) and any(
        k.startswith("unet.") for k in state
    )
    assert (
        float(state["autoencoder.scale_factor"]) > 0
        and float(state["autoencoder.scale_factor"]) != 1.0
    )


@pytest.mark.slow
def test_wandb_offline_history_has_loss_and_fid(fast_run):
    _, run_dir = fast_run
    run_files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2  # one W&B run per stage
    runs = {
        info["name"].rsplit("-", 1)[-1]: (rows, info) for rows, info in map(read_history, run_files)
    }
    assert set(runs) == {"autoencoder", "diffusion"}
    assert (
        runs["autoencoder"][1]["group"] == runs["diffusion"][1]["group"]
    )  # one group for the two stages
    ae_keys = set().union(*runs["autoencoder"][0])
    assert {
        "train/loss",
        "val/rec_loss",
        "val/psnr",
        "val/ssim",
        "val/reconstructions/_type",
    } <= ae_keys
    rows, info = runs["diffusion"]
    keys = set().union(*rows)
    assert {"train/loss", "val/loss", "val/fid", "val/fid_num_samples", "val/samples/_type"} <= keys
    fid = [row["val/fid"] for row in rows if "val/fid" in row]
    assert fid and all(v > 0 for v in fid)
    assert next(row["val/fid_num_samples"] for row in rows if "val/fid_num_samples" in row) == 32
    # The resolved config and the run manifest are the run's W&B config.
    assert (
        info["config"]["trained_stage"] == "diffusion" and info["config"]["manifest"]["seed"] == 42
    )
