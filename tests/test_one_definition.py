"""Concepts with one definition (issue 15): the even class spread and the grids built on it, the
SLURM job id, torch.distributed's state, the Markdown result table."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.metrics.classifier_config import DEFAULTS, ClassifierConfig
from ldm.metrics.train_classifier import settings_hash, train_classifier
from ldm.modules.conditioning import even_class_labels
from ldm.train import save_final_grid
from ldm.utils.distributed import is_distributed
from ldm.utils.launch import slurm_job_id
from ldm.utils.tables import format_table
from tests.conftest import compose_config


def test_even_class_labels():
    assert even_class_labels(12, 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert even_class_labels(3, 10).tolist() == [0, 1, 2]
    assert even_class_labels(4, 2, "cpu").dtype == torch.long


class LabelPainter:
    """Stands in for LatentDiffusion: the image of label k is a flat (1, 4, 4) grey of k/(K-1)."""

    num_classes = 3
    takes_prompts = False
    conditioner = None  # no image-to-image task
    device = torch.device("cpu")
    hparams = SimpleNamespace(val_guidance_scale=2.0)

    def __init__(self):
        self.calls = []

    def sample(self, n, class_labels, generator, guidance_scale):
        self.calls.append((n, class_labels.tolist(), guidance_scale))
        grey = class_labels.float() / (self.num_classes - 1) * 2 - 1  # (n,) in [-1, 1]
        return grey.view(n, 1, 1, 1).expand(n, 1, 4, 4)


def test_final_grid_has_a_column_per_class(tmp_path):
    """As the validation grid and sample.py's grid.png (and README's description of
    final_samples.png): 8 samples per class, column k shows class k."""
    model = LabelPainter()
    cfg = OmegaConf.create({"seed": 0, "paths": {"output_dir": str(tmp_path)}})
    path = save_final_grid(model, None, cfg)
    [(n, labels, scale)] = model.calls
    assert n == 24 and labels == even_class_labels(24, 3).tolist() and scale == 2.0
    grid = Image.open(path).convert("L")
    assert grid.size == (3 * 6 + 2, 8 * 6 + 2)  # 3 columns x 8 rows of 4x4 tiles, padding 2
    for row in range(8):
        greys = [grid.getpixel((2 + 6 * col + 1, 2 + 6 * row + 1)) for col in range(3)]
        assert greys == [0, 128, 255]


def test_slurm_job_id():
    assert slurm_job_id({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "80"}) == "80"
    array = {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "79", "SLURM_ARRAY_TASK_ID": "3"}
    assert slurm_job_id(array) == "79_3"  # as scontrol names an array task


def test_requeue_names_the_array_task(monkeypatch):
    from ldm.callbacks import resume

    calls = []

    def fake_run(args, **kwargs):
        calls.append(args)
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(resume.subprocess, "run", fake_run)
    for key, value in {
        "SLURM_JOB_ID": "80",
        "SLURM_ARRAY_JOB_ID": "79",
        "SLURM_ARRAY_TASK_ID": "3",
    }.items():
        monkeypatch.setenv(key, value)
    resume.requeue_slurm_job()
    assert calls == [["scontrol", "requeue", "79_3"]]


def test_is_distributed_outside_a_process_group():
    assert is_distributed() is False


def test_format_table():
    rows = [{"steps": 4, "fid": 12.34567, "cas": None}, {"steps": 10, "fid": 3.0}]
    table = format_table(rows, [("steps", "steps"), ("fid", "FID"), ("cas", "CAS")])
    assert table.splitlines() == [
        "| steps | FID | CAS |",
        "|---|---|---|",
        "| 4 | 12.35 | - |",
        "| 10 | 3 | - |",
    ]


def test_fid_classifier_settings_have_one_source(tmp_path):
    """ClassifierConfig is conf/fid/classifier.yaml's `classifier` node (typed) and the defaults
    of train_classifier; the values are those the cached classifiers and reported FIDs used."""
    assert DEFAULTS == {
        "epochs": 6,
        "batch_size": 64,
        "lr": 3e-3,
        "seed": 0,
        "max_shift": 2,
        "widths": [16, 32],
        "feature_dim": 128,
    }
    assert settings_hash(DEFAULTS) == "4e295894b6"  # the cache key of the default classifier
    for overrides in ([], ["fid=inception"]):
        node = compose_config(overrides, tmp_path).fid.classifier
        assert OmegaConf.get_type(node) is ClassifierConfig
        assert OmegaConf.to_container(node) == DEFAULTS
    defaults = {k: p.default for k, p in inspect.signature(train_classifier).parameters.items()}
    assert {k: defaults[k] for k in DEFAULTS} == {**DEFAULTS, "widths": (16, 32)}
