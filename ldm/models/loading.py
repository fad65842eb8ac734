"""Rebuild trained modules from ldm checkpoints alone (stored config + strict state dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm.utils.checkpoint import load_checkpoint, state_dict_mismatch
from ldm.utils.errors import UserError
from ldm.utils.instantiate import safe_instantiate, upgrade_stored_config


def load_state_strict(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path
) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming the checkpoint on a mismatch."""
    mismatch = state_dict_mismatch(module.state_dict(), state_dict)
    if mismatch:
        raise UserError(
            f"checkpoint {str(path)!r} does not fit the model its config describes: {mismatch}"
        )
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        detail = str(err).splitlines()[0] if str(err) else "mismatch"
        raise UserError(
            f"checkpoint {str(path)!r} does not fit the model its config describes: {detail}"
        ) from err


def autoencoder_from_checkpoint(ckpt: dict[str, Any], path: str | Path) -> torch.nn.Module:
    """Build the stage-1 module described by an autoencoder checkpoint and load its weights."""
    config = ckpt["ldm"]["config"]["model"]["autoencoder"]
    autoencoder = safe_instantiate(config, where=f"checkpoint {str(path)!r}")
    load_state_strict(autoencoder, ckpt["state_dict"], path)
    return autoencoder.eval().requires_grad_(False)


def load_autoencoder(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(frozen autoencoder, its stored autoencoder config) from a stage-1 checkpoint."""
    ckpt = load_checkpoint(path, expected_stage="autoencoder")
    config = upgrade_stored_config(ckpt["ldm"]["config"]["model"]["autoencoder"])
    return autoencoder_from_checkpoint(ckpt, path), config


def latent_diffusion_from_checkpoint(
    ckpt: dict[str, Any], path: str | Path, use_ema: bool = True
) -> torch.nn.Module:
    """Build a LatentDiffusion module (with its frozen autoencoder) from a stage-2 checkpoint.

    The checkpoint's `state_dict` holds the EMA weights when EMA was on (Lightning's weight
    averaging callback swaps them in); `current_model_state` holds the raw training weights.
    """
    config = ckpt["ldm"]["config"]
    where = f"checkpoint {str(path)!r}"
    autoencoder = safe_instantiate(config["model"]["autoencoder"], where=where)
    diffusion_cfg = {k: v for k, v in config["model"]["diffusion"].items() if k != "latent_cache"}
    model = safe_instantiate(diffusion_cfg, where=where, autoencoder=autoencoder)
    state = ckpt["state_dict"]
    if not use_ema:
        if "current_model_state" not in ckpt:
            raise UserError(
                f"{where} has no separate non-EMA weights (EMA was off); use use_ema=true"
            )
        state = ckpt["current_model_state"]
    load_state_strict(model, state, path)
    return model.eval()


def load_latent_diffusion(
    path: str | Path, use_ema: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(LatentDiffusion in eval mode, the checkpoint dict) from a stage-2 checkpoint."""
    ckpt = load_checkpoint(path, expected_stage="diffusion")
    return latent_diffusion_from_checkpoint(ckpt, path, use_ema), ckpt
