"""Every config group option composes and instantiates; the CLI rejects bad values in one line."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
from omegaconf import OmegaConf

from ldm.train import stage_datamodule
from ldm.utils.cli import group_options
from tests.conftest import CONF_DIR, ROOT, compose_config

# What each data option is for: its source class, image size, channels and classes. Options whose
# files the tests do not have are built (constructors read no files) but not set up.
DATA_OPTIONS = {
    "mnist5k": ("MNIST5k", 32, 1, 10, True),
    "digits": ("SklearnDigits", 32, 1, 10, True),
    "mnist": ("TorchvisionSource", 32, 1, 10, False),
    "fashion_mnist": ("TorchvisionSource", 32, 1, 10, False),
    "cifar10": ("TorchvisionSource", 32, 3, 10, False),
    "image_folder": ("ImageFolder", 64, 3, None, False),
    "latents": ("LatentTensors", 32, 1, 10, False),
    # built on first use (captions: seconds; speech synthesis: minutes): tests/test_text.py and
    # tests/test_audio.py set them up on small settings
    "mnist5k_captions": ("MNIST5kCaptions", 32, 1, 10, False),
    "spoken_digits": ("SpokenDigits", 64, 1, 10, False),
}


def test_default_config_values(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.stage == "all" and cfg.data.name == "mnist5k" and cfg.data.num_classes == 10
    assert OmegaConf.select(cfg, "model.autoencoder._target_").startswith("ldm.models.autoencoder.")
    assert cfg.model.diffusion._target_ == "ldm.models.latent_diffusion.LatentDiffusion"
    assert (
        set(cfg.autoencoder)
        == set(cfg.diffusion)
        == {
            "trainer",
            "data",
            "default_max_epochs",
            "default_batch_size",
        }
    )


def test_every_data_option_is_listed():
    assert sorted(DATA_OPTIONS) == group_options(CONF_DIR, "data")


@pytest.mark.parametrize("option", group_options(CONF_DIR, "data"))
def test_data_options_compose_and_instantiate(option, tmp_path):
    source_class, size, channels, classes, has_files = DATA_OPTIONS[option]
    extra = {"image_folder": ["data.root=/nonexistent"], "latents": ["data.source.path=/x.pt"]}
    cfg = compose_config([f"data={option}", *extra.get(option, [])], tmp_path)
    OmegaConf.resolve(cfg.paths)
    dm = stage_datamodule(cfg, "diffusion")
    assert type(dm.source).__name__ == source_class
    assert (dm.image_size, dm.num_channels, dm.num_classes) == (size, channels, classes)
    if option in ("mnist", "fashion_mnist", "cifar10"):
        assert dm.source.name == option
    if not has_files:
        return
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (dm.batch_size, channels, size, size)
    assert batch["label"].min() >= 0 and batch["label"].max() < classes
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0


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
    composed = []
    for option in group_options(CONF_DIR, group):
        cfg = compose_config([f"{group}={option}", "data=mnist5k"], tmp_path)
        # Every interpolation must resolve (no dangling keys) in each option ...
        resolved = OmegaConf.to_container(cfg, resolve=True)
        composed.append(resolved)
    # ... and each option changes the config (none is an empty or duplicate file).
    distinct = {OmegaConf.to_yaml(OmegaConf.create(c)) for c in composed}
    assert len(distinct) == len(composed), group


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
