"""The LISA callback: train a few sampled transformer blocks at a time.

The algorithm (Pan et al., 2024, Algorithm 1), as the hooks below run it:

* ``setup``: check the arguments against the model and the strategy; touch nothing yet.
* ``on_fit_start`` (the model is wrapped): let the strategy adapter check the wrapped model.
* ``on_train_start`` (the optimizer exists): remember which parameters the user left trainable,
  then start the current period.
* ``on_train_batch_start`` of the first micro-batch of every optimizer step: when
  ``global_step // interval`` moves to a new period, switch.
* a switch: draw ``n_layers`` units from ``(seed, period)``; freeze every other block (and drop its
  gradient), release the optimizer state of what was frozen, unfreeze the sampled units; the
  always-active set (input embeddings and output head by default) trains throughout.
* ``state_dict``: the period and active units go into checkpoints, so a resumed run continues the
  same schedule.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_lisa.compile import warn_whole_model_compile
from lightning_lisa.errors import LISAConfigError, check_bool, check_choice, check_int, check_names, check_positive
from lightning_lisa.layers import LayerInfo, Unit, find_layers, resolve_modules, split_units, unique_parameters
from lightning_lisa.norms import layer_norms
from lightning_lisa.optimizer_state import OPTIMIZER_STATE_MODES, OptimizerStateHandler, OptimizerStateMode
from lightning_lisa.optimizer_state import optimizer_state_bytes as state_bytes
from lightning_lisa.parameters import ParameterSet
from lightning_lisa.report import LISAReport, build_report
from lightning_lisa.sampling import SamplingName, check_probabilities, check_sampling
from lightning_lisa.schedule import Schedule, Switch
from lightning_lisa.step_in_backward import StepInBackward
from lightning_lisa.strategies import StrategyAdapter, adapter_for, check_supported
from lightning_lisa.strategies.ddp import FrozenSkippingState

log = logging.getLogger(__name__)

Granularity = Literal["block", "module"]

__all__ = ["LISA", "Switch"]


class LISA(Callback):
    r"""Layerwise Importance Sampled AdamW: train ``n_layers`` random blocks, re-sampled every ``interval`` steps.

    Every ``interval`` optimizer steps (a *period*), all transformer blocks are frozen except ``n_layers``
    sampled ones; the always-active set (by default the input embeddings and the output head) trains
    throughout. The optimizer is the one ``configure_optimizers`` builds over all parameters: LISA
    never changes its parameter groups, it frees (or offloads) the state of frozen parameters.

    Args:
        n_layers: Units trained at once (the paper's :math:`\gamma`), at least 1.
        interval: Optimizer steps per period (the paper's :math:`K`), at least 1. Counted in optimizer
            steps, so gradient accumulation is respected.
        layers: Dotted path of the block list relative to the ``LightningModule`` (e.g.
            ``"model.model.layers"``), a list of paths for several stacks, or ``None`` to detect them
            with :func:`~lightning_lisa.find_layers`.
        always_active: Names of modules (or parameters), relative to the ``LightningModule``, that
            train all the time. ``None``: the detected input embeddings and output head. ``[]``: none.
        sampling: How units are drawn: ``"uniform"`` (the paper), ``"cyclic"`` (every unit once per
            pass), ``"weight_norm"`` (proportional to ``norm ** (1 / temperature)``), or a list of
            per-unit probabilities. See :mod:`lightning_lisa.sampling`.
        optimizer_state: What happens to the optimizer state of frozen parameters: ``"drop"`` frees
            it, ``"offload"`` moves it to CPU and back, ``"keep"`` leaves it.
        seed: Seed of the sampling. Period ``i`` trains the units drawn from ``(seed, i)``: the same
            on every rank, and the same after a resume.
        temperature: Temperature of ``sampling="weight_norm"``, > 0.
        granularity: ``"block"`` samples whole blocks; ``"module"`` samples their large sub-modules
            (attention, MLP) independently, and ``n_layers`` then counts those.
        train_embeddings: Deprecated: name the modules in ``always_active`` instead.
        train_head: Deprecated: name the modules in ``always_active`` instead.
        train_final_norm: Deprecated: name the modules in ``always_active`` instead.
        ddp_comm_hook: Under DDP, install a communication hook that all-reduces only the gradients
            of trainable parameters (see :mod:`lightning_lisa.strategies.ddp`).
        verify_ranks: At every switch, all-gather the active units and raise if the ranks disagree
            (a debugging aid; costs one small collective per switch).
        step_in_backward: Update each parameter inside the backward pass as soon as its gradient is
            final and free that gradient at once, so no two gradients need to be resident (see
            :mod:`lightning_lisa.step_in_backward`; single device, no gradient clipping, no fp16 scaler).

    Attributes:
        active_layers: The sorted indices of the units in :attr:`unit_names` trainable right now.
        unit_names: The names of what is sampled, after ``setup``: block names, or sub-module names.
        history: Every :class:`~lightning_lisa.schedule.Switch` of the run, the first included.
        layer_info: What :func:`~lightning_lisa.find_layers` found, after ``setup``.
        report: The start-up report (:class:`~lightning_lisa.report.LISAReport`), logged once after
            ``setup``: what is sampled, always trained, and frozen for the whole run.
        communication: Under DDP with ``ddp_comm_hook=True``, the hook's counters of all-reduced
            gradient elements.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_lisa import LISA
        >>> trainer = pl.Trainer(callbacks=[LISA(n_layers=2, interval=20)], logger=False)
    """

    def __init__(
        self,
        n_layers: int = 2,
        interval: int = 20,
        layers: str | Sequence[str] | None = None,
        always_active: Sequence[str] | None = None,
        sampling: SamplingName | Sequence[float] = "uniform",
        optimizer_state: OptimizerStateMode = "drop",
        seed: int = 0,
        temperature: float = 1.0,
        granularity: Granularity = "block",
        train_embeddings: bool | None = None,
        train_head: bool | None = None,
        train_final_norm: bool | None = None,
        ddp_comm_hook: bool = True,
        verify_ranks: bool = False,
        step_in_backward: bool = False,
    ) -> None:
        check_int("n_layers", n_layers, minimum=1)
        check_int("interval", interval, minimum=1)
        check_int("seed", seed)
        check_names("layers", layers, allow_str=True)
        check_names("always_active", always_active, allow_str=False)
        check_sampling(sampling)
        check_choice("optimizer_state", optimizer_state, OPTIMIZER_STATE_MODES)
        check_positive("temperature", temperature)
        check_choice("granularity", granularity, get_args(Granularity))
        check_bool("ddp_comm_hook", ddp_comm_hook)
        check_bool("verify_ranks", verify_ranks)
        check_bool("step_in_backward", step_in_backward)
        self._flags = _deprecated_flags(always_active, train_embeddings, train_head, train_final_norm)
        self.n_layers = n_layers
        self.interval = interval
        self.layers = layers if layers is None or isinstance(layers, str) else list(layers)
        self.always_active = None if always_active is None else list(always_active)
        self.sampling: str | list[float] = sampling if isinstance(sampling, str) else [float(p) for p in sampling]
        self.optimizer_state = optimizer_state
        self.seed = seed
        self.temperature = float(temperature)
        self.granularity = granularity
        self.ddp_comm_hook = ddp_comm_hook
        self.verify_ranks = verify_ranks
        self.step_in_backward = step_in_backward
        self._in_backward = StepInBackward("step_in_backward=True") if step_in_backward else None
        self.schedule = Schedule(n_layers, interval, _frozen(self.sampling), seed, self.temperature)

        self.active_layers: list[int] = []
        self.history: list[Switch] = []
        self.layer_info: LayerInfo | None = None
        self.report: LISAReport | None = None
        self.units: list[Unit] = []
        self.communication: FrozenSkippingState | None = None
        self._always_active_modules: list[nn.Module] = []
        self._params: ParameterSet | None = None
        self._adapter: StrategyAdapter | None = None
        self._state = OptimizerStateHandler(optimizer_state)
        self._period = -1
        self._restored: dict[str, Any] | None = None
        self._check_gradients = False
        self._warned_no_gradient = False

    @property
    def state_key(self) -> str:
        """One LISA per Trainer: its checkpoint key is the class name."""
        return "LISA"

    @property
    def unit_names(self) -> list[str]:
        """The names of what is sampled: block names, or sub-module names."""
        return [u.name for u in self.units]

    # ------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Validate everything against the model and the strategy before anything is touched."""
        if stage != "fit":
            return
        check_supported(trainer.strategy)
        built_later = is_overridden("configure_model", pl_module)
        if not built_later:
            self._inspect(pl_module)
        self._adapter = adapter_for(trainer.strategy)
        self._adapter.check(None if built_later else self.units, self.granularity)
        if self._in_backward is not None:
            self._in_backward.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Inspect models built in ``configure_model``; let the strategy adapter check the wrapped model."""
        if self.layer_info is None:
            self._inspect(pl_module)
        if self._in_backward is not None:
            self._in_backward.on_fit_start(trainer, pl_module)
        self._adapter_of(trainer).prepare(trainer, self.units)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember what the user left trainable and start the current period."""
        self.communication = self._adapter_of(trainer).start(trainer, self.ddp_comm_hook)
        assert self.layer_info is not None, "LISA.setup did not run"
        self._params = ParameterSet(pl_module, self.units, self._always_active_modules)
        self._params.check(self.n_layers, f"{self.granularity}s of `{self.layer_info.path}`", trainer.optimizers)
        period = self.schedule.period(trainer.global_step)
        restored, self._restored = self._restored, None
        if restored is None:  # a fresh run: forget the switches of an earlier fit
            self.history = []
        active = restored["active_layers"] if restored is not None and restored["period"] == period else []
        if self._params.valid(active, self.n_layers):
            self._switch(trainer, period, list(active), first=True)
        else:
            self._switch(trainer, period, self._draw(trainer, period), first=True)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Switch units before the first micro-batch of the first optimizer step of a new period."""
        if batch_idx % trainer.accumulate_grad_batches == 0:
            period = self.schedule.period(trainer.global_step)
            if period != self._period:
                self._switch(trainer, period, self._draw(trainer, period))
            if self.schedule.period(trainer.global_step + 1) != period:
                self._prefetch(trainer, period + 1)
        if self._in_backward is not None:
            self._in_backward.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """With ``step_in_backward=True``, check that Lightning stepped where the parameters were updated."""
        if self._in_backward is not None:
            self._in_backward.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """At the first step of a period, warn about sampled units that received no gradient at all."""
        if not self._check_gradients or self._params is None:
            return
        self._check_gradients = False
        received = None if self._in_backward is None else self._in_backward.received_gradient  # grads gone
        starved = [self.unit_names[i] for i in self._params.without_gradient(self.active_layers, received)]
        if starved and not self._warned_no_gradient:
            self._warned_no_gradient = True
            rank_zero_warn(NO_GRADIENT.format(starved=starved, step=trainer.global_step))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the user back every parameter trainable, as it was before fit."""
        if self._params is not None:
            self._params.restore()
        if self._in_backward is not None:
            self._in_backward.detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the user back every parameter trainable after a failed or interrupted fit."""
        self.teardown(trainer, pl_module, "fit")

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Wait for offload copies in flight: the checkpoint reads the host buffers."""
        self._state.synchronize()

    def state_dict(self) -> dict[str, Any]:
        """The schedule: seed, interval, period, active units and the switch history."""
        return {
            "n_layers": self.n_layers,
            "interval": self.interval,
            "sampling": self.sampling,
            "seed": self.seed,
            "period": self._period,
            "active_layers": list(self.active_layers),
            "history": [asdict(s) for s in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule; ``on_train_start`` re-applies it once the optimizer is restored."""
        for key in ("n_layers", "interval", "sampling", "seed"):
            if state_dict.get(key) != getattr(self, key):
                rank_zero_warn(
                    f"LISA resumes with `{key}={getattr(self, key)!r}`, but the checkpoint was written with "
                    f"`{key}={state_dict.get(key)!r}`: the schedule from here on differs from the original run."
                )
        self._restored = dict(state_dict)
        self.history = [
            Switch(**{**s, "active_layers": tuple(s["active_layers"])}) for s in state_dict.get("history", [])
        ]

    # ---------------------------------------------------------------------------- the algorithm

    def _switch(self, trainer: pl.Trainer, period: int, active: list[int], first: bool = False) -> None:
        """Make exactly the ``active`` units and the always-active set trainable; release frozen state."""
        assert self._params is not None, "LISA.on_train_start did not run"
        frozen, unfrozen = self._params.apply(active, first=first)
        self._state.release(trainer.optimizers, frozen)
        self._state.restore(trainer.optimizers, unfrozen)
        if self.verify_ranks:
            _verify_ranks(trainer, active)
        self._period, self.active_layers, self._check_gradients = period, list(active), True
        switch = Switch(
            trainer.global_step, period, tuple(active), self._params.trainable_numel(), state_bytes(trainer.optimizers)
        )
        if not self.history or self.history[-1].period != period:
            self.history.append(switch)
        _log(trainer, switch)

    def _prefetch(self, trainer: pl.Trainer, period: int) -> None:
        """During the last step of a period, start copying back the offloaded state of the next one's units.

        The draw is a function of ``(seed, period)``, except with ``sampling="weight_norm"``, whose norms
        change until the switch: nothing is prefetched then.
        """
        if self.optimizer_state != "offload" or self.sampling == "weight_norm" or self._params is None:
            return
        coming = [
            p for i in self._draw(trainer, period) if i not in self.active_layers for p in self._params.by_unit[i]
        ]
        self._state.prefetch(trainer.optimizers, coming)

    def _draw(self, trainer: pl.Trainer, period: int) -> list[int]:
        """The units of ``period``, among those with trainable parameters."""
        assert self._params is not None
        candidates = self._params.candidates
        norms = None
        if self.sampling == "weight_norm":  # every rank calls this at the same step: the norms are all-reduced
            named = [(self.units[i].name, nn.ModuleList(self.units[i].modules)) for i in candidates]
            norms = list(layer_norms(named, plain=self._adapter_of(trainer).plain_tensors).values())
        return self.schedule.draw(period, candidates, norms)

    # ---------------------------------------------------------------------------------- helpers

    def _inspect(self, pl_module: pl.LightningModule) -> None:
        """Find units and always-active modules and check the arguments against them."""
        info = find_layers(pl_module, self.layers)
        units = split_units(info, self.granularity)
        what = "blocks" if self.granularity == "block" else "block modules"
        if self.n_layers > len(units):
            raise LISAConfigError(
                f"`n_layers={self.n_layers}` is larger than the {len(units)} {what} of `{info.path}`; "
                f"allowed: 1 to {len(units)}."
            )
        if not isinstance(self.sampling, str):
            check_probabilities(self.sampling, len(units), self.n_layers)
        names = self.always_active
        if names is None:
            names = _default_always_active(info, self._flags, tied=_tied(pl_module, info))
        self._always_active_modules = resolve_modules(pl_module, names, "always_active")
        self.layer_info, self.units = info, units
        self.report = build_report(pl_module, info, units, names, self.n_layers, self.interval)
        rank_zero_info(str(self.report))
        warn_whole_model_compile(pl_module, info)

    def _adapter_of(self, trainer: pl.Trainer) -> StrategyAdapter:
        if self._adapter is None or self._adapter.strategy is not trainer.strategy:
            self._adapter = adapter_for(trainer.strategy)
        return self._adapter


NO_GRADIENT = (
    "LISA: the sampled {starved} received no gradient at step {step}, so they do not train. With gradient "
    "checkpointing (use_reentrant=True) and frozen embeddings, blocks whose inputs do not require grad get none: "
    "call `model.enable_input_require_grads()` on the Hugging Face model, or use "
    "`gradient_checkpointing_kwargs={{'use_reentrant': False}}`."
)


def _log(trainer: pl.Trainer, switch: Switch) -> None:
    log.info("LISA period %d (step %d): training units %s", switch.period, switch.step, switch.active_layers)
    metrics: dict[str, float] = {
        "lisa/period": float(switch.period),
        "lisa/trainable_params": float(switch.trainable_params),
        "lisa/optimizer_state_bytes": float(switch.optimizer_state_bytes),
    }
    metrics.update({f"lisa/active_block_{j}": float(i) for j, i in enumerate(switch.active_layers)})
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _verify_ranks(trainer: pl.Trainer, active: list[int]) -> None:
    """Raise unless every rank is about to train the same ``active`` units."""
    if trainer.world_size < 2:
        return
    mine = torch.tensor(active, device=trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(mine).view(trainer.world_size, -1).tolist()
    if any(row != active for row in gathered):
        raise RuntimeError(f"LISA: ranks disagree on the active units at step {trainer.global_step}: {gathered}")


def _frozen(sampling: str | list[float]) -> str | tuple[float, ...]:
    return sampling if isinstance(sampling, str) else tuple(sampling)


Flags = tuple[bool, bool, bool]


def _deprecated_flags(
    always_active: Sequence[str] | None, embeddings: bool | None, head: bool | None, final_norm: bool | None
) -> Flags:
    """The deprecated ``train_*`` flags, checked; ``(True, True, False)`` when none was given."""
    given = {"train_embeddings": embeddings, "train_head": head, "train_final_norm": final_norm}
    for name, value in given.items():
        if value is not None:
            check_bool(name, value)
    named = [f"{k}={v}" for k, v in given.items() if v is not None]
    if named and always_active is not None:
        raise LISAConfigError(
            f"`always_active={list(always_active)!r}` and `{', '.join(named)}` both choose what always trains; "
            "give the list of names only."
        )
    if named:
        warnings.warn(
            f"LISA's `{', '.join(named)}` is deprecated and will be removed in 0.3: name what always trains in "
            "`always_active` (`lightning_lisa.find_layers(model)` lists the detected `embedding_names`, "
            "`head_names` and `final_norm_names`).",
            DeprecationWarning,
            stacklevel=3,
        )
    return (embeddings is not False, head is not False, final_norm is True)


def _tied(pl_module: nn.Module, info: LayerInfo) -> bool:
    """Whether the input embeddings and the head share a weight."""
    embeddings = unique_parameters(resolve_modules(pl_module, info.embedding_names, "always_active"))
    head = unique_parameters(resolve_modules(pl_module, info.head_names, "always_active"))
    return bool({id(p) for p in embeddings} & {id(p) for p in head})


def _default_always_active(info: LayerInfo, flags: Flags, tied: bool) -> list[str]:
    """The detected input side, head and projectors (with the deprecated flag, the final normalization layer).

    With the default flags this is :func:`~lightning_lisa.layers.default_always_active`.
    """
    embeddings, head, final_norm = flags
    if tied and embeddings != head:
        raise LISAConfigError(
            f"`train_embeddings={embeddings}` and `train_head={head}` differ, but the input embeddings "
            f"{list(info.embedding_names)} and the head {list(info.head_names)} share (tie) their weights in this "
            "model; set both alike."
        )
    names = list(info.embedding_names) + list(info.extra_embedding_names) if embeddings else []
    names += list(info.head_names) if head else []
    names += list(info.projector_names)
    if final_norm:
        if not info.final_norm_names:
            raise LISAConfigError(
                f"`train_final_norm=True`, but no final normalization layer was found after `{info.path}`; name it "
                "in `always_active` instead."
            )
        names += list(info.final_norm_names)
    return names
