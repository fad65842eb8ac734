"""Every config group option composes and instantiates; the CLI rejects bad values in one line."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
from omegaconf import OmegaConf

from ldm.utils.cli import group_options
from tests.conftest import CONF_DIR, ROOT, compose_config

# Options that need files the tests do not have; they are composed but only checked, not built.
NEEDS_FILES = {
    ("data", "image_folder"),
    ("data", "latents"),
    ("data", "mnist"),
    ("data", "fashion_mnist"),
    ("data", "cifar10"),
}


def test_default_config_values(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.stage == "all" and cfg.data.name == "mnist5k" and cfg.data.num_classes == 10
    assert OmegaConf.select(cfg, "model.autoencoder._target_").startswith("ldm.models.autoencoder.")
    assert cfg.model.diffusion._target_ == "ldm.models.latent_diffusion.LatentDiffusion"
    assert set(cfg.stage_trainer) == {"autoencoder", "diffusion"}


@pytest.mark.parametrize("option", group_options(CONF_DIR, "data"))
def test_data_options_compose_and_instantiate(option, tmp_path):
    cfg = compose_config([f"data={option}"], tmp_path)
    OmegaConf.resolve(cfg.paths)
    if ("data", option) in NEEDS_FILES:
        assert cfg.data._target_ == "ldm.data.ImageDataModule"
        return
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (
        cfg.data.num_channels,
        cfg.data.image_size,
        cfg.data.image_size,
    )


@pytest.mark.parametrize(
    "group",
    [
        "model/autoencoder",
        "schedule",
        "sampler",
        "trainer",
        "logger",
        "fid",
        "callbacks",
        "experiment",
        "debug",
    ],
)
def test_group_options_compose(group, tmp_path):
    for option in group_options(CONF_DIR, group):
        cfg = compose_config([f"{group}={option}", "data=mnist5k"], tmp_path)
        # Every interpolation must resolve (no dangling keys) in each option.
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("option", group_options(CONF_DIR, "schedule"))
def test_schedule_options_instantiate(option, tmp_path):
    cfg = compose_config([f"schedule={option}"], tmp_path)
    schedule = hydra.utils.instantiate(cfg.schedule)
    assert schedule.num_timesteps == cfg.schedule.num_timesteps


@pytest.mark.parametrize("option", group_options(CONF_DIR, "sampler"))
def test_sampler_options_instantiate(option, tmp_path):
    cfg = compose_config([f"sampler={option}"], tmp_path)
    schedule = hydra.utils.instantiate(cfg.schedule)
    sampler = hydra.utils.instantiate(cfg.sampler)(schedule=schedule)
    assert sampler.steps == cfg.sampler.steps


@pytest.mark.parametrize("option", group_options(CONF_DIR, "model/autoencoder"))
def test_autoencoder_options_instantiate(option, tmp_path):
    cfg = compose_config([f"model/autoencoder={option}", "debug=fast"], tmp_path)
    model = hydra.utils.instantiate(cfg.model.autoencoder)
    assert model.latent_channels == cfg.model.autoencoder.latent_channels


@pytest.mark.parametrize("option", group_options(CONF_DIR, "trainer"))
def test_trainer_options_instantiate(option, tmp_path):
    if option in ("gpu", "ddp"):
        pytest.skip("needs GPUs")
    cfg = compose_config([f"trainer={option}", "debug=fast"], tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.num_devices == cfg.trainer.devices


def run_cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data=nope", "data='nope' is not an option of 'data'"),
        ("stage=both", "stage='both' is not one of all|autoencoder|diffusion"),
    ],
)
def test_bad_values_give_one_line_error(override, expected, tmp_path):
    result = run_cli(override, f"paths.log_dir={tmp_path}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
