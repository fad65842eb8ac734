"""Hydra instantiation helpers: callbacks and loggers from config, and safe instantiation of stored configs."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger

from ldm.utils.errors import UserError

log = logging.getLogger(__name__)

# Configs read back from checkpoints may only build objects from these namespaces.
SAFE_TARGET_PREFIXES = ("ldm.", "torch.optim.", "torch.nn.")


def check_targets(node: Any, where: str = "config") -> None:
    """Refuse any `_target_` outside SAFE_TARGET_PREFIXES (a stored config could name os.system)."""
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(SAFE_TARGET_PREFIXES):
            raise UserError(f"{where} names _target_={target!r}, outside the allowed namespaces {SAFE_TARGET_PREFIXES}")
        for value in node.values():
            check_targets(value, where)
    elif isinstance(node, list | tuple):
        for value in node:
            check_targets(value, where)


def safe_instantiate(config: Mapping | DictConfig, where: str = "stored config", **kwargs: Any) -> Any:
    """Instantiate a config that came from a file (checkpoint), after checking every `_target_`."""
    plain = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    check_targets(plain, where)
    return hydra.utils.instantiate(plain, **kwargs)


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """Every entry with a `_target_` becomes a Callback; `null` entries are skipped (disabled)."""
    callbacks: list[Callback] = []
    for name, cb_conf in (callbacks_cfg or {}).items():
        if isinstance(cb_conf, DictConfig) and "_target_" in cb_conf:
            log.debug("callback %s: %s", name, cb_conf._target_)
            callbacks.append(hydra.utils.instantiate(cb_conf))
    return callbacks


def wandb_logged_in() -> bool:
    """True when W&B credentials exist (API key in the environment or a netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def instantiate_loggers(logger_cfg: DictConfig | None, name: str, group: str) -> list[Logger]:
    """Build the configured loggers; W&B gets the stage's run name and the shared group.

    `offline: null` means offline unless logged in; `group: null` means the given `group`.
    """
    loggers: list[Logger] = []
    for _, lg_conf in (logger_cfg or {}).items():
        if not (isinstance(lg_conf, DictConfig) and "_target_" in lg_conf):
            continue
        overrides: dict[str, Any] = {}
        if lg_conf._target_.endswith("WandbLogger"):
            overrides["name"] = lg_conf.get("name") or name
            overrides["group"] = lg_conf.get("group") or group
            if lg_conf.get("offline") is None:
                overrides["offline"] = not wandb_logged_in()
        loggers.append(hydra.utils.instantiate(lg_conf, **overrides))
    return loggers
