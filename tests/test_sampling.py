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


def chi_square(counts: Counter, expected: dict[int, float]) -> float:
    return sum((counts[i] - e) ** 2 / e for i, e in expected.items())


@pytest.mark.parametrize(("num_blocks", "n_layers"), [(6, 2), (7, 2), (8, 3), (5, 5), (4, 1)])
def test_cyclic_covers_every_block_once_per_pass(num_blocks, n_layers):
    per_pass = -(-num_blocks // n_layers)
    passes = []
    for start in range(0, 10 * per_pass, per_pass):
        groups = [
            sample_layers("cyclic", num_blocks, n_layers, seed=2, period=p) for p in range(start, start + per_pass)
        ]
        assert all(len(set(g)) == n_layers for g in groups)
        assert {i for g in groups for i in g} == set(range(num_blocks))
        passes.append(groups)
    if num_blocks > n_layers:
        assert len({str(p) for p in passes}) > 1  # a fresh permutation each pass


@pytest.mark.parametrize("probabilities", [[0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 3.0, 0.0, 4.0]])
def test_probability_list_frequencies_match(probabilities):
    periods = 6000
    counts = Counter(sample_layers(probabilities, len(probabilities), 1, seed=5, period=p)[0] for p in range(periods))
    total = sum(probabilities)
    expected = {i: periods * q / total for i, q in enumerate(probabilities) if q > 0}
    assert set(counts) == set(expected)  # zero-probability blocks are never drawn
    assert chi_square(counts, expected) < 16.3  # chi-square, at most 3 degrees of freedom, p = 0.001


def test_probability_list_without_replacement():
    for period in range(300):
        chosen = sample_layers([0.0, 1.0, 3.0, 0.0, 4.0], 5, 3, seed=0, period=period)
        assert chosen == [1, 2, 4]


def test_weight_norm_frequencies_follow_norms_and_temperature():
    norms = [1.0, 2.0, 4.0]
    periods = 6000
    for temperature in (1.0, 0.5):
        counts = Counter(
            sample_layers("weight_norm", 3, 1, seed=1, period=p, norms=norms, temperature=temperature)[0]
            for p in range(periods)
        )
        weights = [n ** (1 / temperature) for n in norms]
        expected = {i: periods * w / sum(weights) for i, w in enumerate(weights)}
        assert chi_square(counts, expected) < 13.8  # 2 degrees of freedom, p = 0.001
    hot = Counter(
        sample_layers("weight_norm", 3, 1, seed=1, period=p, norms=norms, temperature=1e6)[0] for p in range(periods)
    )
    assert chi_square(hot, {i: periods / 3 for i in range(3)}) < 13.8  # a high temperature is uniform


def test_weight_norm_needs_norms():
    with pytest.raises(ValueError, match="needs 3 block norms"):
        sample_layers("weight_norm", 3, 1, seed=0, period=0)
