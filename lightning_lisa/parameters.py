"""The parameter set LISA manages: freeze, unfreeze, and give back what the user left trainable.

LISA only ever touches the parameters that required gradients when training started (the user may
have frozen others, e.g. PEFT's base weights). Of those, the always-active ones train throughout,
the parameters of the active units train during their period, and every other one is frozen: it
stops requiring gradients and its gradient is dropped (a frozen parameter that still holds a
``.grad`` would be updated by the optimizer anyway). An always-active module inside a unit takes its
parameters out of the unit: a unit that is always active as a whole leaves the sampling pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import Unit, unique_parameters


class ParameterSet:
    """The trainable parameters of a model, by unit and always-active set.

    Args:
        module: The ``LightningModule`` (or any root module).
        units: What is sampled.
        always_active: Modules that train all the time.

    Examples:
        >>> from lightning_lisa.layers import find_layers, split_units
        >>> model = nn.Sequential(nn.Embedding(8, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
        >>> units = split_units(find_layers(model, "1"), "block")
        >>> params = ParameterSet(model, units, [model[0]])
        >>> frozen, unfrozen = params.apply([2], first=True)
        >>> [p.requires_grad for p in model[1][2].parameters()], model[1][0].weight.requires_grad
        ([True, True], False)
        >>> params.restore()
        >>> model[1][0].weight.requires_grad
        True
    """

    def __init__(self, module: nn.Module, units: Sequence[Unit], always_active: Iterable[nn.Module]) -> None:
        self.managed = [p for p in unique_parameters([module]) if p.requires_grad]
        self.names = {id(p): name for name, p in module.named_parameters()}
        managed = {id(p) for p in self.managed}
        self.always = [p for p in unique_parameters(always_active) if id(p) in managed]
        always = {id(p) for p in self.always}
        self.by_unit = [[p for p in unique_parameters(u.modules) if id(p) in managed and id(p) not in always]
                        for u in units]  # fmt: skip
        #: Indices of the units with something to sample (the others the user froze before fit, or are always
        #: active as a whole).
        self.candidates = [i for i, params in enumerate(self.by_unit) if params]

    def apply(self, active: Sequence[int], first: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Make exactly the ``active`` units and the always-active set trainable.

        Args:
            active: Unit indices to train.
            first: Freeze (and drop the gradient of) every other parameter, even one already frozen.

        Returns:
            The parameters frozen now, and those unfrozen now.
        """
        trainable = {id(p) for i in active for p in self.by_unit[i]} | {id(p) for p in self.always}
        frozen, unfrozen = [], []
        for p in self.managed:
            if id(p) in trainable:
                if not p.requires_grad:
                    p.requires_grad_(True)
                    unfrozen.append(p)
            elif p.requires_grad or first:
                p.requires_grad_(False)
                p.grad = None
                frozen.append(p)
        return frozen, unfrozen

    def trainable_numel(self) -> int:
        """Elements that train now (tied weights once)."""
        return sum(p.numel() for p in self.managed if p.requires_grad)

    def without_gradient(
        self, active: Sequence[int], received: Callable[[nn.Parameter], bool] | None = None
    ) -> list[int]:
        """The ``active`` units none of whose parameters received a gradient.

        Args:
            active: Unit indices.
            received: Whether a parameter received a gradient, where gradients are gone (updated in the
                backward pass); by default whether it holds one.
        """
        got = received if received is not None else (lambda p: p.grad is not None)
        return [i for i in active if not any(map(got, self.by_unit[i]))]

    def check(self, n_layers: int, what: str, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Raise when fewer than ``n_layers`` units can train; warn about parameters no optimizer updates.

        Args:
            n_layers: Units trained at once.
            what: What the units are, for the message (e.g. "blocks of `model.layers`").
            optimizers: The Trainer's optimizers.
        """
        if len(self.candidates) < n_layers:
            count = len(self.candidates)
            raise LISAConfigError(
                f"`n_layers={n_layers}`, but only {count} of the {len(self.by_unit)} {what} "
                f"{'has' if count == 1 else 'have'} parameters to sample (the others were frozen before fit, or "
                "are in `always_active`). Lower `n_layers`, or unfreeze them."
            )
        missing = self.not_in(optimizers)
        if missing and optimizers:
            rank_zero_warn(
                f"LISA: {len(missing)} trainable parameters are in no optimizer (e.g. "
                f"{[self.names[id(p)] for p in missing[:3]]}); they will never change. Build the optimizer over all "
                "parameters, not only those with requires_grad."
            )

    def valid(self, active: Sequence[int], n_layers: int) -> bool:
        """Whether ``active`` (e.g. restored from a checkpoint) names ``n_layers`` distinct units that can train."""
        return len(set(active)) == len(active) == n_layers and all(i in self.candidates for i in active)

    def not_in(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[nn.Parameter]:
        """Managed parameters that no optimizer updates."""
        known = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        return [p for p in self.managed if id(p) not in known]

    def restore(self) -> None:
        """Give every managed parameter back trainable, as it was before fit."""
        for p in self.managed:
            p.requires_grad_(True)
