"""Shared fixtures: configs composed the way train.py composes them, shrunk into tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import ldm  # noqa: F401  (resolvers and structured config nodes exist before any compose)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one thread each (and in the runs they start), or the
    # workers' thread pools oversubscribe the cores.
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def quiet_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    """A CPU Trainer for unit tests: no logger, checkpoints, progress bar, summary or validation
    unless the test asks for them through kwargs."""
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    return pl.Trainer(**{**args, **kwargs})


def compose_config(overrides: list[str], tmp_path: Path, config_name: str = "train") -> DictConfig:
    """Compose conf/<config_name>.yaml with overrides, outputs and caches under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        # As in a real run: the task sees `hydra` only through HydraConfig (`${hydra:...}`).
        del cfg["hydra"]
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.fixture
def cfg_fast(tmp_path: Path) -> DictConfig:
    return compose_config(["debug=fast"], tmp_path)
