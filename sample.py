"""ldm sampling CLI: `python sample.py ckpt=PATH [overrides]` (see conf/sample.yaml); thin wrapper
over ldm.sample.run."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import ldm.sample  # registers the schema SampleConfig (light: torch is imported only by run)
from ldm.utils.cli import check_group_overrides, check_typed_overrides, exit_on_user_error
from ldm.utils.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"

# `fid=true` (the on/off flag) names the `fid` config group too, and Hydra reads any override whose
# key is a group name as a group choice. The flag is taken off the command line here and set on the
# composed config in main(); the group itself is mounted at `metrics` (`fid@metrics=inception`).
# Likewise `task=superres|inpaint` (a plain setting here, train.py's `task` group).
FID_FLAG: list[str] = []
TASK_FLAG: list[str] = []


def split_fid_flag(argv: list[str], name: str = "fid") -> tuple[list[str], list[str]]:
    """(argv without `<name>=VALUE` overrides, their values as written)."""
    rest, values = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == name:
            values.append(value)
        else:
            rest.append(arg)
    return rest, values


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        if FID_FLAG:
            value = OverridesParser.create().parse_override(f"fid={FID_FLAG[-1]}").value()
            if not isinstance(value, bool):
                raise UserError(f"fid={value!r} must be true or false")
            cfg.fid = value
        if TASK_FLAG:
            value = OverridesParser.create().parse_override(f"task={TASK_FLAG[-1]}").value()
            if value is not None and not isinstance(value, str):
                raise UserError(f"task={value!r} must be superres or inpaint")
            cfg.task = value
        ldm.sample.run(cfg)
    except UserError as err:
        exit_on_user_error(err)


if __name__ == "__main__":
    sys.argv[1:], FID_FLAG[:] = split_fid_flag(sys.argv[1:])
    sys.argv[1:], TASK_FLAG[:] = split_fid_flag(sys.argv[1:], "task")
    try:
        check_group_overrides(sys.argv[1:], CONF_DIR)
        check_typed_overrides(sys.argv[1:], ldm.sample.SampleConfig)
    except UserError as err:
        exit_on_user_error(err)
    main()
