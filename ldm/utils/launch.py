"""Hydra overrides that train.py adds before Hydra starts, for launches Hydra alone gets wrong.

- Several processes of one run started by an external launcher (`torchrun`, SLURM `srun`) each
  compose the config, and `${now:...}` in `hydra.run.dir` can differ between them by a second:
  the ranks would write into different run dirs. Unless `hydra.run.dir` is given, the run dir is
  named from what the launcher shares with all ranks: the torchrun rendezvous id
  (`torchrun --rdzv-id=ID` or `--standalone`), else the start time and pid of the torchrun agent
  (one node), or the SLURM job (and step) id, which a requeued job keeps, so
  `ckpt_path=last` finds the checkpoint of the job's earlier attempt.
- Only rank zero writes Hydra's `.hydra/` files; every other rank logs to `<task>_rank<R>.log`
  (Lightning's own DDP launcher already passes `hydra.output_subdir=null` to the ranks it spawns).
- A rerun from a run dir's saved config (`--config-dir RUN/.hydra --config-name config`): that file
  has no defaults list, so the project's Hydra settings (`conf/hydra/default.yaml`: run dirs under
  `logs/`, log file, output-dir check) are added with `+hydra=default`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import yaml


def external_launcher(environ: Mapping[str, str]) -> str | None:
    """`torchrun` or `srun` when this process is one of several that such a launcher started."""
    if "TORCHELASTIC_RUN_ID" in environ and int(environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    if (
        int(environ.get("SLURM_NTASKS", "1")) > 1
        and "SLURM_PROCID" in environ
        and "SLURM_JOB_ID" in environ
    ):
        return "srun"
    return None


def slurm_job_id(environ: Mapping[str, str]) -> str | None:
    """This SLURM job's id as `scontrol` names it (`<array job>_<task>` for an array task), or
    None outside SLURM; a requeued job keeps it. The one place that reads it."""
    if environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return environ.get("SLURM_JOB_ID") or None


def rank_label(environ: Mapping[str, str]) -> str | None:
    """This process's rank as named in its log file; None for rank zero (or a single process).

    Read from the launcher's environment as Lightning reads it: RANK (torchrun), SLURM_PROCID
    (srun), else LOCAL_RANK and NODE_RANK (processes that Lightning's own DDP launcher starts).
    """
    if "RANK" in environ:
        rank = environ["RANK"]
    elif external_launcher(environ) == "srun":
        rank = environ["SLURM_PROCID"]
    else:
        node, local = environ.get("NODE_RANK", "0"), environ.get("LOCAL_RANK", "0")
        rank = local if node == "0" else f"{node}.{local}"
    return None if rank == "0" else rank


def process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of a process, from /proc (Linux); None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def shared_run_name(launcher: str, environ: Mapping[str, str]) -> str:
    """A name every rank of this launch derives alike."""
    if launcher == "srun":
        return f"slurm-{slurm_job_id(environ)}.{environ.get('SLURM_STEP_ID', '0')}"
    run_id = environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id not in ("", "none"):
        return f"torchrun-{run_id}"
    # `torchrun --nproc-per-node=N` on one node: the ranks are children of one agent process.
    agent = os.getppid()
    started = process_start_time(agent) or time.time()
    return f"{datetime.fromtimestamp(started):%Y-%m-%d_%H-%M-%S}-torchrun{agent}"


def has_override(argv: Sequence[str], key: str) -> bool:
    return any(arg.lstrip("+~").split("=", 1)[0] == key for arg in argv)


def option_value(argv: Sequence[str], *names: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` (Hydra's own flags)."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def is_saved_run_config(argv: Sequence[str]) -> bool:
    """`--config-dir D --config-name N` names a config with no defaults list (a run's saved one)."""
    config_dir = option_value(argv, "--config-dir", "-cd")
    config_name = option_value(argv, "--config-name", "-cn")
    if not (config_dir and config_name):
        return False
    path = Path(config_dir) / (
        config_name if config_name.endswith(".yaml") else f"{config_name}.yaml"
    )
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and "defaults" not in config


def launch_overrides(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Overrides to append to `argv` (the command-line arguments after the script name)."""
    extra: list[str] = []
    if is_saved_run_config(argv) and not has_override(argv, "hydra"):
        extra.append("+hydra=default")
    launcher = external_launcher(environ)
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    if launcher is not None:
        name = shared_run_name(launcher, environ)
        if multirun and not has_override(argv, "hydra.sweep.dir"):
            extra.append(f"hydra.sweep.dir=${{paths.log_dir}}/${{task_name}}/multiruns/{name}")
        elif not multirun and not has_override(argv, "hydra.run.dir"):
            extra.append(f"hydra.run.dir=${{paths.log_dir}}/${{task_name}}/runs/{name}")
    rank = rank_label(environ)
    if rank is not None:
        if launcher is not None and not has_override(argv, "hydra.output_subdir"):
            extra.append("hydra.output_subdir=null")
        if not any(arg.lstrip("+").startswith("hydra/job_logging") for arg in argv):
            extra.append(
                f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/${{task_name}}_rank{rank}.log"
            )
    return extra
