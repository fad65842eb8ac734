"""Run dirs that never collide, and a lock that keeps a second live run out of a run's dir.

- Names: `conf/hydra/default.yaml` names run and sweep dirs `${ldm.run_name:}`, the start time to
  the millisecond plus a random suffix (and the SLURM job id under SLURM), e.g.
  `2026-12-01_09-41-07.312-5f2a9c`, so runs started in the same second (a shell loop with `&`, a
  SLURM array of plain runs, two people on one filesystem) get distinct dirs. The resolver caches
  its value per config, and Hydra copies that cache into every job of a sweep, so all references
  to one dir agree. Processes of one DDP launch get the dir from their launcher (ldm.utils.launch).
- Ownership: before Hydra writes anything there, the run's first process creates its dir
  (exclusively when new) and holds an OS lock (flock) on `<dir>/.run.lock` for its lifetime; the
  file names the owner's host, pid and start time. A second run aimed at a dir whose lock is held
  is refused in one line. The kernel drops the lock when the owner exits or dies (SIGKILL, OOM),
  so a stopped run's dir is free again: the explicit resume `hydra.run.dir=RUN ckpt_path=last`
  takes it over (logged as a stale lock). A lock file naming a live process on this host is
  refused too, even where flock is not shared (some network filesystems).
- Sweeps: the sweep dir is locked the same way by the sweep's process; its jobs get their own
  numbered subdirs inside it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ldm.utils.errors import UserError
from ldm.utils.launch import process_start_time, rank_label, slurm_job_id

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
# Locks held by this process (path -> open file): kept open, and so held, until the process exits.
_HELD: dict[str, Any] = {}


def run_name(environ: Mapping[str, str] | None = None, now: datetime | None = None) -> str:
    """`YYYY-MM-DD_HH-MM-SS.mmm-<6 hex>`, plus `-slurm<job id>` under SLURM."""
    environ = os.environ if environ is None else environ
    now = now or datetime.now()
    name = f"{now:%Y-%m-%d_%H-%M-%S}.{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"
    job = slurm_job_id(environ)
    return f"{name}-slurm{job}" if job else name


def register_resolver() -> None:
    """`${ldm.run_name:}` in configs (cached: one value per config and its sweep jobs)."""
    if not OmegaConf.has_resolver("ldm.run_name"):
        OmegaConf.register_new_resolver("ldm.run_name", lambda: run_name(), use_cache=True)


register_resolver()


def first_process(environ: Mapping[str, str] | None = None) -> bool:
    """False in the second and later processes of a DDP launch (they share rank zero's dir)."""
    return rank_label(os.environ if environ is None else environ) is None


def owner_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": process_start_time(os.getpid()),
        "locked_at": datetime.now().isoformat(timespec="seconds"),
    }


def read_owner(lock: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(lock.read_text() or "null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def alive_here(owner: dict[str, Any]) -> bool:
    """The owner is a live process on this host (the same process: its pid and start time)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    started, recorded = process_start_time(pid), owner.get("started")
    return started is None or recorded is None or abs(started - recorded) < 2.0


def describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('locked_at')}"


def claim_dir(path: str | Path, what: str = "hydra.run.dir") -> bool:
    """Create `path` (exclusively when new) and lock it for this process; False when `path` cannot
    be created (the writability check that follows says why). Raises UserError when a live run
    owns it."""
    path = Path(path).absolute()
    if str(path) in _HELD:
        return True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        fresh = True
    except FileExistsError:
        fresh = False
    except OSError:
        return False
    lock = path / LOCK_NAME
    try:
        handle = open(lock, "a+")  # held open (and locked) for the life of the process
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"{what} {str(path)!r} is in use by a live run ({describe(read_owner(lock))}); "
            "choose another dir, or wait for that run to end (then hydra.run.dir=THAT_DIR "
            "ckpt_path=last resumes it)"
        ) from None
    except OSError:  # no flock here: fall back to the pid in the file
        pass
    previous = read_owner(lock)
    if previous and previous.get("pid") != os.getpid() and alive_here(previous):
        handle.close()
        raise UserError(
            f"{what} {str(path)!r} is in use by a live run ({describe(previous)}); choose another "
            "dir, or wait for that run to end"
        )
    if previous:
        log.info("%s %s: stale lock of %s (ended); taking over", what, path, describe(previous))
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(owner_record()) + "\n")
    handle.flush()
    _HELD[str(path)] = handle
    if not fresh and not previous:
        log.info("%s %s exists (no run owns it); using it", what, path)
    return True


def release_dir(path: str | Path) -> None:
    """Drop this process's lock on `path` (the lock file stays, naming the last owner)."""
    handle = _HELD.pop(str(Path(path).absolute()), None)
    if handle is not None:
        handle.close()
