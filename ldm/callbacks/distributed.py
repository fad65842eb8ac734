"""DDP faults: a rank that dies is named, and the ranks left stop within seconds, not 30 minutes.

When one rank of a DDP run dies (SIGKILL, the OOM killer, a crashed node), the others block in
their next collective until the process-group timeout (`trainer=ddp|ddp_cpu`:
`trainer.strategy.timeout`, 5 minutes here, torch's default 30), or gloo fails at once with
"Connection closed by peer" and a long traceback, or Lightning's own launcher SIGKILLs them all
with a log line that names a child pid only. `LostRankWatchdog` has every rank learn the host
and pid of all ranks when a stage's Trainer starts; while it trains, a thread looks every `poll_s`
seconds whether the ranks on its host are alive, and a collective that fails is checked the same
way. When one is gone it logs one error line naming the lost rank, the last checkpoint and the
resume command, and ends this process (exit code 1):
checkpoints are written to a temporary file and renamed, so `last.ckpt` is intact, and
`hydra.run.dir=RUN ckpt_path=last` resumes. Ranks on other hosts are covered by the process-group
timeout. A preemption signal (SIGTERM/SIGUSR1, see ldm.callbacks.resume) makes all ranks stop
together; ranks that exit that way are not reported as lost.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist

from ldm.utils.distributed import is_distributed

log = logging.getLogger(__name__)

EXIT_CODE = 1


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead child its parent has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def silence_lightning_observer() -> None:
    """Stop Lightning's child-process observer (rank 0 of its own launcher), which SIGKILLs every
    process, itself included, within 5 s of a rank's death and says only that a child died; the
    watchdog does the same job with a line that says which rank, and a clean exit code."""
    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_run"):
            thread._run = lambda: True  # its loop ends at its next check


class LostRankWatchdog(pl.Callback):
    """Stop this rank, with one line naming the lost one, when another rank on its host dies."""

    def __init__(self, poll_s: float = 2.0):
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peers: list[tuple[str, int]] = []
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not is_distributed():
            return
        peers: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
        self._peers = [tuple(p) for p in peers]
        self._trainer = trainer
        silence_lightning_observer()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="lost-rank-watchdog", daemon=True)
        self._thread.start()

    def _stopping(self) -> bool:
        """A preemption signal arrived: the ranks are stopping together on purpose."""
        trainer = self._trainer
        return trainer is not None and any(
            getattr(cb, "received", 0) for cb in trainer.callbacks if hasattr(cb, "received")
        )

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            lost = self._lost_peers()
            if lost and not (self._stop.is_set() or self._stopping()):
                self._report_and_exit(*lost[0])

    def _lost_peers(self, wait_s: float = 0.0) -> list[tuple[int, int, str]]:
        """(rank, pid, host) of the ranks on this host that are gone; waits up to `wait_s` for one
        (a peer's sockets close a moment before its process is gone)."""
        host, me = socket.gethostname(), os.getpid()
        deadline = time.monotonic() + wait_s
        while True:
            lost = [
                (rank, pid, peer_host)
                for rank, (peer_host, pid) in enumerate(self._peers)
                if peer_host == host and pid != me and not pid_alive(pid)
            ]
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(0.1)

    def _report_and_exit(self, rank: int, pid: int, host: str) -> None:
        trainer = self._trainer
        this_rank = trainer.global_rank if trainer is not None else "?"
        last = ""
        callback = trainer.checkpoint_callback if trainer is not None else None
        if callback is not None and callback.dirpath:
            last = f"; last checkpoint: {Path(callback.dirpath) / 'last.ckpt'}"
        message = (
            f"DDP rank {rank} (pid {pid} on {host}) is gone; rank {this_rank} stops too{last}; "
            "resume with hydra.run.dir=<run dir> ckpt_path=last"
        )
        log.error(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_CODE)  # the main thread is blocked in a collective: end the process here

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop.set()
        self._trainer = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """A collective that failed because a peer died (gloo: "Connection closed by peer"): the
        same one line as the watchdog's instead of a traceback from deep inside torch."""
        self._stop.set()
        if not self._peers or not isinstance(exception, RuntimeError) or self._stopping():
            return
        lost = self._lost_peers(wait_s=2.0)
        if lost:
            self._report_and_exit(*lost[0])
