"""The optimizer step inside the backward pass: each gradient is freed as soon as it is final and used.

In a normal step every trainable parameter holds its gradient from the moment the backward pass
reaches it until ``optimizer.step()`` runs, so the gradients of the input embeddings, the head and the
sampled blocks are all resident together. :class:`StepInBackward` updates each parameter as soon as
its gradient is final, in a hook registered with ``Tensor.register_post_accumulate_grad_hook``, and
frees that gradient at once: with untied embeddings and head the gradients are resident one at a time
(the largest, at Llama-3-8B, the head's). A parameter used twice is final after its last use: a tied
embedding and head's gradient waits, through the whole backward pass, from the head's part to the
embedding's, beside each block's gradient.

The update is the optimizer's own: the hook runs the optimizer class's ``step`` on a one-parameter view
of the parameter's group, with the group's hyper-parameters of that moment (so learning-rate
schedulers keep working) and the optimizer's own ``state`` (so checkpoints and resume are unchanged).
A parameter's gradient is final after its last use in the backward pass, and autograd runs no node that
needs the parameter after that point, so updating it in place changes no other gradient. Weights after
``N`` steps equal those of a normal run (bit for bit on CPU in the tests).

Lightning keeps its automatic optimization: it still calls ``optimizer.step()`` once per step, which
finds no gradients left and updates nothing (a parameter the hooks did not update, e.g. one that got no
gradient in the last micro-batch, still holds its gradient and is updated there, as in a normal run).
With gradient accumulation the hooks update only in the backward pass of the last micro-batch of an
optimizer step; the gradients of the earlier micro-batches are accumulated as usual, so they are resident
between micro-batches.

Gradient clipping by value (``gradient_clip_algorithm="value"``) is element-wise, so the hook clamps each
gradient to ``[-gradient_clip_val, gradient_clip_val]`` as it arrives, before the update: the same
clamp Lightning applies after the backward pass (with gradient accumulation, to the accumulated
gradient, as here), and the same weights. A gradient the hooks did not take (a parameter without a
gradient in the last micro-batch) is clamped in ``on_before_optimizer_step``. While fitting, the
Trainer's ``gradient_clip_val`` is set to ``None`` (and restored at teardown), because Lightning's own
clipping would find no gradients left (torch's ``clip_grad_value_`` fails on an empty list).

What cannot be exact is refused with :class:`~lightning_lisa.errors.LISAConfigError` before the first
step: gradient clipping by norm (the norm needs every gradient at once, and Lightning clips after the
backward pass, when the gradients are gone), an overridden ``configure_gradient_clipping``, fp16 mixed
precision with a ``GradScaler`` (unscaling and the inf check need every gradient at once), optimizers
whose step is not per-parameter, several optimizers, manual optimization, and any strategy but a single
device (under DDP and FSDP each rank's gradient is reduced after the hook would run).

Optimizers supported: ``torch.optim.AdamW``, ``Adam`` and ``SGD`` (plain, ``foreach`` and ``fused``), and
any optimizer class whose ``per_parameter_step`` attribute is ``True`` (a promise that stepping a
parameter alone gives the same update), such as :class:`~lightning_lisa.compact.CompactAdamW`.
The update of the largest parameter is where the step in backward peaks: AdamW with ``fused=True``
updates it in place, where ``foreach`` makes one temporary copy of it and the plain loop two (counted
on CPU); at Llama-3-8B's shape that copy is the head's 1 GiB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_lisa.errors import LISAConfigError

EXACT_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
"""Optimizer classes whose step on one parameter alone equals their step on all (exact classes only)."""

_OFF = "or turn the step in backward off"


def steps_per_parameter(optimizer: Optimizer) -> bool:
    """Whether stepping each parameter of ``optimizer`` alone gives the same update as its full step.

    True for exactly ``torch.optim.AdamW``, ``Adam`` and ``SGD`` (not their subclasses, which may change
    ``step``), and for classes that declare ``per_parameter_step = True``.

    Examples:
        >>> import torch
        >>> steps_per_parameter(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))
        True
        >>> steps_per_parameter(torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(2))]))
        False
    """
    return type(optimizer) in EXACT_OPTIMIZERS or getattr(type(optimizer), "per_parameter_step", False) is True


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, flag: str = "StepInBackward") -> None:
    """Raise :class:`LISAConfigError` for Trainer settings under which the step in backward is not exact.

    Args:
        trainer: The Trainer about to fit.
        pl_module: The LightningModule it fits.
        flag: How the user turned the feature on, for the messages (e.g. ``"step_in_backward=True"``).
    """
    strategy = trainer.strategy
    if not isinstance(strategy, SingleDeviceStrategy):
        raise LISAConfigError(
            f"`{flag}` is not supported with `strategy={type(strategy).__name__}`: under a multi-device strategy "
            "each rank's gradient is reduced after the hook would update the parameter, so the update would "
            f"use the local gradient. Train on one device, {_OFF} for multi-device training."
        )
    if not pl_module.automatic_optimization:
        raise LISAConfigError(
            f"`{flag}` needs automatic optimization, but the LightningModule sets `automatic_optimization=False`; "
            f"with manual optimization call the optimizer yourself, {_OFF}."
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise LISAConfigError(
            f"`{flag}` is not supported with `precision={trainer.precision!r}`: the GradScaler unscales and checks "
            "for inf/NaN over all gradients at once, which never exist together here. Use "
            f"`precision='bf16-mixed'` (or 'bf16-true' / '32-true'), {_OFF}."
        )
    clip = trainer.gradient_clip_val
    algorithm = clip_algorithm(trainer)
    if clip is not None and clip > 0 and algorithm != "value":
        raise LISAConfigError(
            f"`{flag}` is not supported with `gradient_clip_val={clip}` "
            f"(`gradient_clip_algorithm={algorithm!r}`): clipping by norm needs every gradient "
            "at once, and Lightning clips after the backward pass, when the gradients are already freed. Clip "
            "by value instead (`gradient_clip_algorithm='value'`, element-wise, applied to each gradient as it "
            f"arrives), remove `gradient_clip_val`, {_OFF}."
        )
    if is_overridden("configure_gradient_clipping", pl_module):
        raise LISAConfigError(
            f"`{flag}` is not supported with an overridden `configure_gradient_clipping`, which expects every "
            f"gradient at once after the backward pass. Remove the override, {_OFF}."
        )


def clip_algorithm(trainer: pl.Trainer) -> str:
    """The Trainer's ``gradient_clip_algorithm`` as text (``"norm"`` when unset)."""
    algorithm = trainer.gradient_clip_algorithm
    return str(getattr(algorithm, "value", algorithm) or "norm")


def check_optimizers(optimizers: list[Optimizer], flag: str = "StepInBackward") -> None:
    """Raise :class:`LISAConfigError` unless there is one optimizer and it steps per parameter."""
    if len(optimizers) != 1:
        raise LISAConfigError(
            f"`{flag}` needs exactly one optimizer, but `configure_optimizers` returned {len(optimizers)}. "
            f"Put all parameters in the groups of one optimizer, {_OFF}."
        )
    optimizer = optimizers[0]
    if not steps_per_parameter(optimizer):
        allowed = ", ".join(f"torch.optim.{c.__name__}" for c in EXACT_OPTIMIZERS)
        raise LISAConfigError(
            f"`{flag}` does not support the optimizer {type(optimizer).__module__}.{type(optimizer).__qualname__}: "
            f"its update of one parameter alone is not known to equal its full step. Allowed: {allowed} "
            "(plain, foreach or fused), lightning_lisa.CompactAdamW, or a class with `per_parameter_step = True`; "
            f"{_OFF}."
        )
    if any(group.get("differentiable", False) for group in optimizer.param_groups):
        raise LISAConfigError(f"`{flag}` does not support `differentiable=True` optimizers; {_OFF}.")


def is_last_micro_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether Lightning steps the optimizer after the backward pass of micro-batch ``batch_idx``.

    Lightning steps after every ``accumulate_grad_batches``-th micro-batch and after the last one of the
    epoch. Where the epoch's length is unknown (an iterable dataset), a last incomplete accumulation is
    stepped by Lightning's own ``optimizer.step()``, which then finds the gradients.
    """
    accumulate = trainer.accumulate_grad_batches
    total = trainer.num_training_batches
    return (batch_idx + 1) % accumulate == 0 or (not math.isinf(total) and batch_idx + 1 == int(total))


class StepInBackward(Callback):
    """Run the optimizer step of each parameter inside the backward pass and free its gradient at once.

    Add it to the Trainer's callbacks (or use ``LISA(step_in_backward=True)``, which runs it for you).
    The LightningModule keeps automatic optimization and its ``configure_optimizers``; nothing else
    changes. See the module's notes for what is refused and why.

    Attributes:
        stepped: The ids of the parameters the hooks updated in the latest optimizer step.
        steps_in_backward: How many optimizer steps ran (at least partly) inside the backward pass.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_lisa import StepInBackward
        >>> trainer = pl.Trainer(callbacks=[StepInBackward()], logger=False, accelerator="cpu")
    """

    def __init__(self, flag: str = "StepInBackward") -> None:
        self.stepped: set[int] = set()
        self.steps_in_backward = 0
        self._flag = flag
        self._handles: list[RemovableHandle] = []
        self._params: list[torch.Tensor] = []
        self._hooked: set[int] = set()
        self._where: dict[int, tuple[Optimizer, int]] = {}
        self._armed = False
        self._step_before = -1
        self._shadows: dict[int, Optimizer] = {}
        self._clip_value: float | None = None
        self._trainer_clip: tuple[pl.Trainer, float | int | None] | None = None

    # ------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse Trainer settings under which the update cannot be exact, before anything runs."""
        if stage == "fit":
            check_trainer(trainer, pl_module, self._flag)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizer and register a hook on every trainable parameter it updates."""
        check_trainer(trainer, pl_module, self._flag)
        check_optimizers(trainer.optimizers, self._flag)
        if is_overridden("on_before_optimizer_step", pl_module):
            rank_zero_warn(
                f"`{self._flag}`: `{type(pl_module).__name__}.on_before_optimizer_step` runs after the parameters "
                "were updated and their gradients freed, so it sees no gradients."
            )
        clip = trainer.gradient_clip_val
        by_value = clip_algorithm(trainer) == "value"
        self._clip_value = float(clip) if by_value and clip is not None and clip > 0 else None
        if self._clip_value is not None:  # clipped here; Lightning's clipping would find no gradients
            self._trainer_clip = (trainer, clip)
            trainer.gradient_clip_val = None
        self.attach(trainer.optimizers[0])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Clip by value the gradients the hooks did not take (Lightning's clipping is off while fitting)."""
        if self._clip_value is None:
            return
        for p in self._params:
            if p.grad is not None:
                p.grad.clamp_(min=-self._clip_value, max=self._clip_value)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Arm the hooks for the backward pass of the last micro-batch of an optimizer step."""
        self.refresh()
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.stepped = set()
        self._armed = is_last_micro_batch(trainer, batch_idx)
        self._step_before = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Disarm the hooks; raise if they updated parameters in a batch where Lightning did not step."""
        armed, self._armed = self._armed, False
        if armed and self.stepped and trainer.global_step == self._step_before:
            raise RuntimeError(
                f"`{self._flag}`: parameters were updated in the backward pass of batch {batch_idx}, but Lightning "
                f"did not step the optimizer after it (global_step stayed {trainer.global_step}). Please report this "
                "with your Trainer settings."
            )
        if armed and self.stepped:
            self.steps_in_backward += 1

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks; give the Trainer back its ``gradient_clip_val``."""
        self.detach()
        self._give_back_clip()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the hooks after a failed or interrupted fit; give the Trainer back its ``gradient_clip_val``."""
        self.detach()
        self._give_back_clip()

    def _give_back_clip(self) -> None:
        if self._trainer_clip is not None:
            trainer, clip = self._trainer_clip
            trainer.gradient_clip_val = clip
            self._trainer_clip = None

    # ---------------------------------------------------------------------------------- engine

    def received_gradient(self, p: torch.Tensor) -> bool:
        """Whether ``p`` got a gradient in the current optimizer step (updated in backward, or still holding it)."""
        return p.grad is not None or id(p) in self.stepped

    def attach(self, optimizer: Optimizer) -> None:
        """Register the update hook on every trainable parameter of ``optimizer`` (earlier hooks are removed).

        A hook stays through ``requires_grad`` changes; parameters frozen now get theirs from
        :meth:`refresh` once they are trainable.
        """
        self.detach()
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self._where[id(p)] = (optimizer, index)
                self._params.append(p)
        self.refresh()

    def refresh(self) -> None:
        """Register the hook on parameters that became trainable since :meth:`attach`."""
        for p in self._params:
            if p.requires_grad and id(p) not in self._hooked:
                self._hooked.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))  # type: ignore[no-untyped-call]

    def detach(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._params = []
        self._hooked = set()
        self._where = {}
        self._shadows = {}
        self._armed = False

    def _hook(self, p: torch.Tensor) -> None:
        if not self._armed or p.grad is None:
            return
        optimizer, index = self._where[id(p)]
        if self._clip_value is not None:  # what Lightning's clip_grad_value_ does, on this gradient alone
            p.grad.clamp_(min=-self._clip_value, max=self._clip_value)
        step_one(optimizer, index, p, self._shadow(optimizer))
        p.grad = None
        self.stepped.add(id(p))

    def _shadow(self, optimizer: Optimizer) -> Optimizer:
        shadow = self._shadows.get(id(optimizer))
        if shadow is None:
            shadow = object.__new__(type(optimizer))
            self._shadows[id(optimizer)] = shadow
        return shadow


def step_one(optimizer: Optimizer, index: int, p: torch.Tensor, shadow: Optimizer | None = None) -> None:
    """Run ``optimizer``'s own step for the parameter ``p`` of its group ``index`` only.

    ``shadow`` (an uninitialised instance of the optimizer's class, reused between calls) is given the
    optimizer's attributes, its ``state`` and a one-parameter copy of the group with the group's current
    hyper-parameters; the class's step then runs on it without the optimizer's step hooks, which
    Lightning's own ``optimizer.step()`` call runs once per step. Parameters without a gradient are
    skipped by the step as usual.

    Examples:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([a, b], lr=0.5)
        >>> a.grad, b.grad = torch.ones(2), torch.ones(2)
        >>> step_one(opt, 0, a)
        >>> a.tolist(), b.tolist()
        ([0.5, 0.5], [1.0, 1.0])
    """
    if shadow is None:
        shadow = object.__new__(type(optimizer))
    group = optimizer.param_groups[index]
    shadow.__dict__.clear()
    shadow.__dict__.update(optimizer.__dict__)
    shadow.__dict__.pop("step", None)  # an instance-level wrapper (e.g. from an LR scheduler) steps the original
    shadow.param_groups = [{**group, "params": [p]}]
    _raw_step(type(optimizer))(shadow)


def _raw_step(cls: type[Optimizer]) -> Callable[[Optimizer], Any]:
    """The class's step without the wrapper that runs the step hooks (``torch.optim`` adds it per class)."""
    step: Any = cls.step
    if getattr(step, "hooked", False) and hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return cast(Callable[[Optimizer], Any], step)
