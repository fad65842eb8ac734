"""Numerical faults: a NaN injected by a forward hook stops training cleanly or is skipped and
counted."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ldm.callbacks.safety import AtomicCheckpointIO, NonFiniteError, NonFiniteGuard
from ldm.utils.checkpoint import read_torch_file
from tests.conftest import CONF_DIR


class Tiny(pl.LightningModule):
    """A 4 -> 1 regression; `manual=True` steps its optimizer itself like the GAN autoencoder."""

    def __init__(self, manual: bool = False, batchnorm: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm1d(4) if batchnorm else nn.Identity()
        self.net = nn.Linear(4, 1)
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(self.bn(x)) - y) ** 2).mean()
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def inject_nan(module: nn.Module, at_calls: set[int], into: str = "output") -> None:
    """Test hook: the module's output (or input) becomes NaN on the given forward calls
    (0-based)."""
    calls = {"n": 0}

    def poison(x: torch.Tensor) -> torch.Tensor:
        n, calls["n"] = calls["n"], calls["n"] + 1
        return x * float("nan") if n in at_calls else x

    if into == "output":
        module.register_forward_hook(lambda mod, args, output: poison(output))
    else:
        module.register_forward_pre_hook(lambda mod, args: (poison(args[0]),))


class WeightLog(pl.Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.net.weight.detach().clone())


def fit(model, tmp_path, callbacks, max_steps=6):
    data = TensorDataset(
        torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.randn(32, 1)
    )
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, ckpt],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    return trainer


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_nan_stops_training_and_last_checkpoint_stays_good(tmp_path, manual):
    model = Tiny(manual=manual)
    inject_nan(model.net, {3})
    with pytest.raises(NonFiniteError) as err:
        fit(model, tmp_path, [NonFiniteGuard()])
    message = str(err.value)
    assert "\n" not in message and "non-finite gradients" in message and "batch 3" in message
    assert (
        "(first: net.weight)" in message
        and "callbacks.common.nonfinite.skip_nonfinite=true" in message
    )
    last = read_torch_file(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 3  # written after batch 2, the last finite step
    assert torch.isfinite(last["state_dict"]["net.weight"]).all()
    # the update from the NaN batch never happened: the live weights are the checkpointed ones
    assert torch.equal(last["state_dict"]["net.weight"], model.net.weight.detach())
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))


def test_without_the_guard_nan_weights_reach_last_checkpoint(tmp_path):
    """Control: the injected fault is real; unguarded, Lightning saves NaN weights as last.ckpt."""
    model = Tiny()
    inject_nan(model.net, {3})
    fit(model, tmp_path, [])
    last = read_torch_file(tmp_path / "ckpt" / "last.ckpt")
    assert torch.isnan(last["state_dict"]["net.weight"]).all()


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_skip_nonfinite_skips_and_counts(tmp_path, manual):
    model, weights, guard = Tiny(manual=manual), WeightLog(), NonFiniteGuard(skip_nonfinite=True)
    inject_nan(model.net, {2, 3})
    trainer = fit(model, tmp_path, [guard, weights])
    assert guard.num_skipped == 2
    assert trainer.callback_metrics["train/nonfinite_skipped"].item() == 2.0
    assert trainer.global_step == 6
    w = weights.weights
    assert torch.equal(w[2], w[1]) and torch.equal(w[3], w[1])  # skipped: no update at all
    assert not torch.equal(w[4], w[3]) and torch.isfinite(w[5]).all()  # training went on
    last = read_torch_file(tmp_path / "ckpt" / "last.ckpt")
    assert torch.isfinite(last["state_dict"]["net.weight"]).all()
    assert last["callbacks"]["NonFiniteGuard"]["num_skipped"] == 2


def test_skip_nonfinite_gives_up_after_consecutive_limit(tmp_path):
    model = Tiny()
    inject_nan(model.net, set(range(1, 100)))
    with pytest.raises(
        NonFiniteError, match=r"4 non-finite steps in a row .* max_consecutive_skips=3"
    ):
        fit(
            model,
            tmp_path,
            [NonFiniteGuard(skip_nonfinite=True, max_consecutive_skips=3)],
            max_steps=8,
        )


def test_nan_loss_without_gradient_path_is_caught(tmp_path):
    """A NaN that reaches the loss but not the gradients (a logged term added as a constant)."""

    class NanTerm(Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + (float("nan") if batch_idx == 2 else 0.0)

    with pytest.raises(NonFiniteError, match=r"non-finite training loss \(nan\) .* batch 2"):
        fit(NanTerm(), tmp_path, [NonFiniteGuard()])


def test_nonfinite_buffer_is_never_saved(tmp_path):
    """Skipping the step cannot undo BatchNorm statistics updated by a NaN batch: the save is
    refused."""
    model = Tiny(batchnorm=True)
    inject_nan(model.bn, {3}, into="input")
    with pytest.raises(NonFiniteError, match=r"refusing to save .*state_dict\['bn.running_mean'\]"):
        fit(model, tmp_path, [NonFiniteGuard(skip_nonfinite=True)])
    last = read_torch_file(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 3
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )


def test_trainer_config_clips_gradients_and_writes_atomically(tmp_path):
    cfg = OmegaConf.load(CONF_DIR / "trainer" / "default.yaml")
    cfg.default_root_dir, cfg.accelerator, cfg.gradient_clip_val = str(tmp_path), "cpu", 0.5
    trainer = hydra.utils.instantiate(cfg, logger=False)
    assert trainer.gradient_clip_val == 0.5
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class NanOnRank1(Tiny):
    """NaN on one DDP rank only: in the loss with a gradient path (`grad`) or as a constant term."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 2 and self.global_rank == 1:
            loss = loss * float("nan") if self.kind == "grad" else loss + float("nan")
        return loss


@pytest.mark.parametrize("kind", ["grad", "constant"])
def test_ddp_all_ranks_stop_together(tmp_path, kind):
    """A NaN on one rank must stop every rank (no rank left waiting in a collective)."""
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NonFiniteGuard()],
        enable_checkpointing=False,
    )
    what = (
        r"gradients in 2 of 2 parameter tensors \(first: net.weight\)"
        if kind == "grad"
        else "training loss"
    )
    with pytest.raises(
        Exception,
        match=rf"NonFiniteError: non-finite {what}.* at global step \d \(epoch 0, batch 2\)",
    ):
        trainer.fit(NanOnRank1(kind), DataLoader(data, batch_size=4))
