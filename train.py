"""ldm training CLI: `python train.py [overrides]` (see README); thin wrapper over ldm.train.run."""

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ldm.utils.cli import (
    check_group_overrides,
    check_renamed_keys,
    exit_on_user_error,
    null_group_overrides,
)
from ldm.utils.errors import UserError
from ldm.utils.launch import launch_overrides

CONF_DIR = Path(__file__).resolve().parent / "conf"
log = logging.getLogger("train")


def report_failed_job(err: Exception) -> None:
    """One log line for a failed job of a sweep; the traceback goes to the job dir's error.txt."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    (job_dir / "error.txt").write_text("".join(traceback.format_exception(err)))
    overrides = " ".join(hydra_cfg.overrides.task)
    message = str(err).splitlines()[0] if str(err) else ""
    log.error(
        f"job {hydra_cfg.job.num} failed ({overrides}): {type(err).__name__}: {message} "
        f"[{job_dir}/error.txt]"
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns `optimized_metric` for sweepers. In a multirun a failing job raises to Hydra, which
    records it as failed and goes on with the sweep (the Optuna sweeper marks the trial failed)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ldm.train import run  # imported here so `--help` and bad overrides answer fast

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return run(cfg)
    except Exception as err:
        if multirun:
            report_failed_job(err)
            raise
        if isinstance(err, UserError):
            exit_on_user_error(err)
        raise


if __name__ == "__main__":
    try:
        check_group_overrides(sys.argv[1:], CONF_DIR)
        check_renamed_keys(sys.argv[1:])
    except UserError as err:
        exit_on_user_error(err)
    sys.argv[1:] = null_group_overrides(sys.argv[1:], CONF_DIR)
    sys.argv += launch_overrides(sys.argv[1:], os.environ)
    main()
