"""Makes every checkpoint self-describing: its stage and the resolved run config."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from ldm.utils.checkpoint import CHECKPOINT_FORMAT_VERSION


class StoreConfigInCheckpoint(pl.Callback):
    """Writes `checkpoint["ldm"] = {"stage", "config", "format_version"}` so loaders can rebuild
    the modules (and refuse a layout newer than they know).

    The config is a plain, resolved dict (no OmegaConf objects), so the checkpoint loads with
    `torch.load(weights_only=True)`.
    """

    def __init__(self, stage: str, config: dict[str, Any]):
        self.stage, self.config = stage, config

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["ldm"] = {
            "stage": self.stage,
            "config": self.config,
            "format_version": CHECKPOINT_FORMAT_VERSION,
        }
