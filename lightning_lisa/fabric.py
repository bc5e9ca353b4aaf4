"""LISA in Lightning Fabric loops and plain PyTorch loops: the same algorithm, driven by other hooks.

Fabric calls two hooks of the objects in ``Fabric(callbacks=[...])`` by itself; :class:`~lightning_lisa.LISA`
has both:

* ``on_after_setup(fabric, module)``, at the end of ``fabric.setup(...)``: LISA inspects the model, refuses
  what it cannot train (the strategy, the options), runs what must see every parameter trainable
  (FSDP2's lazy initialization, DDP's communication hook) and registers a forward pre-hook on the module.
* ``on_after_optimizer_step(strategy, optimizer)``, after each step through Fabric's optimizer wrapper:
  LISA counts optimizer steps (gradient accumulation is the loop's business: one step is one call).

LISA starts the first period at once (as the Trainer callback does in ``on_train_start``), and forward
pre-hooks do what the Trainer callback does at the first micro-batch of every optimizer step: switch
whenever the step count enters a new period. Forwards without gradients (evaluation under
``torch.no_grad()``) switch nothing. An optimizer built after ``fabric.setup(model)`` must
still be built over all parameters; LISA checks that after the first step.

Loops that call ``fabric.setup_module`` (which runs no hook) or use no Fabric at all call
:meth:`LISA.attach(model, optimizer) <lightning_lisa.LISA.attach>` instead: it does the same and counts
steps with ``Optimizer.register_step_post_hook`` on the torch optimizer.

Never silent: an optimizer step that LISA sees before it was set up (``fabric.setup_module``) raises,
naming ``attach``; an optimizer that holds the model's parameters and steps outside Fabric's wrapper
before LISA saw any step raises at the next forward.

Checkpoints: :meth:`LISA.save <lightning_lisa.LISA.save>` and :meth:`LISA.load <lightning_lisa.LISA.load>`
wrap ``fabric.save`` and ``fabric.load``. Under FSDP (``ModelParallelStrategy``, ``FSDPStrategy``) the
optimizer state is loaded strictly for every parameter that requires gradients, and LISA's checkpoints
hold state for the trained parameters only; ``load`` reads LISA's state first, makes exactly the
parameters with saved state trainable while Fabric loads, then re-applies the restored period. Under
a single device and DDP, a plain ``fabric.load`` with LISA in the state works as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.wrappers import is_wrapped
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_lisa.engine import NO_GRADIENT, LoopView, MetricsLogger
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.strategies import StrategyAdapter, adapter_for, check_supported
from lightning_lisa.strategies.checkpoints import checkpoint_names, params_with_saved_state
from lightning_lisa.strategies.ddp import DDPAdapter, find_ddp

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies.strategy import Strategy as FabricStrategy

    from lightning_lisa.callback import LISA

__all__ = ["LoopDriver", "attach", "load", "save", "set_up_from_fabric"]

SETUP_MODULE = (
    "LISA saw an optimizer step, but was never set up: `fabric.setup_module(...)` runs no callback hook. Call "
    "`lisa.attach(model, optimizer, fabric)` after `fabric.setup_optimizers(...)`, or set up model and optimizer "
    "together with `fabric.setup(model, optimizer)`."
)


class LoopDriver:
    """Drives a :class:`~lightning_lisa.LISA` from a Fabric loop's hooks or a torch optimizer's step hook.

    Args:
        lisa: The LISA it drives.
        model: The module the loop calls (Fabric's wrapper, a ``DistributedDataParallel`` module, or the
            model itself); the forward pre-hook goes on the model inside the wrappers.
        adapter: The adapter of the loop's strategy.
        loggers: Where the switches are logged.
        world_size: Processes training together.
        all_gather: Gathers a tensor from every process, for ``verify_ranks``.
        device: This process's device.
        how: How LISA was set up, for the messages (``"callbacks"`` or ``"attach"``).

    Attributes:
        root: The model LISA's names are relative to (the module inside Fabric's and DDP's wrappers).
        optimizers: The optimizers seen so far.
    """

    def __init__(
        self,
        lisa: LISA,
        model: nn.Module,
        adapter: StrategyAdapter,
        loggers: list[MetricsLogger],
        world_size: int,
        all_gather: Callable[[torch.Tensor], torch.Tensor] | None,
        device: torch.device,
        how: str,
    ) -> None:
        self.lisa, self.model, self.adapter, self.how = lisa, model, adapter, how
        self.root = unwrap_module(model)
        self.loggers, self.world_size, self.all_gather, self.device = loggers, world_size, all_gather, device
        self.optimizers: list[Optimizer] = []
        self.needs_start = True
        self.paused = False
        self._boundary_step = -1
        self._handles: list[RemovableHandle] = []
        self._raw_step: Optimizer | None = None  # an optimizer that stepped where Fabric's hook did not follow
        self._checked = False  # whether the optimizers were checked against the parameters
        self._stepped = False  # whether an optimizer step was seen in this process
        self._loaded = False  # an optimizer loaded state outside `lisa.load`: release frozen state at next forward

    def view(self) -> LoopView:
        """What the loop knows now."""
        return LoopView(
            self.lisa._step,
            self.optimizers,
            self.adapter,
            self.loggers,
            self.world_size,
            self.all_gather,
            self.device,
        )

    def install(self, optimizer: Optimizer | None) -> None:
        """Inspect the model, check it, start the first period; register the hooks.

        An optimizer that already holds state (loaded before ``attach`` in a plain loop's resume) defers the
        start to the first forward: a ``lisa.load_state_dict`` may still follow, and a fresh draw now would
        release the state of the restored period's units.

        The forward pre-hooks go on the user's model and on every unit's modules, first in line: Fabric runs
        a LightningModule's ``training_step`` without calling the model, FSDP2's own pre-forward hooks
        (all-gathers) must see the new ``requires_grad``, and a unit's parameters are first used in its
        forward. The first hook that runs in an optimizer step does the step's work.
        """
        lisa = self.lisa
        if lisa._restored is None:  # a fresh run (state loaded before `attach` keeps its step)
            lisa._step = 0
        lisa._detached = False
        lisa._inspect(self.root)
        self.adapter.check(lisa.units, lisa.granularity)
        self.adapter.check_wrapped(self.model, lisa.units)
        lisa.communication = self.adapter.begin(self.model, self.world_size, lisa.ddp_comm_hook)
        lisa._begin(self.root, [optimizer] if optimizer is not None else [])
        if optimizer is not None and optimizer.state:  # loaded before `attach`: `lisa.load_state_dict` may follow
            self.learn(optimizer, release=False)
            self.needs_start = self._loaded = True  # start the period at the first forward, then release
        else:
            if optimizer is not None:
                self.learn(optimizer)
            self.restart()
        for module in dict.fromkeys([self.root, *(m for u in lisa.units for m in u.modules)]):
            self._handles.append(module.register_forward_pre_hook(self._before_forward, prepend=True))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._after_torch_step))
        else:  # only until Fabric's hook reports a first step: an optimizer stepping outside Fabric is an error
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self._handles.append(register_optimizer_step_post_hook(self._any_step))

    def remove(self) -> None:
        """Remove every hook this driver registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def learn(self, optimizer: Optimizer, release: bool = True) -> None:
        """Remember ``optimizer``; with ``release``, release the state it holds for frozen parameters."""
        if any(o is optimizer for o in self.optimizers):
            return
        self.optimizers.append(optimizer)
        self._handles.append(optimizer.register_load_state_dict_post_hook(self._after_optimizer_load))
        if release:
            self._release_frozen([optimizer])

    def _release_frozen(self, optimizers: list[Optimizer]) -> None:
        if self.lisa._params is not None:
            frozen = [p for p in self.lisa._params.managed if not p.requires_grad]
            self.lisa._state.release(optimizers, frozen)

    def updates_model(self, optimizer: Optimizer) -> bool:
        """Whether ``optimizer`` is known, or holds parameters LISA manages (another model's optimizer does not)."""
        if any(o is optimizer for o in self.optimizers):
            return True
        params = self.lisa._params
        managed = {id(p) for p in params.managed} if params is not None else set()
        return any(id(p) in managed for group in optimizer.param_groups for p in group["params"])

    def check_optimizers(self) -> None:
        """After the first optimizer step: raise unless the optimizers seen update every parameter LISA manages."""
        self._checked = True
        params = self.lisa._params
        missing = params.not_in(self.optimizers) if params is not None else []
        if missing and params is not None:
            names = [params.names[id(p)] for p in missing[:3]]
            raise LISAConfigError(
                f"LISA: {len(missing)} parameters it may train are in no optimizer that stepped (e.g. {names}), so "
                "the blocks they belong to would never train when sampled. Build the optimizer over all parameters "
                "(`model.parameters()`), not only those with `requires_grad` (LISA freezes at `fabric.setup` or "
                "`attach`). LISA has given every parameter back trainable and stopped driving this model."
            )

    def after_step(self, optimizer: Optimizer) -> None:
        """One optimizer step was taken."""
        if self.paused:
            return
        self._raw_step = None
        self._stepped = True
        self.learn(optimizer)
        received = None  # gradients are still held after the step
        starved = self.lisa._starved_units(received)
        if starved:
            rank_zero_warn(NO_GRADIENT.format(starved=starved, step=self.lisa._step))
        self.lisa._step += 1

    def restart(self) -> None:
        """Start the restored period now (after a load), instead of at the next forward."""
        self.needs_start = False
        self._boundary_step = -1
        self.lisa._start(self.view())

    # ------------------------------------------------------------------------------------ hooks

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        try:
            self._check_loop()
        except LISAConfigError:  # the model goes back as the user gave it: every parameter trainable
            detach(self.lisa)
            raise
        if not torch.is_grad_enabled():  # evaluation: it trains nothing, so it starts no period
            return
        if self.needs_start:
            self.restart()
        if self._loaded:  # after the restored period (if any) is applied: its frozen units hold no state
            self._loaded = False
            self._release_frozen(self.optimizers)
        if self._boundary_step != self.lisa._step:  # the first forward of an optimizer step
            self._boundary_step = self.lisa._step
            self.lisa._step_boundary(self.view())

    def _check_loop(self) -> None:
        """Raise when the loop's optimizer stepped where LISA could not see it, or misses LISA's parameters."""
        if self._raw_step is not None:
            raise LISAConfigError(
                f"LISA: the optimizer {type(self._raw_step).__name__} that holds the model's parameters stepped, but "
                "not through Fabric's optimizer wrapper, so LISA never saw the step. Set it up with "
                "`fabric.setup(model, optimizer)` or `fabric.setup_optimizers(optimizer)`, or call "
                "`lisa.attach(model, optimizer)`. LISA has given every parameter back trainable and stopped "
                "driving this model."
            )
        if torch.is_grad_enabled() and not self._checked and self._stepped:
            self.check_optimizers()

    def _after_optimizer_load(self, optimizer: Optimizer) -> None:
        # A plain `optimizer.load_state_dict(...)` (a plain loop's resume, in any order with
        # `lisa.load_state_dict`) may bring back state of units that are frozen now; `lisa.load` pauses.
        if not self.paused:
            self._loaded = True

    def _after_torch_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.after_step(optimizer)

    def _any_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self.paused or self.optimizers:
            return
        if self.updates_model(optimizer):
            self._raw_step = optimizer


def unwrap_module(model: nn.Module) -> nn.Module:
    """The user's model inside Fabric's and DDP's wrappers."""
    if is_wrapped(model):
        inner = getattr(model, "module", model)
        model = inner if isinstance(inner, nn.Module) else model
    ddp = find_ddp(model) if isinstance(model, nn.Module) else None
    return ddp.module if ddp is not None and ddp is model else model


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside Fabric's wrapper."""
    inner = optimizer.optimizer if is_wrapped(optimizer) else optimizer
    if not isinstance(inner, Optimizer):
        raise LISAConfigError(
            f"LISA needs a `torch.optim.Optimizer` (or Fabric's wrapper of one), got {type(optimizer).__name__}."
        )
    return inner


def _refuse_options(lisa: LISA, how: str) -> None:
    if lisa.step_in_backward:
        raise LISAConfigError(
            f"`LISA(step_in_backward=True)` is not supported with {how}: the step in backward must know which "
            "micro-batch ends an optimizer step, which only the Trainer tells. Use the Trainer, or turn it off."
        )


def _check_free(lisa: LISA) -> None:
    if lisa._driver is not None:
        raise LISAConfigError(
            f"This LISA is already set up ({lisa._driver.how}); one LISA drives one model. Call `lisa.detach()` first, "
            "or create another LISA."
        )


def set_up_from_fabric(lisa: LISA, fabric: Fabric, module: nn.Module) -> None:
    """What ``LISA.on_after_setup`` does: set LISA up on the module ``fabric.setup`` returned."""
    _check_free(lisa)
    check_supported(fabric.strategy)
    _refuse_options(lisa, "`Fabric(callbacks=[LISA(...)])`")
    driver = _driver_for(lisa, module, fabric.strategy, list(fabric.loggers), "callbacks")
    driver.install(None)
    lisa._driver = driver


def after_optimizer_step(lisa: LISA, optimizer: Optimizer) -> None:
    """What ``LISA.on_after_optimizer_step`` does: count the step (raise when LISA was never set up)."""
    driver = lisa._driver
    if driver is None and lisa._detached:  # the user ended LISA's run; Fabric still calls its callbacks
        return
    if driver is None:
        raise LISAConfigError(SETUP_MODULE)
    inner = unwrap_optimizer(optimizer)
    if driver.how == "callbacks" and driver.updates_model(inner):
        driver.after_step(inner)


def attach(lisa: LISA, model: nn.Module, optimizer: Any, fabric: Fabric | None = None) -> None:
    """What ``LISA.attach`` does (see there)."""
    _check_free(lisa)
    inner = unwrap_optimizer(optimizer)
    if fabric is not None:
        check_supported(fabric.strategy)
    _refuse_options(lisa, "`lisa.attach(...)`")
    strategy = fabric.strategy if fabric is not None else None
    loggers = list(fabric.loggers) if fabric is not None else []
    driver = _driver_for(lisa, model, strategy, loggers, "attach")
    driver.install(inner)
    lisa._driver = driver


def _driver_for(
    lisa: LISA, model: nn.Module, strategy: FabricStrategy | None, loggers: list[Any], how: str
) -> LoopDriver:
    if strategy is not None:
        adapter = adapter_for(strategy)
        world_size = strategy.world_size if hasattr(strategy, "world_size") else 1
        device = strategy.root_device
        return LoopDriver(lisa, model, adapter, loggers, world_size, strategy.all_gather, device, how)
    # a plain PyTorch loop: one process, or DistributedDataParallel set up by the user
    distributed = dist.is_available() and dist.is_initialized()
    plain_adapter = DDPAdapter(None) if find_ddp(model) is not None else StrategyAdapter(None)
    device = next(model.parameters()).device
    return LoopDriver(
        lisa,
        model,
        plain_adapter,
        loggers,
        dist.get_world_size() if distributed else 1,
        _plain_all_gather if distributed else None,
        device,
        how,
    )


def _plain_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.stack(parts)


def detach(lisa: LISA) -> None:
    """What ``LISA.detach`` does: remove the hooks and give back every parameter trainable."""
    driver = lisa._driver
    if driver is None:
        return
    driver.remove()
    if lisa._params is not None:
        lisa._params.restore()
    lisa._driver, lisa._detached = None, True


# ------------------------------------------------------------------------------------ checkpoints


def _driver_of(lisa: LISA, what: str) -> LoopDriver:
    if lisa._driver is None:
        raise LISAConfigError(
            f"`lisa.{what}(...)` needs LISA set up first: pass it to `Fabric(callbacks=[lisa])` and call "
            "`fabric.setup(model, optimizer)`, or call `lisa.attach(model, optimizer, fabric)`."
        )
    return lisa._driver


def _key_of(lisa: LISA, state: Mapping[str, Any], what: str) -> str:
    key = next((k for k, v in state.items() if v is lisa), None)
    if key is None:
        raise LISAConfigError(
            f"`lisa.{what}(fabric, path, state)`: `state` must hold this LISA, e.g. "
            f"`{{'model': model, 'optimizer': optimizer, 'lisa': lisa}}`; got the keys {sorted(state)}."
        )
    return key


def save(
    lisa: LISA,
    fabric: Fabric,
    path: str | Path,
    state: dict[str, Any],
    filter: dict[str, Callable[[str, Any], bool]] | None = None,
) -> None:
    """What ``LISA.save`` does: ``fabric.save`` with every trainable parameter holding optimizer state."""
    driver = _driver_of(lisa, "save")
    _key_of(lisa, state, "save")
    lisa._state.synchronize()
    optimizers = [unwrap_optimizer(v) for v in state.values() if isinstance(v, Optimizer)]
    params = lisa._params
    assert params is not None
    held = [p for p in params.managed if p.requires_grad and not any(o.state.get(p) for o in optimizers)]
    with _paused(driver), _requires_grad(held, False):
        fabric.save(path, state, filter=filter)


def load(
    lisa: LISA,
    fabric: Fabric,
    path: str | Path,
    state: dict[str, Any],
    strict: bool = True,
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """What ``LISA.load`` does (see there)."""
    driver = _driver_of(lisa, "load")
    key = _key_of(lisa, state, "load")
    path = Path(fabric.broadcast(str(path)))
    saved = read_saved_state(path, key, weights_only)
    if saved is None:
        raise LISAConfigError(f"The checkpoint {str(path)!r} holds no {key!r} entry (LISA's state).")
    optimizer_keys = [k for k, v in state.items() if isinstance(v, Optimizer)]
    optimizers = [unwrap_optimizer(state[k]) for k in optimizer_keys]
    lisa.load_state_dict(saved)  # checks the settings and the model's depth before anything is loaded
    params = lisa._params
    assert params is not None
    with_state: set[int] | None = None
    if driver.adapter.strict_optimizer_loading:  # trainable <=> saved state, while Fabric loads strictly
        names = params_with_saved_state(path, driver.root, len(optimizers), weights_only, optimizer_keys)
        by_name = dict(zip(checkpoint_names(driver.root), driver.root.parameters(), strict=True))
        with_state = {id(p) for n, p in by_name.items() if n in names}
    rest = {k: v for k, v in state.items() if k != key}
    with _paused(driver), _mask(params.managed, with_state):
        remainder = fabric.load(path, rest, strict=strict, weights_only=weights_only)
    for optimizer in optimizers:
        driver.learn(optimizer, release=False)  # the restored period releases what it freezes
    driver.restart()
    remainder.pop(key, None)
    return remainder


def read_saved_state(path: Path, key: str, weights_only: bool | None) -> dict[str, Any] | None:
    """LISA's entry ``key`` of a Fabric checkpoint: a file, or a distributed checkpoint's ``meta.pt``."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    source = path / _METADATA_FILENAME if path.is_dir() else path
    if not source.is_file():
        raise LISAConfigError(f"LISA found no checkpoint at {str(path)!r}.")
    safe = True if weights_only is None else weights_only  # what Fabric uses for a local file
    checkpoint = torch.load(source, mmap=source is path, map_location="cpu", weights_only=safe)
    entry = checkpoint.get(key) if isinstance(checkpoint, dict) else None
    return dict(entry) if isinstance(entry, Mapping) else None


@contextmanager
def _paused(driver: LoopDriver) -> Iterator[None]:
    """Steps inside (the fake step of a distributed-checkpoint load) are not the loop's."""
    driver.paused = True
    try:
        yield
    finally:
        driver.paused = False


@contextmanager
def _requires_grad(params: list[nn.Parameter], value: bool) -> Iterator[None]:
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(value)
    try:
        yield
    finally:
        for p, was in zip(params, before, strict=True):
            p.requires_grad_(was)


@contextmanager
def _mask(params: list[nn.Parameter], trainable: set[int] | None) -> Iterator[None]:
    """With ``trainable``: exactly those of ``params`` require gradients inside (then as before)."""
    if trainable is None:
        yield
        return
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(id(p) in trainable)
    try:
        yield
    finally:
        for p, was in zip(params, before, strict=True):
            p.requires_grad_(was)
