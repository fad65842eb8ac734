"""Exact resume: RNG states in checkpoints, and a resumable checkpoint on SIGTERM/SIGUSR1/SIGUSR2.

Lightning restores the model, optimizers, LR schedulers, loop counters and callback states (EMA
included); the training data order is restored by `ldm.data.resumable`. What it leaves out are
the global random number generators, which stage 1's posterior sampling and dropout draw from:
`RNGStateCheckpoint` stores them per rank. `PreemptionCheckpoint` turns the signals that clusters
send before they stop a job into a `last.ckpt` written at the next batch end, then a clean exit.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def distributed(trainer: pl.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def collect_rng_states() -> dict[str, Any]:
    """This process's global RNG states as tensors and plain data (loadable with weights_only=True)."""
    # The legacy global state is the one seed_everything seeds and library code draws from.
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(  # noqa: NPY002
        (np_state["name"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RNGStateCheckpoint(pl.Callback):
    """Saves every rank's global RNG states (torch CPU/CUDA, numpy, python) in each checkpoint and
    puts them back just before the first training batch after a resume.

    Restoring at that point, not when the checkpoint is read, keeps anything that draws random
    numbers while a run starts up (it does so in both runs alike) from shifting the streams.
    """

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1
        self._to_restore: list[dict[str, Any]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rank, self.world_size = trainer.global_rank, trainer.world_size

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is assembled; rank zero's copy is written.
        state = collect_rng_states()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, state)
            return {"ranks": gathered}
        return {"ranks": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict["ranks"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._to_restore is None:
            return
        states, self._to_restore = self._to_restore, None
        if len(states) != self.world_size:
            log.warning(
                "checkpoint holds RNG states of %d ranks, this run has %d; rank %d takes those of rank %d",
                len(states), self.world_size, self.rank, self.rank % len(states),
            )
        set_rng_states(states[self.rank % len(states)])


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (array task), as Lightning's SLURM auto-requeue does."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job_id:
        log.warning("auto_requeue: not running under SLURM (no SLURM_JOB_ID); not requeued")
        return
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("requeued SLURM job %s", job_id)
    else:
        log.warning("requeueing SLURM job %s failed: %s", job_id, result.stderr.strip())


class PreemptionCheckpoint(pl.Callback):
    """On one of `signals`: save `dirpath/filename` at the next training batch end, then exit.

    The handler only sets a flag; the checkpoint is written between batches, where the state is
    consistent (Lightning marks it mid-epoch, so `ckpt_path=last` continues with the next batch).
    Under DDP the ranks agree on the flag at every batch end (one all-reduce of a scalar), so all
    of them save together and stop at the same step.

    After saving: a handler that was installed before training (submitit's, which requeues the
    job on its preemption signal SIGUSR2) is called; with `requeue=True` (`trainer.auto_requeue`)
    a SIGUSR1, the signal `sbatch --signal=USR1@120` sends before the time limit, requeues the SLURM
    job with `scontrol requeue`; then the process exits with status 128 + signal number.

    Handlers are installed in `on_fit_start`, before Lightning installs its own: Lightning's
    SIGTERM handler then calls this one too, and Lightning leaves SIGUSR1 to it under SLURM.
    """

    def __init__(
        self,
        dirpath: str | Path,
        filename: str = "last.ckpt",
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        requeue: bool = False,
    ):
        self.path = Path(dirpath) / filename
        self.signals = [signal.Signals[name] for name in signals]
        self.requeue = requeue
        self.received = 0
        self.active = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if not self.active:
            # Training is over (or failed) but a handler of ours is still installed: act as if it
            # never was, so the signal keeps its usual effect.
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = self.received or signum

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received, self.active = 0, True
        if os.name == "nt":
            return
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: signals cannot be handled here
                log.debug("PreemptionCheckpoint: cannot install a %s handler outside the main thread", signum)

    def _restore_handlers(self) -> None:
        self.active = False
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handler:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        if not distributed(trainer):
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer)
        if signum:
            self._save_and_exit(trainer, signum)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal that arrived during the last validation: the run still stops here, not later.
        signum = self._agreed_signal(trainer)
        if signum:
            self._save_and_exit(trainer, signum)

    def _save_and_exit(self, trainer: pl.Trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            log.warning(
                "%s at epoch %d, step %d: saved %s; resume with hydra.run.dir=<this run dir> ckpt_path=last",
                name, trainer.current_epoch, trainer.global_step, self.path,
            )
        previous = self._previous.get(signum)
        self._restore_handlers()
        if callable(previous) and not isinstance(getattr(previous, "__self__", None), PreemptionCheckpoint):
            previous(signum, None)  # e.g. submitit requeues on its signal, then exits (rank zero)
        if self.requeue and signum == signal.SIGUSR1 and trainer.is_global_zero:
            requeue_slurm_job()
        raise SIGTERMException(128 + signum)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()
