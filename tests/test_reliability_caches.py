"""Shared caches are built once: processes that need one at the same time wait for the first
builder (one log line) and reuse its result; a builder killed mid-build leaves neither a
half-written cache nor a stuck lock (ldm.utils.cache_lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm.utils.cache_lock import build_once, cache_lock, lock_path
from tests.conftest import ROOT

# Each process waits for the same wall-clock moment, so that all of them ask for the cache together.
RACE = """
import logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
ready, n = Path(sys.argv[1]), int(sys.argv[2])
{setup}
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < n:  # a barrier: every process has finished its setup
    time.sleep(0.01)
{body}
"""


def race(setup: str, body: str, n: int, tmp_path: Path) -> list[str]:
    """Run `body` in `n` processes released together once all have run `setup` (a barrier, not a
    clock: on a loaded machine imports take any time); their stdouts."""
    script = tmp_path / "race.py"
    script.write_text(RACE.format(setup=setup, body=body))
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(ready), str(n)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(n)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def test_build_once_builds_once_for_concurrent_processes(tmp_path):
    setup = f"""
from pathlib import Path
from ldm.utils.cache_lock import build_once
target = Path({str(tmp_path / "cache" / "data")!r})
def build(tmp):
    tmp.mkdir()
    (tmp / "part1").write_text("a")
    time.sleep(1.0)
    (tmp / "part2").write_text("b")
    with open({str(tmp_path / "builds.txt")!r}, "a") as f:
        f.write("built\\n")
"""
    outputs = race(setup, "build_once(target, build, 'test dataset'); print('done')", 3, tmp_path)
    assert (tmp_path / "builds.txt").read_text() == "built\n"
    target = tmp_path / "cache" / "data"
    assert sorted(p.name for p in target.iterdir()) == ["part1", "part2"]
    waiting = [o for o in outputs if "another process is building" in o]
    assert len(waiting) >= 1 and all("test dataset" in o for o in waiting)
    assert sorted(p.name for p in target.parent.iterdir()) == ["data", "data.lock"]


def test_killed_builder_leaves_no_partial_cache_and_no_stuck_lock(tmp_path):
    target = tmp_path / "cache" / "features.pt"
    script = f"""
import time
from pathlib import Path
from ldm.utils.cache_lock import build_once
def build(tmp):
    tmp.write_bytes(b"half a cache")
    time.sleep(60)
build_once(Path({str(target)!r}), build, "features")
"""
    builder = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    deadline = time.monotonic() + 60
    while not list(target.parent.glob(".features.pt.*.tmp")):
        assert builder.poll() is None and time.monotonic() < deadline, "the builder never started"
        time.sleep(0.1)
    os.kill(builder.pid, signal.SIGKILL)
    builder.wait(timeout=30)
    assert not target.exists()  # nothing half-written under the cache's name

    started = time.monotonic()
    build_once(target, lambda tmp: tmp.write_bytes(b"whole"), "features")
    assert time.monotonic() - started < 5  # the dead builder's lock was released by the kernel
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in target.parent.iterdir()) == ["features.pt", "features.pt.lock"]


def test_failed_build_leaves_nothing_and_the_next_caller_builds(tmp_path):
    target = tmp_path / "dataset"

    def broken(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "a").write_text("x")
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError, match="generator crashed"):
        build_once(target, broken, "dataset")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.lock"]
    build_once(target, lambda tmp: tmp.mkdir(), "dataset")
    assert target.is_dir()
    with cache_lock(target, "dataset") as waited:
        assert waited is False and lock_path(target).is_file()


@pytest.mark.slow
def test_fid_classifier_is_trained_once_by_runs_that_need_it_together(tmp_path):
    cache = tmp_path / "shared_cache"
    setup = f"""
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from ldm.metrics.train_classifier import get_or_train_classifier
with initialize_config_dir(config_dir={str(ROOT / "conf")!r}, version_base="1.3"):
    cfg = compose(config_name="train", overrides=["data=digits", "data.image_size=16"])
datamodule = instantiate(cfg.data, batch_size=32)
datamodule.setup("fit")
"""
    body = f"get_or_train_classifier(datamodule, {str(cache)!r}, epochs=1)"
    outputs = race(setup, body, 2, tmp_path)
    trained = [o for o in outputs if "FID classifier: trained" in o]
    loaded = [o for o in outputs if "FID classifier: loaded" in o]
    assert (len(trained), len(loaded)) == (1, 1), outputs
    assert "FID classifier: another process is building" in loaded[0]
    assert len(list(cache.rglob("classifier_*.pt"))) == 1
