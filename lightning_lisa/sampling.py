"""Which blocks train in each period: deterministic, rank-consistent sampling.

The choice for period ``i`` depends only on ``(seed, i)``: a ``torch.Generator`` is seeded from the
pair, so every rank of a distributed run picks the same blocks with no communication, and a resumed
run picks exactly what the uninterrupted run picked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MASK64 = (1 << 64) - 1


def period_seed(seed: int, period: int) -> int:
    """A well-mixed 64-bit seed for ``period`` of a run seeded with ``seed`` (SplitMix64).

    Example:
        >>> period_seed(0, 1) != period_seed(0, 2) != period_seed(1, 1)
        True
    """
    z = (seed * 0x9E3779B97F4A7C15 + (period + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def period_generator(seed: int, period: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for ``period``; independent of the global RNG state."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(period_seed(seed, period))
    return generator


def uniform(num_blocks: int, n_layers: int, generator: torch.Generator) -> list[int]:
    """``n_layers`` distinct block indices out of ``num_blocks``, uniformly (the paper's choice)."""
    return torch.randperm(num_blocks, generator=generator)[:n_layers].tolist()


#: A sampling strategy: ``(num_blocks, n_layers, generator) -> distinct indices``.
Sampler = Callable[[int, int, torch.Generator], list[int]]

#: Sampling strategies by the name accepted by ``LISA(sampling=...)``.
SAMPLERS: dict[str, Sampler] = {"uniform": uniform}


def sample_layers(sampling: str, num_blocks: int, n_layers: int, seed: int, period: int) -> list[int]:
    """The sorted block indices trained in ``period``.

    Args:
        sampling: A name from :data:`SAMPLERS`.
        num_blocks: How many blocks there are to choose from.
        n_layers: How many to choose (distinct).
        seed: The run's seed.
        period: The period index (``global_step // interval``).

    Returns:
        ``n_layers`` distinct indices in ``range(num_blocks)``, sorted.

    Example:
        >>> sample_layers("uniform", num_blocks=8, n_layers=2, seed=0, period=3)
        [4, 6]
        >>> sample_layers("uniform", 8, 2, 0, 3) == sample_layers("uniform", 8, 2, 0, 3)
        True
    """
    chosen = SAMPLERS[sampling](num_blocks, n_layers, period_generator(seed, period))
    if len(set(chosen)) != n_layers or not all(0 <= i < num_blocks for i in chosen):
        raise RuntimeError(f"sampling={sampling!r} returned {chosen}, not {n_layers} distinct blocks")
    return sorted(chosen)
