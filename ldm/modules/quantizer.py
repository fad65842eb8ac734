"""Vector quantizer of the VQ autoencoder, with a k-means-initialised, self-repairing codebook.

- Nearest-code assignment, straight-through gradients, codebook + commitment loss:
  van den Oord et al. 2017 ("Neural Discrete Representation Learning", arXiv 1711.00937), Eq. 3.
- Optional EMA codebook updates instead of the codebook loss: same paper, App. A.1, with the
  Laplace smoothing of the cluster sizes used by Razavi et al. 2019 (VQ-VAE-2).
- Codebook initialised by k-means (Lloyd 1982, k-means++ seeding of Arthur & Vassilvitskii 2007)
  on the first encoder outputs, computed in torch on their device.
- Dead codes (unused for `dead_code_steps` training steps) are moved onto random encoder outputs
  of the current batch, the codebook-reset remedy of Dhariwal et al. 2020 (Jukebox, Sec. 3.2) /
  Williams et al. 2020.

State that must survive a checkpoint (initialised flag, per-code idle counters, EMA statistics)
lives in persistent buffers. Under torch.distributed the usage counts and EMA statistics are
all-reduced and codebook rewrites are broadcast from rank 0, so every rank holds the same codes.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ldm.utils.distributed import is_distributed

_CHUNK = 8192  # rows of z per distance matrix, bounds memory at chunk x num_codes


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


@torch.no_grad()
def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest codebook row for every row of x (N, D), and the squared distance.

    ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2, evaluated in float32 in chunks of rows."""
    x = x.float()
    codebook = codebook.float()
    e2 = codebook.pow(2).sum(1)  # (K,)
    indices, dists = [], []
    for xc in x.split(_CHUNK):
        d = xc.pow(2).sum(1, keepdim=True) - 2.0 * xc @ codebook.t() + e2  # (n, K)
        dmin, idx = d.min(dim=1)
        indices.append(idx)
        dists.append(dmin.clamp_min(0.0))
    return torch.cat(indices), torch.cat(dists)  # (N,), (N,)


@torch.no_grad()
def _cluster_sums(
    x: torch.Tensor, indices: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sum of rows and counts via one-hot matmuls (deterministic on CUDA, unlike
    index_add_/scatter_add_)."""
    sums = x.new_zeros(num_clusters, x.shape[1], dtype=torch.float32)
    counts = x.new_zeros(num_clusters, dtype=torch.float32)
    for xc, ic in zip(x.float().split(_CHUNK), indices.split(_CHUNK)):
        onehot = F.one_hot(ic, num_clusters).float()  # (n, K)
        sums += onehot.t() @ xc  # (K, D)
        counts += onehot.sum(0)
    return sums, counts


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    iters: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the rows of x (N, D): k-means++ seeding (Arthur & Vassilvitskii 2007), then
    `iters` Lloyd iterations (Lloyd 1982). Empty clusters keep their previous centre.

    Returns centroids (K, D) float32 and cluster sizes (K,) float32 of the final assignment."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    if num_clusters <= 0 or iters < 0:
        raise ValueError(
            f"kmeans needs num_clusters > 0 and iters >= 0, got {num_clusters}, {iters}"
        )
    x = x.float()
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centroids = x[first]  # (1, D)
    d2 = (x - centroids).pow(2).sum(1)  # (N,) squared distance to the nearest chosen centre
    chosen = [centroids]
    for _ in range(1, num_clusters):
        # D^2 sampling; when every point coincides with a centre (N < K) fall back to uniform.
        weights = d2 if bool(d2.sum() > 0) else torch.ones_like(d2)
        idx = torch.multinomial(weights, 1, generator=generator)
        c = x[idx]  # (1, D)
        chosen.append(c)
        d2 = torch.minimum(d2, (x - c).pow(2).sum(1))
    centroids = torch.cat(chosen)  # (K, D)

    indices, _ = nearest_code(x, centroids)
    sums, counts = _cluster_sums(x, indices, num_clusters)
    for _ in range(iters):
        nonempty = counts > 0
        centroids = torch.where(nonempty[:, None], sums / counts.clamp_min(1.0)[:, None], centroids)
        indices, _ = nearest_code(x, centroids)
        sums, counts = _cluster_sums(x, indices, num_clusters)
    return centroids, counts


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor  # (B, D, h, w) quantized latents carrying straight-through gradients
    loss: torch.Tensor  # () codebook + beta * commitment (EMA: beta * commitment only)
    indices: torch.Tensor  # (B, h, w) code index per position
    counts: torch.Tensor  # (K,) float32 uses of each code in this batch (all ranks)


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code usage distribution: K when all K codes are used equally."""
    p = counts.float() / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class VectorQuantizer(nn.Module):
    """Maps z (B, D, h, w) to its nearest codebook vectors; see the module docstring.

    Args:
        num_codes: codebook size K.
        code_dim: D, the channel count of z.
        beta: commitment weight (0.25 in van den Oord et al.).
        use_ema: update codes by exponential moving averages instead of the codebook loss.
        ema_decay, ema_eps: EMA decay and Laplace smoothing constant.
        init: "kmeans" (k-means on the encoder outputs of the first `kmeans_init_batches`
            training batches; until then z passes through unquantized, so the net warms up as a
            plain autoencoder) or "random" (uniform(-1/K, 1/K), as Taming Transformers).
        kmeans_init_batches: number of training batches gathered for the k-means init.
        kmeans_iters: Lloyd iterations after k-means++ seeding.
        dead_code_steps: a code unused for this many consecutive training steps is moved onto a
            random encoder output of the current batch; 0 disables the reset.
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        beta: float = 0.25,
        use_ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        init: str = "kmeans",
        kmeans_init_batches: int = 4,
        kmeans_iters: int = 10,
        dead_code_steps: int = 50,
    ):
        super().__init__()
        if init not in ("kmeans", "random"):
            raise ValueError(f"init={init!r} is not one of 'kmeans', 'random'")
        if num_codes <= 1 or code_dim <= 0:
            raise ValueError(f"num_codes={num_codes} must be > 1 and code_dim={code_dim} > 0")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must be in (0, 1)")
        if kmeans_init_batches < 1 or kmeans_iters < 0 or dead_code_steps < 0:
            raise ValueError(
                f"kmeans_init_batches={kmeans_init_batches} must be >= 1, "
                f"kmeans_iters={kmeans_iters} and dead_code_steps={dead_code_steps} >= 0"
            )
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.use_ema = use_ema
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.init = init
        self.kmeans_init_batches = kmeans_init_batches
        self.kmeans_iters = kmeans_iters
        self.dead_code_steps = dead_code_steps

        codebook = torch.empty(num_codes, code_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if use_ema:
            self.register_buffer("embedding", codebook)
            self.register_buffer("ema_cluster_size", torch.ones(num_codes))
            self.register_buffer("ema_embed_sum", codebook.clone())
        else:
            self.embedding = nn.Parameter(codebook)
        self.register_buffer("initialized", torch.tensor(init == "random"))
        self.register_buffer("steps_since_used", torch.zeros(num_codes, dtype=torch.long))
        self._init_samples: list[torch.Tensor] = []  # encoder outputs gathered for k-means

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}, "
            f"use_ema={self.use_ema}, init={self.init!r}, dead_code_steps={self.dead_code_steps}"
        )

    @staticmethod
    def _flatten(z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)

    def _check(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.code_dim:
            raise ValueError(
                f"z of shape {tuple(z.shape)} must be (B, {self.code_dim}, h, w) for this codebook"
            )

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure lookup, no state change and no gradient: z (B, D, h, w) -> (z_q, indices)."""
        self._check(z)
        b, _, h, w = z.shape
        indices, _ = nearest_code(self._flatten(z), self.embedding)
        z_q = self.embedding[indices].to(z.dtype)  # (B*h*w, D)
        return z_q.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous(), indices.reshape(b, h, w)

    @torch.no_grad()
    def _kmeans_init(self, z_flat: torch.Tensor) -> None:
        centroids, counts = kmeans(z_flat, self.num_codes, self.kmeans_iters)
        centroids = _broadcast_from_rank0(centroids.contiguous())
        counts = _broadcast_from_rank0(counts.contiguous())
        self.embedding.data.copy_(centroids)
        if self.use_ema:
            self.ema_cluster_size.copy_(counts)
            self.ema_embed_sum.copy_(centroids * counts[:, None])
        self.steps_since_used.zero_()
        self.initialized.fill_(True)

    @torch.no_grad()
    def _revive_dead_codes(self, z_flat: torch.Tensor) -> bool:
        dead = (self.steps_since_used >= self.dead_code_steps).nonzero().squeeze(1)  # (n_dead,)
        if dead.numel() == 0:
            return False
        n = z_flat.shape[0]
        if dead.numel() <= n:
            pick = torch.randperm(n, device=z_flat.device)[: dead.numel()]
        else:
            pick = torch.randint(n, (dead.numel(),), device=z_flat.device)
        new_codes = _broadcast_from_rank0(z_flat[pick].float().contiguous())  # (n_dead, D)
        self.embedding.data[dead] = new_codes
        if self.use_ema:
            # A cluster of size one sitting on the new code, so the EMA ratio reproduces it.
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new_codes
        self.steps_since_used[dead] = 0
        return True

    @torch.no_grad()
    def _ema_update(self, z_flat: torch.Tensor, indices: torch.Tensor) -> None:
        sums, counts = _cluster_sums(z_flat, indices, self.num_codes)
        sums, counts = _all_reduce_sum(sums), _all_reduce_sum(counts)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.ema_eps) / (n + self.num_codes * self.ema_eps) * n
        self.embedding.copy_(self.ema_embed_sum / smoothed[:, None])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """In training mode this also runs the k-means init, idle counters, dead-code resets
        and EMA updates; in eval mode it only quantizes."""
        self._check(z)
        b, d, h, w = z.shape
        z_flat = self._flatten(z.detach())  # (B*h*w, D)

        if self.training and not bool(self.initialized):
            self._init_samples.append(z_flat.float())
            if len(self._init_samples) < self.kmeans_init_batches:
                # Warm-up as a plain autoencoder until enough outputs are gathered. The zero
                # loss still touches the codebook so DDP sees a gradient for every parameter.
                indices, _ = nearest_code(z_flat, self.embedding)
                counts = _all_reduce_sum(torch.bincount(indices, minlength=self.num_codes).float())
                loss = 0.0 * self.embedding.sum() if not self.use_ema else z.new_zeros(())
                return QuantizerOutput(z, loss, indices.reshape(b, h, w), counts)
            self._kmeans_init(torch.cat(self._init_samples))
            self._init_samples = []

        indices, _ = nearest_code(z_flat, self.embedding)  # (B*h*w,)
        counts = torch.bincount(indices, minlength=self.num_codes).float()  # (K,)
        if self.training:
            counts = _all_reduce_sum(counts)
            used = counts > 0
            self.steps_since_used.copy_(torch.where(used, 0, self.steps_since_used + 1))
            if self.dead_code_steps > 0 and self._revive_dead_codes(z_flat):
                # Reassign so revived codes serve the outputs they were placed on right away.
                indices, _ = nearest_code(z_flat, self.embedding)
                counts = _all_reduce_sum(torch.bincount(indices, minlength=self.num_codes).float())
            if self.use_ema:
                self._ema_update(z_flat, indices)

        z_q = F.embedding(indices, self.embedding)  # (B*h*w, D)
        z_q = z_q.reshape(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)  # (B, D, h, w)
        commitment = F.mse_loss(z, z_q.detach())
        if self.use_ema:
            loss = self.beta * commitment
        else:
            loss = F.mse_loss(z_q, z.detach()) + self.beta * commitment
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return QuantizerOutput(z_q, loss, indices.reshape(b, h, w), counts)
