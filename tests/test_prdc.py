"""Precision/recall (Kynkaenniemi et al. 2019) and density/coverage (Naeem et al. 2020)."""

import math

import pytest
import torch

from ldm.metrics.prdc import PRDC, PRDC_KEYS, knn_radii, prdc


def gaussian(n, d=8, seed=0, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def test_hand_computed_one_dimensional_sets():
    """k = 1 on the line: reals {0, 1, 3, 7} have radii 1, 1, 2, 4; fakes {0.5, 2.8, 12, 20} 2.3,
    2.3, 8, 8. Fakes in real balls: 0.5 (balls of 0 and 1), 2.8 (ball of 3) -> precision 2/4,
    density 3 / (1 * 4). Reals in fake balls: 0, 1, 3 (ball of 0.5 or 2.8), 7 (ball of 12, radius 8)
    -> recall 1: an outlying fake with a wide ball inflates recall, which coverage avoids: the
    nearest fake of 7 is 2.8 at 4.2 > 4, so coverage is 3/4."""
    real = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    fake = torch.tensor([[0.5], [2.8], [12.0], [20.0]])
    assert knn_radii(real, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(fake, 1).tolist() == pytest.approx([2.3, 2.3, 8.0, 8.0])
    # k = 2: the second-nearest other point.
    assert knn_radii(real, 2).tolist() == [3.0, 2.0, 3.0, 6.0]
    got = prdc(real, fake, nearest_k=1)
    assert got == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "density": 0.75, "coverage": 0.75}
    )


def test_equal_size_draws_cover_as_naeem_et_al_predict():
    """Two equal-size draws of one distribution: E[coverage] = 1 - 2^-k (Naeem et al. 2020, Sec. 4),
    whatever the size or dimension; with 10x more reals than fakes it is far lower."""
    for n, d in ((400, 4), (1000, 16)):
        got = prdc(gaussian(n, d), gaussian(n, d, seed=9), nearest_k=3)
        assert got["coverage"] == pytest.approx(0.875, abs=0.04), (n, d, got)
    assert prdc(gaussian(4000, 4), gaussian(400, 4, seed=9), nearest_k=3)["coverage"] < 0.4


def test_identical_sets_score_one():
    x = gaussian(300)
    got = prdc(x, x.clone(), nearest_k=3)
    assert got["precision"] == got["recall"] == got["coverage"] == 1.0
    # Each fake lies in its own twin's ball and, summed over fakes, in k more per real ball (each
    # ball holds its centre's k nearest others, no ties): density = (N + kN) / (kN) = (k + 1) / k.
    assert got["density"] == pytest.approx(4 / 3, rel=1e-12)
    # Two independent draws of one distribution score close to one too.
    other = prdc(x, gaussian(300, seed=1), nearest_k=3)
    assert all(other[key] > 0.75 for key in PRDC_KEYS), other
    assert other["density"] == pytest.approx(1.0, abs=0.2)


def test_collapsed_set_keeps_precision_loses_recall_and_coverage():
    real = gaussian(400)
    collapsed = real[:5].repeat_interleave(40, dim=0) + 1e-3 * gaussian(200, seed=2)  # 5 modes
    got = prdc(real, collapsed, nearest_k=3)
    assert got["precision"] == 1.0
    assert got["recall"] < 0.1 and got["coverage"] < 0.1, got


def test_shifted_set_has_low_precision_and_density():
    real = gaussian(400)
    got = prdc(real, gaussian(400, seed=3, shift=3.0), nearest_k=3)
    assert got["precision"] < 0.1 and got["density"] < 0.05 and got["coverage"] < 0.1, got
    half = prdc(real, gaussian(400, seed=3, shift=1.0), nearest_k=3)
    assert got["precision"] < half["precision"] < 0.9


def test_metric_accumulates_batches_and_chunking_does_not_matter():
    real, fake = gaussian(180), gaussian(180, seed=4, shift=0.3)
    expected = prdc(real, fake, nearest_k=3)
    metric = PRDC(nearest_k=3, chunk_size=7, sync_on_compute=False)
    metric.set_real_features(real)
    for batch in fake.split(50):
        metric.update(batch)
    assert metric.compute() == pytest.approx(expected, rel=1e-12)
    # More reals than fakes: scored against a seeded subset of as many reals, in their order.
    more = torch.cat([gaussian(300, seed=5), real])
    metric.set_real_features(more)
    got = metric.compute()
    subset = more[
        torch.randperm(480, generator=torch.Generator().manual_seed(0))[:180].sort().values
    ]
    assert got == pytest.approx(prdc(subset, fake, nearest_k=3), rel=1e-12)
    assert metric.compute() == got  # same seed, same subset
    metric.reset()  # forgets the fakes, keeps the reals
    metric.update(fake[:3])  # N <= k: the k-NN balls of the fakes are undefined
    assert all(math.isnan(v) for v in metric.compute().values())
    with pytest.raises(ValueError, match="nearest_k=0"):
        PRDC(nearest_k=0)
    with pytest.raises(ValueError, match="0 < k < N"):
        knn_radii(real[:3], 3)
