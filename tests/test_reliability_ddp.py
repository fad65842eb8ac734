"""Faults under DDP (`trainer=ddp_cpu`: two CPU processes, gloo), as a cluster delivers them:

- one rank SIGKILLed mid-epoch: the other stops within seconds with one line naming the lost rank
  (not after the 30-minute process-group timeout), `last.ckpt` is intact, and `ckpt_path=last`
  resumes to the same weights as an uninterrupted run;
- SIGTERM to every rank (what SLURM sends): one checkpoint, a clean exit.
"""

from __future__ import annotations

import re
import signal
from datetime import datetime
from pathlib import Path

import pytest

from ldm.callbacks.distributed import EXIT_CODE
from tests.train_cli import FAST, assert_same_training_state, explain, load_ckpt, train_cli

# Stage 1 only, two epochs of 3 batches per rank, a checkpoint after every step.
DDP = [
    *FAST,
    "trainer=ddp_cpu",
    "stage=autoencoder",
    "autoencoder.trainer.max_epochs=2",
    "callbacks.autoencoder.model_checkpoint.monitor=null",
    "+callbacks.autoencoder.model_checkpoint.every_n_train_steps=1",
]


def fault(epoch: int, batch: int, name: str, rank: int | None = None) -> list[str]:
    prefix = "+callbacks.autoencoder.fault"
    return [
        f"{prefix}._target_=tests.train_cli.SignalAt",
        f"{prefix}.epoch={epoch}",
        f"{prefix}.batch={batch}",
        f"{prefix}.name={name}",
        f"{prefix}.rank={'null' if rank is None else rank}",
    ]


def log_time(text: str, needle: str) -> datetime:
    """Time stamp of the first log line containing `needle`."""
    for line in text.splitlines():
        if needle in line:
            stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", line)
            return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
    raise AssertionError(f"no log line with {needle!r}")


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ddp_reference")
    result = train_cli(*DDP, f"hydra.run.dir={work / 'run'}", cwd=work)
    assert result.returncode == 0, explain(result)
    return work / "run"


@pytest.mark.slow
def test_sigkill_of_one_rank_stops_the_other_fast_and_resumes_exactly(ddp_reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = train_cli(*DDP, f"hydra.run.dir={run_dir}", *fault(1, 1, "SIGKILL", 1), cwd=tmp_path)
    assert killed.returncode == EXIT_CODE, explain(killed)
    lines = [line for line in killed.stderr.splitlines() if "is gone" in line]
    assert len(lines) == 1 and lines[0].startswith("error: DDP rank 1 (pid "), explain(killed)
    assert "rank 0 stops too" in lines[0] and "ckpt_path=last" in lines[0]
    killed_at = log_time((run_dir / "train_rank1.log").read_text(), "fault: SIGKILL to rank 1")
    noticed_at = log_time((run_dir / "train.log").read_text(), "DDP rank 1 (pid")
    assert (noticed_at - killed_at).total_seconds() < 20
    # the newest checkpoint is whole: after batch 0 of epoch 1 (rank 1 died before step 5 was saved)
    last = run_dir / "checkpoints" / "autoencoder" / "last.ckpt"
    assert load_ckpt(last)["global_step"] == 4

    resumed = train_cli(*DDP, f"hydra.run.dir={run_dir}", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    assert_same_training_state(ddp_reference / "checkpoints" / "autoencoder" / "last.ckpt", last)


@pytest.mark.slow
def test_sigterm_to_all_ranks_saves_one_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    stopped = train_cli(*DDP, f"hydra.run.dir={run_dir}", *fault(1, 0, "SIGTERM"), cwd=tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, explain(stopped)
    assert "Traceback" not in stopped.stderr and "is gone" not in stopped.stderr, explain(stopped)
    log = (run_dir / "train.log").read_text()
    last = run_dir / "checkpoints" / "autoencoder" / "last.ckpt"
    assert log.count(f"SIGTERM at epoch 1, step 4: saved {last}") == 1
    assert load_ckpt(last)["global_step"] == 4
    # one checkpoint written by one rank: no second rank's copy (last-v1.ckpt)
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch000.ckpt", "last.ckpt"]
