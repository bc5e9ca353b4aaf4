"""The schedule: which units train in which period, a pure function of ``(seed, period)``.

A *period* is ``interval`` optimizer steps during which one set of units trains. The schedule
knows nothing of models or Trainers: given the period and the indices of the units that can be
sampled, it returns the active ones. Every rank and every resumed run computes the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_lisa.sampling import sample_layers


@dataclass(frozen=True)
class Switch:
    """One change of the active units, as LISA records it.

    Attributes:
        step: The optimizer step (``trainer.global_step``) before which the switch happened.
        period: The period index, ``step // interval``.
        active_layers: The sorted unit indices trained during the period.
        trainable_params: Parameters trainable during the period (tied weights counted once).
        optimizer_state_bytes: Optimizer-state bytes right after the switch released the state of
            the units it froze (new units get their state at their first optimizer step).
    """

    step: int
    period: int
    active_layers: tuple[int, ...]
    trainable_params: int
    optimizer_state_bytes: int

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Switch:
        """The switch that :func:`dataclasses.asdict` wrote (as checkpoints keep it, with a list of units).

        Examples:
            >>> Switch.from_dict({"step": 0, "period": 0, "active_layers": [1, 4], "trainable_params": 9,
            ...     "optimizer_state_bytes": 0}).active_layers
            (1, 4)
        """
        return cls(**{**fields, "active_layers": tuple(fields["active_layers"])})


@dataclass(frozen=True)
class Schedule:
    """``n_layers`` units per period of ``interval`` optimizer steps, drawn from ``(seed, period)``.

    Attributes:
        n_layers: Units trained at once.
        interval: Optimizer steps per period.
        sampling: A sampler name of :mod:`lightning_lisa.sampling`, or one probability per unit.
        seed: The run's seed.
        temperature: Temperature of ``"weight_norm"``.

    Examples:
        >>> schedule = Schedule(n_layers=2, interval=10, sampling="cyclic", seed=0)
        >>> schedule.period(25)
        2
        >>> sorted(i for p in range(3) for i in schedule.draw(p, candidates=range(6)))
        [0, 1, 2, 3, 4, 5]
    """

    n_layers: int
    interval: int
    sampling: str | tuple[float, ...] = "uniform"
    seed: int = 0
    temperature: float = 1.0

    def period(self, step: int) -> int:
        """The period that optimizer step ``step`` belongs to."""
        return step // self.interval

    def draw(self, period: int, candidates: Sequence[int], norms: Sequence[float] | None = None) -> list[int]:
        """The sorted units that train in ``period``.

        Args:
            period: The period index.
            candidates: Indices of the units that can be sampled (those with trainable parameters).
            norms: The current weight norm of each candidate, for ``sampling="weight_norm"``.
        """
        candidates = list(candidates)
        sampling: str | list[float] = (
            self.sampling if isinstance(self.sampling, str) else [self.sampling[i] for i in candidates]
        )
        chosen = sample_layers(
            sampling, len(candidates), self.n_layers, self.seed, period, norms=norms, temperature=self.temperature
        )
        return [candidates[i] for i in chosen]
