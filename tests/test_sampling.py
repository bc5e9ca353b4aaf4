"""Sampling: deterministic from (seed, period), distinct, uniform."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lightning_lisa import sample_layers
from lightning_lisa.sampling import period_seed


def test_deterministic_and_independent_of_global_rng():
    first = [sample_layers("uniform", 32, 4, seed=3, period=p) for p in range(50)]
    torch.manual_seed(123)
    torch.rand(10)
    second = [sample_layers("uniform", 32, 4, seed=3, period=p) for p in range(50)]
    assert first == second
    assert first != [sample_layers("uniform", 32, 4, seed=4, period=p) for p in range(50)]


def test_distinct_sorted_in_range():
    for period in range(200):
        chosen = sample_layers("uniform", 10, 3, seed=0, period=period)
        assert len(set(chosen)) == 3
        assert chosen == sorted(chosen)
        assert all(0 <= i < 10 for i in chosen)
    assert sample_layers("uniform", 5, 5, 0, 0) == [0, 1, 2, 3, 4]


def test_uniform_frequencies():
    n, k, periods = 12, 3, 4000
    counts = Counter(i for p in range(periods) for i in sample_layers("uniform", n, k, seed=1, period=p))
    expected = periods * k / n
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(n))
    assert chi2 < 31.3  # chi-square, 11 degrees of freedom, p = 0.001


def test_consecutive_periods_are_not_correlated():
    pairs = Counter(
        tuple(sample_layers("uniform", 4, 1, seed=0, period=p) + sample_layers("uniform", 4, 1, seed=0, period=p + 1))
        for p in range(3200)
    )
    assert len(pairs) == 16
    assert min(pairs.values()) > 120  # 200 expected for each of 16 pairs


@pytest.mark.parametrize("seed", [0, 1, 2**40])
def test_period_seed_is_64_bit(seed):
    values = {period_seed(seed, p) for p in range(1000)}
    assert len(values) == 1000
    assert all(0 <= v < 2**64 for v in values)
