"""Exact resume: RNG states and data position in checkpoints; a checkpoint on SIGTERM/USR1/USR2.

Lightning restores the model, optimizers, LR schedulers, loop counters and callback states (EMA
included). `ExactResume` adds the global random number generators (stage 1's posterior sampling
and dropout draw from them) and makes sure the training loader (`ldm.data.resumable`) continues
from its saved position. `PreemptionCheckpoint` turns the signals that clusters send before they
stop a job into a `last.ckpt` written at the next batch end, then a clean exit.
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
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.data.resumable import ResumableDataLoader
from ldm.utils.distributed import is_distributed
from ldm.utils.launch import slurm_job_id

log = logging.getLogger(__name__)


def collect_rng_states() -> dict[str, Any]:
    """This process's global RNG states as tensors and plain data (weights_only=True loads them)."""
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
    if (
        state["cuda"]
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(  # noqa: NPY002
        (
            np_state["name"],
            keys,
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class ExactResume(pl.Callback):
    """Saves what Lightning leaves out of a checkpoint and puts it back when a run resumes:

    - every rank's global RNG states (torch CPU/CUDA, numpy, python), restored just before the
      first training batch after the resume (or at the end of a fit that had no batch left), so
      that whatever draws random numbers while a run starts up cannot shift the streams;
    - the position of a `ResumableDataLoader` in its epoch. Lightning saves it too (the loader is
      stateful) but loads it only if the training data was not requested earlier, and a model whose
      `configure_optimizers` reads `trainer.estimated_stepping_batches` requests it before the
      checkpoint's loop state is restored; so it is loaded again at `on_train_start`, before the
      first batch is drawn (loading it twice is harmless).
    """

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self._loader_to_restore: dict[str, int] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is assembled; rank zero's copy is written.
        rng = collect_rng_states()
        if is_distributed():
            ranks: list[Any] = [None] * self.world_size
            dist.all_gather_object(ranks, rng)
        else:
            ranks = [rng]
        loader = self._train_loader()
        return {
            "rng": ranks,
            "train_dataloader": loader.state_dict() if loader is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict["rng"]
        self._loader_to_restore = state_dict["train_dataloader"]

    def _train_loader(self) -> ResumableDataLoader | None:
        trainer = getattr(self, "_trainer", None)
        loader = trainer.train_dataloader if trainer is not None else None
        return loader if isinstance(loader, ResumableDataLoader) else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._loader_to_restore = self._loader_to_restore, None
        loader = self._train_loader()
        if state is not None and loader is not None:
            loader.load_state_dict(state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.restore_rng()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resumed from a checkpoint of a finished stage: no batch left to run, but what comes
        # next (stage 2's weight init) must still see the generators as they were.
        self.restore_rng()

    def restore_rng(self) -> None:
        if self._rng_to_restore is None:
            return
        states, self._rng_to_restore = self._rng_to_restore, None
        if len(states) != self.world_size:
            log.warning(
                "checkpoint holds RNG states of %d ranks, this run has %d; rank %d takes rank %d's",
                len(states),
                self.world_size,
                self.rank,
                self.rank % len(states),
            )
        set_rng_states(states[self.rank % len(states)])


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (array task), as Lightning's SLURM auto-requeue does."""
    job_id = slurm_job_id(os.environ)
    if not job_id:
        log.warning("auto_requeue: not running under SLURM (no SLURM_JOB_ID); not requeued")
        return
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("requeued SLURM job %s", job_id)
    else:
        log.warning("requeueing SLURM job %s failed: %s", job_id, result.stderr.strip())


class PreemptionCheckpoint(pl.Callback):
    """On one of `signals`: save `dirpath/filename` at the next training batch end (or the end of
    the validation under way), then exit.

    The handler only sets a flag; the checkpoint is written between batches, where the state is
    consistent (Lightning marks it mid-epoch, so `ckpt_path=last` continues with the next batch).
    Under DDP the ranks agree on the flag at every batch end (one all-reduce of a scalar), so all
    of them save together and stop at the same step.

    After saving: a handler that was installed before training (submitit's, which requeues the
    job on its preemption signal SIGUSR2) is called; with `requeue=True` (`trainer.auto_requeue`)
    a SIGUSR1, the signal `sbatch --signal=USR1@120` sends before the time limit, requeues the SLURM
    job with `scontrol requeue`; then the process exits with status 128 + signal number.

    Handlers are installed in `on_fit_start`, before Lightning installs its own, so Lightning
    leaves SIGUSR1 to this one under SLURM. For the training loop, SIGTERM is taken back from
    Lightning in `on_train_start`: Lightning's handler runs a `broadcast` inside the signal handler,
    once per signal received, and ranks that receive different numbers of SIGTERMs (a signal sent
    to the whole process group reaches DDP ranks that Lightning started twice) then hang in
    mismatched collectives. Here a handler only sets a flag.
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
                log.debug(
                    "PreemptionCheckpoint: cannot install a %s handler outside the main thread",
                    signum,
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if signal.SIGTERM in self._previous and signal.getsignal(signal.SIGTERM) != self._handler:
            try:  # Lightning restores its own at teardown
                signal.signal(signal.SIGTERM, self._handler)
            except ValueError:
                pass

    def _restore_handlers(self) -> None:
        self.active = False
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handler:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        if not is_distributed():
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer)
        if signum:
            self._save_and_exit(trainer, signum)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A long validation (FID sampling) may outlast the grace period before a hard kill: a
        # signal that arrived during it is acted on here, where ModelCheckpoint saves too.
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            signum = self._agreed_signal(trainer)
            if signum:
                self._save_and_exit(trainer, signum)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal after the last training batch (during the final validation): the stage ends
        # normally and writes its own checkpoints; `exit_if_signalled` then stops the run.
        self.received = self._agreed_signal(trainer)

    def exit_if_signalled(self) -> None:
        """Call after `trainer.fit`: exit as `_save_and_exit` does if a signal came too late."""
        if self.received:
            name = signal.Signals(self.received).name
            log.warning("%s after the last training batch: the stage finished; exiting", name)
            raise SIGTERMException(128 + self.received)

    def _save_and_exit(self, trainer: pl.Trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        for callback in trainer.checkpoint_callbacks:
            # When this file is a ModelCheckpoint's `last.ckpt`, tell it so: the resumed run then
            # overwrites it instead of writing `last-v1.ckpt` beside it.
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                last_name = f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                if Path(callback.dirpath) / last_name == self.path:
                    callback.last_model_path = str(self.path)
        trainer.save_checkpoint(self.path, weights_only=False)
        if trainer.is_global_zero:
            log.warning(
                "%s at epoch %d, step %d: saved %s; resume: hydra.run.dir=<run dir> ckpt_path=last",
                name,
                trainer.current_epoch,
                trainer.global_step,
                self.path,
            )
        previous = self._previous.get(signum)
        self._restore_handlers()
        if callable(previous) and not isinstance(
            getattr(previous, "__self__", None), PreemptionCheckpoint
        ):
            previous(signum, None)  # e.g. submitit requeues on its signal, then exits (rank zero)
        if self.requeue and signum == signal.SIGUSR1 and trainer.is_global_zero:
            requeue_slurm_job()
        raise SIGTERMException(128 + signum)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()
