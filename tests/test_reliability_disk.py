"""Disk faults at start-up: unwritable, missing-parent and full output dirs fail in one line."""

from __future__ import annotations

import collections
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.utils.errors import UserError
from ldm.utils.validation import check_writable
from tests.conftest import ROOT


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory that refuses new files. chmod does not stop root, so as root use /proc/self,
    a real directory in which the kernel refuses to create files."""
    if os.geteuid() != 0:
        path = tmp_path / "ro"
        path.mkdir()
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
    elif Path("/proc/self").is_dir():
        yield Path("/proc/self")
    else:
        pytest.skip("running as root without /proc: no directory refuses writes")


def test_writable_dir_passes_and_leaves_nothing(tmp_path):
    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_read_only_dir(read_only_dir):
    with pytest.raises(UserError) as err:
        check_writable(read_only_dir)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"output dir {str(read_only_dir)!r} is not writable ("
    )


def test_dir_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        UserError, match=r"output dir '.*/file/run' is not writable \(Not a directory\)"
    ):
        check_writable(tmp_path / "file" / "run")


def test_disk_full_on_write(tmp_path, monkeypatch):
    """A real ENOSPC from the kernel: the probe file name is pinned and points at /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    monkeypatch.setattr(secrets, "token_hex", lambda n: "0" * 2 * n)
    (tmp_path / f".ldm-write-probe-{os.getpid()}-00000000").symlink_to("/dev/full")
    with pytest.raises(UserError, match=r"is not writable \(No space left on device\)"):
        check_writable(tmp_path)


def test_too_little_free_space(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: usage(2**40, 2**40 - 50 * 2**20, 50 * 2**20)
    )
    with pytest.raises(UserError) as err:
        check_writable(tmp_path, min_free_mb=100)
    assert str(err.value) == (
        f"output dir {str(tmp_path)!r} has 50 MiB free, "
        "less than the 100 MiB needed for checkpoints and logs; "
        "free space or choose another directory"
    )
    check_writable(tmp_path, min_free_mb=10)


def test_train_refuses_an_unwritable_run_dir_before_hydra_writes(tmp_path):
    (tmp_path / "file").write_text("x")
    run = subprocess.run(
        [
            sys.executable,
            "train.py",
            "debug=fast",
            f"paths.log_dir={tmp_path / 'file'}/logs",
            "++hydra.callbacks.output_dir_check._target_=ldm.utils.validation.OutputDirCheck",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2, run.stderr
    assert (
        run.stderr.startswith(f"error: hydra.run.dir '{tmp_path / 'file'}/logs/train/runs/")
        and run.stderr.count("\n") == 1
    )
    assert "is not writable (Not a directory)" in run.stderr


def test_default_run_dir_is_checked_too(tmp_path):
    """The default dirs interpolate `${hydra:runtime.cwd}`, which Hydra has not set when the check
    runs: it must still resolve them and refuse, here with `logs` a file in the launch dir."""
    (tmp_path / "logs").write_text("x")
    run = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "debug=fast"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2, run.stderr
    assert (
        run.stderr.startswith(f"error: hydra.run.dir '{tmp_path}/logs/train/runs/")
        and run.stderr.count("\n") == 1
    )
    assert "is not writable (Not a directory)" in run.stderr
