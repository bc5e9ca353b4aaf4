"""Optimizers and learning-rate schedules for :class:`~lightning_lisa.recipes.module.CausalLMModule`.

The optimizer is always built over every parameter of the model, trainable or not: LISA decides
what trains by flipping ``requires_grad`` and frees the optimizer state of what it freezes, so a
block that is frozen when the optimizer is created must still be in it when it is sampled later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

OptimizerName = Literal["adamw", "adamw8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

ScheduleName = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)


def parameter_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """Split parameters into a decayed group (matrices) and an undecayed one (biases, norms).

    Every parameter is returned, whatever its ``requires_grad``.

    Examples:
        >>> layer = torch.nn.Linear(3, 2).requires_grad_(False)
        >>> groups = parameter_groups(layer.named_parameters(), weight_decay=0.1)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(1, 0.1), (1, 0.0)]
        >>> len(parameter_groups(layer.named_parameters(), weight_decay=0.0))
        1
    """
    params = list(named_parameters)
    if weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": 0.0}]
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    return [
        group
        for group in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if group["params"]
    ]


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """Create ``torch.optim.AdamW`` (``"adamw"``) or bitsandbytes ``AdamW8bit`` (``"adamw8bit"``).

    Args:
        name: One of :data:`OPTIMIZERS`.
        groups: Parameter groups, e.g. from :func:`parameter_groups`.
        lr: Peak learning rate.
        betas: Adam's coefficients of the running averages.
        eps: Adam's denominator term.
        fused: ``torch.optim.AdamW(fused=True)``: one kernel that updates in place, with no temporary copy
            of the parameters (``"adamw"`` only).

    Raises:
        MisconfigurationException: For an unknown ``name``, ``"adamw8bit"`` without bitsandbytes, or
            ``fused`` with ``"adamw8bit"``.

    Examples:
        >>> layer = torch.nn.Linear(3, 2)
        >>> opt = build_optimizer("adamw", parameter_groups(layer.named_parameters(), 0.0), lr=1e-3)
        >>> type(opt).__name__, opt.defaults["lr"]
        ('AdamW', 0.001)
    """
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    if fused:
        raise MisconfigurationException(f"`fused=True` needs the optimizer 'adamw' (torch's AdamW), got {name!r}.")
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise MisconfigurationException(
                "`optimizer='adamw8bit'` needs bitsandbytes: `pip install bitsandbytes` (or 'lightning-lisa[bnb]')."
            ) from err
        adamw8bit: Any = bnb.optim.AdamW8bit  # type: ignore[attr-defined]
        optimizer: torch.optim.Optimizer = adamw8bit(groups, lr=lr, betas=betas, eps=eps)
        return optimizer
    raise MisconfigurationException(f"`optimizer={name!r}` is not one of {list(OPTIMIZERS)}.")


def lr_lambda(
    schedule: str, warmup_steps: int, total_steps: float, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """The learning-rate multiplier per optimizer step: linear warm-up, then ``schedule``.

    Args:
        schedule: ``"cosine"`` (decay to ``min_lr_ratio`` at ``total_steps``), ``"linear"`` (likewise,
            linearly) or ``"constant"``.
        warmup_steps: Steps of linear warm-up from 0 to the peak learning rate.
        total_steps: Optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        min_lr_ratio: The final learning rate as a fraction of the peak, in ``[0, 1]``.

    Raises:
        MisconfigurationException: For an unknown schedule, a decaying schedule of an unbounded run,
            or values out of range.

    Examples:
        >>> f = lr_lambda("cosine", warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10, 12)]
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """
    if schedule not in SCHEDULES:
        raise MisconfigurationException(f"`lr_schedule={schedule!r}` is not one of {list(SCHEDULES)}.")
    if warmup_steps < 0:
        raise MisconfigurationException(f"`warmup_steps={warmup_steps}` is not allowed; it must be >= 0.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise MisconfigurationException(f"`min_lr_ratio={min_lr_ratio}` is not allowed; it must be in [0, 1].")
    if schedule != "constant" and not math.isfinite(total_steps):
        raise MisconfigurationException(
            f"`lr_schedule={schedule!r}` decays over the whole run, but the run has no end: set "
            "`trainer.max_steps` or `trainer.max_epochs`, or use `lr_schedule='constant'`."
        )

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return multiplier
