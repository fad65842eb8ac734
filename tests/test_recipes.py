"""conf/recipe (the recipe sweep of bench/README.md section 9): each variant changes exactly the
one thing its name says, and stage 2's lr schedules are the intended ones, wired to the Trainer's
step budget."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.optim import build_lr_scheduler
from tests.conftest import ROOT, compose_config
from tests.test_latent_diffusion import make_autoencoder, make_model, tiny_cfg

# variant -> the config leaves it may change (a prefix covers the leaves under it)
CHANGES = {
    "default": set(),
    "eps_prediction": {"schedule.prediction_type", "model.diffusion.schedule.prediction_type"},
    "uniform_loss": {"model.diffusion.loss_weighting"},
    "cosine_lr": {"model.diffusion.lr_scheduler.schedulers.1"},
}
STEPS = 1750  # the default run's stage 2: 25 epochs of 70 batches


def leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {prefix: node}
    out = {}
    for key, value in items:
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resolved(tmp_path, *overrides: str) -> dict[str, object]:
    return leaves(OmegaConf.to_container(compose_config(list(overrides), tmp_path), resolve=True))


def test_the_recipe_group_is_the_listed_variants():
    assert {p.stem for p in (ROOT / "conf" / "recipe").glob("*.yaml")} == set(CHANGES)


@pytest.mark.parametrize("variant", sorted(CHANGES))
def test_each_recipe_changes_only_what_its_name_says(tmp_path, variant):
    base, changed = resolved(tmp_path), resolved(tmp_path, f"recipe={variant}")
    diff = {k for k in base.keys() | changed.keys() if base.get(k, "<absent>") != changed.get(k)}
    assert all(any(k.startswith(p) for p in CHANGES[variant]) for k in diff), diff
    assert bool(diff) == bool(CHANGES[variant])


def stage2_lrs(tmp_path, *overrides: str) -> tuple[float, list[float]]:
    cfg = compose_config(list(overrides), tmp_path).model.diffusion
    lr = cfg.optimizer.lr
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_lr_scheduler(instantiate(cfg.lr_scheduler), opt, STEPS)
    out = []
    for _ in range(STEPS):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lr, out


def test_default_stage2_lr_is_the_linear_warmup_then_constant(tmp_path):
    lr, lrs = stage2_lrs(tmp_path)
    # bitwise what LinearLR(start_factor=0.01, total_iters=100) alone gave before the SequentialLR
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    old = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=100)
    expected = []
    for _ in range(STEPS):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        old.step()
    assert lrs == expected
    assert lrs[0] == pytest.approx(0.01 * lr) and set(lrs[100:]) == {lr}


def test_cosine_lr_recipe_decays_to_zero_over_the_stage_after_the_same_warmup(tmp_path):
    lr, default = stage2_lrs(tmp_path)
    _, cosine = stage2_lrs(tmp_path, "recipe=cosine_lr")
    assert cosine[:101] == default[:101]
    expected = [
        lr * 0.5 * (1 + math.cos(math.pi * (s - 100) / (STEPS - 100))) for s in range(100, STEPS)
    ]
    assert cosine[100:] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert cosine[-1] < 1e-5 * lr  # the last step is 1 of 1,650 before the end


def test_stage2_cosine_length_comes_from_the_trainers_step_budget(tmp_path):
    cfg = tiny_cfg(tmp_path, "recipe=cosine_lr")
    model = make_model(cfg, make_autoencoder(cfg))
    model._trainer = SimpleNamespace(
        estimated_stepping_batches=300
    )  # what configure_optimizers reads
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    cosine = scheduler._schedulers[1]
    assert isinstance(cosine, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert cosine.T_max == 300 - 100
