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
from lightning_lisa.errors import check_bool, check_choice, check_int, check_names, check_positive
from lightning_lisa.layers import LayerInfo, Unit, deprecated_flags, find_units, flagged_always_active, resolve_modules
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

    Every ``interval`` optimizer steps (a *period*), every transformer block is frozen but ``n_layers``
    sampled ones; the always-active set (by default the input embeddings and the output head) trains
    throughout. The optimizer is the user's, over all parameters: LISA never changes its parameter
    groups, it frees (or offloads) the state of frozen parameters.

    Args:
        n_layers: Units trained at once (the paper's :math:`\gamma`), at least 1.
        interval: Optimizer steps per period (the paper's :math:`K`, so gradient accumulation is
            respected), at least 1.
        layers: Dotted path of the block list relative to the ``LightningModule`` (e.g.
            ``"model.model.layers"``), a list of paths for several stacks, or ``None`` to detect them
            with :func:`~lightning_lisa.find_layers`.
        always_active: Names of modules (or parameters), relative to the ``LightningModule``, that
            train all the time. ``None``: the detected input embeddings and output head. ``[]``: none.
        sampling: ``"uniform"`` (the paper), ``"cyclic"`` (every unit once per pass), ``"weight_norm"``
            (proportional to ``norm ** (1 / temperature)``), or per-unit probabilities
            (:mod:`lightning_lisa.sampling`).
        optimizer_state: For frozen parameters' optimizer state: ``"drop"`` frees it, ``"offload"``
            moves it to CPU and back, ``"keep"`` leaves it.
        seed: Period ``i`` trains the units drawn from ``(seed, i)``: the same on every rank and after
            a resume.
        temperature: Temperature of ``sampling="weight_norm"``, > 0.
        granularity: ``"block"`` samples whole blocks; ``"module"`` samples their large sub-modules
            (attention, MLP) independently, and ``n_layers`` then counts those.
        train_embeddings: Deprecated: name the modules in ``always_active`` instead.
        train_head: Deprecated: name the modules in ``always_active`` instead.
        train_final_norm: Deprecated: name the modules in ``always_active`` instead.
        ddp_comm_hook: Under DDP, all-reduce only the gradients of trainable parameters
            (:mod:`lightning_lisa.strategies.ddp`).
        verify_ranks: At every switch, all-gather the active units and raise if the ranks disagree.
        step_in_backward: Update each parameter in the backward pass as soon as its gradient is final,
            and free that gradient (:mod:`lightning_lisa.step_in_backward`; single device).

    Attributes:
        active_layers: The sorted indices of the units in :attr:`unit_names` trainable right now.
        history: Every :class:`~lightning_lisa.schedule.Switch` of the run, the first included.
        layer_info: What :func:`~lightning_lisa.find_layers` found, after ``setup``.
        report: The start-up report (:class:`~lightning_lisa.report.LISAReport`), logged after ``setup``.
        communication: Under DDP with ``ddp_comm_hook=True``, the hook's counters.

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
        _check_arguments(locals())
        self._flags = deprecated_flags(always_active, train_embeddings, train_head, train_final_norm)
        self.n_layers, self.interval, self.seed, self.temperature = n_layers, interval, seed, float(temperature)
        self.layers = layers if layers is None or isinstance(layers, str) else list(layers)
        self.always_active = None if always_active is None else list(always_active)
        self.sampling: str | list[float] = sampling if isinstance(sampling, str) else [float(p) for p in sampling]
        self.optimizer_state, self.granularity = optimizer_state, granularity
        self.ddp_comm_hook, self.verify_ranks, self.step_in_backward = ddp_comm_hook, verify_ranks, step_in_backward
        frozen_sampling = self.sampling if isinstance(self.sampling, str) else tuple(self.sampling)
        self.schedule = Schedule(n_layers, interval, frozen_sampling, seed, self.temperature)

        self.active_layers: list[int] = []
        self.history: list[Switch] = []
        self.layer_info: LayerInfo | None = None
        self.report: LISAReport | None = None
        self.units: list[Unit] = []
        self.communication: FrozenSkippingState | None = None
        # the step in backward's hooks run inside LISA's; a plain Callback does nothing when it is off
        self._in_backward = StepInBackward("step_in_backward=True") if step_in_backward else Callback()
        self._always_active_modules: list[nn.Module] = []
        self._params: ParameterSet | None = None
        self._adapter: StrategyAdapter | None = None
        self._state = OptimizerStateHandler(optimizer_state)
        self._restored: dict[str, Any] | None = None  # the checkpoint's schedule, until on_train_start
        self._period, self._check_gradients, self._warned_no_gradient = -1, False, False

    @property
    def state_key(self) -> str:
        """One LISA per Trainer: its checkpoint key is the class name."""
        return "LISA"

    @property
    def unit_names(self) -> list[str]:
        """The names of what is sampled (after ``setup``): block names, or sub-module names."""
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
        self._in_backward.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Inspect models built in ``configure_model``; let the strategy adapter check the wrapped model."""
        if self.layer_info is None:
            self._inspect(pl_module)
        self._in_backward.on_fit_start(trainer, pl_module)
        self._adapter_of(trainer).prepare(trainer, self.units)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember what the user left trainable and start the current period (the restored one on resume)."""
        self.communication = self._adapter_of(trainer).start(trainer, self.ddp_comm_hook)
        assert self.layer_info is not None, "LISA.setup did not run"
        self._params = ParameterSet(pl_module, self.units, self._always_active_modules)
        self._params.check(self.n_layers, f"{self.granularity}s of `{self.layer_info.path}`", trainer.optimizers)
        period = self.schedule.period(trainer.global_step)
        restored, self._restored = self._restored, None
        if restored is None:  # a fresh run: forget the switches of an earlier fit
            self.history = []
        active = list(restored["active_layers"]) if restored is not None and restored["period"] == period else []
        if not self._params.valid(active, self.n_layers):
            active = self._draw(trainer, period)
        self._switch(trainer, period, active, first=True)

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
        self._in_backward.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """With ``step_in_backward=True``, check that Lightning stepped where the parameters were updated."""
        self._in_backward.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """At the first step of a period, warn (once) about sampled units that received no gradient at all."""
        if not self._check_gradients or self._warned_no_gradient or self._params is None:
            return
        self._check_gradients = False
        received = getattr(self._in_backward, "received_gradient", None)  # the step in backward frees gradients
        starved = [self.unit_names[i] for i in self._params.without_gradient(self.active_layers, received)]
        if starved:
            self._warned_no_gradient = True
            rank_zero_warn(NO_GRADIENT.format(starved=starved, step=trainer.global_step))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the user back every parameter trainable, as it was before fit."""
        if self._params is not None:
            self._params.restore()
        self._in_backward.teardown(trainer, pl_module, stage)

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
        settings = {key: getattr(self, key) for key in SCHEDULE_SETTINGS}
        history = [asdict(s) for s in self.history]
        return {**settings, "period": self._period, "active_layers": list(self.active_layers), "history": history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule; ``on_train_start`` re-applies it once the optimizer is restored."""
        for key in SCHEDULE_SETTINGS:
            if state_dict.get(key) != getattr(self, key):
                rank_zero_warn(RESUMED_OTHERWISE.format(key=key, now=getattr(self, key), then=state_dict.get(key)))
        self._restored = dict(state_dict)
        self.history = [Switch.from_dict(s) for s in state_dict.get("history", [])]

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
        state = state_bytes(trainer.optimizers)
        switch = Switch(trainer.global_step, period, tuple(active), self._params.trainable_numel(), state)
        if not self.history or self.history[-1].period != period:
            self.history.append(switch)
        _log(trainer, switch)

    def _prefetch(self, trainer: pl.Trainer, period: int) -> None:
        """In the last step of a period, start bringing back the offloaded state of the next period's units."""
        # not with weight_norm sampling: its draw depends on norms that change until the switch
        if self.optimizer_state != "offload" or self.sampling == "weight_norm" or self._params is None:
            return
        by_unit, now = self._params.by_unit, self.active_layers
        coming = [p for i in self._draw(trainer, period) if i not in now for p in by_unit[i]]
        self._state.prefetch(trainer.optimizers, coming)

    def _draw(self, trainer: pl.Trainer, period: int) -> list[int]:
        """The units of ``period``, among those with trainable parameters."""
        assert self._params is not None
        candidates, norms = self._params.candidates, None
        if self.sampling == "weight_norm":  # every rank calls this at the same step: the norms are all-reduced
            named = [(self.units[i].name, nn.ModuleList(self.units[i].modules)) for i in candidates]
            norms = list(layer_norms(named, plain=self._adapter_of(trainer).plain_tensors).values())
        return self.schedule.draw(period, candidates, norms)

    def _inspect(self, pl_module: pl.LightningModule) -> None:
        """Find the units and the always-active modules; check the arguments against them; report."""
        info, units = find_units(pl_module, self.layers, self.granularity, self.n_layers)
        if not isinstance(self.sampling, str):
            check_probabilities(self.sampling, len(units), self.n_layers)
        names = (
            flagged_always_active(pl_module, info, *self._flags) if self.always_active is None else self.always_active
        )
        self._always_active_modules = resolve_modules(pl_module, names, "always_active")
        self.layer_info, self.units = info, units
        self.report = build_report(pl_module, info, units, names, self.n_layers, self.interval)
        rank_zero_info(str(self.report))
        warn_whole_model_compile(pl_module, info)

    def _adapter_of(self, trainer: pl.Trainer) -> StrategyAdapter:
        if self._adapter is None or self._adapter.strategy is not trainer.strategy:
            self._adapter = adapter_for(trainer.strategy)
        return self._adapter


def _check_arguments(arguments: dict[str, Any]) -> None:
    """Raise :class:`~lightning_lisa.errors.LISAConfigError` for a constructor argument LISA cannot use."""
    check_int("n_layers", arguments["n_layers"], minimum=1)
    check_int("interval", arguments["interval"], minimum=1)
    check_int("seed", arguments["seed"])
    check_names("layers", arguments["layers"], allow_str=True)
    check_names("always_active", arguments["always_active"], allow_str=False)
    check_sampling(arguments["sampling"])
    check_choice("optimizer_state", arguments["optimizer_state"], OPTIMIZER_STATE_MODES)
    check_positive("temperature", arguments["temperature"])
    check_choice("granularity", arguments["granularity"], get_args(Granularity))
    for flag in ("ddp_comm_hook", "verify_ranks", "step_in_backward"):
        check_bool(flag, arguments[flag])


#: The constructor arguments a checkpoint records, to warn when a resumed run changes them.
SCHEDULE_SETTINGS = ("n_layers", "interval", "sampling", "seed")

RESUMED_OTHERWISE = (
    "LISA resumes with `{key}={now!r}`, but the checkpoint was written with `{key}={then!r}`: the schedule from "
    "here on differs from the original run."
)

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
