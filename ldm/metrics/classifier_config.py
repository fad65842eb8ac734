"""The FID feature classifier's settings: the one definition of their names, types and defaults.

Registered in Hydra's ConfigStore as `fid_classifier`, the `classifier` node of
conf/fid/classifier.yaml (so `fid.classifier.epochs=3` is typed), and the defaults of
ldm.metrics.train_classifier for callers that pass no config. Light (no torch): ldm/__init__.py
imports it so that the node exists wherever a config is composed.
"""

from dataclasses import asdict, dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class ClassifierConfig:
    """Other settings train and cache another classifier (the cache key hashes all of them).
    The defaults reach ~98-99% test accuracy on MNIST-5k in about 15 s on one CPU core."""

    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    max_shift: int = 2  # random translation (pixels) as augmentation
    widths: list[int] = field(default_factory=lambda: [16, 32])  # conv channels of the 2 stages
    feature_dim: int = 128  # penultimate layer = FID feature dimension


TRAINING_KEYS = ("epochs", "batch_size", "lr", "seed", "max_shift")
ARCH_KEYS = ("widths", "feature_dim")
DEFAULTS = asdict(ClassifierConfig())

ConfigStore.instance().store(name="fid_classifier", node=ClassifierConfig)
