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
