"""Noise schedules of variance-preserving diffusion: betas, alphas_cumprod, q_sample, targets,
weights.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239):
    x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * eps,   eps ~ N(0, I)
with training timesteps t in 0..T-1 (t = 0 already carries betas[0] of noise). Everything here is
plain torch; schedules are computed in float64 and stored as float32 buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def _check_choice(what: str, value: object, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(repr, valid))}")


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Linear betas of DDPM (Ho et al. 2020, Sec. 4: 1e-4 .. 0.02 over T = 1000). float64, (T,)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Latent diffusion's schedule (Rombach et al. 2022): sqrt(beta) linear, then squared. float64,
    (T,)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17), float64, (T,).

    alphas_cumprod(t) = f(t) / f(0), f(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2, and
    beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t) clipped to max_beta = 0.999 to avoid the
    singularity at t = T.
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def sigmoid_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Sigmoid schedule of GeoDiff (Xu et al. 2022): sigmoid(linspace(-6, 6)) scaled into
    [beta_start, beta_end]. float64, (T,)."""
    u = torch.linspace(-6, 6, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(u) * (beta_end - beta_start) + beta_start


def betas_from_sigmas(sigmas: Tensor) -> Tensor:
    """Variance-preserving betas equivalent to variance-exploding per-step noise sizes, float64
    (T,).

    VE chain: x_{t+1} = x_t + eps_t, eps_t ~ N(0, sigma_t^2 I), so x_t = x0 + s_t * n with the
    marginal variance s_t^2 = sum_{i<=t} sigma_i^2 (t = 0 has taken one step, like betas[0]).
    Dividing by sqrt(1 + s_t^2) gives
        x_t / sqrt(1 + s_t^2) = x0 / sqrt(1 + s_t^2) + s_t / sqrt(1 + s_t^2) * n,
    which is the VP marginal with alphas_cumprod_t = 1 / (1 + s_t^2) (and 1 - alphas_cumprod_t =
    s_t^2 / (1 + s_t^2), so the two coefficients' squares sum to one). Hence
        beta_t = 1 - alphas_cumprod_t / alphas_cumprod_{t-1} = sigma_t^2 / (1 + s_t^2),
    and a VP sample x_t^VP corresponds to the VE sample x_t^VE = x_t^VP / sqrt(alphas_cumprod_t)
    (the scaling used by Karras et al. 2022, eq. 4; their sigma(t) is our s_t).
    """
    var = sigmas.to(torch.float64) ** 2  # (T,) per-step variances sigma_t^2
    return var / (1 + torch.cumsum(var, dim=0))


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.

    Shift sqrt(alphas_cumprod) so its last value is 0 (SNR(T) = 0, training then sees pure noise at
    the last step) and scale it so its first value is unchanged; convert back to betas (last = 1).
    """
    sqrt_ac = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1 - alphas


def convert_prediction(
    pred: Tensor, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, src: str, dst: str
) -> Tensor:
    """Convert a model output between prediction types at one noise level.

    With x_t = alpha * x0 + sigma * eps, alpha^2 + sigma^2 = 1 (alpha = sqrt(alphas_cumprod)) and
    v = alpha * eps - sigma * x0 (Salimans & Ho 2022, "Progressive Distillation", Sec. 4 / App. D):
        x0  = (x_t - sigma * eps) / alpha     = alpha * x_t - sigma * v
        eps = (x_t - alpha * x0) / sigma      = sigma * x_t + alpha * v
    `alpha`/`sigma` are floats or tensors broadcastable to x_t. The one copy of this algebra: the
    schedule's converters and the samplers both call it.
    """
    if src == dst:
        return pred
    if src == "eps":
        x0 = (x_t - sigma * pred) / alpha
        eps = pred
    elif src == "x0":
        x0 = pred
        eps = (x_t - alpha * pred) / sigma
    elif src == "v":
        # Divided by alpha^2 + sigma^2 (= 1 in exact arithmetic) so that v conversions are exact
        # inverses of each other also with float32-rounded coefficients.
        norm = alpha * alpha + sigma * sigma
        x0 = (alpha * x_t - sigma * pred) / norm
        eps = (sigma * x_t + alpha * pred) / norm
    else:
        raise ValueError(
            f"unknown prediction type {src!r}; valid: {', '.join(map(repr, PREDICTION_TYPES))}"
        )
    if dst == "x0":
        return x0
    if dst == "eps":
        return eps
    if dst == "v":
        return alpha * eps - sigma * x0
    raise ValueError(
        f"unknown prediction type {dst!r}; valid: {', '.join(map(repr, PREDICTION_TYPES))}"
    )


class NoiseSchedule(nn.Module):
    """A discrete variance-preserving noise schedule and the training objective built on it.

    Built by `name` ("linear", "scaled_linear", "cosine", "sigmoid") or from explicit values:
    `betas` (T floats in (0, 1)) or `sigmas` (T positive variance-exploding per-step noise sizes,
    converted by `betas_from_sigmas`). With explicit values, `num_timesteps` is their length and
    `name`, `beta_start`, `beta_end` are not used. `num_timesteps=None` means 1000 for named ones.

    `zero_terminal_snr` applies Lin et al. 2023 (Algorithm 1). It makes alphas_cumprod[T-1] = 0,
    where eps-prediction cannot give x0 back, so it needs prediction_type "v" or "x0" (the paper
    pairs it with v-prediction).

    Buffers (float32, computed in float64, persistent so checkpoints carry them; they move with
    `.to(device)`): betas, alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod.
    """

    def __init__(
        self,
        name: str = "linear",
        num_timesteps: int | None = None,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        betas: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        zero_terminal_snr: bool = False,
        prediction_type: str = "eps",
    ):
        super().__init__()
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if betas is not None and sigmas is not None:
            raise ValueError("give either betas or sigmas, not both")
        explicit = betas if betas is not None else sigmas
        if explicit is not None:
            values = torch.as_tensor(list(explicit), dtype=torch.float64)  # (T,)
            if values.ndim != 1 or values.numel() == 0:
                raise ValueError(
                    "explicit betas/sigmas must be a non-empty list, "
                    f"got shape {tuple(values.shape)}"
                )
            if num_timesteps is not None and num_timesteps != values.numel():
                raise ValueError(
                    f"num_timesteps={num_timesteps} does not match "
                    f"the {values.numel()} explicit values"
                )
            num_timesteps = values.numel()
            if betas is not None:
                if not bool(((values > 0) & (values < 1)).all()):
                    raise ValueError(
                        "betas must lie in (0, 1), "
                        f"got min {values.min().item()} max {values.max().item()}"
                    )
                name, beta64 = "betas", values
            else:
                if not bool(((values > 0) & values.isfinite()).all()):
                    raise ValueError(
                        f"sigmas must be positive and finite, got min {values.min().item()}"
                    )
                name, beta64 = "sigmas", betas_from_sigmas(values)
        else:
            _check_choice("schedule name", name, SCHEDULE_NAMES)
            num_timesteps = 1000 if num_timesteps is None else int(num_timesteps)
            if num_timesteps < 1:
                raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
            if (
                name in ("linear", "scaled_linear", "sigmoid")
                and not 0 < beta_start <= beta_end < 1
            ):
                raise ValueError(
                    f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
                )
            if name == "cosine":
                beta64 = cosine_betas(num_timesteps)
            else:
                make = {
                    "linear": linear_betas,
                    "scaled_linear": scaled_linear_betas,
                    "sigmoid": sigmoid_betas,
                }
                beta64 = make[name](num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            if prediction_type == "eps":
                raise ValueError(
                    "zero_terminal_snr=True needs prediction_type 'v' or 'x0' "
                    "(eps cannot recover x0 at SNR 0)"
                )
            beta64 = rescale_zero_terminal_snr(beta64)

        self.name = name
        self.num_timesteps = int(num_timesteps)
        self.beta_start, self.beta_end = beta_start, beta_end
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.prediction_type = prediction_type

        ac64 = torch.cumprod(1 - beta64, dim=0)  # (T,)
        for key, value in {
            "betas": beta64,
            "alphas_cumprod": ac64,
            "sqrt_alphas_cumprod": ac64.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - ac64).sqrt(),
        }.items():
            self.register_buffer(key, value.to(torch.float32), persistent=True)

    def extra_repr(self) -> str:
        ac = self.alphas_cumprod
        parts = [f"name={self.name!r}", f"num_timesteps={self.num_timesteps}"]
        if self.name in ("linear", "scaled_linear", "sigmoid"):
            parts += [f"beta_start={self.beta_start:g}", f"beta_end={self.beta_end:g}"]
        parts += [
            f"prediction_type={self.prediction_type!r}",
            f"zero_terminal_snr={self.zero_terminal_snr}",
            f"alphas_cumprod=[{ac[0].item():.6g} .. {ac[-1].item():.4g}]",
        ]
        return ", ".join(parts)

    # -- gathering per-sample coefficients ------------------------------------------------------
    def _gather(self, buffer: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """buffer[t] shaped (B, 1, ..., 1) to broadcast against `like` (B, ...), in like's dtype."""
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"t must be an integer tensor of timesteps, got {t.dtype}")
        out = buffer.to(like.device)[t.to(like.device)].to(like.dtype)  # (B,)
        return out.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)

    def _alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return (
            self._gather(self.sqrt_alphas_cumprod, t, like),
            self._gather(self.sqrt_one_minus_alphas_cumprod, t, like),
        )

    # -- forward process ------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x0) (Ho et al. 2020, eq. 4): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) at t, float32 (B,)."""
        ac = self.alphas_cumprod.to(t.device)[t]
        return ac / (1 - ac)

    # -- prediction-type conversions ------------------------------------------------------------
    def convert(self, x_t: Tensor, t: Tensor, pred: Tensor, src: str, dst: str) -> Tensor:
        """Convert `pred` from prediction type `src` to `dst` at timesteps t (see
        convert_prediction)."""
        _check_choice("prediction type", src, PREDICTION_TYPES)
        _check_choice("prediction type", dst, PREDICTION_TYPES)
        alpha, sigma = self._alpha_sigma(t, x_t)
        return convert_prediction(pred, x_t, alpha, sigma, src, dst)

    def to_eps(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """eps implied by a model output `pred` given in self.prediction_type."""
        return self.convert(x_t, t, pred, self.prediction_type, "eps")

    def to_x0(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """x0 implied by a model output `pred` given in self.prediction_type."""
        return self.convert(x_t, t, pred, self.prediction_type, "x0")

    def to_v(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """v implied by a model output `pred` given in self.prediction_type."""
        return self.convert(x_t, t, pred, self.prediction_type, "v")

    # -- training objective ---------------------------------------------------------------------
    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Regression target for self.prediction_type: noise, x0, or v = alpha noise - sigma x0."""
        if self.prediction_type == "eps":
            return noise
        if self.prediction_type == "x0":
            return x0
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def loss_weight(
        self, t: Tensor, weighting: str = "uniform", min_snr_gamma: float = 5.0
    ) -> Tensor:
        """Per-sample weight (B,) float32 of the MSE on self.prediction_type's target.

        "min_snr" is Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
        Weighting Strategy", eq. 8): the x0-space loss is weighted by min(SNR, gamma). Since
        ||eps err||^2 = SNR ||x0 err||^2 and ||v err||^2 = (SNR + 1) ||x0 err||^2, that is
        min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0.
        """
        _check_choice("loss weighting", weighting, LOSS_WEIGHTINGS)
        if weighting == "uniform":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        snr = self.snr(t).double()  # (B,) float64 so 1/SNR near t=0 stays accurate
        clipped = snr.clamp(max=min_snr_gamma)
        if self.prediction_type == "eps":
            weight = clipped / snr
        elif self.prediction_type == "v":
            weight = clipped / (snr + 1)
        else:
            weight = clipped
        return weight.float()
