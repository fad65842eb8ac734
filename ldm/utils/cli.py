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
                raise UserError(
                    f"{key}={option!r} is not an option of '{group}'; choose one of: {', '.join(options)}"
                )


# Per-stage sections hold only the keys that differ from `trainer` / `data`; any Trainer or data
# argument may be added there, so their overrides are add-or-set (`++`) without the user typing it.
OPEN_SECTIONS = ("stage_trainer.", "stage_data.")


def open_section_overrides(argv: list[str]) -> list[str]:
    """`stage_data.diffusion.batch_size=64` -> `++stage_data.diffusion.batch_size=64` (plain
    Hydra refuses keys that are not yet in the config: "Key 'batch_size' is not in struct")."""
    return [f"++{arg}" if arg.startswith(OPEN_SECTIONS) and "=" in arg else arg for arg in argv]


def exit_on_user_error(err: UserError) -> None:
    """Print the one-line error and exit with status 2."""
    # An error re-raised from a DataLoader worker carries the worker's traceback; its last line is ours.
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
