"""Pre-flight checks of command-line overrides, run before Hydra composes the config.

Hydra reports an unknown group option as a multi-line block; users get one line naming the bad
value and the valid ones instead (and a non-zero exit).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.utils.errors import UserError


def group_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_overrides(argv: list[str], conf_dir: Path) -> None:
    """Raise UserError for `group=option` overrides whose option file does not exist.

    Handles `+group=`, `++group=`, `group@package=` (named as typed), sweeps (`group=a,b`) and
    `group=null`; ignores `key.sub=value` and Hydra's own `hydra/...` groups.
    """
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        group = key.split("@", 1)[0]
        if "." in group or not (conf_dir / group).is_dir():
            continue
        options = group_options(conf_dir, group)
        for option in value.split(","):
            option = option.strip()
            if option in ("null", "") or option.startswith(
                ("choice(", "range(", "interval(", "glob(")
            ):
                continue
            if option not in options:
                choices = ", ".join(options)
                raise UserError(
                    f"{key}={option!r} is not an option of '{group}'; choose one of: {choices}"
                )


# Spellings of earlier versions, answered with the key to use instead of Hydra's "not in struct"
# (whose advice, a `+`, would add a key nothing reads).
RENAMED_PREFIXES = {
    "stage_trainer.autoencoder.": "autoencoder.trainer.",
    "stage_trainer.diffusion.": "diffusion.trainer.",
    "stage_data.autoencoder.": "autoencoder.data.",
    "stage_data.diffusion.": "diffusion.data.",
}
# The keys conf/train.yaml's stage sections hold; any other key there is added with a `+`.
STAGE_SECTION_KEYS = {
    "autoencoder.trainer.": ("max_epochs", "max_steps", "gradient_clip_val"),
    "diffusion.trainer.": ("max_epochs", "max_steps"),
    "autoencoder.data.": ("batch_size",),
    "diffusion.data.": ("batch_size",),
}
# Whole keys that were replaced by another setting.
REPLACED_KEYS = {
    "model.autoencoder.lr_schedule": "model.autoencoder.lr_scheduler (a torch scheduler config; "
    "null: constant lr)",
    "model.autoencoder.warmup_steps": "model.autoencoder.lr_scheduler.milestones=[N] with "
    "model.autoencoder.lr_scheduler.schedulers.0.total_iters=N-1",
}


def check_renamed_keys(argv: list[str]) -> None:
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        for old, new in RENAMED_PREFIXES.items():
            if key.startswith(old):
                rest = key[len(old) :]
                plus = "" if rest in STAGE_SECTION_KEYS[new] else "+"
                raise UserError(f"{key} was renamed: use {plus}{new}{rest}")
        if key in REPLACED_KEYS:
            raise UserError(f"{key} was replaced: use {REPLACED_KEYS[key]}")
        if key in ("stage_trainer", "stage_data") or key.startswith(
            ("stage_trainer.", "stage_data.")
        ):
            raise UserError(
                f"{key} was renamed: per-stage settings are autoencoder.trainer.*, "
                "autoencoder.data.*, diffusion.trainer.*, diffusion.data.*"
            )


def null_group_overrides(argv: list[str], conf_dir: Path) -> list[str]:
    """`logger=null` -> `~logger`. Hydra 1.3 drops a config group's default only as `~GROUP`;
    `GROUP=null` (the spelling Lightning-Hydra users type, and ours in the README) is a Hydra error
    ("Config group override must be a string"). Only whole-group, non-sweep overrides change."""
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        group = key.lstrip("+")
        if value == "null" and not key.startswith("~") and (conf_dir / group).is_dir():
            arg = f"~{group}"
        out.append(arg)
    return out


def exit_on_user_error(err: UserError) -> None:
    """Print the one-line error and exit with status 2."""
    # An error re-raised from a DataLoader worker carries the worker's traceback; its last line is
    # ours.
    message = (
        str(err)
        .strip()
        .splitlines()[-1]
        .removeprefix(f"{type(err).__module__}.{type(err).__name__}: ")
    )
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_typed_overrides(argv: list[str], schema: type) -> None:
    """Raise UserError for a `key=value` override that the structured config `schema` (a dataclass)
    refuses: a value of the wrong type or a key it does not have. Hydra finds the same mistakes
    while composing, but reports them in several lines; this asks OmegaConf the same question
    first to answer in one. Keys typed `Any` (config groups and their sub-keys, free-form values),
    Hydra's own keys, deletions and sweeps are left to Hydra and the caller's checks."""
    import typing

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    hints = typing.get_type_hints(schema)
    parser = OverridesParser.create()
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "~", "hydra")):
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # a syntax error: Hydra's own message names it
        key = override.key_or_group
        top = key.split(".", 1)[0]
        if override.package is not None or override.is_sweep_override() or key.startswith("hydra"):
            continue
        if top not in hints:
            raise UserError(
                f"{key}={override.get_value_element_as_str()}: no such setting "
                "(`--cfg job` lists them)"
            )
        if hints[top] is typing.Any:
            continue
        try:
            OmegaConf.update(OmegaConf.structured(schema), key, override.value(), merge=True)
        except OmegaConfBaseException as err:
            message = str(err).strip().splitlines()[0]
            raise UserError(f"{arg.lstrip('+')}: {message}") from None
