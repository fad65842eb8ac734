"""Hydra instantiation helpers: callbacks and loggers from config, and safe instantiation of stored
configs."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import hydra
from hydra._internal.utils import _locate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger

from ldm.utils.errors import UserError
from ldm.utils.wandb_offline import online_or_reason

log = logging.getLogger(__name__)

# Configs read back from checkpoints may only build objects from these namespaces.
SAFE_TARGET_PREFIXES = ("ldm.", "torch.optim.", "torch.nn.")

# Stored configs are upgraded before they are checked and built, so old checkpoints keep loading:
# a checkpoint stores its config with the `_target_`s and arguments of its day. Add a line here
# whenever a class a config names is moved or renamed, or loses an argument.

# Classes that moved: old `_target_` -> new.
RENAMED_TARGETS = {
    # ldm/modules/autoencoder.py became ldm/modules/encoder_decoder.py (issue 15)
    "ldm.modules.autoencoder.Encoder": "ldm.modules.encoder_decoder.Encoder",
    "ldm.modules.autoencoder.Decoder": "ldm.modules.encoder_decoder.Decoder",
}
# Arguments a class no longer takes (training-only settings, no effect on a loaded model): dropped.
REMOVED_ARGUMENTS = {
    # lr_schedule/warmup_steps became the `lr_scheduler` config (issue 15)
    "ldm.models.autoencoder.KLAutoencoder": ("lr_schedule", "warmup_steps"),
    "ldm.models.autoencoder.VQAutoencoder": ("lr_schedule", "warmup_steps"),
}


def upgrade_stored_config(node: Any) -> Any:
    """A copy of a plain (stored) config with renamed `_target_`s replaced by their new names and
    removed arguments dropped (`RENAMED_TARGETS`, `REMOVED_ARGUMENTS`)."""
    if isinstance(node, Mapping):
        out = {key: upgrade_stored_config(value) for key, value in node.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            target = out["_target_"] = RENAMED_TARGETS.get(target, target)
            for key in REMOVED_ARGUMENTS.get(target, ()):
                out.pop(key, None)
        return out
    if isinstance(node, list | tuple):
        return type(node)(upgrade_stored_config(value) for value in node)
    return node


def check_target(target: Any, where: str) -> None:
    """Refuse a `_target_` unless both its name and the object it resolves to lie in the allowlist.

    The name alone is not enough: `ldm.utils.instantiate.os.system` starts with `ldm.` but walks
    through a module attribute to `os.system`, so the resolved object's `__module__` is checked too.
    Resolving only imports modules of the allowed namespaces and reads attributes; nothing is
    called.
    """
    allowed = tuple(prefix.rstrip(".") for prefix in SAFE_TARGET_PREFIXES)
    if not isinstance(target, str) or not target.startswith(SAFE_TARGET_PREFIXES):
        raise UserError(
            f"{where} names _target_={target!r}, "
            f"outside the allowed namespaces {SAFE_TARGET_PREFIXES}"
        )
    try:
        obj = _locate(target)  # what instantiate itself uses (get_object also logs an error line)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"{where} names _target_={target!r}, which does not exist") from err
    module = getattr(obj, "__module__", None) or ""
    if not (callable(obj) and (module in allowed or module.startswith(SAFE_TARGET_PREFIXES))):
        raise UserError(
            f"{where} names _target_={target!r}, which resolves to {module or '?'}."
            f"{getattr(obj, '__qualname__', type(obj).__name__)}, outside {SAFE_TARGET_PREFIXES}"
        )


def check_targets(node: Any, where: str = "config", key: str = "") -> None:
    """Walk a stored config: every `_target_` must pass `check_target`; no string may hold a live
    `${...}` interpolation (stored configs are saved resolved, and instantiate would resolve it)."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            check_target(node["_target_"], where)
        for name, value in node.items():
            check_targets(value, where, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            check_targets(value, where, f"{key}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise UserError(
            f"{where} holds an interpolation at {key}={node!r}; stored configs are plain values"
        )


def safe_instantiate(
    config: Mapping | DictConfig, where: str = "stored config", **kwargs: Any
) -> Any:
    """Instantiate a config that came from a file (checkpoint): upgraded to today's names
    (`upgrade_stored_config`), then every `_target_` checked."""
    plain = (
        OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    )
    plain = upgrade_stored_config(plain)
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


# Keys of logger.wandb that configure the start-up check, not WandbLogger.
WANDB_STARTUP_KEYS = ("init_timeout", "require_online")


def wandb_offline(lg_conf: DictConfig) -> bool:
    """Whether the W&B logger runs offline: `offline: true`, `WANDB_MODE=offline|disabled`, no
    credentials (with `offline: null`), or a server that cannot be reached or refuses the key within
    `init_timeout` seconds (one warning line; with `require_online: true` a UserError instead)."""
    offline = lg_conf.get("offline")
    if offline or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True
    if offline is None and not wandb_logged_in():
        if lg_conf.get("require_online"):
            raise UserError(
                "logger.wandb.require_online=true but no W&B credentials were found; run "
                "`wandb login` or set WANDB_API_KEY, or set require_online=false"
            )
        return True
    timeout = float(lg_conf.get("init_timeout") or 5)
    reason = online_or_reason(timeout)
    if reason is None:
        return False
    if lg_conf.get("require_online"):
        raise UserError(
            f"logger.wandb.require_online=true but W&B is not usable: {reason}; "
            "check the network, WANDB_BASE_URL and the API key, or set require_online=false"
        )
    if reason not in _WARNED:
        _WARNED.add(reason)
        save_dir = lg_conf.get("save_dir") or "."
        log.warning(
            "W&B: %s; logging offline instead (upload later: wandb sync %s/wandb/offline-run-*)",
            reason,
            save_dir,
        )
    return True


_WARNED: set[str] = set()


def instantiate_loggers(logger_cfg: DictConfig | None, name: str, group: str) -> list[Logger]:
    """Build the configured loggers; W&B gets the stage's run name and the shared group.

    `offline: null` means offline unless logged in; `group: null` means the given `group`; a W&B
    server that does not answer within `init_timeout` seconds means offline (`wandb_offline`).
    """
    loggers: list[Logger] = []
    for _, lg_conf in (logger_cfg or {}).items():
        if not (isinstance(lg_conf, DictConfig) and "_target_" in lg_conf):
            continue
        overrides: dict[str, Any] = {}
        if lg_conf._target_.endswith("WandbLogger"):
            overrides["name"] = lg_conf.get("name") or name
            overrides["group"] = lg_conf.get("group") or group
            overrides["offline"] = wandb_offline(lg_conf)
            resolved = OmegaConf.to_container(lg_conf, resolve=True)
            lg_conf = {k: v for k, v in resolved.items() if k not in WANDB_STARTUP_KEYS}
        loggers.append(hydra.utils.instantiate(lg_conf, **overrides))
    return loggers
