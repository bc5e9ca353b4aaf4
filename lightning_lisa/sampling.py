"""Which units train in each period: deterministic, rank-consistent samplers.

The choice for period ``i`` depends only on ``(seed, i)`` (and, for ``"weight_norm"``, on the current
weights, whose norms LISA all-reduces so that every rank has the same, sharded or not): a
``torch.Generator`` is seeded from the pair, so every
rank of a distributed run picks the same blocks with no communication, and a resumed run picks
exactly what the uninterrupted run picked. Every sampler samples without replacement.

Samplers, by the value of ``LISA(sampling=...)``:

* ``"uniform"``: every block equally likely (the paper's choice).
* ``"cyclic"``: a fresh random permutation of the blocks for each pass of ``ceil(N / n_layers)``
  periods, cut into consecutive groups, so every block trains at least once per pass (as in BAdam).
* ``"weight_norm"``: block ``i`` is drawn with probability proportional to
  ``norm_i ** (1 / temperature)``, its current L2 weight norm; a large temperature tends to uniform.
* a list of ``N`` non-negative numbers: fixed per-block probabilities (normalised), e.g. weights from
  an outlier analysis.

With ``n_layers > 1``, drawing without replacement makes the chance that a block is *included* in a
period less skewed than its probability (exactly proportional for ``n_layers == 1``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch

from lightning_lisa.errors import LISAConfigError

_MASK64 = (1 << 64) - 1

Norms = Sequence[float] | None

#: The named samplers; ``LISA(sampling=...)`` also accepts a list of per-block probabilities.
SamplingName = Literal["uniform", "cyclic", "weight_norm"]
SAMPLING_STRATEGIES: tuple[str, ...] = get_args(SamplingName)


def period_seed(seed: int, period: int, stream: int = 0) -> int:
    """A well-mixed 64-bit seed for ``period`` of a run seeded with ``seed`` (SplitMix64).

    Args:
        seed: The run's seed.
        period: The period index (or, for ``stream=1``, the pass index of ``"cyclic"``).
        stream: Separates independent uses of the same ``(seed, period)``.

    Examples:
        >>> period_seed(0, 1) != period_seed(0, 2) != period_seed(1, 1) != period_seed(0, 1, stream=1)
        True
    """
    z = (seed * 0x9E3779B97F4A7C15 + (period + 1) * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def period_generator(seed: int, period: int, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for ``period``; independent of the global RNG state."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(period_seed(seed, period, stream))
    return generator


def uniform(
    num_blocks: int, n_layers: int, seed: int, period: int, norms: Norms = None, temperature: float = 1
) -> list[int]:
    """``n_layers`` distinct blocks out of ``num_blocks``, each equally likely."""
    return torch.randperm(num_blocks, generator=period_generator(seed, period))[:n_layers].tolist()


def cyclic(
    num_blocks: int, n_layers: int, seed: int, period: int, norms: Norms = None, temperature: float = 1
) -> list[int]:
    """Consecutive groups of a per-pass random permutation: every block once per pass.

    A pass lasts ``ceil(num_blocks / n_layers)`` periods; when ``n_layers`` does not divide
    ``num_blocks``, the last group of a pass is completed with the first blocks of the permutation.

    Examples:
        >>> passes = [cyclic(6, 2, seed=0, period=p) for p in range(3)]
        >>> sorted(i for group in passes for i in group)
        [0, 1, 2, 3, 4, 5]
    """
    per_pass = math.ceil(num_blocks / n_layers)
    order = torch.randperm(num_blocks, generator=period_generator(seed, period // per_pass, stream=1)).tolist()
    start = (period % per_pass) * n_layers
    group = order[start : start + n_layers]
    return group + [i for i in order if i not in group][: n_layers - len(group)]


def weight_norm(num_blocks: int, n_layers: int, seed: int, period: int, norms: Norms, temperature: float) -> list[int]:
    """Distinct blocks drawn with probabilities from their weight ``norms`` (see :func:`norm_probabilities`)."""
    if norms is None or len(norms) != num_blocks:
        raise ValueError(f"sampling='weight_norm' needs {num_blocks} block norms, got {norms!r}")
    return weighted(norm_probabilities(norms, temperature), n_layers, seed, period)


def weighted(probabilities: torch.Tensor, n_layers: int, seed: int, period: int) -> list[int]:
    """``n_layers`` distinct blocks drawn with the given (valid) probabilities, without replacement."""
    chosen = torch.multinomial(probabilities, n_layers, replacement=False, generator=period_generator(seed, period))
    return chosen.tolist()


def check_probabilities(probabilities: Sequence[float], num_blocks: int, n_layers: int) -> torch.Tensor:
    """Validate explicit per-block probabilities and normalise them.

    Raises:
        LISAConfigError: For a wrong length, NaN or infinite, negative or all-zero values,
            or fewer positive values than ``n_layers``.

    Examples:
        >>> check_probabilities([1, 1, 2], num_blocks=3, n_layers=1).tolist()
        [0.25, 0.25, 0.5]
    """
    values = torch.tensor([float(p) for p in probabilities], dtype=torch.float64)
    positive = int((values > 0).sum())
    shown = list(probabilities) if len(probabilities) <= 8 else f"{list(probabilities)[:8]}..."
    if len(values) != num_blocks:
        problem = f"has {len(values)} values, but there are {num_blocks} blocks to sample from"
    elif not torch.isfinite(values).all():
        problem = "contains NaN or infinite values"
    elif (values < 0).any():
        problem = "contains negative values"
    elif positive < n_layers:
        problem = f"has {positive} positive {'value' if positive == 1 else 'values'}, fewer than n_layers={n_layers}"
    else:
        return values / values.sum()
    raise LISAConfigError(
        f"`sampling={shown}` {problem}; a probability list needs one finite, non-negative value per block, "
        f"at least n_layers of them positive."
    )


def norm_probabilities(norms: Sequence[float], temperature: float) -> torch.Tensor:
    """Probabilities proportional to ``norm ** (1 / temperature)``, computed stably in log space.

    Examples:
        >>> norm_probabilities([1.0, 2.0], temperature=1.0).tolist()
        [0.3333333333333333, 0.6666666666666666]
    """
    logits = torch.tensor(norms, dtype=torch.float64).log() / temperature
    return torch.softmax(logits, dim=0)


#: A named sampler: ``(num_blocks, n_layers, seed, period, norms, temperature) -> distinct indices``.
Sampler = Callable[[int, int, int, int, Norms, float], list[int]]

#: The named samplers of ``LISA(sampling=...)``.
SAMPLERS: dict[str, Sampler] = {"uniform": uniform, "cyclic": cyclic, "weight_norm": weight_norm}


def check_sampling(sampling: object) -> None:
    """Raise :class:`~lightning_lisa.errors.LISAConfigError` unless ``sampling`` is a sampler name or a list of numbers.

    Examples:
        >>> check_sampling("cyclic")
        >>> check_sampling([0.5, 0.5])
    """
    if isinstance(sampling, str):
        if sampling not in SAMPLERS:
            raise LISAConfigError(
                f"`sampling={sampling!r}` is not one of {list(SAMPLERS)} or a list of per-block probabilities."
            )
        return
    if not isinstance(sampling, Sequence) or not all(
        isinstance(p, int | float) and not isinstance(p, bool) for p in sampling
    ):
        raise LISAConfigError(
            f"`sampling={sampling!r}` is not allowed; give one of {list(SAMPLERS)} or a list of numbers."
        )
    bad = [p for p in sampling if not math.isfinite(p) or p < 0]
    if bad or not any(p > 0 for p in sampling):
        raise LISAConfigError(
            f"`sampling={list(sampling)!r}` is not allowed: a probability list needs finite, non-negative values, "
            f"at least one of them positive{f' (got {bad[:3]})' if bad else ''}."
        )


def __getattr__(name: str) -> object:
    if name == "STRATEGIES":  # the old name of SAMPLERS, kept for one release
        warnings.warn("`lightning_lisa.sampling.STRATEGIES` is now `SAMPLERS`.", DeprecationWarning, stacklevel=2)
        return SAMPLERS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sample_layers(
    sampling: str | Sequence[float],
    num_blocks: int,
    n_layers: int,
    seed: int,
    period: int,
    norms: Sequence[float] | None = None,
    temperature: float = 1.0,
) -> list[int]:
    """The sorted block indices trained in ``period``.

    Args:
        sampling: A name from :data:`SAMPLING_STRATEGIES` or per-block probabilities.
        num_blocks: How many blocks there are to choose from.
        n_layers: How many to choose (distinct).
        seed: The run's seed.
        period: The period index (``global_step // interval``).
        norms: Current per-block weight norms (``"weight_norm"`` only).
        temperature: Temperature of ``"weight_norm"``.

    Returns:
        ``n_layers`` distinct indices in ``range(num_blocks)``, sorted.

    Examples:
        >>> sample_layers("uniform", num_blocks=8, n_layers=2, seed=0, period=3)
        [4, 6]
        >>> sample_layers([0, 0, 1, 0], num_blocks=4, n_layers=1, seed=0, period=0)
        [2]
    """
    check_sampling(sampling)
    if isinstance(sampling, str):
        chosen = SAMPLERS[sampling](num_blocks, n_layers, seed, period, norms, temperature)
    else:
        chosen = weighted(check_probabilities(sampling, num_blocks, n_layers), n_layers, seed, period)
    if len(set(chosen)) != n_layers or not all(0 <= i < num_blocks for i in chosen):
        raise RuntimeError(f"sampling={sampling!r} returned {chosen}, not {n_layers} distinct blocks")
    return sorted(chosen)
