"""Old checkpoints keep working: the fixture written by the code at 6fef1e3 loads bit for bit
(its config upgraded by `upgrade_stored_config`) and computes what that code computed; the
default networks are built exactly as before (same init, same state_dict keys)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from ldm.models.loading import load_latent_diffusion
from ldm.utils.checkpoint import load_checkpoint
from ldm.utils.errors import UserError
from ldm.utils.instantiate import RENAMED_TARGETS, check_target, upgrade_stored_config
from tests.conftest import ROOT, compose_config

FIXTURES = ROOT / "tests" / "fixtures"
CKPT = FIXTURES / "diffusion_6fef1e3_debug_fast.ckpt"


@pytest.fixture(scope="module")
def reference():
    """What the 6fef1e3 code computed (tests/fixtures/make_reference_outputs.py)."""
    return torch.load(FIXTURES / "diffusion_6fef1e3_outputs.pt", weights_only=True)


def test_old_checkpoint_loads_bit_exactly():
    stored = load_checkpoint(CKPT, expected_stage="diffusion")
    ae_cfg = stored["ldm"]["config"]["model"]["autoencoder"]
    # the old module path, which no longer exists: loading goes through RENAMED_TARGETS
    assert ae_cfg["encoder"]["_target_"] == "ldm.modules.autoencoder.Encoder"
    assert ae_cfg["decoder"]["_target_"] == "ldm.modules.autoencoder.Decoder"
    model, _ = load_latent_diffusion(CKPT)
    state = model.state_dict()
    assert list(state) == list(stored["state_dict"])
    for key, value in stored["state_dict"].items():
        assert torch.equal(state[key], value), key


def test_old_checkpoint_computes_what_its_code_computed(reference):
    ref = reference["fixture"]
    model, _ = load_latent_diffusion(CKPT)
    with torch.no_grad():
        z = model.autoencoder.encode(ref["images"])
        recon = model.autoencoder.decode(ref["z"])
        pred = model.unet(ref["x"], torch.tensor([5, 50]), torch.tensor([0, 3]))
        samples = model.sample(
            2, class_labels=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0)
        )
    # Equal on one thread; other thread counts may round differently.
    for name, value in (("z", z), ("recon", recon), ("pred", pred), ("samples", samples)):
        torch.testing.assert_close(value, ref[name], rtol=0, atol=1e-5, msg=name)


def test_default_networks_are_built_as_before(reference, tmp_path):
    """Seed 0 gives the default autoencoder and UNet the same initial weights (order, shapes,
    values) as the 6fef1e3 code, and the autoencoder the same outputs: the default run starts
    from the same point."""
    ref = reference["default"]
    cfg = compose_config([], tmp_path)
    torch.manual_seed(0)
    autoencoder = instantiate(cfg.model.autoencoder)
    torch.manual_seed(0)
    unet = instantiate(cfg.model.diffusion.unet)
    for name, module in (("autoencoder", autoencoder), ("unet", unet)):
        state = module.state_dict()
        assert list(state) == ref[f"{name}_init"]["keys"], name
        stats = torch.stack(
            [torch.stack([v.double().sum(), v.double().pow(2).sum()]) for v in state.values()]
        )
        torch.testing.assert_close(stats, ref[f"{name}_init"]["stats"], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        z = autoencoder.encode(ref["images"])
        recon = autoencoder.decode(ref["z"])
    torch.testing.assert_close(z, ref["z"], rtol=0, atol=1e-5)
    torch.testing.assert_close(recon, ref["recon"], rtol=0, atol=1e-5)


def test_stored_configs_are_upgraded_everywhere():
    old, new = next(iter(RENAMED_TARGETS.items()))
    ae = "ldm.models.autoencoder.KLAutoencoder"
    config = {
        "a": {
            "_target_": ae,
            "lr_schedule": "cosine",
            "warmup_steps": 20,
            "b": [{"_target_": old}],
        },
        "c": {"lr_schedule": "kept: no target"},
    }
    assert upgrade_stored_config(config) == {
        "a": {"_target_": ae, "b": [{"_target_": new}]},
        "c": {"lr_schedule": "kept: no target"},
    }
    assert config["a"]["b"][0]["_target_"] == old and "lr_schedule" in config["a"]  # a copy
    for target in RENAMED_TARGETS.values():
        check_target(target, "test")  # every new name exists and passes the allowlist
    with pytest.raises(UserError, match="does not exist"):
        check_target(old, "test")
