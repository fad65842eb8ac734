"""ldm: latent diffusion (stage 1 autoencoder, stage 2 latent UNet), Lightning + Hydra."""

# The resolvers conf/ interpolates with (`${ifnull:...}`, `${epoch_budget:...}`) exist as soon as
# anything of ldm is imported: train.py, sample.py, tests composing configs, reruns from .hydra/.
from ldm import config as _config  # noqa: F401

# Likewise the structured config nodes conf/ builds on (`fid_classifier`).
from ldm.metrics import classifier_config as _classifier_config  # noqa: F401
