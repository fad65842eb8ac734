"""The config contract in code: the resolvers conf/ uses, each stage's Trainer and data args.

`trainer` and `data` are shared by both stages; `autoencoder.{trainer,data}` and
`diffusion.{trainer,data}` refine them for one stage (conf/train.yaml). A stage's own default
budget applies only where the shared key is unset, so `trainer.max_epochs=2` sets both stages,
`diffusion.trainer.max_epochs=2` one, and neither is ever silently outranked.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

STAGES = ("autoencoder", "diffusion")


def ifnull(value: Any, default: Any) -> Any:
    """`${ifnull:${data.batch_size},32}`: the shared value when set, else this stage's default."""
    return default if value is None else value


def epoch_budget(max_epochs: int | None, max_steps: int | None, default: int) -> int:
    """A stage's max_epochs: the shared `trainer.max_epochs` when set; -1 (no epoch limit) when a
    step budget is given instead, so `trainer.max_steps=N` trains exactly N steps; else
    `default`."""
    if max_epochs is not None:
        return max_epochs
    if max_steps is not None and max_steps != -1:
        return -1
    return default


def launch_dir() -> str:
    """`${ldm.launch_dir:}` (paths.root_dir): the directory train.py / sample.py was started in.
    Hydra's `runtime.cwd` once Hydra has set it (every job, including those a launcher runs on
    another node), else the current directory: the multirun sweeper resolves `hydra.sweep.dir`
    before any job, where `${hydra:runtime.cwd}` fails ("HydraConfig was not set"); Hydra sets
    runtime.cwd to that same os.getcwd() at start-up."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.cwd
    return os.getcwd()


def register_resolvers() -> None:
    for name, fn in (
        ("ifnull", ifnull),
        ("epoch_budget", epoch_budget),
        ("ldm.launch_dir", launch_dir),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def stage_section(cfg: DictConfig, stage: str, section: str) -> dict[str, Any]:
    """`trainer` or `data` for one stage: the shared section with `<stage>.<section>` merged over
    it, resolved to plain values (what that stage's Trainer / data module is built from)."""
    shared = OmegaConf.select(cfg, section)
    own = OmegaConf.select(cfg, f"{stage}.{section}")
    merged = OmegaConf.merge(
        OmegaConf.to_container(shared, resolve=True) if shared is not None else {},
        OmegaConf.to_container(own, resolve=True) if own is not None else {},
    )
    return OmegaConf.to_container(merged, resolve=True)
