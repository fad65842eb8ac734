"""Exact reruns and resume.

- The same seed gives bitwise-equal weights and losses; another seed does not.
- `python train.py --config-dir RUN/.hydra --config-name config` reruns a run into a fresh dir and
  ends with the same weights; the run dir holds what a rerun needs (manifest, command, config).
- A run stopped by SIGKILL or SIGTERM and resumed with `ckpt_path=last` in its own run dir ends
  bitwise equal to an uninterrupted run: weights (EMA and raw), optimizer, LR scheduler, step
  counters, RNG streams and data order. Plus the pieces: resumable loader, RNG states, stage choice.
"""

from __future__ import annotations

import io
import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import open_dict

from ldm.callbacks.resume import ExactResume, collect_rng_states, set_rng_states
from ldm.data.resumable import ResumableDataLoader, ResumableSampler
from ldm.train import resume_checkpoints
from ldm.utils.errors import UserError
from tests.conftest import compose_config
from tests.train_cli import (
    FAST,
    assert_same_training_state,
    explain,
    load_ckpt,
    logged,
    train_cli,
    train_in_process,
)

# Both stages, two epochs of 3 batches each. A checkpoint after every step whatever the
# metrics (monitor=null), so the uninterrupted and the resumed run write their final last.ckpt at
# the same point; an LR schedule whose state has to be resumed as well.
RESUME = [
    *FAST,
    "stage=all",
    "autoencoder.trainer.max_epochs=2",
    "diffusion.trainer.max_epochs=2",
    "callbacks.autoencoder.model_checkpoint.monitor=null",
    "callbacks.diffusion.model_checkpoint.monitor=null",
    "+callbacks.autoencoder.model_checkpoint.every_n_train_steps=1",
    "+callbacks.diffusion.model_checkpoint.every_n_train_steps=1",
    "model.diffusion.lr_scheduler={_target_:torch.optim.lr_scheduler.LinearLR,_partial_:true,start_factor:0.1,total_iters:10}",
]


def fault(stage: str, epoch: int, batch: int | None, name: str) -> list[str]:
    """Overrides that make the run send itself signal `name` after batch `batch` of `epoch`
    (None: when the epoch's validation starts)."""
    prefix = f"+callbacks.{stage}.fault"
    return [
        f"{prefix}._target_=tests.train_cli.SignalAt",
        f"{prefix}.epoch={epoch}",
        f"{prefix}.batch={'null' if batch is None else batch}",
        f"{prefix}.name={name}",
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("resume")
    run_dir = work / "uninterrupted"
    result = train_cli(*RESUME, f"hydra.run.dir={run_dir}", cwd=work)
    assert result.returncode == 0, explain(result)
    return run_dir


@pytest.mark.slow
def test_same_seed_same_weights_and_losses_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg, _ = train_in_process(
            ["stage=autoencoder", "autoencoder.trainer.max_epochs=2", f"seed={seed}"],
            tmp_path / name,
        )
        runs[name] = Path(cfg.paths.output_dir)
    last = {name: run / "checkpoints" / "autoencoder" / "last.ckpt" for name, run in runs.items()}
    assert_same_training_state(last["a"], last["b"])
    losses = {name: logged(run, "autoencoder") for name, run in runs.items()}
    assert len(losses["a"]) == 6 and losses["a"] == losses["b"]
    weights_a, weights_c = load_ckpt(last["a"])["state_dict"], load_ckpt(last["c"])["state_dict"]
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    assert losses["a"] != losses["c"]


@pytest.mark.slow
def test_rerun_from_the_run_dir_reproduces_its_final_weights(uninterrupted, tmp_path):
    # What the run dir holds for a rerun.
    manifest = json.loads((uninterrupted / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["data_fingerprint"].startswith("mnist5k-32-")
    assert len(manifest["git"]["commit"]) == 40 and isinstance(manifest["git"]["dirty"], bool)
    assert manifest["packages"]["torch"] and manifest["packages"]["pytorch-lightning"]
    assert manifest["hostname"] and "cuda" in manifest["devices"]
    assert manifest["launch"]["trainer"]["deterministic"] is True
    assert f"hydra.run.dir={uninterrupted}" in (uninterrupted / "command.txt").read_text()
    resolved = yaml.safe_load((uninterrupted / "config_resolved.yaml").read_text())
    assert resolved["paths"]["output_dir"] == str(uninterrupted)
    saved = yaml.safe_load((uninterrupted / ".hydra" / "config.yaml").read_text())
    assert (
        saved["paths"]["output_dir"] == "${hydra:runtime.output_dir}"
    )  # resolved afresh by a rerun

    rerun = train_cli(
        "--config-dir", str(uninterrupted / ".hydra"), "--config-name", "config", cwd=tmp_path
    )
    assert rerun.returncode == 0, explain(rerun)
    # A fresh dir in the project's layout (logs/<task_name>/runs/<time>), not the original one.
    (rerun_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert (rerun_dir / "train.log").is_file() and "--config-dir" in (
        rerun_dir / "command.txt"
    ).read_text()
    for stage in ("autoencoder", "diffusion"):
        assert_same_training_state(
            uninterrupted / "checkpoints" / stage / "last.ckpt",
            rerun_dir / "checkpoints" / stage / "last.ckpt",
        )
        assert logged(uninterrupted, stage) == logged(rerun_dir, stage)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    killed = train_cli(
        *RESUME, f"hydra.run.dir={run_dir}", *fault("diffusion", 1, 1, "SIGKILL"), cwd=tmp_path
    )
    assert killed.returncode == -signal.SIGKILL, explain(killed)
    stopped_at = load_ckpt(run_dir / "checkpoints" / "diffusion" / "last.ckpt")
    # The newest checkpoint is mid-epoch: after batch 0 of epoch 1, one batch into its order.
    assert (stopped_at["epoch"], stopped_at["global_step"]) == (1, 4)
    assert stopped_at["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 1}
    ]

    resumed = train_cli(*RESUME, f"hydra.run.dir={run_dir}", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    log = (run_dir / "train.log").read_text()
    assert (
        f"ckpt_path=last: resuming stage diffusion from {run_dir}/checkpoints/diffusion/last.ckpt"
        in log
    )
    # stage 1 is not trained again: the stage-2 checkpoint carries the autoencoder
    assert (
        log.count("stage autoencoder: fitting") == 1 and log.count("stage diffusion: fitting") == 2
    )
    for stage in ("autoencoder", "diffusion"):
        assert_same_training_state(
            uninterrupted / "checkpoints" / stage / "last.ckpt",
            run_dir / "checkpoints" / stage / "last.ckpt",
        )
    reference = logged(uninterrupted, "diffusion")
    after_resume = logged(run_dir, "diffusion")
    assert len(reference) == 6 and {4, 5} <= after_resume.keys()
    assert {step: reference[step] for step in after_resume} == after_resume


@pytest.mark.slow
def test_sigterm_during_validation_saves_a_checkpoint_that_resumes_exactly(uninterrupted, tmp_path):
    # SIGTERM while stage 1 validates after its first epoch: saved when the validation ends.
    run_dir = tmp_path / "stopped"
    stopped = train_cli(
        *RESUME, f"hydra.run.dir={run_dir}", *fault("autoencoder", 0, None, "SIGTERM"), cwd=tmp_path
    )
    assert stopped.returncode == 128 + signal.SIGTERM, explain(stopped)
    assert "Traceback" not in stopped.stderr, explain(stopped)
    last = run_dir / "checkpoints" / "autoencoder" / "last.ckpt"
    assert f"SIGTERM at epoch 0, step 3: saved {last}" in (run_dir / "train.log").read_text()
    assert load_ckpt(last)["global_step"] == 3  # the first epoch's three batches
    assert not (run_dir / "checkpoints" / "diffusion").exists()  # stopped; stage 2 never began

    resumed = train_cli(*RESUME, f"hydra.run.dir={run_dir}", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    for stage in ("autoencoder", "diffusion"):
        assert_same_training_state(
            uninterrupted / "checkpoints" / stage / "last.ckpt",
            run_dir / "checkpoints" / stage / "last.ckpt",
        )
        reference, this_run = logged(uninterrupted, stage), logged(run_dir, stage)
        assert {step: reference[step] for step in this_run} == this_run
    assert {3, 4, 5} <= logged(run_dir, "autoencoder").keys()  # steps after the resume, matching
    # the resumed invocation is recorded next to the first one
    assert len((run_dir / "command.txt").read_text().splitlines()) == 2


def test_loader_resumes_mid_epoch_and_starts_the_next_epoch_whole():
    data = list(range(20))

    def loader(rank: int = 0, world: int = 1) -> ResumableDataLoader:
        return ResumableDataLoader(
            data, ResumableSampler(data, world, rank, seed=7), batch_size=3, drop_last=True
        )

    full = loader()
    full.sampler.set_epoch(2)
    epoch2 = [b.tolist() for b in full]
    assert len(epoch2) == 6 and full.state_dict() == {"epoch": 2, "batches": 6}

    stopped = loader()
    stopped.sampler.set_epoch(2)
    batches = iter(stopped)
    seen = [next(batches).tolist(), next(batches).tolist()]
    state = stopped.state_dict()
    assert seen == epoch2[:2] and state == {"epoch": 2, "batches": 2}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert [b.tolist() for b in resumed] == epoch2[2:]
    # the skip is used once; the next pass (and a pass of another epoch) is a whole epoch
    resumed.sampler.set_epoch(3)
    assert len(list(resumed)) == 6
    other = loader()
    other.load_state_dict(state)
    other.sampler.set_epoch(3)
    assert len(list(other)) == 6
    # passes leave the global RNG alone (a resumed run restores it as of the checkpoint)
    state = torch.get_rng_state()
    list(loader())
    assert torch.equal(state, torch.get_rng_state())
    # two DDP ranks take disjoint halves of one permutation
    shards = [set(torch.cat(list(loader(rank, 2))).tolist()) for rank in (0, 1)]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 9


def test_rng_states_round_trip_through_a_weights_only_checkpoint():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)  # noqa: NPY002 (the legacy global state is what is saved)
    buffer = io.BytesIO()
    torch.save({"ranks": [collect_rng_states()]}, buffer)
    expected = (torch.rand(4), random.random(), np.random.rand(2))  # noqa: NPY002
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["ranks"][0]
    torch.manual_seed(0)
    random.seed(0)
    set_rng_states(state)
    again = (torch.rand(4), random.random(), np.random.rand(2))  # noqa: NPY002
    assert (
        torch.equal(expected[0], again[0])
        and expected[1] == again[1]
        and np.array_equal(expected[2], again[2])
    )


def test_rng_of_a_finished_stage_is_restored_when_its_fit_ends():
    # Resuming from the checkpoint of a finished stage runs no batch; stage 2's weight init that
    # follows must still draw from the checkpoint's generators.
    callback = ExactResume()
    torch.manual_seed(5)
    callback.load_state_dict(callback.state_dict())
    expected = torch.rand(3)
    torch.manual_seed(0)
    callback.on_fit_end(None, None)
    assert torch.equal(torch.rand(3), expected)


def fake_checkpoint(path: Path, stage: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "ldm": {"stage": stage, "config": {}}}, path)
    return path


def test_ckpt_path_picks_the_stage_to_resume(tmp_path):
    cfg = compose_config(["ckpt_path=last"], tmp_path)
    assert resume_checkpoints(cfg) == {}  # nothing saved yet: start from scratch
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    ae_last = fake_checkpoint(checkpoints / "autoencoder" / "last.ckpt", "autoencoder")
    assert resume_checkpoints(cfg) == {"autoencoder": str(ae_last)}
    diffusion_last = fake_checkpoint(checkpoints / "diffusion" / "last.ckpt", "diffusion")
    assert resume_checkpoints(cfg) == {"diffusion": str(diffusion_last)}  # the later stage first
    with open_dict(cfg):
        cfg.stage, cfg.ckpt_path = "autoencoder", str(diffusion_last)
    with pytest.raises(
        UserError, match="is a diffusion checkpoint but stage=autoencoder trains autoencoder"
    ):
        resume_checkpoints(cfg)
    with open_dict(cfg):
        cfg.stage, cfg.ckpt_path = "diffusion", str(ae_last)
    with pytest.raises(UserError, match="use autoencoder_ckpt=PATH"):
        resume_checkpoints(cfg)
    with open_dict(cfg):
        cfg.stage = "all"
    assert resume_checkpoints(cfg) == {"autoencoder": str(ae_last)}
