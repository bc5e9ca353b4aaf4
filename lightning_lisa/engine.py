"""The LISA algorithm, independent of the loop that drives it.

:class:`LISAEngine` holds the settings, the schedule, the units and the optimizer-state handler, and
does the work: find the units, start a run (or a resumed one), switch at the start of a new period,
release the optimizer state of what it froze, and keep the checkpoint state. It never asks a Trainer
or a Fabric object for anything: every call gets a :class:`LoopView`, a snapshot of what the loop
knows at that moment (optimizer steps taken, optimizers, the strategy's adapter, loggers, how to
all-gather). The Trainer callback (:mod:`lightning_lisa.callback`) and the Fabric adapter
(:mod:`lightning_lisa.fabric`) are thin layers that build those views from their own hooks.

The checkpoint state (:meth:`LISAEngine.state_dict`) is the same for every loop. What a resumed run
does when its settings differ from the checkpoint's is decided here, once:

* another ``n_layers``, ``interval``, ``seed``, ``sampling`` (or ``temperature``): the run continues
  from the restored step with the new schedule (the units of that step are drawn with the new
  settings: period ``step // interval``), and a warning names the old and the new value;
* another ``always_active``: the run continues with the restored units and the new always-active set
  (what it no longer names is frozen, its optimizer state released), and a warning names both sets;
* another ``granularity``, or a model with another number of units than the checkpoint's schedule
  was drawn from: :class:`~lightning_lisa.errors.LISAConfigError`, naming both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, get_args

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from lightning_lisa.compile import warn_whole_model_compile
from lightning_lisa.errors import (
    LISAConfigError,
    check_bool,
    check_choice,
    check_int,
    check_names,
    check_positive,
)
from lightning_lisa.layers import LayerInfo, Unit, deprecated_flags, find_units, flagged_always_active, resolve_modules
from lightning_lisa.norms import layer_norms
from lightning_lisa.optimizer_state import OPTIMIZER_STATE_MODES, OptimizerStateHandler, OptimizerStateMode
from lightning_lisa.optimizer_state import optimizer_state_bytes as state_bytes
from lightning_lisa.parameters import ParameterSet
from lightning_lisa.report import LISAReport, build_report
from lightning_lisa.sampling import SamplingName, check_probabilities, check_sampling
from lightning_lisa.schedule import Schedule, Switch
from lightning_lisa.step_in_backward import StepInBackward
from lightning_lisa.strategies import StrategyAdapter
from lightning_lisa.strategies.ddp import FrozenSkippingState

log = logging.getLogger(__name__)

Granularity = Literal["block", "module"]

__all__ = ["Granularity", "LISAEngine", "LoopView", "MetricsLogger"]


class MetricsLogger(Protocol):
    """What LISA logs to: a Trainer's or a Fabric's logger."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log ``metrics`` at ``step``."""


@dataclass
class LoopView:
    """What the loop that drives LISA knows at the moment of a call.

    Attributes:
        step: Optimizer steps taken so far (the Trainer's ``global_step``).
        optimizers: The optimizers that update the model (possibly none yet, in a Fabric loop before
            its first step).
        adapter: The strategy's adapter (:func:`~lightning_lisa.strategies.adapter_for`).
        loggers: Where the switches are logged.
        world_size: Processes training together.
        all_gather: Gathers a tensor from every process (stacked along a new first dimension); needed
            by ``verify_ranks`` when ``world_size > 1``.
        device: The device of this process's tensors for ``all_gather``.
    """

    step: int
    optimizers: Sequence[Optimizer]
    adapter: StrategyAdapter
    loggers: Sequence[MetricsLogger] = ()
    world_size: int = 1
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class LISAEngine:
    r"""The LISA algorithm and its state; :class:`~lightning_lisa.LISA` documents the arguments."""

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
        # the step in backward's hooks run inside the Trainer callback's; a plain Callback does nothing when off
        self._in_backward = StepInBackward("step_in_backward=True") if step_in_backward else Callback()
        self._always_active_modules: list[nn.Module] = []
        self._always_active_names: list[str] = []
        self._params: ParameterSet | None = None
        self._state = OptimizerStateHandler(optimizer_state)
        self._restored: dict[str, Any] | None = None  # the checkpoint's schedule, until the run starts
        self._period, self._check_gradients, self._warned_no_gradient = -1, False, False
        self._step = 0  # optimizer steps taken, as the loop last told
        self._adapter: StrategyAdapter | None = None  # the Trainer's strategy adapter
        self._driver: Any = None  # the driver of a Fabric or plain loop (lightning_lisa.fabric.LoopDriver)
        self._detached = False  # whether that driver was removed by `detach`

    @property
    def state_key(self) -> str:
        """One LISA per loop: its checkpoint key is the class name."""
        return "LISA"

    @property
    def unit_names(self) -> list[str]:
        """The names of what is sampled (after the model was inspected): block names, or sub-module names."""
        return [u.name for u in self.units]

    # ---------------------------------------------------------------------------- the algorithm

    def _inspect(self, root: nn.Module) -> None:
        """Find the units and the always-active modules of ``root``; check the arguments against them; report."""
        info, units = find_units(root, self.layers, self.granularity, self.n_layers)
        if not isinstance(self.sampling, str):
            check_probabilities(self.sampling, len(units), self.n_layers)
        names = flagged_always_active(root, info, *self._flags) if self.always_active is None else self.always_active
        self._always_active_modules = resolve_modules(root, names, "always_active")
        self._always_active_names = list(names)
        self.layer_info, self.units = info, units
        self.report = build_report(root, info, units, names, self.n_layers, self.interval)
        rank_zero_info(str(self.report))
        warn_whole_model_compile(root, info)
        if self._restored is not None:
            self._check_restored(self._restored)

    def _begin(self, root: nn.Module, optimizers: Sequence[Optimizer]) -> None:
        """Remember which parameters of ``root`` the user left trainable; check them against ``n_layers``."""
        assert self.layer_info is not None, "LISA did not inspect the model"
        self._params = ParameterSet(root, self.units, self._always_active_modules)
        self._params.check(self.n_layers, f"{self.granularity}s of `{self.layer_info.path}`", optimizers)

    def _start(self, loop: LoopView) -> None:
        """Start the period of ``loop.step``: the restored one on resume (the same units), else a fresh draw."""
        assert self._params is not None, "LISA did not begin"
        self._step = loop.step
        period = self.schedule.period(loop.step)
        restored, self._restored = self._restored, None
        if restored is None:  # a fresh run: forget the switches of an earlier one
            self.history = []
        changed = restored is not None and restored.get(CHANGED_KEY, False)
        same = restored is not None and not changed and restored["period"] == period
        active = list(restored["active_layers"]) if restored is not None and same else []
        if not self._params.valid(active, self.n_layers):
            active = self._draw(loop, period)
        self._switch(loop, period, active, first=True, record=changed)

    def _step_boundary(self, loop: LoopView) -> None:
        """Before the first micro-batch of an optimizer step: switch when a new period starts; prefetch."""
        self._step = loop.step
        period = self.schedule.period(loop.step)
        if period != self._period:
            self._switch(loop, period, self._draw(loop, period))
        if self.schedule.period(loop.step + 1) != period:
            self._prefetch(loop, period + 1)

    def _switch(
        self, loop: LoopView, period: int, active: list[int], first: bool = False, record: bool = False
    ) -> None:
        """Make exactly the ``active`` units and the always-active set trainable; release frozen state.

        The switch goes into :attr:`history` when it starts another period than the last recorded one, or
        with ``record`` (a resumed run whose schedule settings changed).
        """
        assert self._params is not None, "LISA did not begin"
        frozen, unfrozen = self._params.apply(active, first=first)
        self._state.release(loop.optimizers, frozen)
        self._state.restore(loop.optimizers, unfrozen)
        if self.verify_ranks:
            _verify_ranks(loop, active)
        self._period, self.active_layers, self._check_gradients = period, list(active), True
        state = state_bytes(loop.optimizers)
        switch = Switch(loop.step, period, tuple(active), self._params.trainable_numel(), state)
        if record or not self.history or self.history[-1].period != period:
            self.history.append(switch)
        _log(loop, switch)

    def _prefetch(self, loop: LoopView, period: int) -> None:
        """In the last step of a period, start bringing back the offloaded state of the next period's units."""
        # not with weight_norm sampling: its draw depends on norms that change until the switch
        if self.optimizer_state != "offload" or self.sampling == "weight_norm" or self._params is None:
            return
        by_unit, now = self._params.by_unit, self.active_layers
        coming = [p for i in self._draw(loop, period) if i not in now for p in by_unit[i]]
        self._state.prefetch(loop.optimizers, coming)

    def _draw(self, loop: LoopView, period: int) -> list[int]:
        """The units of ``period``, among those with trainable parameters."""
        assert self._params is not None
        candidates, norms = self._params.candidates, None
        if self.sampling == "weight_norm":  # every rank calls this at the same step: the norms are all-reduced
            named = [(self.units[i].name, nn.ModuleList(self.units[i].modules)) for i in candidates]
            norms = list(layer_norms(named, plain=loop.adapter.plain_tensors).values())
        return self.schedule.draw(period, candidates, norms)

    def _starved_units(self, received: Callable[[nn.Parameter], bool] | None = None) -> list[str]:
        """At the first step of a period (once per run): the sampled units that received no gradient."""
        if not self._check_gradients or self._warned_no_gradient or self._params is None:
            return []
        self._check_gradients = False
        starved = [self.unit_names[i] for i in self._params.without_gradient(self.active_layers, received)]
        if starved:
            self._warned_no_gradient = True
        return starved

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The schedule: its settings, the step, the period, the active units and the switch history."""
        settings = {key: getattr(self, key) for key in SCHEDULE_SETTINGS}
        history = [asdict(s) for s in self.history]
        return {
            **settings,
            "granularity": self.granularity,
            "num_units": len(self.units),
            "always_active": list(self._always_active_names),
            "step": self._step,
            "period": self._period,
            "active_layers": list(self.active_layers),
            "history": history,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule; it is re-applied when the run starts (see :mod:`lightning_lisa.engine`)."""
        changed = [key for key in SCHEDULE_SETTINGS if key in state_dict and state_dict[key] != getattr(self, key)]
        for key in changed:
            rank_zero_warn(RESUMED_OTHERWISE.format(key=key, now=getattr(self, key), then=state_dict[key]))
        if self.units:  # the model was inspected already: check against it now
            self._check_restored(state_dict)
        # with other schedule settings, the restored step starts the new schedule: its units are drawn anew
        self._restored = {**state_dict, CHANGED_KEY: bool(changed)}
        self._step = int(state_dict.get("step", 0))
        self.history = [Switch.from_dict(s) for s in state_dict.get("history", [])]

    def _check_restored(self, saved: dict[str, Any]) -> None:
        """Refuse a checkpoint whose schedule names units the model lacks; warn about another always-active set."""
        self._check_units(saved)
        before = saved.get("always_active")
        if before is not None and list(before) != self._always_active_names:
            rank_zero_warn(
                RESUMED_WITH.format(key="always_active", now=self._always_active_names, then=list(before))
                + ". The restored units stay; the new always-active set trains from here on (what it adds with "
                "fresh optimizer state), and what it no longer names is frozen."
            )

    def _check_units(self, saved: dict[str, Any]) -> None:
        """Raise when the checkpoint's schedule was drawn over other units than the model's (after inspection)."""
        then = saved.get("granularity", self.granularity)
        if then != self.granularity:
            raise LISAConfigError(
                f"LISA resumes with `granularity={self.granularity!r}`, but the checkpoint was written with "
                f"`granularity={then!r}`: its schedule numbers other units. Resume with `granularity={then!r}`."
            )
        named = [*saved.get("active_layers", []), *(i for s in saved.get("history", []) for i in s["active_layers"])]
        saved_units = saved.get("num_units")
        kind = "blocks" if self.granularity == "block" else "block modules"
        if (saved_units is not None and saved_units != len(self.units)) or any(i >= len(self.units) for i in named):
            highest = max(named, default=-1)
            written = f" (it was written for a model with {saved_units} {kind})" if saved_units is not None else ""
            raise LISAConfigError(
                f"LISA cannot resume from this checkpoint: its schedule names {kind} up to {highest}{written}, and "
                f"the model has {len(self.units)} {kind}. Resume with the model the checkpoint was written with."
            )


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


#: The constructor arguments a checkpoint records; a resumed run with other values warns and goes on.
SCHEDULE_SETTINGS = ("n_layers", "interval", "sampling", "seed", "temperature")

#: Set in the restored state when the schedule settings differ from the checkpoint's.
CHANGED_KEY = "_settings_changed"

RESUMED_WITH = "LISA resumes with `{key}={now!r}`, but the checkpoint was written with `{key}={then!r}`"

RESUMED_OTHERWISE = (
    RESUMED_WITH + ": the schedule from here on differs from the original run: the units of the restored step are "
    "drawn with the new settings."
)

NO_GRADIENT = (
    "LISA: the sampled {starved} received no gradient at step {step}, so they do not train. With gradient "
    "checkpointing (use_reentrant=True) and frozen embeddings, blocks whose inputs do not require grad get none: "
    "call `model.enable_input_require_grads()` on the Hugging Face model, or use "
    "`gradient_checkpointing_kwargs={{'use_reentrant': False}}`."
)


def _log(loop: LoopView, switch: Switch) -> None:
    log.info("LISA period %d (step %d): training units %s", switch.period, switch.step, switch.active_layers)
    metrics: dict[str, float] = {
        "lisa/period": float(switch.period),
        "lisa/trainable_params": float(switch.trainable_params),
        "lisa/optimizer_state_bytes": float(switch.optimizer_state_bytes),
    }
    metrics.update({f"lisa/active_block_{j}": float(i) for j, i in enumerate(switch.active_layers)})
    for logger in loop.loggers:
        logger.log_metrics(metrics, step=loop.step)


def _verify_ranks(loop: LoopView, active: list[int]) -> None:
    """Raise unless every rank is about to train the same ``active`` units."""
    if loop.world_size < 2 or loop.all_gather is None:
        return
    mine = torch.tensor(active, device=loop.device)
    gathered = loop.all_gather(mine).view(loop.world_size, -1).tolist()
    if any(row != active for row in gathered):
        raise RuntimeError(f"LISA: ranks disagree on the active units at step {loop.step}: {gathered}")
