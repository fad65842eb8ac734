"""Checkpoints from before this turn keep working, and a newer unknown format is refused.

`tests/fixtures/diffusion_6fef1e3_debug_fast.ckpt` was written by the code at 6fef1e3 (no format
version in it): it loads, `sample.py` samples from it, and `train.py` resumes training from it.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from ldm.models.loading import load_autoencoder, load_latent_diffusion
from ldm.train import preflight
from ldm.utils.checkpoint import CHECKPOINT_FORMAT_VERSION, load_checkpoint
from ldm.utils.errors import UserError
from tests.conftest import ROOT, compose_config
from tests.train_cli import FAST, explain, load_ckpt, sample_cli, train_cli

FIXTURE = ROOT / "tests" / "fixtures" / "diffusion_6fef1e3_debug_fast.ckpt"
AUTOENCODER_FIXTURE = ROOT / "tests" / "fixtures" / "autoencoder_6fef1e3_debug_fast.ckpt"


def test_old_stage1_checkpoint_passes_preflight_for_stage_2(tmp_path):
    """Stage 2 on a stage-1 checkpoint saved before the module rename: the preflight builds its
    architecture under today's names (it failed with "Error locating target"), and stage 2 is
    given, and so stores, today's names."""
    overrides = ["debug=fast", "stage=diffusion", f"autoencoder_ckpt={AUTOENCODER_FIXTURE}"]
    preflight(compose_config(overrides, tmp_path))
    _, config = load_autoencoder(AUTOENCODER_FIXTURE)
    assert config["encoder"]["_target_"] == "ldm.modules.encoder_decoder.Encoder"


def test_old_checkpoint_loads_and_samples_in_process():
    ckpt = load_checkpoint(FIXTURE, expected_stage="diffusion")
    assert "format_version" not in ckpt["ldm"]  # written before versions existed (version 0)
    model, _ = load_latent_diffusion(FIXTURE)
    images = model.sample(
        2, class_labels=torch.tensor([3, 7]), generator=torch.Generator().manual_seed(0)
    )
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()


def test_newer_checkpoint_format_is_refused_in_one_line(tmp_path):
    ckpt = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    ckpt["ldm"]["format_version"] = CHECKPOINT_FORMAT_VERSION + 1
    newer = tmp_path / "newer.ckpt"
    torch.save(ckpt, newer)
    with pytest.raises(UserError) as err:
        load_checkpoint(newer)
    message = str(err.value)
    assert "\n" not in message
    assert f"format version {CHECKPOINT_FORMAT_VERSION + 1}" in message
    assert f"(format version {CHECKPOINT_FORMAT_VERSION})" in message
    # the sample CLI says the same in one line, exit 2, nothing written
    result = sample_cli(f"ckpt={newer}", f"out_dir={tmp_path / 'out'}", "device=cpu", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        f"format version {CHECKPOINT_FORMAT_VERSION + 1}" in result.stderr.strip().splitlines()[-1]
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_old_checkpoint_samples_with_the_cli_and_resumes_training(tmp_path):
    out = tmp_path / "samples"
    sampled = sample_cli(
        f"ckpt={FIXTURE}",
        f"out_dir={out}",
        "device=cpu",
        "num_samples=4",
        "sampler.steps=4",
        cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    images = [p for p in out.glob("*.png") if p.name not in ("grid.png", "trajectory.png")]
    assert len(images) == 4 and (out / "grid.png").is_file()

    # Resume: stage=all with a stage-2 checkpoint skips stage 1 (the checkpoint carries the
    # autoencoder) and continues stage 2 from the fixture's step 3 for one more epoch.
    local = tmp_path / "old.ckpt"
    shutil.copy(FIXTURE, local)
    run_dir = tmp_path / "run"
    resumed = train_cli(
        *FAST,
        "stage=all",
        f"ckpt_path={local}",
        "diffusion.trainer.max_epochs=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, explain(resumed)
    last = load_ckpt(run_dir / "checkpoints" / "diffusion" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 6)
    assert last["ldm"]["format_version"] == CHECKPOINT_FORMAT_VERSION
    log = (run_dir / "train.log").read_text()
    assert "stage autoencoder: fitting" not in log
