"""Sampling CLI: `run(cfg)` generates images from a stage-2 checkpoint alone and saves them.

The settings' keys, types and defaults are the dataclass `SampleConfig` (registered in Hydra's
ConfigStore as `sample_schema`, the base of conf/sample.yaml), so Hydra rejects a wrong type or an
unknown key itself; `check_settings` adds what a type cannot say (positive counts, value sets,
files).
Every check, the checkpoint and the model-dependent ones included (labels, sampler, FID data), runs
before `out_dir` is created, so bad input writes nothing.

Then: `conditioning_inputs` builds the model's conditioning (class labels) for every sample,
`generate` draws the images in batches from one seeded CPU generator (the same seed and settings
give byte-identical PNGs on CPU), and `write_outputs` saves `00000.png`..., `grid.png`; `run` adds
`samples.json` and, optionally, `trajectory.png`, `metrics.json` (fid=true) and the NFE sweep
(ldm.metrics.nfe_sweep).

torch, Lightning and the metrics are imported inside the functions that need them: a typo in a
plain setting is reported in a fraction of a second instead of after ~10 s of imports.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from ldm.utils.errors import UserError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("32", "bf16", "16")


# ---------------------------------------------------------------------------- settings
@dataclass
class SampleConfig:
    """conf/sample.yaml's keys (`python sample.py --cfg job` prints them composed)."""

    ckpt: str = MISSING  # stage-2 checkpoint to sample from (required)
    num_samples: int = 64
    batch_size: int = 64  # images per sample() call (x2 model batch with guidance)
    # same seed + same settings -> the same images (byte for byte on CPU): one CPU generator
    seed: int = 0
    use_ema: bool = True  # the EMA weights (false: the raw training weights, when EMA was on)
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    precision: str = "32"  # 32 | bf16 | 16 (autocast; 16 needs cuda)
    # Conditional models only. null: an even spread over the classes (sample i gets class i mod K);
    # an int: every sample; a list: sample i gets list[i mod len] (num_samples entries: per sample).
    # A class name (a class folder of data.labels=folders, stored in the checkpoint) works too.
    class_label: Any = None
    # classifier-free guidance: uncond + s * (cond - uncond); 1 = off. null: the model's own
    # (model.diffusion.val_guidance_scale: its training grids' and FID's; 2 for the default model)
    # where there is a condition to guide towards (labels, prompts, an img2img class_label), else 1
    guidance_scale: float | None = None
    # Text-conditioned models only: one prompt for every sample, or a file of prompts (one a line,
    # blank lines skipped) splitting num_samples into equal blocks, one grid row per prompt.
    prompt: str | None = None
    prompts_file: str | None = None
    # Text models on captioned MNIST: sample the evaluation prompts (ldm.metrics.text) with
    # guidance_scale and score digit/attribute/composition accuracy -> text_metrics.json
    text_metrics: bool = False
    text_metrics_per_prompt: int = 4
    # Guidance that keeps diversity (LatentDiffusion.sample); null: the checkpoint's model setting
    # (model.diffusion.guidance_*, off unless trained with it). [sigma_lo, sigma_hi]: guide only at
    # steps with sigma = sqrt((1 - abar) / abar) in (lo, hi], null = open end (Kynkaenniemi et al.
    # 2024); [null, null]: every step. guidance_rescale: CFG rescale phi in [0, 1] (Lin et al.
    # 2023).
    guidance_interval: Any = None
    guidance_rescale: float | None = None
    out_dir: str = "${paths.log_dir}/sample/${now:%Y-%m-%d_%H-%M-%S}"
    grid_images: int = 100  # grid.png shows the first this-many samples (0: no grid.png)
    trajectory: bool = False  # trajectory.png: decoded x0 predictions of a few samples over steps
    trajectory_samples: int = 4  # rows of trajectory.png
    trajectory_steps: int = 10  # columns of trajectory.png (evenly spaced steps, last included)
    # FID/KID/CAS and precision/recall/density/coverage of the samples against the train split of
    # the checkpoint's dataset -> metrics.json
    fid: bool = False
    # null or a list of step counts: FID and wall time of num_samples images at each -> nfe_sweep.*
    nfe_sweep: list[int] | None = None
    # Image-to-image (ldm.sample_img2img): task=superres input=PATH|DIR; task=inpaint input=PATH
    # mask=PATH (white = fill); init_image=PATH|DIR strength=0.6 (SDEdit, any model). One output
    # per input; grid.png shows inputs and outputs side by side.
    task: str | None = None  # superres | inpaint (the checkpoint must be trained for it)
    input: str | None = None  # low-res image(s) (superres) or the image to fill (inpaint)
    mask: str | None = None  # inpaint: grayscale mask of the image's size, white = fill
    paste: bool | None = None  # inpaint: keep the known pixels (null: the checkpoint's task.paste)
    init_image: str | None = None  # SDEdit: image(s) of the model's size to start from
    strength: float = 0.6  # SDEdit: in (0, 1]; the fraction of the sampler's steps that run
    # config groups (see conf/sample.yaml's defaults list)
    sampler: Any = MISSING
    metrics: Any = MISSING
    paths: Any = MISSING


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain lists/dicts; anything else unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(cfg: DictConfig) -> None:
    """The checks the schema's types cannot do; UserError (one line) on the first bad value."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise UserError("ckpt is required: python sample.py ckpt=PATH (a stage-2 checkpoint)")
    for key in (
        "num_samples",
        "batch_size",
        "trajectory_samples",
        "trajectory_steps",
        "text_metrics_per_prompt",
    ):
        if cfg[key] <= 0:
            raise UserError(f"{key}={cfg[key]} must be a positive integer")
    steps = cfg.sampler.steps  # the sampler group is not typed by the schema
    if not _is_int(steps) or steps <= 0:
        raise UserError(f"sampler.steps={steps!r} must be a positive integer")
    if cfg.grid_images < 0:
        raise UserError(f"grid_images={cfg.grid_images} must be >= 0 (0: no grid.png)")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    device = cfg.device
    if device not in ("auto", "cpu", "cuda") and not (
        device.startswith("cuda:") and device[5:].isdigit()
    ):
        raise UserError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N")
    if cfg.guidance_scale is not None and not math.isfinite(cfg.guidance_scale):
        raise UserError(f"guidance_scale={cfg.guidance_scale} must be a finite number")

    label = _plain(cfg.class_label)
    if isinstance(label, list):
        if not label or not all(_is_int(x) or isinstance(x, str) for x in label):
            raise UserError(
                f"class_label={label!r} must be null, an integer, a class name or a non-empty "
                "list of them"
            )
        if len(label) > cfg.num_samples:
            raise UserError(
                f"class_label has {len(label)} entries but num_samples={cfg.num_samples}; "
                "give at most num_samples labels"
            )
    elif label is not None and not (_is_int(label) or isinstance(label, str)):
        raise UserError(
            f"class_label={label!r} must be null, an integer, a class name or a list of them"
        )

    read_prompts(cfg)

    sweep = cfg.nfe_sweep
    if sweep is not None and (not sweep or not all(n > 0 for n in sweep)):
        raise UserError(
            f"nfe_sweep={_plain(sweep)!r} must be null or a non-empty list of positive step counts"
        )
    if (cfg.fid or sweep) and cfg.num_samples < 2:
        raise UserError(
            f"num_samples={cfg.num_samples} is too few for FID (fid / nfe_sweep); use >= 2"
        )

    if not Path(cfg.ckpt).is_file():  # checked here too: answers before torch is imported
        raise UserError(f"ckpt={cfg.ckpt!r} does not exist or is not a file")
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(
            f"out_dir={cfg.out_dir!r} already exists and is not empty; choose a new out_dir"
        )


def read_prompts(cfg: DictConfig) -> list[str] | None:
    """The prompts of `prompt` / `prompts_file` (None: neither given); one-line errors."""
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise UserError("give prompt=... or prompts_file=..., not both")
    if cfg.prompt is None and cfg.prompts_file is None:
        return None
    if _plain(cfg.class_label) is not None:
        raise UserError("give class_label (class-conditional models) or a prompt, not both")
    if cfg.prompt is not None:
        if not str(cfg.prompt).strip():
            raise UserError(
                "prompt is empty: give a caption (omit prompt= for unconditional samples)"
            )
        prompts = [str(cfg.prompt).strip()]
    else:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise UserError(f"prompts_file={cfg.prompts_file!r} does not exist or is not a file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"prompts_file={cfg.prompts_file!r} has no prompts (one a line)")
    if cfg.num_samples % len(prompts):
        raise UserError(
            f"num_samples={cfg.num_samples} is not a multiple of the {len(prompts)} prompts "
            f"(each prompt gets num_samples / {len(prompts)} samples)"
        )
    return prompts


# ---------------------------------------------------------------------------- torch-side checks
def resolve_device(device: str, precision: str) -> torch.device:
    """`auto` -> cuda if available else cpu; refuses cuda without a GPU and fp16 on the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={device!r} but CUDA is not available here; use device=cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif precision == "16":
        raise UserError("precision=16 needs device=cuda; on the CPU use precision=32 or bf16")
    return resolved


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Mixed-precision context for `precision` (32: none)."""
    import torch

    if precision == "32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------- conditioning
def resolve_labels(
    class_label: int | str | list[int | str] | None,
    num_samples: int,
    num_classes: int | None,
    guidance_scale: float,
    class_names: list[str] | None = None,
) -> torch.Tensor | None:
    """The label of every sample, LongTensor (num_samples,), or None for unconditional models.

    None on a conditional model: an even spread, sample i gets class i mod K; an int: all samples;
    a list: sample i gets list[i mod len(list)]. Strings are class names (`class_names`, stored
    in checkpoints trained with data.labels=folders), integers class indices.
    """
    import torch

    from ldm.modules.conditioning import even_class_labels

    if num_classes is None:
        if class_label is not None:
            raise UserError(
                f"class_label={class_label!r} given but the checkpoint's model is unconditional"
            )
        if guidance_scale != 1.0:
            raise UserError(
                f"guidance_scale={guidance_scale} needs a class-conditional model; this one is "
                "unconditional (use guidance_scale=1)"
            )
        return None
    if class_label is None:
        return even_class_labels(num_samples, num_classes)  # (N,)
    chosen = class_label if isinstance(class_label, list) else [class_label]
    chosen = [class_index(label, class_names) for label in chosen]
    for label in chosen:
        if not 0 <= label < num_classes:
            raise UserError(
                f"class_label={label} is outside the model's classes 0..{num_classes - 1}"
            )
    return torch.tensor(chosen, dtype=torch.long)[torch.arange(num_samples) % len(chosen)]  # (N,)


def class_index(label: int | str, class_names: list[str] | None) -> int:
    """A class index as given, or the index of a class name among the checkpoint's class names."""
    if not isinstance(label, str):
        return label
    if not class_names:
        raise UserError(
            f"class_label={label!r} is a name but the checkpoint stores no class names "
            "(data.class_names: models trained with data.labels=folders have them); use an index"
        )
    if label not in class_names:
        raise UserError(
            f"class_label={label!r} is not one of the checkpoint's classes: "
            f"{', '.join(class_names)}"
        )
    return class_names.index(label)


def checkpoint_class_names(ckpt: Any) -> list[str] | None:
    """The class names a checkpoint's run read from its class folders (data.class_names) or
    None."""
    names = ((ckpt.get("ldm") or {}).get("config") or {}).get("data", {}).get("class_names")
    return list(names) if names else None


def conditioning_inputs(
    cfg: DictConfig, model: Any, class_names: list[str] | None = None
) -> dict[str, Any]:
    """The conditioning keyword arguments of `model.sample` for all num_samples samples, each a
    tensor or list of length num_samples (sliced per batch by `generate`); {} for an unconditional
    model. The one place that turns settings into conditioning: add new kinds here.

    A text model gets `prompts` (sample i: prompt i // (num_samples / number of prompts))."""
    prompts = read_prompts(cfg)
    if getattr(model, "takes_prompts", False):
        if _plain(cfg.class_label) is not None:
            raise UserError(
                "class_label given but the checkpoint's model is text-conditioned; use "
                "prompt=... or prompts_file=..."
            )
        if prompts is None:
            if cfg.guidance_scale != 1.0 and not cfg.text_metrics:
                raise UserError(
                    f"guidance_scale={cfg.guidance_scale} needs prompt=... or prompts_file=... "
                    "(guidance pushes towards a caption)"
                )
            return {}
        per = cfg.num_samples // len(prompts)
        per_sample = [p for p in prompts for _ in range(per)]
        try:
            model.conditioner.check_conditions({"caption": per_sample})
        except ValueError as err:
            raise UserError(str(err)) from err
        return {"prompts": per_sample}
    if prompts is not None:
        raise UserError(
            f"prompt given but the checkpoint's model is {model.conditioning_name()}: it takes "
            "no text" + (" (use class_label=...)" if model.num_classes else "")
        )
    labels = resolve_labels(
        _plain(cfg.class_label),
        cfg.num_samples,
        model.num_classes,
        cfg.guidance_scale,
        class_names,
    )
    return {} if labels is None else {"class_labels": labels}


def default_guidance_scale(cfg: DictConfig, model: Any, job: dict[str, Any] | None) -> float:
    """`guidance_scale=null`: the model's `val_guidance_scale` (what its training grids and FID
    used, so `sample.py ckpt=PATH` gives what training showed) where the samples are conditioned:
    a class-conditional model (asked labels or the even spread), a text model given prompts (or
    text_metrics), an image-to-image model given class_label; 1 where there is nothing to guide
    towards (unconditional sampling, img2img without a label)."""
    if job is not None and job["mode"] != "sdedit":
        conditioned = _plain(cfg.class_label) is not None
    elif getattr(model, "takes_prompts", False):
        conditioned = read_prompts(cfg) is not None or bool(cfg.text_metrics)
    else:
        conditioned = bool(getattr(model, "takes_labels", False))
    return float(model.hparams.get("val_guidance_scale") or 1.0) if conditioned else 1.0


def effective_guidance(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """The guidance interval and rescale sampling will use (cfg's, else the model's), checked."""
    from ldm.diffusion.samplers import check_guidance

    interval = _plain(cfg.guidance_interval)
    rescale = cfg.guidance_rescale
    try:
        check_guidance(interval, 0.0 if rescale is None else rescale)
    except ValueError as err:
        raise UserError(str(err)) from None
    if interval is None:
        interval = model.hparams.get("guidance_interval")
    if rescale is None:
        rescale = model.hparams.get("guidance_rescale", 0.0)
    return {"guidance_interval": _plain(interval), "guidance_rescale": float(rescale)}


# ---------------------------------------------------------------------------- generation
@dataclass
class TrajectoryRecorder:
    """Sampler callback keeping the x0 predictions (latents) of the first `num_samples` samples."""

    num_samples: int
    timesteps: list[int] = field(default_factory=list)
    x0_preds: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, i: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        self.timesteps.append(int(t))
        self.x0_preds.append(x0_pred[: self.num_samples].detach().float().cpu())  # (k, c, h, w)


def generate(
    model: Any,
    sampler: Any,
    cfg: DictConfig,
    inputs: dict[str, Any],
    device: torch.device,
    desc: str,
    callback: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, float]:
    """All `cfg.num_samples` images (N, C, H, W) float32 on the CPU in [-1, 1], and the seconds
    spent generating them. One CPU generator seeded once draws all noise, batch after batch;
    `inputs` (conditioning_inputs) are sliced per batch; `callback` sees the first batch only."""
    import torch
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(cfg.seed)
    n, bs = cfg.num_samples, cfg.batch_size
    scale = cfg.guidance_scale if inputs else 1.0
    images = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    # disable=None: a bar on terminals, nothing in logs and pipes.
    for i in tqdm(range(0, n, bs), desc=desc, unit="batch", disable=None):
        batch_inputs = {
            k: v[i : i + bs].to(device) if isinstance(v, torch.Tensor) else v[i : i + bs]
            for k, v in inputs.items()
        }
        with autocast(device, cfg.precision):
            batch = model.sample(
                min(bs, n - i),
                **batch_inputs,
                guidance_scale=scale,
                guidance_interval=_plain(cfg.guidance_interval),
                guidance_rescale=cfg.guidance_rescale,
                generator=generator,
                sampler=sampler,
                callback=callback if i == 0 else None,
            )  # (B, C, H, W)
        images.append(batch.float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(images), time.perf_counter() - start  # (N, C, H, W)


# ---------------------------------------------------------------------------- outputs
def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """Images (N, C, H, W) in [-1, 1] as one PNG grid with `nrow` images per row."""
    from torchvision.utils import make_grid, save_image

    from ldm.utils.images import to_display_range

    save_image(make_grid(to_display_range(images), nrow=nrow, padding=2), path)


def write_outputs(
    images: torch.Tensor,
    cfg: DictConfig,
    num_classes: int | None,
    out: Path,
    prompts: list[str] | None = None,
    data_cfg: dict[str, Any] | None = None,
) -> list[str]:
    """Write the samples into `out`: one PNG per image and `grid.png` (on an even class spread a
    column per class; with `prompts`, the prompt of every sample, a row per prompt labelled with
    it); for an audio checkpoint (`data_cfg`, the stored data config) also one WAV per sample.
    Returns the files written, for samples.json. Add new output kinds here."""
    from ldm.utils.images import save_labelled_grid, save_png

    for i, image in enumerate(images):
        save_png(image, out / f"{i:05d}.png")
    files = [f"{0:05d}.png .. {len(images) - 1:05d}.png"]
    if cfg.grid_images and prompts is not None:
        unique = list(dict.fromkeys(prompts))
        per = len(images) // len(unique)
        cols = min(per, max(1, cfg.grid_images // len(unique)), 16)
        shown = images.view(len(unique), per, *images.shape[1:])[:, :cols].flatten(0, 1)
        save_labelled_grid(shown, unique, cols, out / "grid.png")
        files.append("grid.png")
    elif cfg.grid_images:
        shown = images[: cfg.grid_images]
        spread = num_classes is not None and cfg.class_label is None
        nrow = min(num_classes, len(shown)) if spread else math.ceil(math.sqrt(len(shown)))
        save_grid(shown, out / "grid.png", nrow=nrow)
        files.append("grid.png")
    from ldm.audio.outputs import is_audio, write_audio

    if is_audio(data_cfg):  # mel images -> waveforms (the stored front end, Griffin-Lim)
        files += write_audio(images, data_cfg, out)
    return files


def save_trajectory(
    model: Any,
    recorder: TrajectoryRecorder,
    columns: int,
    device: torch.device,
    precision: str,
    path: Path,
) -> list[int]:
    """Decoded x0 predictions as one image: a row per sample, `columns` evenly spaced steps from the
    first (t = T-1: a blurry mean) to the last (the final sample). Returns the timesteps shown."""
    import torch

    steps = len(recorder.x0_preds)
    picks = torch.linspace(0, steps - 1, min(columns, steps)).round().long().unique().tolist()
    latents = torch.stack([recorder.x0_preds[j] for j in picks], dim=1)  # (k, m, c, h, w)
    m = latents.shape[1]
    with autocast(device, precision):
        images = model.decode(latents.flatten(0, 1).to(device)).float().cpu()  # (k * m, C, H, W)
    save_grid(images, path, nrow=m)
    return [recorder.timesteps[j] for j in picks]


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def build_text_evaluation(ckpt: Any, path: Path, metrics_cfg: DictConfig, model: Any) -> tuple:
    """(classifier, held-out choices, attribute thresholds) for `text_metrics=true`."""
    from ldm.metrics.sample_scores import stored_data_config
    from ldm.metrics.text import text_eval_inputs
    from ldm.utils.instantiate import safe_instantiate

    if not getattr(model, "takes_prompts", False):
        raise UserError(
            f"text_metrics=true needs a text-conditioned model; this one is "
            f"{model.conditioning_name()}"
        )
    data_cfg = stored_data_config(ckpt, path, "text_metrics needs")
    try:
        datamodule = safe_instantiate(data_cfg, where=f"checkpoint {str(path)!r} (data)")
        return text_eval_inputs(datamodule, metrics_cfg)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"text_metrics: {str(err).splitlines()[0]}") from err


# ---------------------------------------------------------------------------- entry
def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, generate, write; returns the content of samples.json (plus metrics / sweep
    rows)."""
    check_settings(cfg)

    import torch
    from hydra.utils import instantiate

    from ldm import sample_img2img as img2img
    from ldm.audio.outputs import audio_record
    from ldm.models.loading import latent_diffusion_from_checkpoint
    from ldm.utils.checkpoint import file_sha256, load_checkpoint

    ckpt_path = Path(cfg.ckpt)
    device = resolve_device(cfg.device, cfg.precision)
    ckpt = load_checkpoint(ckpt_path, expected_stage="diffusion")
    model = latent_diffusion_from_checkpoint(ckpt, ckpt_path, use_ema=cfg.use_ema).to(device)
    job = img2img.prepare(cfg, model, ckpt["ldm"]["config"])  # None: plain sampling
    if cfg.guidance_scale is None:
        cfg.guidance_scale = default_guidance_scale(cfg, model, job)
    if job is not None:
        cfg.num_samples = len(job["files"])  # one output per input
    class_names = checkpoint_class_names(ckpt)
    inputs = conditioning_inputs(cfg, model, class_names)
    if job is not None and job["mode"] != "sdedit" and _plain(cfg.class_label) is None:
        if inputs and cfg.guidance_scale != 1.0:
            raise UserError(
                f"guidance_scale={cfg.guidance_scale} needs class_label=... (task={job['mode']} "
                "without a label fills in whatever the input suggests, unguided)"
            )
        inputs = {}  # inpainting / super-resolution not told the class (the null class), unguided
    labels = inputs.get("class_labels")
    guidance = effective_guidance(cfg, model)
    samplers = {}  # None: the main run's; n: the NFE sweep's n-step one
    sampler_factory = instantiate(cfg.sampler)  # ldm.diffusion.samplers.build_sampler, partial
    for steps in [None, *(cfg.nfe_sweep or [])]:
        try:
            samplers[steps] = sampler_factory(
                schedule=model.schedule, **({} if steps is None else {"steps": steps})
            )
        except (ValueError, TypeError) as err:
            what = f"sampler={cfg.sampler.name}"
            what = what if steps is None else f"nfe_sweep entry {steps} ({what})"
            raise UserError(f"{what}: {str(err).splitlines()[0]}") from err
    sampler = samplers.pop(None)
    sweep_samplers = samplers
    text_eval = None
    if cfg.text_metrics:
        text_eval = build_text_evaluation(ckpt, ckpt_path, cfg.metrics, model)
    evaluate = None
    if cfg.fid or sweep_samplers:
        from ldm.metrics.sample_scores import build_evaluator

        evaluate = build_evaluator(ckpt, ckpt_path, cfg.metrics, device)

    # ---- everything is valid: write
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out_dir={str(out)!r} cannot be created ({err.strerror})") from err

    recorder = TrajectoryRecorder(cfg.trajectory_samples) if cfg.trajectory else None
    prompts = inputs.get("prompts")
    stored = ckpt["ldm"]["config"]
    if job is not None:
        images, seconds = img2img.generate(model, sampler, cfg, job, device, inputs)
        files = img2img.write(job, images, out, cfg.grid_images)
    else:
        images, seconds = generate(model, sampler, cfg, inputs, device, "sampling", recorder)
        files = write_outputs(images, cfg, model.num_classes, out, prompts, stored.get("data"))
    trajectory = None
    if recorder is not None:
        shown_t = save_trajectory(
            model, recorder, cfg.trajectory_steps, device, cfg.precision, out / "trajectory.png"
        )
        trajectory = {
            "file": "trajectory.png",
            "samples": recorder.x0_preds[0].shape[0],
            "timesteps": shown_t,
        }
        files.append("trajectory.png")

    guidance_scale = cfg.guidance_scale if inputs else 1.0
    record: dict[str, Any] = {
        "checkpoint": {
            "path": str(ckpt_path.resolve()),
            "sha256": file_sha256(ckpt_path),
            "stage": ckpt["ldm"]["stage"],
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "dataset": (stored.get("data") or {}).get("name"),
        },
        "weights": "ema" if cfg.use_ema and "current_model_state" in ckpt else "raw",
        "config": {k: _plain(v) for k, v in cfg.items() if k != "hydra"},
        "sampler": {
            "name": cfg.sampler.name,
            "steps": sampler.steps,
            "nfe": sampler.nfe,
            "repr": repr(sampler),
        },
        "device": str(device),
        "precision": cfg.precision,
        "N": len(images),
        "image_shape": list(images.shape[1:]),
        "num_classes": model.num_classes,
        "class_names": class_names,
        "guidance_scale": guidance_scale,
        **guidance,
        "labels": labels.tolist() if labels is not None else None,
        "prompts": list(dict.fromkeys(prompts)) if prompts is not None else None,
        "samples_per_prompt": len(images) // len(set(prompts)) if prompts is not None else None,
        "timing": {
            "seconds": seconds,
            "images_per_second": len(images) / seconds,
            "batch_size": cfg.batch_size,
        },
        "trajectory": trajectory,
        "audio": audio_record(stored.get("data")),
        "img2img": img2img.describe(job, cfg) if job is not None else None,
        "torch": torch.__version__,
        "files": [*files, "samples.json"],
    }
    write_json(record, out / "samples.json")  # now, so a failing evaluation below keeps it
    print(
        f"sampled {len(images)} images ({cfg.sampler.name}, {sampler.steps} steps, "
        f"{record['weights']} weights, {device}, precision {cfg.precision}) in {seconds:.2f}s "
        f"({record['timing']['images_per_second']:.1f} images/s) -> {out}"
    )

    if cfg.fid:
        from ldm.metrics.prdc import PRDC_KEYS

        scores = evaluate(images, labels)
        metrics = {
            **scores,
            "extractor": cfg.metrics.extractor,
            "dataset": evaluate.dataset,
            "sampler": cfg.sampler.name,
            "steps": sampler.steps,
            "guidance_scale": guidance_scale,
            **guidance,
            "checkpoint_sha256": record["checkpoint"]["sha256"],
        }
        write_json(metrics, out / "metrics.json")
        record["metrics"] = metrics
        record["files"].append("metrics.json")
        cas = f", CAS {scores['cas']:.3f}" if scores["cas"] is not None else ""
        cas += "".join(f", {key} {scores[key]:.3f}" for key in PRDC_KEYS)
        print(
            f"FID {scores['fid']:.3f}, KID {scores['kid']:.5f}{cas} (N={scores['N']} vs "
            f"{scores['num_real']} real, {cfg.metrics.extractor} features)"
        )

    if text_eval is not None:
        from ldm.metrics.text import evaluate_text_model, summary_line

        with autocast(device, cfg.precision):
            result = evaluate_text_model(
                model,
                *text_eval,
                per_prompt=cfg.text_metrics_per_prompt,
                guidance_scale=cfg.guidance_scale,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                sampler=sampler,
            )
        write_json(result, out / "text_metrics.json")
        record["text_metrics"] = result
        record["files"].append("text_metrics.json")
        print(summary_line(result))

    if sweep_samplers:
        from ldm.metrics.nfe_sweep import run_nfe_sweep, write_nfe_sweep

        def sweep_generate(sweep_sampler: Any, desc: str) -> tuple[torch.Tensor, float]:
            return generate(model, sweep_sampler, cfg, inputs, device, desc)

        rows = run_nfe_sweep(sweep_samplers, sweep_generate, evaluate, labels)
        info = {
            "sampler": cfg.sampler.name,
            "N": cfg.num_samples,
            "extractor": cfg.metrics.extractor,
            "guidance_scale": guidance_scale,
            **guidance,
            "device": str(device),
        }
        record["nfe_sweep"] = rows
        record["files"] += write_nfe_sweep(rows, info, out)

    write_json(record, out / "samples.json")
    return record
