"""Scale: DDP over two CPU processes (Lightning's launcher and torchrun) gives one set of outputs;
basic and Optuna sweeps give one dir per job and one W&B group, survive a failing job, and report a
best value; the SLURM launcher and the search space compose; launch overrides for ranks and
reruns."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ldm.train import check_multirun_launch, sweep_dir
from ldm.utils.errors import UserError
from ldm.utils.launch import launch_overrides, shared_run_name
from ldm.utils.wandb_offline import read_history
from tests.conftest import CONF_DIR, compose_config
from tests.train_cli import FAST, explain, load_ckpt, logged, train_cli, train_in_process


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory) -> Path:
    """A stage-1 checkpoint, so that sweeps train stage 2 only."""
    cfg, _ = train_in_process(["stage=autoencoder"], tmp_path_factory.mktemp("stage1"))
    return Path(cfg.paths.output_dir) / "checkpoints" / "autoencoder" / "last.ckpt"


def files_named(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.rglob(name))


@pytest.mark.slow
def test_ddp_cpu_two_processes_give_one_set_of_outputs(tmp_path):
    run_dir = tmp_path / "run"
    result = train_cli(
        *FAST, "trainer=ddp_cpu", "stage=all", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, explain(result)
    assert result.stdout.count("=== ldm run summary ===") == 1
    for name in (
        "manifest.json",
        "command.txt",
        "config_resolved.yaml",
        "final_samples.png",
        "config.yaml",
    ):
        assert files_named(tmp_path, name) == [
            run_dir / (".hydra/" if name == "config.yaml" else "") / name
        ]
    assert (run_dir / "train.log").is_file() and (run_dir / "train_rank1.log").is_file()
    for stage in ("autoencoder", "diffusion"):
        written = sorted(p.name for p in (run_dir / "checkpoints" / stage).iterdir())
        assert written == [
            "epoch000.ckpt",
            "last.ckpt",
        ]  # once each, no rank's duplicate (last-v1.ckpt)
    ckpt = load_ckpt(run_dir / "checkpoints" / "diffusion" / "last.ckpt")
    # each rank ran the 3 batches of its half of the data; the sampler is the rank-aware one
    assert ckpt["global_step"] == 3
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches": 3}
    ]
    assert json.loads((run_dir / "manifest.json").read_text())["launch"]["trainer"]["devices"] == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_share_one_run_dir(tmp_path):
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}")
    result = train_cli(
        *FAST, "trainer=ddp_cpu", "stage=autoencoder", cwd=tmp_path, launcher=torchrun
    )
    assert result.returncode == 0, explain(result)
    # No hydra.run.dir given: both ranks derived the same one from the torchrun agent.
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert "-torchrun" in run_dir.name
    assert files_named(tmp_path, "manifest.json") == [run_dir / "manifest.json"]
    assert files_named(tmp_path, "config.yaml") == [run_dir / ".hydra" / "config.yaml"]
    assert (run_dir / "train_rank1.log").is_file()
    launch = json.loads((run_dir / "manifest.json").read_text())["launch"]
    assert (launch["launcher"], launch["world_size"]) == ("torchrun", 2)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "autoencoder").iterdir()) == [
        "epoch000.ckpt",
        "last.ckpt",
    ]


@pytest.mark.slow
def test_basic_multirun_gives_each_job_its_dir_and_one_wandb_group(tmp_path, autoencoder_ckpt):
    sweep = tmp_path / "sweep"
    overrides = [o for o in FAST if not o.startswith("logger=")]
    result = train_cli(
        "-m",
        *overrides,
        "logger=wandb",
        "stage=diffusion",
        f"autoencoder_ckpt={autoencoder_ckpt}",
        "schedule=linear,cosine",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, explain(result)
    groups = set()
    for job, schedule in ((0, "linear"), (1, "cosine")):
        job_dir = sweep / str(job)
        assert (job_dir / "checkpoints" / "diffusion" / "last.ckpt").is_file()
        assert f"schedule={schedule}" in yaml.safe_load(
            (job_dir / ".hydra" / "overrides.yaml").read_text()
        )
        assert (
            yaml.safe_load((job_dir / "config_resolved.yaml").read_text())["schedule"]["name"]
            == schedule
        )
        (wandb_run,) = (job_dir / "wandb").glob("offline-run-*/run-*.wandb")
        groups.add(read_history(wandb_run)[1]["group"])
    assert groups == {f"train-{sweep.name}"}


@pytest.mark.slow
def test_optuna_sweep_survives_a_failing_trial_and_reports_the_best(tmp_path, autoencoder_ckpt):
    sweep = tmp_path / "sweep"
    result = train_cli(  # no -m: the hparams_search config sets hydra.mode=MULTIRUN
        "hparams_search=optuna",
        *FAST,
        "stage=diffusion",
        f"autoencoder_ckpt={autoencoder_ckpt}",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
        "+callbacks.common.fault._target_=tests.train_cli.FailOnJob",
        "+callbacks.common.fault.job=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, explain(result)
    failed = sweep / "1"
    assert "RuntimeError: injected failure in job 1" in (failed / "error.txt").read_text()
    assert "job 1 failed (" in (failed / "train.log").read_text()
    assert not (failed / "checkpoints").exists()
    values = []
    for job in (0, 2):
        val_loss = logged(sweep / str(job), "diffusion", "val/loss")
        values.append(val_loss[max(val_loss)])
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(values), rel=1e-6)
    assert set(best["best_params"]) == {
        "model.diffusion.optimizer.lr",
        "schedule",
        "schedule.prediction_type",
        "model.diffusion.unet.model_channels",
        "callbacks.diffusion.ema.multi_avg_fn.decay",
    }


def compose_with_hydra(overrides: list[str]):
    """The composed config with its `hydra` node (which compose_config drops)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_optuna_search_space_names_real_settings():
    cfg = compose_with_hydra(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 1234
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.optimized_metric == "val/fid"
    for key, space in sweeper.params.items():
        if key == "schedule":  # a config group: each choice is a file of conf/schedule
            for option in space.removeprefix("choice(").removesuffix(")").split(","):
                assert (CONF_DIR / "schedule" / f"{option.strip()}.yaml").is_file()
        else:
            assert OmegaConf.select(cfg, key) is not None, key


def test_slurm_launcher_config_composes():
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="the optional [slurm] extra"
    )
    cfg = compose_with_hydra(
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert (
        launcher.partition is None and launcher.timeout_min > 0 and launcher.array_parallelism > 0
    )
    assert launcher.setup[0] == f"export OMP_NUM_THREADS={launcher.cpus_per_task}"


def test_local_multirun_with_ddp_is_refused_and_sweep_jobs_share_a_group(tmp_path):
    cfg = compose_config(
        ["hydra.mode=MULTIRUN", "trainer=ddp_cpu", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path
    )
    assert sweep_dir() == tmp_path / "sweep"
    with pytest.raises(UserError, match="Lightning would re-run the whole sweep in every rank"):
        check_multirun_launch(cfg)
    check_multirun_launch(compose_config(["hydra.mode=MULTIRUN", "trainer=cpu"], tmp_path))
    assert sweep_dir() is not None
    compose_config(["trainer=ddp_cpu"], tmp_path)
    assert sweep_dir() is None


def test_launch_overrides_for_ranks_and_reruns(tmp_path):
    torchrun = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0"}
    rank0 = launch_overrides(["trainer=ddp_cpu"], torchrun)
    rank1 = launch_overrides(["trainer=ddp_cpu"], {**torchrun, "LOCAL_RANK": "1", "RANK": "1"})
    assert rank0 == [
        "hydra.run.dir=${paths.log_dir}/${task_name}/runs/" + shared_run_name("torchrun", torchrun)
    ]
    assert rank1[0] == rank0[0]  # the same run dir on every rank
    assert rank1[1:] == [
        "hydra.output_subdir=null",
        "hydra.job_logging.handlers.file.filename=${hydra.runtime.output_dir}/${task_name}_rank1.log",
    ]
    assert launch_overrides(["hydra.run.dir=/x"], torchrun) == []
    named = {**torchrun, "TORCHELASTIC_RUN_ID": "job42"}
    assert launch_overrides([], named) == [
        "hydra.run.dir=${paths.log_dir}/${task_name}/runs/torchrun-job42"
    ]
    srun = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    assert (
        launch_overrides(["-m"], srun)[0]
        == "hydra.sweep.dir=${paths.log_dir}/${task_name}/multiruns/slurm-77.0"
    )
    assert launch_overrides([], srun)[2].endswith("_rank2.log")
    # Lightning's own DDP launcher passes the run dir to the ranks it starts
    spawned = {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0"}
    assert launch_overrides(["hydra.run.dir=/x", "hydra.output_subdir=null"], spawned) == [
        "hydra.job_logging.handlers.file.filename=${hydra.runtime.output_dir}/${task_name}_rank1.log"
    ]
    assert launch_overrides(["debug=fast"], {}) == []
    # a rerun from a run dir's saved config gets the project's Hydra settings
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    assert launch_overrides(["--config-dir", str(tmp_path), "--config-name", "config"], {}) == [
        "+hydra=default"
    ]
    assert (
        launch_overrides([f"--config-dir={tmp_path}", "-cn", "config", "+hydra=default"], {}) == []
    )
