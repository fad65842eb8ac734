"""Sweeps that survive: an Optuna sweep killed mid-way and rerun with the same command continues
its study (SQLite in the sweep dir) without re-running finished trials; a local parallel grid
(Hydra's joblib launcher, 2 jobs at a time) gives each job its own dir and one W&B group; a grid
typed as the README shows it (no hydra.sweep.dir) lands in logs/<task>/multiruns/ of the launch
dir."""

from __future__ import annotations

import signal
from pathlib import Path

import optuna
import pytest
import yaml

from ldm.utils.wandb_offline import read_history
from tests.train_cli import FAST, explain, logged, train_cli, train_in_process


def test_readme_grid_sweep_without_a_sweep_dir_runs_each_job_under_the_launch_dir(tmp_path):
    # The sweeper resolves hydra.sweep.dir (-> paths.root_dir) before Hydra sets HydraConfig, where
    # ${hydra:runtime.cwd} fails; every multirun test that passed hydra.sweep.dir hid this.
    result = train_cli(
        "-m", *FAST, "stage=autoencoder", "trainer.limit_train_batches=1", "seed=1,2", cwd=tmp_path
    )
    assert result.returncode == 0, explain(result)
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    seeds = set()
    for job in (0, 1):
        resolved = yaml.safe_load((sweep / str(job) / "config_resolved.yaml").read_text())
        assert resolved["paths"]["root_dir"] == str(tmp_path)
        assert (sweep / str(job) / "checkpoints" / "autoencoder" / "last.ckpt").is_file()
        seeds.add(resolved["seed"])
    assert seeds == {1, 2}


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory) -> Path:
    cfg, _ = train_in_process(["stage=autoencoder"], tmp_path_factory.mktemp("stage1"))
    return Path(cfg.paths.output_dir) / "checkpoints" / "autoencoder" / "last.ckpt"


@pytest.mark.slow
def test_killed_optuna_sweep_continues_without_rerunning_finished_trials(
    tmp_path, autoencoder_ckpt
):
    sweep = tmp_path / "sweep"
    command = [
        "hparams_search=optuna",
        *FAST,
        "stage=diffusion",
        f"autoencoder_ckpt={autoencoder_ckpt}",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
        # the whole sweep process dies (SIGKILL) when trial 1 starts training, once
        "+callbacks.common.fault._target_=tests.train_cli.KillOnJob",
        "+callbacks.common.fault.job=1",
    ]
    killed = train_cli(*command, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, explain(killed)
    storage = f"sqlite:///{sweep}/optuna.db"
    trials = optuna.load_study(study_name="train", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING"]

    resumed = train_cli(*command, cwd=tmp_path)  # the same command
    assert resumed.returncode == 0, explain(resumed)
    assert "1 finished trials kept, 1 interrupted re-queued, 2 to run" in resumed.stdout
    trials = optuna.load_study(study_name="train", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == trials[1].params  # the interrupted trial ran again
    # trial 0 trained once (its dir untouched by the rerun); trials 2 and 3 in their own dirs
    assert (sweep / "0" / "train.log").read_text().count("stage diffusion: fitting") == 1
    for job in (2, 3):
        assert (sweep / str(job) / "checkpoints" / "diffusion" / "last.ckpt").is_file()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [logged(sweep / str(job), "diffusion", "val/loss") for job in (0, 2, 3)]
    assert best["best_value"] == pytest.approx(min(v[max(v)] for v in values), rel=1e-6)


@pytest.mark.slow
def test_joblib_launcher_runs_a_grid_two_at_a_time_one_dir_each_one_wandb_group(
    tmp_path, autoencoder_ckpt
):
    sweep = tmp_path / "sweep"
    overrides = [o for o in FAST if not o.startswith("logger=")]
    result = train_cli(
        "-m",
        *overrides,
        "logger=wandb",
        "stage=diffusion",
        f"autoencoder_ckpt={autoencoder_ckpt}",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "schedule=linear,cosine",
        "seed=1,2,3",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, explain(result)
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    groups, combos = set(), set()
    for job in range(6):
        job_dir = sweep / str(job)
        assert (job_dir / "checkpoints" / "diffusion" / "last.ckpt").is_file()
        resolved = yaml.safe_load((job_dir / "config_resolved.yaml").read_text())
        assert resolved["paths"]["output_dir"] == str(job_dir)
        combos.add((resolved["schedule"]["name"], resolved["seed"]))
        (wandb_run,) = (job_dir / "wandb").glob("offline-run-*/run-*.wandb")
        groups.add(read_history(wandb_run)[1]["group"])
    assert len(combos) == 6
    assert groups == {f"train-{sweep.name}"}
