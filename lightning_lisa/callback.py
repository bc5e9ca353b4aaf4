"""The LISA callback: train a few sampled transformer blocks at a time.

The algorithm (Pan et al., 2024, Algorithm 1) lives in :class:`~lightning_lisa.engine.LISAEngine`;
this module is the layer that drives it from the Trainer's hooks, and from Fabric's
(:mod:`lightning_lisa.fabric`):

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

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_lisa import fabric as fabric_loop
from lightning_lisa.checkpoint_files import check_checkpoint
from lightning_lisa.engine import NO_GRADIENT, Granularity, LISAEngine, LoopView
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.report import summary_correction
from lightning_lisa.schedule import Switch
from lightning_lisa.strategies import StrategyAdapter, adapter_for, check_supported

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies.strategy import Strategy as FabricStrategy

__all__ = ["LISA", "Granularity", "Switch"]


class LISA(LISAEngine, Callback):
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
            A module inside a sampled block (e.g. ``"model.model.layers.0"``) trains all the time and is
            no longer sampled with that block; a whole block leaves the sampling pool.
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

    Under Lightning Fabric, pass it to ``Fabric(callbacks=[...])`` and set up model and optimizer with
    ``fabric.setup(model, optimizer)``: LISA runs from Fabric's own hooks. Loops that call
    ``fabric.setup_module`` or use no Fabric call :meth:`attach`. :meth:`save` and :meth:`load` wrap
    ``fabric.save`` and ``fabric.load`` (see :mod:`lightning_lisa.fabric`).

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_lisa import LISA
        >>> trainer = pl.Trainer(callbacks=[LISA(n_layers=2, interval=20)], logger=False)
    """

    _driver: fabric_loop.LoopDriver | None  # set when a Fabric or plain loop drives LISA
    _weights_hook: RemovableHandle | None = None  # the check of a resumed checkpoint's depth (Trainer)

    # ------------------------------------------------------------------------------- Trainer hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Validate everything against the model and the strategy before anything is touched."""
        if stage != "fit":
            return
        check_supported(trainer.strategy)
        built_later = is_overridden("configure_model", pl_module)
        if not built_later:
            self._inspect(pl_module)
        self._watch_weights_load(trainer, pl_module)
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
        summarized = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self._begin(pl_module, trainer.optimizers)
        self._start(self._view(trainer))
        callbacks: list[Callback] = getattr(trainer, "callbacks", [])
        if any(isinstance(c, ModelSummary) for c in callbacks) and self.history:  # correct its count
            rank_zero_info(summary_correction(summarized, self.history[-1].trainable_params, self.report))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Switch units before the first micro-batch of the first optimizer step of a new period."""
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._step_boundary(self._view(trainer))
        self._in_backward.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the optimizer steps taken (what a checkpoint written now records); check the step in backward."""
        self._step = trainer.global_step
        self._in_backward.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Clip what the step in backward left by value; warn (once a period) about units that got no gradient."""
        self._in_backward.on_before_optimizer_step(trainer, pl_module, optimizer)
        received = getattr(self._in_backward, "received_gradient", None)  # the step in backward frees gradients
        starved = self._starved_units(received)
        if starved:
            rank_zero_warn(NO_GRADIENT.format(starved=starved, step=trainer.global_step))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the user back every parameter trainable, as it was before fit."""
        if self._weights_hook is not None:
            self._weights_hook.remove()
            self._weights_hook = None
        if self._params is not None:
            self._params.restore()
        self._in_backward.teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the user back every parameter trainable after a failed or interrupted fit.

        When the checkpoint being resumed from is truncated, corrupted or incomplete (torch's own error
        names no file), raise :class:`~lightning_lisa.errors.LISAConfigError` naming it instead.
        """
        self.teardown(trainer, pl_module, "fit")
        if not isinstance(exception, LISAConfigError) and trainer.ckpt_path is not None:
            check_checkpoint(trainer.ckpt_path)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Verify the checkpoint's checksums (torch does not) before training resumes or anything is written."""
        check_checkpoint(trainer.ckpt_path)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Wait for offload copies in flight: the checkpoint reads the host buffers."""
        self._state.synchronize()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule; it is re-applied when training starts (or, in a Fabric loop, at the next forward)."""
        super().load_state_dict(state_dict)
        if self._driver is not None:
            self._driver.needs_start = True

    # -------------------------------------------------------------------- Fabric and plain loops

    def on_after_setup(self, fabric: Fabric, module: nn.Module) -> None:
        """Fabric's hook at the end of ``fabric.setup``: inspect and check the model, hook into its forward."""
        fabric_loop.set_up_from_fabric(self, fabric, module)

    def on_after_optimizer_step(self, strategy: FabricStrategy, optimizer: torch.optim.Optimizer) -> None:
        """Fabric's hook after each optimizer step: count it (raise if LISA was never set up)."""
        fabric_loop.after_optimizer_step(self, optimizer)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, fabric: Fabric | None = None) -> None:
        """Drive LISA from a loop without the Trainer: after this call the loop needs no other line.

        For Fabric loops that set up model and optimizer with ``fabric.setup_module`` and
        ``fabric.setup_optimizers`` (or without Fabric's callbacks), and for plain PyTorch loops. LISA
        switches at the first forward of the model in each new period and counts the optimizer's steps
        with ``Optimizer.register_step_post_hook``.

        Args:
            model: The model the loop calls (Fabric's wrapper, ``DistributedDataParallel``, or the model).
            optimizer: Its optimizer, built over all parameters (Fabric's wrapper or the torch optimizer).
            fabric: The Fabric object, if any: its strategy, loggers and collectives are used.

        Raises:
            LISAConfigError: For a strategy or option LISA cannot run with, or when LISA is already set up.

        Examples:
            >>> import torch
            >>> from lightning_lisa import LISA
            >>> model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Sequential(
            ...     *[torch.nn.Linear(4, 4) for _ in range(4)]), torch.nn.Linear(4, 8))
            >>> optimizer = torch.optim.AdamW(model.parameters())
            >>> lisa = LISA(n_layers=1, interval=2, layers="1", always_active=["0", "2"])
            >>> lisa.attach(model, optimizer)
            >>> for _ in range(3):
            ...     model(torch.tensor([1, 2])).sum().backward(); optimizer.step(); optimizer.zero_grad()
            >>> [s.step for s in lisa.history]
            [0, 2]
            >>> lisa.detach()
        """
        fabric_loop.attach(self, model, optimizer, fabric)

    def detach(self) -> None:
        """Remove the hooks :meth:`attach` or Fabric's setup registered; every parameter trains again."""
        fabric_loop.detach(self)

    def save(self, fabric: Fabric, path: str | Path, state: dict[str, Any], **kwargs: Any) -> None:
        """``fabric.save(path, state, **kwargs)``, with what every strategy needs of LISA's optimizer state.

        ``state`` holds LISA itself (e.g. ``{"model": model, "optimizer": optimizer, "lisa": lisa}``). While
        Fabric saves, a trainable parameter without optimizer state (a unit sampled since the last step)
        is frozen, so that "trainable <=> has state" holds in the checkpoint, as FSDP needs.
        """
        fabric_loop.save(self, fabric, path, state, **kwargs)

    def load(
        self,
        fabric: Fabric,
        path: str | Path,
        state: dict[str, Any],
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """``fabric.load(path, state)`` for a checkpoint that :meth:`save` wrote; the schedule resumes exactly.

        LISA's state is read first (so a checkpoint of another model depth fails before anything loads);
        under FSDP exactly the parameters with saved optimizer state require gradients while Fabric loads
        (distributed checkpoints load optimizer state strictly); then the restored period is applied.

        Args:
            fabric: The Fabric object.
            path: The checkpoint (a file, or a distributed checkpoint's folder).
            state: The objects to restore, LISA among them, as for ``fabric.load``.
            strict: Passed to ``fabric.load``.
            weights_only: Passed to ``fabric.load`` (and used to read LISA's entry).

        Returns:
            What ``fabric.load`` returns: the checkpoint's entries that ``state`` did not ask for.
        """
        return fabric_loop.load(self, fabric, path, state, strict=strict, weights_only=weights_only)

    # ---------------------------------------------------------------------------------- helpers

    def _view(self, trainer: pl.Trainer) -> LoopView:
        strategy = trainer.strategy
        return LoopView(
            trainer.global_step,
            trainer.optimizers,
            self._adapter_of(trainer),
            trainer.loggers,
            trainer.world_size,
            strategy.all_gather,
            strategy.root_device,
        )

    def _adapter_of(self, trainer: pl.Trainer) -> StrategyAdapter:
        if self._adapter is None or self._adapter.strategy is not trainer.strategy:
            self._adapter = adapter_for(trainer.strategy)
        return self._adapter

    def _watch_weights_load(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before Lightning loads a checkpoint's weights into the module, refuse one of another model depth.

        Lightning restores the weights before the callbacks' state, and tells the checkpoint's path only
        then: a ``load_state_dict`` pre-hook on the module reads LISA's entry of that checkpoint first, so
        that the error names the blocks the checkpoint's schedule trained, not torch's unexpected keys.
        """
        if self._weights_hook is not None:
            self._weights_hook.remove()
        ref = weakref.ref(trainer)

        def check(module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
            live = ref()
            path = getattr(live, "ckpt_path", None)
            if prefix or not isinstance(path, str | Path):
                return
            saved = saved_trainer_state(Path(path))
            if saved is not None and self.layer_info is None:  # built in `configure_model`, which has run now
                self._inspect(pl_module)
            if saved is not None:
                self._check_units(saved)

        self._weights_hook = pl_module.register_load_state_dict_pre_hook(check)  # type: ignore[no-untyped-call]


def saved_trainer_state(path: Path) -> dict[str, Any] | None:
    """LISA's entry of a Trainer checkpoint (a file, or a distributed checkpoint's ``meta.pt``), if it can be read.

    Only a first look, to refuse a checkpoint of another model before Lightning loads it: a checkpoint
    that cannot be read here is checked when Lightning restores LISA's state.
    """
    source = path / "meta.pt" if path.is_dir() else path
    if not source.is_file():
        return None
    try:
        checkpoint = torch.load(source, mmap=not path.is_dir(), map_location="cpu", weights_only=True)
    except Exception:  # not loadable with weights_only=True: Lightning reports it, LISA checks at restore
        return None
    state = checkpoint.get("callbacks", {}).get("LISA") if isinstance(checkpoint, dict) else None
    return dict(state) if isinstance(state, dict) else None
