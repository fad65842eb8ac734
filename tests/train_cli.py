"""Helpers of the scale/reproducibility/resume tests: run train.py and sample.py as users do,
compare checkpoints, and two fault-injecting callbacks the runs load by `_target_` (so they live
in an importable module)."""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from omegaconf import DictConfig

from tests.conftest import ROOT, compose_config

# Seconds-long, deterministic, no FID (the metric falls back to val/loss), CSV logs.
FAST = ["debug=fast", "logger=csv", "fid.every_n_epochs=0", "trainer.deterministic=true"]


def train_cli(
    *args: str,
    cwd: Path,
    launcher: tuple[str, ...] = (),
    timeout: float = 600,
    env: dict[str, str | None] | None = None,
) -> subprocess.CompletedProcess:
    """`python [launcher] train.py args` in `cwd` (logs and caches land under it); 1 thread/rank.
    `env` adds variables to the environment (None removes one; W&B is offline unless removed)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **(env or {}),
    }
    env = {k: v for k, v in env.items() if v is not None}
    command = [sys.executable, *launcher, str(ROOT / "train.py"), *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def sample_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python sample.py args` in `cwd` as users run it; one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "sample.py"), *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def train_in_process(overrides: list[str], out: Path) -> tuple[DictConfig, float | None]:
    """`ldm.train.run` on FAST plus `overrides`, outputs in `out/run`: (config, metric)."""
    from ldm.train import run

    cfg = compose_config([*FAST, *overrides], out)
    return cfg, run(cfg)


def explain(result: subprocess.CompletedProcess) -> str:
    out, err = result.stdout[-3000:], result.stderr[-5000:]
    return f"exit {result.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: Path, b: Path) -> None:
    """Two checkpoints hold bitwise-equal weights (EMA and raw), optimizer and LR-scheduler states
    and step counters."""
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert (ca["global_step"], ca["epoch"]) == (cb["global_step"], cb["epoch"])
    for key in ("state_dict", "current_model_state", "optimizer_states", "lr_schedulers"):
        assert (key in ca) == (key in cb), key
        if key in ca:
            assert_equal_nested(ca[key], cb[key], key)


def assert_equal_nested(x: Any, y: Any, where: str) -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and torch.equal(x, y), f"{where} differs"
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), f"{where}: keys differ"
        for k in x:
            assert_equal_nested(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list | tuple):
        assert len(x) == len(y), f"{where}: lengths differ"
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            assert_equal_nested(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def logged(run_dir: Path, stage: str, key: str = "train/loss") -> dict[int, float]:
    """`{step: value}` of a metric from the CSV logs of one stage of a run (all its versions)."""
    values: dict[int, float] = {}
    for version in sorted((run_dir / "csv").glob("version_*")):
        hparams = version / "hparams.yaml"
        if (
            not hparams.is_file()
            or yaml.safe_load(hparams.read_text()).get("trained_stage") != stage
        ):
            continue
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    values[int(row["step"])] = float(row[key])
    return values


class SignalAt(pl.Callback):
    """Fault: send the signal `name` (e.g. SIGKILL) to this very process at the end of training
    batch `batch` of epoch `epoch` (batch None: when that epoch's validation starts), as a
    scheduler or the OOM killer would, at a known point."""

    def __init__(self, epoch: int, name: str, batch: int | None = None, rank: int | None = None):
        self.epoch, self.batch, self.signum = epoch, batch, signal.Signals[name]
        self.rank = rank  # under DDP: only this rank (None: every rank)

    def _fire(self, trainer) -> None:
        if self.rank is None or trainer.global_rank == self.rank:
            logging.getLogger(__name__).warning(
                "fault: %s to rank %d at step %d",
                self.signum.name,
                trainer.global_rank,
                trainer.global_step,
            )
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.batch is not None and (trainer.current_epoch, batch_idx) == (
            self.epoch,
            self.batch,
        ):
            self._fire(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if (
            self.batch is None
            and trainer.current_epoch == self.epoch
            and not trainer.sanity_checking
        ):
            self._fire(trainer)


class FailOnJob(pl.Callback):
    """Fault: raise when training starts in Hydra multirun job number `job`."""

    def __init__(self, job: int):
        self.job = job

    def on_fit_start(self, trainer, pl_module) -> None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num == self.job:
            raise RuntimeError(f"injected failure in job {self.job}")


class KillOnJob(pl.Callback):
    """Fault: SIGKILL this process (the whole sweep, when jobs run in it) when training starts in
    Hydra multirun job number `job`."""

    def __init__(self, job: int):
        self.job = job

    def on_fit_start(self, trainer, pl_module) -> None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num == self.job:
            os.kill(os.getpid(), signal.SIGKILL)
