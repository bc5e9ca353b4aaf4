"""The LISA callback: train a few sampled transformer blocks at a time.

The algorithm (Pan et al., 2024, Algorithm 1), as the hooks below run it:

* ``setup``: check the arguments against the model and the strategy; touch nothing yet.
* ``on_train_start`` (the optimizer exists and the model is wrapped): run FSDP2's lazy
  initialization if the model is sharded with ``fully_shard`` (while everything still trains),
  remember which parameters the user left trainable, then start the current period.
* ``on_train_batch_start`` of the first micro-batch of every optimizer step: when
  ``global_step // interval`` moves to a new period, switch.
* a switch: sample ``n_layers`` blocks from ``(seed, period)``; freeze every other block (and its
  gradient), release the optimizer state of what was frozen, unfreeze the sampled blocks; the
  always-active modules (input embeddings and output head by default) stay trainable throughout.
* ``state_dict``: the period and active blocks go into checkpoints, so a resumed run continues the
  same schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import LayerInfo, Unit, find_layers, resolve_modules, split_units, unique_parameters
from lightning_lisa.norms import PlainTensors, layer_norms
from lightning_lisa.optimizer_state import (
    OPTIMIZER_STATE_MODES,
    OptimizerStateHandler,
    OptimizerStateMode,
    optimizer_state_bytes,
)
from lightning_lisa.sampling import STRATEGIES, SamplingName, check_probabilities, sample_layers
from lightning_lisa.strategies.checks import check_strategy, check_wrapped, install_comm_hook
from lightning_lisa.strategies.ddp import FrozenSkippingState
from lightning_lisa.strategies.fsdp2 import lazy_init

log = logging.getLogger(__name__)

Granularity = Literal["block", "module"]


@dataclass(frozen=True)
class Switch:
    """One change of the active blocks.

    Attributes:
        step: The optimizer step (``trainer.global_step``) before which the switch happened.
        period: The period index, ``step // interval``.
        active_layers: The sorted block indices trained during the period.
        trainable_params: Parameters trainable during the period (tied weights counted once).
        optimizer_state_bytes: Optimizer-state bytes right after the switch released the state of
            the blocks it froze (new blocks get their state at their first optimizer step).
    """

    step: int
    period: int
    active_layers: tuple[int, ...]
    trainable_params: int
    optimizer_state_bytes: int


class LISA(Callback):
    r"""Layerwise Importance Sampled AdamW: train ``n_layers`` random blocks, re-sampled every ``interval`` steps.

    Every ``interval`` optimizer steps, all transformer blocks are frozen except ``n_layers`` sampled
    ones; the always-active modules (by default the input embeddings and the output head) train
    throughout. The optimizer is the one ``configure_optimizers`` builds over all parameters: LISA
    never changes its parameter groups, it frees (or offloads) the state of frozen parameters.

    Args:
        n_layers: Blocks trained at once (the paper's :math:`\gamma`), at least 1.
        interval: Optimizer steps between re-samplings (the paper's :math:`K`), at least 1. Counted
            in optimizer steps, so gradient accumulation is respected.
        layers: Dotted path of the ``nn.ModuleList`` of blocks relative to the ``LightningModule``
            (e.g. ``"model.model.layers"``), a list of paths for several stacks, or ``None`` to
            detect them with :func:`~lightning_lisa.find_layers`.
        always_active: Names of modules (or parameters), relative to the ``LightningModule``, that
            train all the time. ``None``: the detected input embeddings and output head. ``[]``: none.
        sampling: How blocks are chosen: ``"uniform"`` (the paper), ``"cyclic"`` (every block once
            per pass), ``"weight_norm"`` (proportional to ``norm ** (1 / temperature)``), or a list
            of per-block probabilities. See :mod:`lightning_lisa.sampling`.
        optimizer_state: What happens to the optimizer state of parameters that are frozen:
            ``"drop"`` frees it, ``"offload"`` moves it to CPU and back, ``"keep"`` leaves it.
        seed: Seed of the sampling. Period ``i`` trains the blocks drawn from ``(seed, i)``: the same
            on every rank, and the same after a resume.
        temperature: Temperature of ``sampling="weight_norm"``, > 0.
        granularity: ``"block"`` samples whole blocks; ``"module"`` samples their large sub-modules
            (attention, MLP) independently, and ``n_layers`` then counts those.
        train_embeddings: With ``always_active=None``, keep the input embeddings trainable.
        train_head: With ``always_active=None``, keep the output head trainable.
        train_final_norm: With ``always_active=None``, also keep the final norm trainable.
        ddp_comm_hook: Under DDP, install a communication hook that all-reduces only the gradients
            of trainable parameters (see :mod:`lightning_lisa.strategies.ddp`).
        verify_ranks: At every switch, all-gather the active blocks and raise if the ranks disagree
            (a debugging aid; costs one small collective per switch).

    Attributes:
        active_layers: The sorted indices of the blocks (or, with ``granularity="module"``, of the
            units in :attr:`unit_names`) trainable right now.
        unit_names: The names of what is sampled, after ``setup``: block names, or sub-module names.
        history: Every :class:`Switch` of the run, the first included.
        layer_info: What :func:`~lightning_lisa.find_layers` found, after ``setup``.
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
        train_embeddings: bool = True,
        train_head: bool = True,
        train_final_norm: bool = False,
        ddp_comm_hook: bool = True,
        verify_ranks: bool = False,
    ) -> None:
        _check_int("n_layers", n_layers, minimum=1)
        _check_int("interval", interval, minimum=1)
        _check_int("seed", seed, minimum=None)
        _check_names("layers", layers, allow_str=True)
        _check_names("always_active", always_active, allow_str=False)
        _check_sampling(sampling)
        if optimizer_state not in OPTIMIZER_STATE_MODES:
            raise LISAConfigError(f"`optimizer_state={optimizer_state!r}` is not one of {list(OPTIMIZER_STATE_MODES)}.")
        if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not temperature > 0:
            raise LISAConfigError(f"`temperature={temperature!r}` is not allowed; it must be a number > 0.")
        if granularity not in get_args(Granularity):
            raise LISAConfigError(f"`granularity={granularity!r}` is not one of {list(get_args(Granularity))}.")
        flags = {"train_embeddings": train_embeddings, "train_head": train_head, "train_final_norm": train_final_norm}
        for name, value in {**flags, "ddp_comm_hook": ddp_comm_hook, "verify_ranks": verify_ranks}.items():
            if not isinstance(value, bool):
                raise LISAConfigError(f"`{name}={value!r}` is not allowed; it must be True or False.")
        changed = [f"{k}={v}" for k, v in flags.items() if v != (k != "train_final_norm")]
        if always_active is not None and changed:
            raise LISAConfigError(
                f"`always_active={always_active!r}` and `{', '.join(changed)}` both choose what always trains; "
                "give the list of names, or the flags with always_active=None."
            )
        self.n_layers = n_layers
        self.interval = interval
        self.layers = layers if layers is None or isinstance(layers, str) else list(layers)
        self.always_active = None if always_active is None else list(always_active)
        self.sampling: str | list[float] = sampling if isinstance(sampling, str) else [float(p) for p in sampling]
        self.optimizer_state = optimizer_state
        self.seed = seed
        self.temperature = float(temperature)
        self.granularity = granularity
        self.train_embeddings = train_embeddings
        self.train_head = train_head
        self.train_final_norm = train_final_norm
        self.ddp_comm_hook = ddp_comm_hook
        self.verify_ranks = verify_ranks
        self.communication: FrozenSkippingState | None = None

        self.active_layers: list[int] = []
        self.history: list[Switch] = []
        self.layer_info: LayerInfo | None = None
        self.unit_names: list[str] = []
        self._units: list[Unit] = []
        self._state = OptimizerStateHandler(optimizer_state)
        self._always_active_modules: list[torch.nn.Module] = []
        self._period = -1
        self._restored: dict[str, Any] | None = None
        self._managed: list[torch.nn.Parameter] = []  # what the user left trainable
        self._unit_params: list[list[torch.nn.Parameter]] = []
        self._always_params: list[torch.nn.Parameter] = []
        self._candidates: list[int] = []
        self._check_gradients = False  # look for sampled units without gradients at the next step
        self._warned_starved = False  # blocks with something trainable

    @property
    def state_key(self) -> str:
        """One LISA per Trainer: its checkpoint key is the class name."""
        return "LISA"

    # ------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Validate everything against the model and the strategy before anything is touched."""
        if stage != "fit":
            return
        units = None
        if not is_overridden("configure_model", pl_module):
            self._inspect(pl_module)
            units = self._units
        check_strategy(trainer.strategy, units, self.granularity)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Inspect models built in ``configure_model``, which runs after ``setup``."""
        if self.layer_info is None:
            self._inspect(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember what the user left trainable and start the current period."""
        lazy_init(pl_module)  # FSDP2 must see every trainable parameter before the first freeze
        self._collect_parameters(trainer, pl_module)
        check_wrapped(trainer.strategy, self._units)
        if self.ddp_comm_hook:
            self.communication = install_comm_hook(trainer.strategy)
        period = trainer.global_step // self.interval
        restored = self._restored
        self._restored = None
        if restored is None:  # a fresh run: forget the switches of an earlier fit
            self.history = []
        if restored is not None and restored["period"] == period and self._valid(restored["active_layers"]):
            active = list(restored["active_layers"])
        else:
            active = self._sample(trainer, period)
        self._switch(trainer, period, active, first=True)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Switch blocks before the first micro-batch of the first optimizer step of a new period."""
        if batch_idx % trainer.accumulate_grad_batches != 0:
            return
        period = trainer.global_step // self.interval
        if period != self._period:
            self._switch(trainer, period, self._sample(trainer, period))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """At the first step of a period, warn about sampled units that received no gradient at all."""
        if not self._check_gradients:
            return
        self._check_gradients = False
        starved = [self.unit_names[i] for i in self.active_layers if all(p.grad is None for p in self._unit_params[i])]
        if starved and not self._warned_starved:
            self._warned_starved = True
            rank_zero_warn(
                f"LISA: the sampled {starved} received no gradient at step {trainer.global_step}, so they do not "
                "train. With gradient checkpointing (use_reentrant=True) and frozen embeddings, blocks whose inputs "
                "do not require grad get none: call `model.enable_input_require_grads()` on the Hugging Face model, "
                "or use `gradient_checkpointing_kwargs={'use_reentrant': False}`."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the user back every parameter trainable, as it was before fit."""
        self._unfreeze_all()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the user back every parameter trainable after a failed or interrupted fit."""
        self._unfreeze_all()

    def state_dict(self) -> dict[str, Any]:
        """The schedule: seed, interval, period, active blocks and the switch history."""
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
        """Make exactly the ``active`` blocks and the always-active set trainable."""
        trainable = {id(p) for i in active for p in self._unit_params[i]}
        trainable.update(id(p) for p in self._always_params)
        frozen, unfrozen = [], []
        for p in self._managed:
            if id(p) in trainable:
                if not p.requires_grad:
                    p.requires_grad_(True)
                    unfrozen.append(p)
            elif p.requires_grad or first:
                p.requires_grad_(False)
                p.grad = None
                frozen.append(p)
        self._state.release(trainer.optimizers, frozen)
        self._state.restore(trainer.optimizers, unfrozen)

        if self.verify_ranks:
            _verify_ranks(trainer, active)
        self._period = period
        self.active_layers = list(active)
        self._check_gradients = True
        switch = Switch(
            step=trainer.global_step,
            period=period,
            active_layers=tuple(active),
            trainable_params=sum(p.numel() for p in self._managed if p.requires_grad),
            optimizer_state_bytes=optimizer_state_bytes(trainer.optimizers),
        )
        if not self.history or self.history[-1].period != period:
            self.history.append(switch)
        self._log(trainer, switch)

    def _sample(self, trainer: pl.Trainer, period: int) -> list[int]:
        """Draw the units of ``period`` among those with trainable parameters."""
        candidates = self._candidates
        sampling = self.sampling
        if not isinstance(sampling, str):
            sampling = [sampling[i] for i in candidates]
        norms = None
        if sampling == "weight_norm":  # every rank calls this at the same step: the norms are all-reduced
            norms = _unit_norms([self._units[i] for i in candidates], trainer.strategy)
        chosen = sample_layers(
            sampling, len(candidates), self.n_layers, self.seed, period, norms=norms, temperature=self.temperature
        )
        return [candidates[i] for i in chosen]

    # ---------------------------------------------------------------------------------- helpers

    def _inspect(self, pl_module: pl.LightningModule) -> None:
        """Find blocks and always-active modules and check the arguments against them."""
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
        names = self.always_active if self.always_active is not None else self._default_always_active(pl_module, info)
        self._always_active_modules = resolve_modules(pl_module, names, "always_active")
        self.layer_info = info
        self._units = units
        self.unit_names = [u.name for u in units]
        rank_zero_info(
            f"LISA: sampling {self.n_layers} of {len(units)} {what} in `{info.path}` every {self.interval} steps; "
            f"always trained: {list(names) or 'nothing else'}."
        )

    def _default_always_active(self, pl_module: pl.LightningModule, info: LayerInfo) -> list[str]:
        embeddings = unique_parameters(resolve_modules(pl_module, info.embedding_names, "always_active"))
        head = unique_parameters(resolve_modules(pl_module, info.head_names, "always_active"))
        tied = {id(p) for p in embeddings} & {id(p) for p in head}
        if tied and self.train_embeddings != self.train_head:
            raise LISAConfigError(
                f"`train_embeddings={self.train_embeddings}` and `train_head={self.train_head}` differ, but the input "
                f"embeddings {list(info.embedding_names)} and the head {list(info.head_names)} share (tie) their "
                "weights in this model; set both alike."
            )
        names = list(info.embedding_names) if self.train_embeddings else []
        names += list(info.head_names) if self.train_head else []
        if self.train_final_norm:
            if not info.final_norm_names:
                raise LISAConfigError(
                    f"`train_final_norm=True`, but no final norm was found after `{info.path}`; name it in "
                    "`always_active` instead."
                )
            names += list(info.final_norm_names)
        return names

    def _collect_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.layer_info is not None, "LISA.setup did not run"
        self._managed = [p for p in unique_parameters([pl_module]) if p.requires_grad]
        managed = {id(p) for p in self._managed}
        self._unit_params = [[p for p in unique_parameters(u.modules) if id(p) in managed] for u in self._units]
        self._always_params = [p for p in unique_parameters(self._always_active_modules) if id(p) in managed]
        self._candidates = [i for i, params in enumerate(self._unit_params) if params]
        if len(self._candidates) < self.n_layers:
            raise LISAConfigError(
                f"`n_layers={self.n_layers}`, but only {len(self._candidates)} {self.granularity}s of "
                f"`{self.layer_info.path}` have trainable parameters (the others were frozen before fit)."
            )
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [n for n, p in pl_module.named_parameters() if id(p) in managed and id(p) not in in_optimizer]
        if missing and trainer.optimizers:
            rank_zero_warn(
                f"LISA: {len(missing)} trainable parameters are in no optimizer (e.g. {missing[:3]}); they will "
                "never change. Build the optimizer over all parameters, not only those with requires_grad."
            )

    def _valid(self, active: Sequence[int]) -> bool:
        return len(set(active)) == self.n_layers and all(i in self._candidates for i in active)

    def _unfreeze_all(self) -> None:
        for p in self._managed:
            p.requires_grad_(True)

    def _log(self, trainer: pl.Trainer, switch: Switch) -> None:
        log.info("LISA period %d (step %d): training blocks %s", switch.period, switch.step, switch.active_layers)
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
        raise RuntimeError(f"LISA: ranks disagree on the active blocks at step {trainer.global_step}: {gathered}")


def _unit_norms(units: Sequence[Unit], strategy: Strategy) -> list[float]:
    """The L2 norm of all the weights of each unit (frozen or not), the same on every rank.

    Under FSDP1 each rank holds a plain slice of each parameter, under FSDP2 a ``DTensor`` shard:
    the squares of what each rank holds are summed in one all-reduce.
    """
    plain: PlainTensors = "sharded" if isinstance(strategy, FSDPStrategy) else "replicated"
    named = [(unit.name, nn.ModuleList(unit.modules)) for unit in units]
    return list(layer_norms(named, plain=plain).values())


def _check_sampling(sampling: object) -> None:
    if isinstance(sampling, str):
        if sampling not in STRATEGIES:
            raise LISAConfigError(
                f"`sampling={sampling!r}` is not one of {list(STRATEGIES)} or a list of per-block probabilities."
            )
        return
    if not isinstance(sampling, Sequence) or not all(
        isinstance(p, int | float) and not isinstance(p, bool) for p in sampling
    ):
        raise LISAConfigError(
            f"`sampling={sampling!r}` is not allowed; give one of {list(STRATEGIES)} or a list of numbers."
        )


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise LISAConfigError(f"`{name}={value!r}` is not allowed; `{name}` must be {allowed}.")


def _check_names(name: str, value: object, allow_str: bool) -> None:
    if value is None or (allow_str and isinstance(value, str)):
        return
    if isinstance(value, str):
        raise LISAConfigError(f"`{name}={value!r}` must be a list of names, e.g. `{name}=[{value!r}]`, or None.")
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        allowed = "a dotted path, a list of dotted paths" if allow_str else "a list of dotted names"
        raise LISAConfigError(f"`{name}={value!r}` is not allowed; `{name}` must be {allowed} or None.")
