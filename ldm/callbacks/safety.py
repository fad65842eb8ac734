"""Training safety: stop (or skip) on non-finite losses and gradients, never save non-finite
weights, and write checkpoints atomically so a crash mid-write cannot replace a good
`last.ckpt`."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.nn.utils import get_total_norm

from ldm.utils.checkpoint import atomic_write, read_torch_file
from ldm.utils.errors import UserError

log = logging.getLogger(__name__)

ADVICE = (
    "lower the learning rate, clip gradients (model.autoencoder.grad_clip for stage 1, "
    "stage_trainer.diffusion.gradient_clip_val for stage 2), or set "
    "callbacks.common.nonfinite.skip_nonfinite=true to skip such steps"
)


class NonFiniteError(UserError):
    """Training produced a NaN/inf loss, gradient or weight; the message says where and what to
    do."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no element of `tensors` is NaN or inf (one reduction and one host sync).

    The max-abs norm cannot overflow for finite inputs, and NaN propagates through it.
    """
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    return not floats or bool(torch.isfinite(get_total_norm(floats, norm_type=float("inf"))))


def uses_grad_scaler(trainer: pl.Trainer) -> bool:
    """fp16 mixed precision: the GradScaler skips inf/NaN steps itself and then lowers the scale."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


class NonFiniteGuard(pl.Callback):
    """Detects non-finite losses and gradients; stops training (default) or skips those steps.

    - Gradients are checked in `on_before_optimizer_step`, i.e. after backward (and after DDP's
      all-reduce, so every rank decides alike) and before the optimizer touches the weights. This
      also covers manual optimization (the autoencoder's GAN steps): Lightning calls the hook inside
      `optimizer.step()` of `self.optimizers()`.
    - Stop (default): raise `NonFiniteError` before the update. The weights stay the last finite
      ones and no checkpoint is written on the way out, so the newest checkpoint is a good one.
    - `skip_nonfinite=True`: set the gradients to None, which torch optimizers treat as "no update"
      for those parameters (Adam's moments and step count stay untouched); count the step and log
      `train/nonfinite_skipped`. More than `max_consecutive_skips` in a row means the run diverged:
      it stops then. Buffers updated in the forward pass (BatchNorm running stats) are not undone;
      the checkpoint check below catches them.
    - Under fp16 mixed precision the GradScaler owns non-finite gradients (it skips the step and
      lowers the scale), so only the unscaled training loss is checked, in `on_train_batch_end`.
    - `on_save_checkpoint`: a state_dict with a non-finite tensor is refused, so `last.ckpt` is
      never overwritten with NaN weights.
    """

    def __init__(self, skip_nonfinite: bool = False, max_consecutive_skips: int = 20):
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips} must be >= 1")
        self.skip_nonfinite = skip_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.num_skipped = 0
        self.consecutive = 0
        self.batch_idx = 0
        self.batch_flagged = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_idx, self.batch_flagged = batch_idx, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if uses_grad_scaler(trainer):
            return
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if all_finite([p.grad for p in params]):
            self.consecutive = 0
            return
        names = {p: n for n, p in pl_module.named_parameters()}
        bad = [names.get(p, "?") for p in params if not torch.isfinite(p.grad).all()]
        self.flag(
            trainer, f"gradients in {len(bad)} of {len(params)} parameter tensors (first: {bad[0]})"
        )
        for p in params:  # reached only when skipping: no update from this step
            p.grad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not self.batch_flagged and torch.is_tensor(loss):
            local_bad = bad = not all_finite([loss])
            if trainer.world_size > 1:  # losses differ per rank; all ranks must stop or skip alike
                bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
            if bad:
                self.flag(
                    trainer,
                    f"training loss ({loss.item():.4g})"
                    if local_bad
                    else "training loss on another rank",
                )
        if self.skip_nonfinite:
            pl_module.log(
                "train/nonfinite_skipped", float(self.num_skipped), on_step=True, on_epoch=False
            )

    def flag(self, trainer: pl.Trainer, what: str) -> None:
        """Stop with a clear message, or count a skipped step (at most once per batch)."""
        where = (
            f"at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {self.batch_idx})"
        )
        if not self.skip_nonfinite:
            raise NonFiniteError(
                f"non-finite {what} {where}; training stopped before applying it (checkpoints "
                f"written so far hold finite weights); {ADVICE}"
            )
        if not self.batch_flagged:
            self.num_skipped += 1
            self.consecutive += 1
        self.batch_flagged = True
        log.warning(
            "skipped a step with non-finite %s %s (%d skipped so far)",
            what,
            where,
            self.num_skipped,
        )
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive} non-finite steps in a row {where} (limit "
                f"max_consecutive_skips={self.max_consecutive_skips}): training diverged; {ADVICE}"
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        if all_finite(list(state.values())):
            return
        bad = next(
            k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
        )
        raise NonFiniteError(
            f"refusing to save a checkpoint at global step {trainer.global_step}: "
            f"state_dict[{bad!r}] "
            f"holds NaN/inf; the existing checkpoints are untouched; {ADVICE}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"num_skipped": self.num_skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_skipped = int(state_dict.get("num_skipped", 0))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that either complete or leave the previous file untouched.

    Streams `torch.save` into a temp file in the target's own directory, then fsync + rename
    (`ldm.utils.checkpoint.atomic_write`). Lightning's default stages the bytes in memory, then in
    the system temp dir; moving that across filesystems is a copy a crash can leave half-done.
    Reading uses `torch.load(weights_only=True)`, so resuming from a foreign checkpoint cannot run
    pickled code. Remote (fsspec URL) paths fall back to Lightning's own writer.

    Use: `Trainer(plugins=[AtomicCheckpointIO()])` (conf/trainer/default.yaml does).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_torch_file(path, what="checkpoint")
