"""The config surface: each documented override reaches the Trainer or data module it names, for
the stage(s) that run; nothing is silently ignored, and what would fail in stage 2 fails first."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
import torch
from PIL import Image

from ldm.config import stage_section
from ldm.train import preflight, stage_datamodule
from ldm.utils.cli import group_options
from ldm.utils.errors import UserError
from tests.conftest import CONF_DIR, ROOT, compose_config
from tests.train_cli import train_cli

# (overrides, {stage: (max_epochs, max_steps, batch_size, accumulate_grad_batches)})
DOCUMENTED = [
    ([], {"autoencoder": (3, -1, 16, 1), "diffusion": (25, -1, 64, 1)}),
    (["trainer.max_epochs=2"], {"autoencoder": (2, -1, 16, 1), "diffusion": (2, -1, 64, 1)}),
    (["trainer.max_steps=7"], {"autoencoder": (-1, 7, 16, 1), "diffusion": (-1, 7, 64, 1)}),
    (["data.batch_size=8"], {"autoencoder": (3, -1, 8, 1), "diffusion": (25, -1, 8, 1)}),
    (
        ["diffusion.trainer.max_epochs=3", "autoencoder.data.batch_size=12"],
        {"autoencoder": (3, -1, 12, 1), "diffusion": (3, -1, 64, 1)},
    ),
    (
        ["trainer.max_epochs=2", "diffusion.trainer.max_epochs=5", "data.batch_size=8"],
        {"autoencoder": (2, -1, 8, 1), "diffusion": (5, -1, 8, 1)},
    ),
    (
        ["diffusion.trainer.max_steps=30", "+diffusion.trainer.accumulate_grad_batches=2"],
        {"autoencoder": (3, -1, 16, 1), "diffusion": (-1, 30, 64, 2)},
    ),
    (["debug=fast"], {"autoencoder": (1, -1, 16, 1), "diffusion": (1, -1, 16, 1)}),
    (
        ["diffusion.default_max_epochs=40", "autoencoder.default_batch_size=8"],
        {"autoencoder": (3, -1, 8, 1), "diffusion": (40, -1, 64, 1)},
    ),
    (
        ["debug=fast", "trainer.max_epochs=3", "data.batch_size=4"],
        {"autoencoder": (3, -1, 4, 1), "diffusion": (3, -1, 4, 1)},
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), DOCUMENTED)
def test_overrides_reach_each_stages_trainer_and_data_module(overrides, expected, tmp_path):
    """Built the way ldm.train builds them: the Trainer from the stage's merged trainer config,
    the data module by `stage_datamodule`."""
    cfg = compose_config(overrides, tmp_path)
    for stage, (max_epochs, max_steps, batch_size, accumulate) in expected.items():
        trainer_cfg = stage_section(cfg, stage, "trainer")
        trainer_cfg.update(accelerator="cpu", devices=1, plugins=None)
        trainer = hydra.utils.instantiate(trainer_cfg, logger=False, enable_checkpointing=False)
        assert (trainer.max_epochs, trainer.max_steps) == (max_epochs, max_steps), stage
        assert trainer.accumulate_grad_batches == accumulate, stage
        assert stage_datamodule(cfg, stage).batch_size == batch_size, stage


@pytest.mark.parametrize("experiment", group_options(CONF_DIR, "experiment"))
def test_shared_budget_overrides_beat_every_presets_stage_budgets(experiment, tmp_path):
    """Presets give each stage its budget as `<stage>.default_*`, so the shared keys a user types
    still reach both stages, and `<stage>.trainer.*` still beats both."""
    extra = ["data.root=/nonexistent"] if experiment.startswith("folder") else []
    cfg = compose_config([f"experiment={experiment}", *extra], tmp_path)
    for stage in ("autoencoder", "diffusion"):
        assert stage_section(cfg, stage, "trainer")["max_epochs"] == cfg[stage].default_max_epochs
        assert stage_section(cfg, stage, "data")["batch_size"] == (
            cfg.data.batch_size or cfg[stage].default_batch_size
        )
    overrides = ["trainer.max_epochs=2", "data.batch_size=8", "diffusion.trainer.max_epochs=5"]
    cfg = compose_config([f"experiment={experiment}", *extra, *overrides], tmp_path)
    assert stage_section(cfg, "autoencoder", "trainer")["max_epochs"] == 2
    assert stage_section(cfg, "diffusion", "trainer")["max_epochs"] == 5
    for stage in ("autoencoder", "diffusion"):
        assert stage_section(cfg, stage, "data")["batch_size"] == 8


def test_gradient_clipping_reaches_both_stages(tmp_path):
    """Stage 1 steps its own optimizers, so `trainer.gradient_clip_val` reaches it as the
    autoencoder's grad_clip; stage 2's Lightning Trainer clips itself."""
    cfg = compose_config(["debug=fast", "trainer.gradient_clip_val=0.5"], tmp_path)
    assert stage_section(cfg, "diffusion", "trainer")["gradient_clip_val"] == 0.5
    assert stage_section(cfg, "autoencoder", "trainer")["gradient_clip_val"] is None
    autoencoder = hydra.utils.instantiate(cfg.model.autoencoder)
    assert autoencoder.grad_clip == 0.5
    preflight(cfg)


def test_a_misspelt_trainer_argument_fails_before_stage_1(tmp_path):
    cfg = compose_config(["debug=fast", "+diffusion.trainer.max_epoch=3"], tmp_path)
    with pytest.raises(UserError, match=r"^diffusion.trainer.max_epoch \(or trainer.max_epoch\) "):
        preflight(cfg)


def test_stage2_mistakes_fail_before_stage_1(tmp_path):
    """Settings only stage 2 builds (its sampler, the FID sampler) are built by the preflight."""
    cfg = compose_config(["debug=fast", "sampler.steps=500"], tmp_path)  # schedule has 100 steps
    with pytest.raises(UserError, match=r"^model: .*500"):
        preflight(cfg)
    cfg = compose_config(["debug=fast", "fid.every_n_epochs=1", "fid.sampler_steps=200"], tmp_path)
    with pytest.raises(UserError, match=r"^model: .*200"):
        preflight(cfg)
    cfg = compose_config(["debug=fast", "fid.sampler_steps=0"], tmp_path)
    with pytest.raises(UserError, match=r"^fid.sampler_steps=0 must be positive"):
        preflight(cfg)
    cfg = compose_config(["debug=fast", "model.diffusion.loss_weighting=snr"], tmp_path)
    with pytest.raises(UserError, match=r"^model: loss_weighting='snr'"):
        preflight(cfg)


def write_folder(root, n=4):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (64, 64), (6 * i, 80, 120)).save(root / f"{i}.png")


def test_unlabeled_folder_with_classifier_fid_fails_before_stage_1(tmp_path):
    """It used to train stage 1, then stop at stage 2's FID callback. (The default fid=auto uses
    self-supervised features on unlabeled data: tests/test_image_folders.py.)"""
    write_folder(tmp_path / "images")
    result = train_cli(
        "debug=fast",
        "data=image_folder",
        f"data.root={tmp_path / 'images'}",
        "fid=classifier",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: fid.extractor=classifier needs labeled data")
    assert not list(tmp_path.glob("logs/**/*.ckpt"))


@pytest.mark.slow
def test_logger_null_callbacks_null_and_a_step_budget_train_both_stages(tmp_path):
    """`logger=null` and `callbacks=null` (Hydra alone rejects `GROUP=null`), `trainer.max_steps`
    and `data.batch_size` as a Lightning user types them: both stages train exactly 2 steps of 4
    images and keep their final weights (no checkpoint callback), nothing is logged."""
    result = train_cli(
        "debug=fast",
        "logger=null",
        "callbacks=null",
        "trainer.max_steps=2",
        "data.batch_size=4",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("autoencoder", "diffusion"):
        ckpt = torch.load(tmp_path / f"run/checkpoints/{stage}/final.ckpt", weights_only=True)
        assert ckpt["global_step"] == 2, stage
        assert ckpt["ldm"]["config"][stage]["data"]["batch_size"] == 4
        loops = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
        assert loops == 2, stage
    assert not (tmp_path / "run/csv").exists() and not (tmp_path / "run/wandb").exists()


def test_help_and_cfg_job_work():
    for args in (["--help"], ["--cfg", "job", "logger=null"]):
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    assert "autoencoder:" in result.stdout and "logger:" not in result.stdout


def test_feature_network_cli_builds_stage_2_data(tmp_path):
    """`python -m ldm.metrics.contrastive data=image_folder ...` composes the run config as
    train.py does; with the shared data.batch_size null it failed building the data module."""
    from ldm.metrics.contrastive import main

    write_folder(tmp_path / "images", n=40)
    summary = main(
        [
            "data=image_folder",
            f"data.root={tmp_path / 'images'}",
            "data.image_size=32",
            "fid.contrastive.epochs=1",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert summary["num_train"] == 38  # 40 images, val_fraction 0.05
