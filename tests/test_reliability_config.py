"""Config faults: each bad setting is refused before training with one line naming it and the
fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ldm.config import stage_section
from ldm.train import preflight
from ldm.utils.cli import group_options
from ldm.utils.errors import UserError
from ldm.utils.validation import validate_config
from tests.conftest import CONF_DIR, ROOT, compose_config


def refused(overrides: list[str], tmp_path) -> str:
    with pytest.raises(UserError) as err:
        validate_config(compose_config(overrides, tmp_path))
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def stored_config(tmp_path_factory) -> dict:
    """The resolved `debug=fast` config, as StoreConfigInCheckpoint stores it."""
    cfg = compose_config(["debug=fast"], tmp_path_factory.mktemp("stored"))
    return OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )


def stage1_checkpoint(tmp_path, stored: dict, edits: dict, stage: str = "autoencoder"):
    """A checkpoint file carrying `stored` with `edits` (dotted keys) applied; no real weights are
    needed because validation reads only the stored config."""
    config = OmegaConf.create(stored)
    for key, value in edits.items():
        OmegaConf.update(config, key, value)
    path = tmp_path / f"{stage}-{len(list(tmp_path.glob('*.ckpt')))}.ckpt"
    ldm = {"stage": stage, "config": OmegaConf.to_container(config)}
    torch.save({"state_dict": {"w": torch.zeros(1)}, "ldm": ldm}, path)
    return path


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["debug=fast"],
        ["model/autoencoder=vq"],
        ["data=digits"],
        *[[f"experiment={name}"] for name in group_options(CONF_DIR, "experiment")],
    ],
)
def test_shipped_configs_pass(tmp_path, overrides):
    """Each shipped config passes the whole preflight (config checks and the dry build of both
    stages) and gives each stage a real budget and batch."""
    cfg = compose_config(overrides, tmp_path)
    if cfg.data.name == "image_folder":  # the folder presets need the user's folder
        cfg.data.root = str(tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        # the *_gpu presets on a CPU machine: refused for the accelerator (test below); the rest
        # of their preflight is checked here
        with pytest.raises(UserError, match="torch sees no CUDA GPU here"):
            preflight(cfg)
        cfg.trainer.accelerator = "cpu"
    preflight(cfg)
    for stage in ("autoencoder", "diffusion"):
        trainer = stage_section(cfg, stage, "trainer")
        assert trainer["max_epochs"] >= 1 and trainer["max_steps"] == -1, stage
        assert stage_section(cfg, stage, "data")["batch_size"] >= 1, stage


def test_unknown_group_option_exits_2_with_one_line():
    run = subprocess.run(
        [sys.executable, "train.py", "data=nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2
    assert run.stderr == (
        "error: data='nope' is not an option of 'data'; choose one of: "
        f"{', '.join(group_options(CONF_DIR, 'data'))}\n"
    )


def test_old_per_stage_spelling_names_the_new_key():
    """`stage_trainer.*` / `stage_data.*` were renamed; Hydra alone would say "not in struct" and
    advise a `+`, which would add a key nothing reads."""
    for typed, new in [
        ("stage_trainer.diffusion.max_epochs=2", "diffusion.trainer.max_epochs"),
        ("+stage_data.autoencoder.batch_size=8", "autoencoder.data.batch_size"),
        # not a key of conf/train.yaml's diffusion.trainer: added with a `+`, as the README says
        ("stage_trainer.diffusion.gradient_clip_val=1", "+diffusion.trainer.gradient_clip_val"),
    ]:
        run = subprocess.run(
            [sys.executable, "train.py", typed, "--cfg", "job"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert run.returncode == 2
        assert run.stderr == f"error: {typed.split('=')[0].lstrip('+')} was renamed: use {new}\n"
    run = subprocess.run(
        [sys.executable, "train.py", "model.autoencoder.lr_schedule=constant", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2
    assert run.stderr.startswith(
        "error: model.autoencoder.lr_schedule was replaced: use model.autoencoder.lr_scheduler"
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["stage=both"], "stage='both' is not one of all|autoencoder|diffusion"),
        (["seed=abc"], "seed='abc' must be an integer"),
        (
            ["data=image_folder"],
            "data.root is required but not set: add data.root=VALUE to the command line",
        ),
        (
            ["+model.diffusion.unet.extra=${nope}"],
            "model.diffusion.unet.extra: Interpolation key 'nope' not found",
        ),
        (
            ["debug=fast", "model.diffusion.unet.in_channels=3"],
            "model.diffusion.unet.in_channels=3 but the autoencoder has latent_channels=4; "
            "set model.diffusion.unet.in_channels=4",
        ),
        (
            ["model.diffusion.unet.out_channels=8"],
            "model.diffusion.unet.out_channels=8 but the autoencoder has latent_channels=4; "
            "set model.diffusion.unet.out_channels=4",
        ),
        (
            ["data.image_size=30"],
            "data.image_size=30 is not divisible by the autoencoder's downsampling factor 4 "
            "(its encoder.ch_mult has 3 levels); use a multiple of 4, e.g. 28, 32, 36",
        ),
        (
            ["model.diffusion.unet.channel_mult=[1,2,2,2,2]"],
            "model.diffusion.unet.channel_mult=[1, 2, 2, 2, 2] halves the 8x8 latents 4 times, "
            "which needs a multiple of 16; "
            "use fewer levels or a data.image_size that is a multiple of 64",
        ),
        (["stage=diffusion"], "stage=diffusion needs autoencoder_ckpt=PATH (a stage-1 checkpoint)"),
        (
            ["stage=diffusion", "autoencoder_ckpt=/no/such.ckpt"],
            "autoencoder_ckpt='/no/such.ckpt' does not exist; give a stage-1 checkpoint file",
        ),
        (
            ["autoencoder_ckpt=/no/such.ckpt"],
            "autoencoder_ckpt='/no/such.ckpt' is used only with stage=diffusion; "
            "stage=all trains a new autoencoder (drop autoencoder_ckpt or set stage=diffusion)",
        ),
        (
            ["ckpt_path=/no/such.ckpt"],
            "ckpt_path='/no/such.ckpt' does not exist; give a checkpoint file, `last`, or null",
        ),
        (
            ["autoencoder.trainer.gradient_clip_val=1.0"],
            "autoencoder.trainer.gradient_clip_val=1.0 does not apply to the autoencoder "
            "(it steps its own optimizers); set model.autoencoder.grad_clip=1.0 instead "
            "(trainer.gradient_clip_val sets both stages)",
        ),
        (
            ["data=image_folder", "data.root=/tmp", "data.source.mode=L"],
            "data.num_channels=3 but data.source.mode=L gives 1; set data.num_channels=1",
        ),
        (
            ["data=image_folder", "data.root=/tmp", "model.diffusion.unet.num_classes=10"],
            "model.diffusion.unet.num_classes=10 but data.name=image_folder has no labels; "
            "set model.diffusion.unet.num_classes=null",
        ),
        (
            ["model.diffusion.unet.num_classes=5"],
            "model.diffusion.unet.num_classes=5 but data.num_classes=10; "
            "set model.diffusion.unet.num_classes=10",
        ),
        (
            ["model.diffusion.unet.model_channels=32"],  # the small UNet's 32 groups
            "model.diffusion.unet.norm_num_groups=32 on 32 channels is one channel a group "
            "(instance norm; samples saturate); use at most 16, e.g. "
            "model.diffusion.unet.norm_num_groups=8",
        ),
        (
            ["task=inpaint", "conditioning=hybrid", "data.num_classes=null"],
            "conditioning=hybrid tells the model the class, but data=mnist5k has no labels "
            "(data.num_classes=null); use conditioning=concat",
        ),
    ],
)
def test_bad_settings_are_named(tmp_path, overrides, expected):
    assert refused(overrides, tmp_path) == expected


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "trainer.max_epochs=abc",
            "autoencoder.trainer.max_epochs (or trainer.max_epochs)='abc' must be an integer",
        ),
        (
            "trainer.limit_val_batches=some",
            "autoencoder.trainer.limit_val_batches (or trainer.limit_val_batches)='some' must be "
            "a number",
        ),
        # stage 2's optimizer is built before stage 1 trains, not when stage 2 starts
        ("model.diffusion.optimizer.lr=abc", "model.diffusion.optimizer.lr='abc' must be a number"),
        (
            "model.diffusion.optimizer.weight_decay=-1",
            "model.diffusion optimizer / lr_scheduler: Invalid weight_decay value: -1",
        ),
    ],
)
def test_preflight_names_bad_trainer_and_optimizer_values(tmp_path, override, expected):
    cfg = compose_config(["debug=fast", "model/diffusion=small", override], tmp_path)
    with pytest.raises(UserError) as err:
        preflight(cfg)
    assert str(err.value) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("overrides", [["debug=fast", "trainer.accelerator=gpu"], ["trainer=gpu"]])
def test_a_gpu_accelerator_on_a_machine_without_one_is_refused_before_anything_trains(
    tmp_path, overrides
):
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(UserError) as err:
        preflight(cfg)
    assert str(err.value) == (
        "autoencoder.trainer.accelerator (or trainer.accelerator)='gpu' but torch sees no CUDA "
        "GPU here; use trainer.accelerator=auto (or cpu)"
    )


def test_stage1_checkpoint_of_another_image_size_or_channel_count(tmp_path, stored_config):
    other = stage1_checkpoint(tmp_path, stored_config, {"data.image_size": 64})
    message = refused(["stage=diffusion", f"autoencoder_ckpt={other}"], tmp_path)
    assert message == (
        f"autoencoder_ckpt={str(other)!r} was trained on 64x64 images with 1 channel(s), "
        "but data.image_size=32 and data.num_channels=1; "
        "set data.image_size=64 data.num_channels=1 or train a new stage 1"
    )
    rgb = stage1_checkpoint(tmp_path, stored_config, {"data.num_channels": 3})
    assert "with 3 channel(s)" in refused(["stage=diffusion", f"autoencoder_ckpt={rgb}"], tmp_path)


def test_stage2_checks_use_the_checkpoints_autoencoder(tmp_path, stored_config):
    """Stage 2 runs on the stored autoencoder: the UNet follows its latent_channels, not the
    default's."""
    ckpt = stage1_checkpoint(tmp_path, stored_config, {"model.autoencoder.latent_channels": 2})
    validate_config(
        compose_config(["debug=fast", "stage=diffusion", f"autoencoder_ckpt={ckpt}"], tmp_path)
    )
    assert refused(
        [
            "debug=fast",
            "stage=diffusion",
            f"autoencoder_ckpt={ckpt}",
            "model.diffusion.unet.in_channels=4",
        ],
        tmp_path,
    ).startswith("model.diffusion.unet.in_channels=4 but the autoencoder has latent_channels=2")


def test_autoencoder_ckpt_of_the_wrong_kind(tmp_path, stored_config):
    stage2 = stage1_checkpoint(tmp_path, stored_config, {}, stage="diffusion")
    assert refused(["stage=diffusion", f"autoencoder_ckpt={stage2}"], tmp_path) == (
        f"{str(stage2)!r} is a stage-2 (diffusion) checkpoint; an autoencoder checkpoint is needed"
    )
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    assert refused(["stage=diffusion", f"autoencoder_ckpt={tmp_path / 'text.ckpt'}"], tmp_path) == (
        f"checkpoint {str(tmp_path / 'text.ckpt')!r} is truncated or not a torch checkpoint "
        "(not a zip-format torch file)"
    )
