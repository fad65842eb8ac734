"""UNet throughput: our UNet vs diffusers' UNet2DModel of the same structure, training and sampling.

Training images/s = batch / (forward + MSE on eps + backward + optimizer step); sampling images/s =
batch / (one forward without gradients, i.e. one denoising step). Both models get identical inputs
(x_t, t, class labels; the same eps target), are class-conditional with the same embedding rows,
and are timed in alternating rounds (ABBA order); the ratios are medians of per-round ratios.

Variants:
- `ours`: the project's defaults, i.e. conf/model/diffusion/<preset>.yaml's UNet and optimizer
  (AdamW with `fused: true`);
- `ours_foreach`: the same UNet with torch's default AdamW (foreach): our architecture alone;
- `diffusers`: UNet2DModel as `bench.common.diffusers_twin` builds it, torch's default AdamW (what
  a diffusers user gets), same learning rate.
Peak memory: on CPU the ru_maxrss growth of a fresh process per (model, mode); on CUDA
torch.cuda.max_memory_allocated. FLOPs per image are counted with torch.utils.flop_counter
(forward; forward + backward for training; `common.count_flops`, which adds the CPU attention
kernels FlopCounterMode leaves at 0); MFU = train FLOPs/image x images/s / --peak-tflops.
Measured GEMM peak: a square matmul (--gemm-size, the run's dtype, threads and clock) is timed in
the same alternating rounds as the models, so load drifts hit it alike; each row reports its train
and sample FLOP/s as a fraction of that measured peak (`train / GEMM`, `sample / GEMM`).

    python bench/unet_throughput.py --quick
    python bench/unet_throughput.py                      # CPU full mode
    python bench/unet_throughput.py --device cuda --dtype bf16 --peak-tflops 989 --presets base
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from common import (
    ModelSteps,
    alternate,
    base_parser,
    call_diffusers,
    call_ours,
    denoiser_inputs,
    diffusers_twin,
    diffusion_preset,
    format_table,
    machine_info,
    median,
    median_ratio,
    num_params,
    peak_rss_mib,
    setup_run,
    spread,
    synchronize,
    timed,
    write_results,
)
from diffusers import UNet2DModel  # noqa: F401  (imported before the memory baseline in children)

from ldm.modules.unet import UNet

VARIANTS = ("ours", "ours_foreach", "diffusers")
LATENT_SIZE = 8  # MNIST-5k 32x32 at f=4, the project default


class Gemm:
    """C = A B for n x n matrices in the bench's dtype on its device: 2 n^3 FLOPs per `step`,
    the reference for what this machine's matmul kernels reach with these threads."""

    def __init__(self, n: int, device: str, dtype: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.a, self.b = (torch.randn(n, n, generator=g).to(device, torch_dtype) for _ in "ab")
        self.c = torch.empty_like(self.a)
        self.flops = 2 * n**3

    def step(self) -> None:
        torch.mm(self.a, self.b, out=self.c)


def build_optimizer(
    variant: str, params: Any, optimizer_cfg: dict[str, Any]
) -> torch.optim.Optimizer:
    """ours: the configured optimizer as the project instantiates it; the others: torch's default
    AdamW implementation (foreach) with the same learning rate and weight decay."""
    from hydra.utils import instantiate

    if variant == "ours":
        return instantiate(optimizer_cfg)(params)
    if optimizer_cfg["_target_"] != "torch.optim.AdamW":
        raise ValueError(
            f"optimizer {optimizer_cfg['_target_']!r}: the comparison assumes torch.optim.AdamW"
        )
    return torch.optim.AdamW(
        params, lr=optimizer_cfg["lr"], weight_decay=optimizer_cfg.get("weight_decay", 0.0)
    )


def build(
    variant: str, unet_kwargs: dict[str, Any], optimizer_cfg: dict[str, Any], batch: int, args: Any
) -> ModelSteps:
    """One variant (seeded weights) with its optimizer on the shared, seeded inputs."""
    torch.manual_seed(args.seed)
    if variant.startswith("ours"):
        model, call = UNet(**unet_kwargs), call_ours
    else:
        model, call = diffusers_twin(unet_kwargs, LATENT_SIZE), call_diffusers
    model.to(args.device)
    shape = (batch, unet_kwargs["in_channels"], LATENT_SIZE, LATENT_SIZE)
    inputs = denoiser_inputs(shape, unet_kwargs["num_classes"], args.device, args.seed)
    optimizer = build_optimizer(variant, model.parameters(), optimizer_cfg)
    return ModelSteps(
        model, call, optimizer, inputs, args.device, args.dtype, args.channels_last, args.compile
    )


def memory_probe(
    variant: str,
    unet_kwargs: dict[str, Any],
    optimizer_cfg: dict[str, Any],
    batch: int,
    mode: str,
    args: Any,
) -> None:
    """Run in a fresh process by peak_rss_mib: build one variant and run two steps of `mode`."""
    torch.set_num_threads(args.threads)
    bench = build(variant, unet_kwargs, optimizer_cfg, batch, args)
    step = bench.train_step if mode == "train" else bench.sample_step
    step()
    step()


def peak_memory_mib(
    variant: str,
    unet_kwargs: dict[str, Any],
    optimizer_cfg: dict[str, Any],
    batch: int,
    mode: str,
    args: Any,
    bench: ModelSteps | None,
) -> float:
    if torch.device(args.device).type == "cuda":
        synchronize(args.device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        (bench.train_step if mode == "train" else bench.sample_step)()
        synchronize(args.device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    mib, _ = peak_rss_mib(memory_probe, variant, unet_kwargs, optimizer_cfg, batch, mode, args)
    return mib


def run_config(preset: str, batch: int, args: Any) -> list[dict[str, Any]]:
    unet_kwargs, optimizer_cfg = diffusion_preset(preset)
    if not optimizer_cfg.get("fused"):
        print(
            f"note: conf/model/diffusion/{preset}.yaml does not set optimizer.fused; "
            "`ours` = foreach too"
        )
    benches = {v: build(v, unet_kwargs, optimizer_cfg, batch, args) for v in VARIANTS}
    # Same weights for the two `ours` variants (they differ only in the optimizer).
    benches["ours_foreach"].model.load_state_dict(copy.deepcopy(benches["ours"].model.state_dict()))
    gemm = Gemm(args.gemm_size, args.device, args.dtype, args.seed)
    gemm.step()  # warm-up
    warm = {}
    for name, bench in benches.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            bench.train_step()
            bench.sample_step()
        synchronize(args.device)
        warm[name] = time.perf_counter() - start
    train = alternate(
        {
            **{
                n: (lambda b=b: timed(b.train_step, args.device, args.repeats, args.clock))
                for n, b in benches.items()
            },
            "gemm": lambda: timed(gemm.step, args.device, args.gemm_repeats, args.clock),
        },
        args.rounds,
    )
    gemm_flops_s = gemm.flops / median(train.pop("gemm"))
    sample = alternate(
        {
            n: (lambda b=b: timed(b.sample_step, args.device, args.repeats, args.clock))
            for n, b in benches.items()
        },
        args.rounds,
    )
    rows = []
    for name, bench in benches.items():
        fwd_flops, train_flops = bench.flops_per_image()
        train_ips, sample_ips = batch / median(train[name]), batch / median(sample[name])
        row = {
            "preset": preset,
            "batch": batch,
            "variant": name,
            "optimizer": type(bench.optimizer).__name__
            + (" fused" if bench.optimizer.defaults.get("fused") else " foreach"),
            "params": num_params(bench.model),
            "train_img_s": train_ips,
            "sample_img_s": sample_ips,
            "train_ratio_vs_diffusers": 1.0 / median_ratio(train[name], train["diffusers"]),
            "sample_ratio_vs_diffusers": 1.0 / median_ratio(sample[name], sample["diffusers"]),
            "train_step_s_rounds": train[name],
            "sample_step_s_rounds": sample[name],
            "train_step_s_spread": spread(train[name]),
            "warmup_s": warm[name],
            "fwd_gflops_per_image": fwd_flops / 1e9,
            "train_gflops_per_image": train_flops / 1e9,
            "train_tflops_achieved": train_flops * train_ips / 1e12,
            "gemm_size": args.gemm_size,
            "gemm_gflops_s": gemm_flops_s / 1e9,
            "train_gflops_s": train_flops * train_ips / 1e9,
            "sample_gflops_s": fwd_flops * sample_ips / 1e9,
            "train_frac_gemm": train_flops * train_ips / gemm_flops_s,
            "sample_frac_gemm": fwd_flops * sample_ips / gemm_flops_s,
            "mfu": train_flops * train_ips / (args.peak_tflops * 1e12)
            if args.peak_tflops
            else None,
        }
        if (
            not args.no_memory and name != "ours_foreach"
        ):  # same model as `ours`; optimizer state alike
            row["train_peak_mib"] = peak_memory_mib(
                name, unet_kwargs, optimizer_cfg, batch, "train", args, bench
            )
            row["sample_peak_mib"] = peak_memory_mib(
                name, unet_kwargs, optimizer_cfg, batch, "sample", args, bench
            )
        rows.append(row)
        print(
            f"{preset} b={batch} {name}: "
            f"train {train_ips:.1f} img/s, sample {sample_ips:.1f} img/s",
            flush=True,
        )
    return rows


COLUMNS = [
    ("preset", "preset"),
    ("batch", "batch"),
    ("variant", "model"),
    ("optimizer", "optimizer"),
    ("params", "params"),
    ("train_img_s", "train img/s"),
    ("train_ratio_vs_diffusers", "train x diffusers"),
    ("sample_img_s", "sample img/s"),
    ("sample_ratio_vs_diffusers", "sample x diffusers"),
    ("train_peak_mib", "train peak MiB"),
    ("sample_peak_mib", "sample peak MiB"),
    ("fwd_gflops_per_image", "fwd GFLOP/img"),
    ("gemm_gflops_s", "GEMM GFLOP/s"),
    ("train_gflops_s", "train GFLOP/s"),
    ("train_frac_gemm", "train / GEMM"),
    ("sample_gflops_s", "sample GFLOP/s"),
    ("sample_frac_gemm", "sample / GEMM"),
    ("mfu", "MFU"),
]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--presets",
        nargs="+",
        default=None,
        help="conf/model/diffusion presets (default: small; full: small base)",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument(
        "--rounds", type=int, default=None, help="alternating rounds (medians over these)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="steps per timed measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast for every model"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="NHWC weights and inputs for every model"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every model (compile time = warmup_s)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (e.g. H100 bf16 dense: 989)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--gemm-size", type=int, default=2048, help="n of the n x n matmul whose FLOP/s is the peak"
    )
    parser.add_argument("--gemm-repeats", type=int, default=3, help="matmuls per GEMM measurement")
    args = parser.parse_args()
    setup_run(args, args.device)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={args.device} but CUDA is not available here")
    presets = args.presets or (["small"] if args.quick else ["small", "base"])
    # Full CPU mode: the CPU preset at a small and the default data batch; the GPU preset at 32.
    default_batches = {"small": [32] if args.quick else [16, 128], "base": [32]}
    args.rounds = args.rounds or (9 if args.quick else 15)
    machine = machine_info(args.device)
    rows = []
    for preset in presets:
        for batch in args.batch_sizes or default_batches.get(preset, [32]):
            rows += run_config(preset, batch, args)
    unit = "img/s" if args.clock == "wall" else "img/CPU-s"
    flop_unit = "GFLOP/s" if args.clock == "wall" else "GFLOP/CPU-s"
    table = format_table(
        rows, [(k, h.replace("img/s", unit).replace("GFLOP/s", flop_unit)) for k, h in COLUMNS]
    )
    print(table)
    path = write_results(
        "unet_throughput",
        args.quick,
        {
            "machine": machine,
            "settings": {k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
            "latent_shape": f"(c, {LATENT_SIZE}, {LATENT_SIZE}) from the preset's in_channels",
            "conditioning": "class-conditional for every model (num_classes + 1 embedding rows)",
            "rows": rows,
            "table": table,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
