"""Build shared caches once: runs that need the same cache at the same time wait for one builder.

Caches shared by runs (the FID classifier and real statistics, latent caches, generated datasets)
live under `paths.cache_dir`, which concurrent runs, sweeps and nodes share. Two tools:

- `cache_lock(path, what)`: a context manager holding `<path>.lock` (the `filelock` library). A
  process that finds the lock taken logs one line naming the cache and waits. The caller checks
  for the cache again inside the lock, so only the first process builds; the others reuse it:

      if not ready():
          with cache_lock(path, "FID classifier"):
              if not ready():
                  build()   # writes atomically (ldm.utils.checkpoint.atomic_write)

- `build_once(path, build, what)`: the same for a cache that is one file or one directory:
  `build(tmp)` writes a temporary sibling that is renamed to `path` when it returns, so readers
  never see half a cache.

The lock is an OS file lock (flock), which the kernel drops when its holder dies (even by SIGKILL):
a builder that is killed leaves no stuck lock, and since caches are written to a temporary name and
renamed, no half-written cache either; the next process builds it. The empty `.lock` files stay
(removing them would race). On network filesystems without working flock (some NFS setups) use a
local `paths.cache_dir`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)
T = TypeVar("T")


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.lock")


@contextlib.contextmanager
def cache_lock(path: str | Path, what: str = "cache", timeout: float = -1) -> Iterator[bool]:
    """Hold the build lock of the cache at `path`; yields whether another process held it first
    (then that process has just built the cache, unless it failed or died).

    `timeout < 0` waits as long as the builder takes (builders that die release the lock).
    """
    lock_file = lock_path(path)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    started, waited = time.monotonic(), False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another process is building %s; waiting for it", what, path)
        lock.acquire(timeout=timeout)
        log.info("%s: waited %.1f s for %s", what, time.monotonic() - started, path)
        waited = True
    try:
        yield waited
    finally:
        lock.release()


def remove_leftovers(path: Path) -> None:
    """Remove `.<name>.*.tmp` siblings of `path` that dead builders left (call under the lock)."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def build_once(path: str | Path, build: Callable[[Path], object], what: str = "cache") -> Path:
    """`path` (a file or a directory), built by `build(tmp)` unless it exists; returns `path`.

    `build` writes the cache at the temporary path it is given (a file or a directory), which is
    renamed to `path` when `build` returns. Concurrent callers build it once: the others wait under
    `cache_lock` (one log line) and then reuse it. If `build` raises, or its process dies, nothing
    is left at `path` and the next caller builds it.
    """
    path = Path(path)
    if path.exists():
        return path
    with cache_lock(path, what):
        if path.exists():
            log.info("%s: reusing %s (built by another process)", what, path)
            return path
        remove_leftovers(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            build(tmp)
            if not tmp.exists():
                raise FileNotFoundError(f"{what}: the builder wrote nothing at {tmp}")
            os.replace(tmp, path)
        except BaseException:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            raise
    return path


def load_or_build(
    paths: tuple[Path, ...], what: str, load: Callable[[], T], build: Callable[[], T], retrain: bool
) -> T:
    """`load()` when every file of a cache entry exists (unless `retrain`), else `build()` under
    the entry's lock: runs that start together build it once, the others wait and then load it."""

    def ready() -> bool:
        return all(path.is_file() for path in paths)

    if ready() and not retrain:
        return load()
    with cache_lock(paths[0], what) as waited:
        if ready() and not (retrain and not waited):
            return load()
        return build()
