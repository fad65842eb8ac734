"""VectorQuantizer: k-means init, dead-code resets, straight-through, losses, EMA, DDP agreement."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from ldm.data import MNIST5k
from ldm.modules.encoder_decoder import Encoder
from ldm.modules.quantizer import (
    VectorQuantizer,
    codebook_perplexity,
    kmeans,
    nearest_code,
)


@pytest.fixture(scope="module")
def encoder_outputs() -> torch.Tensor:
    """Encoder outputs (N, 4) of 256 real MNIST-5k digits through an untrained f=4 encoder."""
    torch.manual_seed(0)
    images = MNIST5k(image_size=32).build().images
    x = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:256]]
    enc = Encoder(1, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, double_z=False)
    with torch.no_grad():
        z = enc(x)  # (256, 4, 8, 8)
    return z.permute(0, 2, 3, 1).reshape(-1, 4)  # (16384, 4)


def _quant_error(x: torch.Tensor, codebook: torch.Tensor) -> float:
    return nearest_code(x, codebook)[1].mean().item()


def test_kmeans_beats_random_init_on_encoder_outputs(encoder_outputs):
    x = encoder_outputs
    gen = torch.Generator().manual_seed(1)
    centroids, counts = kmeans(x, 64, iters=10, generator=gen)
    assert centroids.shape == (64, 4) and counts.sum().item() == x.shape[0]
    err_kmeans = _quant_error(x, centroids)
    # the quantizer's own random init (uniform(-1/K, 1/K), as Taming) ...
    err_uniform = _quant_error(x, VectorQuantizer(64, 4, init="random").embedding.detach())
    # ... and the stronger baseline of 64 random encoder outputs
    picks = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))[:64]
    err_samples = _quant_error(x, x[picks])
    assert err_kmeans < 0.8 * err_samples, (err_kmeans, err_samples)
    assert err_kmeans < 0.5 * err_uniform, (err_kmeans, err_uniform)
    # Lloyd iterations never increase the error of their k-means++ seeding
    seeded, _ = kmeans(x, 64, iters=0, generator=torch.Generator().manual_seed(1))
    assert err_kmeans <= _quant_error(x, seeded) + 1e-6


def test_kmeans_init_inside_quantizer_after_gathering(encoder_outputs):
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4, kmeans_init_batches=2, kmeans_iters=5).train()
    z1, z2 = (
        encoder_outputs[i * 4096 : (i + 1) * 4096].reshape(64, 8, 8, 4).permute(0, 3, 1, 2)
        for i in range(2)
    )  # two batches (64, 4, 8, 8)
    random_codebook = vq.embedding.detach().clone()

    out = vq(z1)  # gathering: passes z through untouched, no loss
    assert not bool(vq.initialized)
    assert torch.equal(out.z_q, z1) and out.loss.item() == 0.0
    assert torch.equal(vq.embedding.detach(), random_codebook)

    torch.manual_seed(5)
    out = vq(z2)  # second batch: k-means runs on both batches, then this batch is quantized
    assert bool(vq.initialized)
    flat = torch.cat([VectorQuantizer._flatten(z1), VectorQuantizer._flatten(z2)])
    torch.manual_seed(5)
    expected, _ = kmeans(flat, 32, iters=5)
    assert torch.allclose(vq.embedding.detach(), expected)
    assert _quant_error(flat, vq.embedding.detach()) < 0.5 * _quant_error(flat, random_codebook)
    z_q, _ = vq.quantize(z2)
    assert torch.allclose(out.z_q, z_q)


def test_random_init_needs_no_gathering():
    vq = VectorQuantizer(8, 2, init="random").train()
    assert bool(vq.initialized)
    z = torch.randn(2, 2, 3, 3)
    out = vq(z)
    assert out.loss.item() > 0 and not torch.equal(out.z_q, z)


def _initialized_vq(**kw) -> VectorQuantizer:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 2, init="random", **kw).train()
    with torch.no_grad():
        vq.embedding[:8] = torch.randn(8, 2)
        vq.embedding[8:] = 100.0 + torch.arange(8.0)[:, None]  # far from the data: never used
        if vq.use_ema:  # keep the EMA statistics consistent with the codes set by hand
            vq.ema_embed_sum.copy_(vq.embedding * vq.ema_cluster_size[:, None])
    return vq


@pytest.mark.parametrize("use_ema", [False, True])
def test_dead_codes_are_moved_onto_encoder_outputs(use_ema):
    vq = _initialized_vq(dead_code_steps=3, use_ema=use_ema)
    z = torch.randn(4, 2, 8, 8)  # 256 vectors around the origin
    flat = VectorQuantizer._flatten(z)
    out = vq(z)
    assert (out.counts[8:] == 0).all()
    usage_before = (out.counts > 0).float().mean().item()
    assert usage_before <= 0.5
    vq(z)
    assert (vq.steps_since_used[8:] == 2).all()
    out = vq(z)  # third idle step: the far codes are dead and get re-seeded
    revived = vq.embedding.detach()[8:]
    dist_to_data = torch.cdist(revived, flat).min(dim=1).values  # (8,)
    # each sits on an encoder output of the batch (EMA: then already nudged by one EMA update)
    assert dist_to_data.max().item() < (0.5 if use_ema else 1e-5)
    assert (vq.steps_since_used[8:] < 3).all()
    usage_after = (out.counts > 0).float().mean().item()
    assert usage_after > usage_before
    assert (out.counts[8:] > 0).all()  # revived codes serve the outputs they were placed on


def test_dead_code_reset_disabled_with_zero_steps():
    vq = _initialized_vq(dead_code_steps=0)
    far = vq.embedding.detach()[8:].clone()
    for _ in range(5):
        vq(torch.randn(2, 2, 4, 4))
    assert torch.equal(vq.embedding.detach()[8:], far)


def test_eval_mode_changes_no_state():
    vq = _initialized_vq(dead_code_steps=1)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    for _ in range(3):
        vq(torch.randn(2, 2, 4, 4))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())


def test_straight_through_and_losses():
    torch.manual_seed(0)
    beta = 0.25
    vq = VectorQuantizer(8, 3, beta=beta, init="random", dead_code_steps=0).train()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = vq(z)
    z_q_values, _ = vq.quantize(z.detach())
    assert torch.allclose(out.z_q, z_q_values, atol=1e-6)  # z + (z_q - z) rounds
    mse = (z.detach() - z_q_values).pow(2).mean()
    assert torch.allclose(out.loss, (1 + beta) * mse)
    (out.z_q * torch.arange(96.0).reshape(2, 3, 4, 4)).sum().backward()
    assert torch.equal(z.grad, torch.arange(96.0).reshape(2, 3, 4, 4))  # identity gradient
    # codebook loss moves the codes, commitment pulls z
    z.grad = None
    out = vq(z)
    out.loss.backward()
    assert vq.embedding.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_ema_codebook_follows_its_cluster_mean():
    vq = VectorQuantizer(2, 1, use_ema=True, ema_decay=0.5, init="random", dead_code_steps=0)
    vq.train()
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[0.5], [-50.0]]))
    z = torch.full((1, 1, 4, 4), 3.0)
    for _ in range(30):
        out = vq(z)
    assert "embedding" not in dict(vq.named_parameters())
    assert abs(vq.embedding[0].item() - 3.0) < 1e-2
    assert torch.allclose(out.loss, 0.25 * (z - out.z_q.detach()).pow(2).mean(), atol=1e-6)


def test_perplexity_and_bad_arguments():
    assert codebook_perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])).item() == pytest.approx(4.0)
    assert codebook_perplexity(torch.tensor([7.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="init='kmeanz'"):
        VectorQuantizer(8, 2, init="kmeanz")
    with pytest.raises(ValueError, match=r"z of shape \(1, 3, 2, 2\)"):
        VectorQuantizer(8, 2)(torch.randn(1, 3, 2, 2))


def test_state_lives_in_buffers():
    keys = set(VectorQuantizer(8, 2, use_ema=True).state_dict())
    assert keys == {
        "embedding",
        "ema_cluster_size",
        "ema_embed_sum",
        "initialized",
        "steps_since_used",
    }
    assert set(VectorQuantizer(8, 2).state_dict()) == {
        "embedding",
        "initialized",
        "steps_since_used",
    }


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    torch.manual_seed(100 + rank)  # every rank sees different data and RNG streams
    vq = VectorQuantizer(
        16, 2, kmeans_init_batches=2, kmeans_iters=3, dead_code_steps=2, use_ema=True
    ).train()
    for _ in range(6):
        vq(torch.randn(2, 2, 4, 4) + rank)
    torch.save(vq.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_hold_identical_codebooks_under_ddp(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert bool(s0["initialized"])
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
