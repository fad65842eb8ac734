"""ldm training CLI: `python train.py [overrides]` (see README); thin wrapper over ldm.train.run."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ldm.utils.cli import check_group_overrides, exit_on_user_error
from ldm.utils.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from ldm.train import run  # imported here so `--help` and bad overrides answer fast

    try:
        return run(cfg)
    except UserError as err:
        exit_on_user_error(err)


if __name__ == "__main__":
    try:
        check_group_overrides(sys.argv[1:], CONF_DIR)
    except UserError as err:
        exit_on_user_error(err)
    main()
