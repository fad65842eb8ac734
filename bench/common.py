"""Shared benchmark helpers: machine description, alternating timed runs and medians, peak memory,
project config composition, FID scoring, JSON results and Markdown tables (one copy of each).

The scripts next to this file import it as `common` (run them as `python bench/<script>.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
CONF_DIR = ROOT / "conf"
# Caches shared with training runs (FID classifier, real features), where conf/paths/default.yaml
# puts them.
CACHE_DIR = ROOT / ".cache" / "ldm"
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repo root
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# the benches' tables are ldm's (re-exported for `from common import format_table`)
from ldm.utils.tables import format_table as format_table  # noqa: E402


# ---------------------------------------------------------------------------- command line
def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: --quick, --threads, --seed, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="about a minute on 2 cores: small N, few steps"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: with --clock cpu, CPU time = compute time)",
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default=None,
        help="what seconds mean: cpu = process CPU time (default on CPU), wall (default on CUDA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="folder for the JSON (and plots)"
    )
    return parser


def setup_run(args: argparse.Namespace, device: str = "cpu") -> None:
    """Apply --threads and --seed before any work; --clock defaults to cpu on CPU, wall on CUDA."""
    if args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.clock is None:
        args.clock = "wall" if torch.device(device).type == "cuda" else "cpu"


# ---------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, threads, library versions, GPU, load average now."""
    import diffusers
    import pytorch_lightning

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "git_commit": git_commit(),
        "load_average_start": load_average(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes compete for the cores: read timings with
    it)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------- timing
def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def clock(name: str) -> Callable[[], float]:
    """`wall`: elapsed time; `cpu`: this process's CPU time (all its threads). With one torch
    thread, CPU time is the work's own compute time, hardly affected by other processes competing
    for the cores (a shared machine's wall-clock times swing by 2-4x)."""
    if name not in CLOCKS:
        raise ValueError(f"clock={name!r} is not one of {list(CLOCKS)}")
    return CLOCKS[name]


def timed(
    fn: Callable[[], Any],
    device: str | torch.device = "cpu",
    repeats: int = 1,
    clock_name: str = "wall",
) -> float:
    """Seconds per call of `fn` on `clock_name`, averaged over `repeats` back-to-back calls.

    Not `torch.utils.benchmark.Timer.timeit`, which times the same synchronised loop but first
    runs max(repeats // 100, 2) untimed warm-up calls on every measurement (its autorange methods
    add block-sizing calls): the benches time one multi-second step per ABBA round, so that would
    triple their run time. They warm up once, before the rounds, instead."""
    now = clock(clock_name)
    synchronize(device)
    start = now()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (now() - start) / repeats


def alternate(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every run once per round, in ABBA order (forward, then reversed, ...), so slow drifts of
    the machine's load hit every run alike. Each call returns its own measurement (seconds)."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(runs[name]())
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (paired by round, so load spikes
    cancel)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            f"need equally many paired times, got {len(numerator)} and {len(denominator)}"
        )
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])


def spread(values: Sequence[float]) -> str:
    """`min..max` of a list of seconds, for the JSON (how noisy the rounds were)."""
    return f"{min(values):.4g}..{max(values):.4g}"


# ---------------------------------------------------------------------------- model steps
class ModelSteps:
    """The two timed steps of a denoiser on fixed inputs: `train_step` (forward, MSE to `eps`,
    backward, optimizer step) and `sample_step` (one forward without gradients = one denoising
    step).

    `call(model, x_t, t, labels) -> prediction` adapts the model's signature; `inputs` holds
    "x" (B, C, H, W), "t" (B,), "y" (B,) and "eps" (B, C, H, W). `dtype="bf16"` runs under autocast;
    `channels_last` converts weights and x; `compile` wraps the model in torch.compile.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        call: Callable[..., torch.Tensor],
        optimizer: torch.optim.Optimizer,
        inputs: dict[str, torch.Tensor],
        device: str = "cpu",
        dtype: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ):
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype={dtype!r} is not one of fp32, bf16")
        self.model, self.call, self.optimizer = model, call, optimizer
        self.inputs = dict(inputs)
        if channels_last:
            model.to(memory_format=torch.channels_last)
            self.inputs["x"] = self.inputs["x"].contiguous(memory_format=torch.channels_last)
        self.forward = torch.compile(model) if compile else model
        self.device, self.dtype = device, dtype

    def autocast(self) -> Any:
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def train_step(self) -> None:
        x, t, y, eps = (self.inputs[k] for k in ("x", "t", "y", "eps"))
        self.model.train()
        with self.autocast():
            pred = self.call(self.forward, x, t, y)  # (B, C, H, W)
        loss = F.mse_loss(pred.float(), eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def sample_step(self) -> None:
        self.model.eval()
        with self.autocast():
            self.call(self.forward, self.inputs["x"], self.inputs["t"], self.inputs["y"])

    def flops_per_image(self) -> tuple[float, float]:
        """(forward, forward + backward) FLOPs per image, counted on the eager model by
        `count_flops` (convolutions, matmuls, attention, on any device)."""
        x, t, y, eps = (self.inputs[k] for k in ("x", "t", "y", "eps"))
        with torch.no_grad():
            fwd = count_flops(lambda: self.call(self.model, x, t, y))
        train = count_flops(
            lambda: F.mse_loss(self.call(self.model, x, t, y).float(), eps).backward()
        )
        self.model.zero_grad(set_to_none=True)
        return fwd / len(x), train / len(x)


# ---------------------------------------------------------------------------- FLOP counting
def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def cpu_attention_flop_mapping() -> dict[Any, Callable[..., int]]:
    """Formulas for the CPU kernels of F.scaled_dot_product_attention, which FlopCounterMode's
    registry lacks (torch 2.14 counts the CUDA flash / efficient / cuDNN kernels only, so on CPU
    the attention products count 0): the same sdpa formulas it uses for the CUDA kernels
    (4 B nh N M d forward, 2x that backward, plus the recomputed scores)."""
    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}  # FlopCounterMode passes the formulas shapes
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            _cpu_sdpa_backward_flops
        )
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of running `fn()` (multiply-adds count 2), by torch.utils.flop_counter.FlopCounterMode
    with the CPU attention kernels added (`cpu_attention_flop_mapping`). Counted: convolutions,
    matmuls (linear, bmm, addmm), attention; not counted: elementwise ops, norms, softmax alone."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as counter:
        fn()
    return counter.get_total_flops()


def conv2d_flops(
    batch: int, c_in: int, c_out: int, h_out: int, w_out: int, kernel: int, groups: int = 1
) -> int:
    """Hand count of a Conv2d forward: 2 x (multiply-adds) = 2 B C_out H_out W_out (C_in / g) k^2
    (the bias add is not counted, as FlopCounterMode does not)."""
    return 2 * batch * c_out * h_out * w_out * (c_in // groups) * kernel * kernel


def linear_flops(rows: int, d_in: int, d_out: int) -> int:
    """Hand count of y = x W^T (+ b) over `rows` rows: 2 rows d_in d_out."""
    return 2 * rows * d_in * d_out


def attention_flops(batch: int, heads: int, tokens: int, head_dim: int) -> int:
    """Hand count of softmax(Q K^T / sqrt(d)) V forward: Q K^T and (scores) V are each
    2 B nh N^2 d (the softmax is not counted)."""
    return 2 * (2 * batch * heads * tokens * tokens * head_dim)


def denoiser_inputs(
    shape: tuple[int, ...], num_classes: int | None, device: str, seed: int
) -> dict[str, torch.Tensor]:
    """Seeded x_t (B, C, H, W), t (B,), labels (B,) and eps target (B, C, H, W) on `device`."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(shape, generator=g).to(device),
        "t": torch.randint(0, 1000, (shape[0],), generator=g).to(device),
        "y": torch.randint(0, num_classes or 1, (shape[0],), generator=g).to(device),
        "eps": torch.randn(shape, generator=g).to(device),
    }


def call_ours(
    model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return model(x, t, y)


def call_diffusers(
    model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return model(x, t, class_labels=y).sample


# ---------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _rss_worker(fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    try:
        # Reset the high-water mark to the current RSS (Linux clear_refs "5"), so transient peaks
        # of the imports do not hide the work's peak; ru_maxrss cannot be reset.
        Path("/proc/self/clear_refs").write_text("5")
        baseline, peak_field = _status_kib("VmRSS"), "VmHWM"
    except OSError:
        baseline, peak_field = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, None
    try:
        result = fn(*args)
        peak = (
            _status_kib(peak_field)
            if peak_field
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        queue.put(("ok", (peak - baseline) / 1024.0, result))  # KiB -> MiB
    except Exception as err:  # reported to the parent, which raises it
        queue.put(("error", repr(err), None))


def peak_rss_mib(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(peak resident memory in MiB that `fn(*args)` added, its return value), measured in a fresh
    spawned process: its high-water mark (VmHWM, reset to the current RSS just before `fn`; else
    the ru_maxrss growth) minus the RSS before `fn`. `fn` must be a module-level function."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_worker, args=(fn, args, queue))
    proc.start()
    status, value, result = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement of {getattr(fn, '__name__', fn)} failed: {value}")
    return value, result


# ---------------------------------------------------------------------------- project config
def compose_project_config(overrides: Sequence[str], workdir: Path) -> Any:
    """conf/train.yaml composed with `overrides` the way train.py composes it, with outputs under
    `workdir` and the shared cache dir (FID classifier, real features) of the repository."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the task sees `hydra` only through HydraConfig
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(workdir / "run")
        cfg.paths.log_dir = str(workdir / "logs")
        cfg.paths.cache_dir = str(CACHE_DIR)
    return cfg


def newest_checkpoint(output_dir: Path, stage: str) -> Path:
    """The checkpoint ldm.train.run left for `stage`: last.ckpt, else final.ckpt, else the
    newest."""
    folder = Path(output_dir) / "checkpoints" / stage
    for name in ("last.ckpt", "final.ckpt"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {stage} checkpoint under {folder}")
    return found[-1]


def train_with_project(overrides: Sequence[str], workdir: Path) -> tuple[Any, float]:
    """Run `ldm.train.run` (the `python train.py` path) with `overrides`; returns (cfg, seconds)."""
    from ldm.train import run

    cfg = compose_project_config(overrides, workdir)
    start = time.perf_counter()
    run(cfg)
    return cfg, time.perf_counter() - start


def diffusion_preset(
    name: str, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(UNet kwargs, optimizer config) of conf/model/diffusion/<name>.yaml as the project resolves
    them for the default data (MNIST-5k, KL f=4: 8x8x4 latents, 10 classes)."""
    import tempfile

    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_project_config([f"model/diffusion={name}", *overrides], Path(tmp))
        unet = OmegaConf.to_container(cfg.model.diffusion.unet, resolve=True)
        optimizer = OmegaConf.to_container(cfg.model.diffusion.optimizer, resolve=True)
    unet.pop("_target_")
    return unet, optimizer


def diffusers_twin(unet_kwargs: dict[str, Any], sample_size: int) -> torch.nn.Module:
    """diffusers' UNet2DModel with the structure of our UNet(**unet_kwargs): same widths per level,
    ResBlocks per level (one more on the way up), attention at the same levels and in the middle,
    same heads, GroupNorm groups, scale-shift (AdaGN) time conditioning, dropout, and a class
    embedding with the same rows (num_classes + 1, the null class included)."""
    from diffusers import UNet2DModel

    mc, mult = unet_kwargs["model_channels"], list(unet_kwargs["channel_mult"])
    attn, heads = list(unet_kwargs["attention_levels"]), unet_kwargs["num_heads"]
    widths = [mc * m for m in mult]
    head_dims = {widths[i] // heads for i in attn} | {widths[-1] // heads}
    if len(head_dims) != 1:
        raise ValueError(
            f"attention widths {sorted(head_dims)} per head differ; "
            "UNet2DModel has one attention_head_dim"
        )
    num_classes = unet_kwargs.get("num_classes")
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=unet_kwargs["in_channels"],
        out_channels=unet_kwargs["out_channels"],
        block_out_channels=tuple(widths),
        layers_per_block=unet_kwargs["num_res_blocks"],
        down_block_types=tuple(
            "AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(mult))
        ),
        up_block_types=tuple(
            "AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(mult)))
        ),
        attention_head_dim=head_dims.pop(),
        norm_num_groups=unet_kwargs.get("norm_num_groups", 32),
        resnet_time_scale_shift="scale_shift",
        dropout=unet_kwargs.get("dropout", 0.0),
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------- FID
class FIDScorer:
    """FID/KID/CAS of generated images against the MNIST-5k train split with the project's own
    classifier features (ldm.metrics.fid: build_extractor + compute_metrics; offline). The
    classifier and the real features are cached in the repository's .cache/ldm like training
    runs."""

    def __init__(self, datamodule: Any, classifier_settings: dict[str, Any] | None = None):
        from ldm.metrics.fid import build_extractor, real_features_path

        datamodule.setup("fit")
        settings = dict(classifier_settings or {})  # conf/fid/classifier.yaml's `classifier` keys
        self.extractor, self.classifier = build_extractor(
            "classifier", datamodule, CACHE_DIR, classifier=settings
        )
        self.reals = datamodule.train_dataset
        self.real_cache = real_features_path(CACHE_DIR, datamodule.fingerprint(), self.extractor)
        self.describe = {
            "extractor": self.extractor.cache_key,
            "feature_dim": int(self.extractor.num_features),
            "reals": f"{datamodule.name} train split ({len(self.reals)} images)",
            "classifier": settings or "ldm.metrics defaults",
        }

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        from ldm.metrics.fid import compute_metrics

        bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
        if bad:  # NaN features crash LAPACK inside the FID's matrix square root
            raise ValueError(
                f"{bad} of {len(images)} generated images hold NaN/inf; FID is undefined"
            )
        scores = compute_metrics(
            images,
            self.reals,
            self.extractor,
            fake_labels=labels,
            classifier=self.classifier,
            real_cache=self.real_cache,
        )
        from ldm.metrics.nfe_sweep import SCORE_COLUMNS

        keys = [key for key, _ in SCORE_COLUMNS] + ["num_samples"]
        return {k: scores[k] for k in keys if k in scores}

    def real_floor(self, datamodule: Any, n: int) -> dict[str, float]:
        """Scores of `n` held-out real images (the val split) as if generated: the best FID
        reachable at this N, to read the generated scores against (small N biases FID upwards)."""
        from ldm.metrics.train_classifier import collect_images

        images, labels = collect_images(datamodule.val_dataset)
        return self(images[:n], labels[:n] if labels is not None else None)


@torch.no_grad()
def sample_latent_model(
    model: Any,
    sampler: Any,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    clock_name: str = "wall",
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """Images (N, C, H, W) in [-1, 1] from a LatentDiffusion with `sampler` for `labels` (N,), one
    seeded CPU generator for all batches, and the seconds (on `clock_name`) it took, decoding
    included. Guidance at `guidance_scale` within the model's own guidance interval."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    out = []
    now = clock(clock_name)
    start = now()
    for i in range(0, n, batch_size):
        batch = labels[i : i + batch_size].to(model.device)
        out.append(
            model.sample(
                len(batch),
                class_labels=batch,
                generator=generator,
                sampler=sampler,
                guidance_scale=guidance_scale,
            ).cpu()
        )
    synchronize(model.device)
    return torch.cat(out), now() - start


# ---------------------------------------------------------------------------- output
def write_results(
    script: str, quick: bool, payload: dict[str, Any], out_dir: Path = RESULTS_DIR
) -> Path:
    """Write `<out_dir>/<script>[_quick].json` (machine info gets the load average at the end)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = payload.get("machine")
    if isinstance(machine, dict):
        machine["load_average_end"] = load_average()
        machine["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    path = out_dir / f"{script}{'_quick' if quick else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps({"script": script, "mode": "quick" if quick else "full", **payload}, indent=2)
        + "\n"
    )
    os.replace(tmp, path)
    return path
