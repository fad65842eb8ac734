"""Latent cache: stage-2 epoch time with images encoded on the fly vs latents read from the cache.

Same LatentDiffusion (the project's small preset, identical initial weights for every run), same
data (MNIST-5k train split, batch 128) and the same Lightning Trainer settings (no validation,
logging or checkpoints): one epoch per run, the two variants alternating (ABBA), medians on
--clock. The stage-1 autoencoder is the project's KL config: `--autoencoder-ckpt`, or a freshly
initialised one (the encoder's cost does not depend on its weights). The one-off cache build
(encoding the whole dataset once) is timed separately; break-even = build / (saving per epoch).

    python bench/latent_cache.py --quick
    python bench/latent_cache.py [--autoencoder-ckpt PATH]
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from common import (
    alternate,
    base_parser,
    clock,
    compose_project_config,
    format_table,
    machine_info,
    median,
    median_ratio,
    setup_run,
    spread,
    write_results,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf


class EpochTimer(pl.Callback):
    """Seconds (on `clock_name`) of every training epoch, from its first batch fetch to its end."""

    def __init__(self, clock_name: str):
        self.now, self.seconds, self.start = clock(clock_name), [], 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.now()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(self.now() - self.start)


def one_epoch(model: pl.LightningModule, datamodule: Any, args: Any) -> float:
    """Seconds of one training epoch of a fresh copy of `model` on `datamodule`."""
    timer = EpochTimer(args.clock)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=args.limit_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    pl.seed_everything(args.seed, verbose=False)
    trainer.fit(copy.deepcopy(model), datamodule=datamodule)
    return timer.seconds[0]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--autoencoder-ckpt",
        default=None,
        help="stage-1 checkpoint (default: fresh KL autoencoder)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="epochs per variant")
    parser.add_argument(
        "--limit-batches", type=int, default=None, help="batches per epoch (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    setup_run(args)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.limit_batches = args.limit_batches or (8 if args.quick else None)
    machine = machine_info("cpu")

    from ldm.data.latent_cache import latent_cache_datamodule
    from ldm.models.loading import load_autoencoder
    from ldm.train import DIFFUSION_RUN_KEYS, use_autoencoder_config

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cfg = compose_project_config(
            ["model/diffusion=small", f"data.batch_size={args.batch_size}", f"seed={args.seed}"],
            workdir,
        )
        if args.autoencoder_ckpt:
            ae_ckpt = Path(args.autoencoder_ckpt)
            autoencoder, ae_config = load_autoencoder(ae_ckpt)
            use_autoencoder_config(cfg, ae_config)
        else:
            torch.manual_seed(args.seed)
            autoencoder = instantiate(cfg.model.autoencoder).eval().requires_grad_(False)
            ae_ckpt = (
                workdir / "autoencoder_weights.pt"
            )  # only names the cache (its sha256 is the key)
            torch.save(autoencoder.state_dict(), ae_ckpt)
        diffusion_cfg = OmegaConf.to_container(cfg.model.diffusion, resolve=True)
        torch.manual_seed(args.seed)
        model = instantiate(
            {k: v for k, v in diffusion_cfg.items() if k not in DIFFUSION_RUN_KEYS},
            autoencoder=autoencoder,
        )
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")

        now = clock(args.clock)
        start = now()
        cached = latent_cache_datamodule(autoencoder, ae_ckpt, datamodule, workdir / "latents")
        build_s = now() - start
        cached.setup("fit")
        print(
            f"cache built in {build_s:.2f} s ({args.clock}) for {len(cached.full_dataset)} images",
            flush=True,
        )

        batches = len(datamodule.train_dataloader())
        batches = min(batches, args.limit_batches) if args.limit_batches else batches
        times = alternate(
            {
                "on the fly": lambda: one_epoch(model, datamodule, args),
                "latent cache": lambda: one_epoch(model, cached, args),
            },
            args.rounds,
        )

    fly, cache = median(times["on the fly"]), median(times["latent cache"])
    rows = [
        {
            "variant": name,
            "epoch_s": median(t),
            "epoch_s_spread": spread(t),
            "batches": batches,
            "img_s": batches * args.batch_size / median(t),
        }
        for name, t in times.items()
    ]
    speedup = median_ratio(times["on the fly"], times["latent cache"])
    saving = fly - cache
    summary = {
        "speedup": speedup,
        "cache_build_s": build_s,
        "break_even_epochs": build_s / saving if saving > 0 else None,
    }
    table = format_table(
        rows,
        [
            ("variant", "stage-2 data"),
            ("batches", "batches/epoch"),
            ("epoch_s", f"epoch s ({args.clock})"),
            ("img_s", f"img/s ({args.clock})"),
        ],
    )
    print(table)
    print(summary)
    path = write_results(
        "latent_cache",
        args.quick,
        {
            "machine": machine,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model": "conf/model/diffusion/small.yaml + conf/model/autoencoder/kl.yaml"
            + (
                f" ({args.autoencoder_ckpt})" if args.autoencoder_ckpt else " (freshly initialised)"
            ),
            "rows": rows,
            "epoch_s_rounds": times,
            "summary": summary,
            "table": table,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
