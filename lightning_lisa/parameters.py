"""The parameter set LISA manages: freeze, unfreeze, and give back what the user left trainable.

LISA only ever touches the parameters that required gradients when training started (the user may
have frozen others, e.g. PEFT's base weights). Of those, the always-active ones train throughout,
the parameters of the active units train during their period, and every other one is frozen: it
stops requiring gradients and its gradient is dropped (a frozen parameter that still holds a
``.grad`` would be updated by the optimizer anyway).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

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
        managed = {id(p) for p in self.managed}
        self.by_unit = [[p for p in unique_parameters(u.modules) if id(p) in managed] for u in units]
        self.always = [p for p in unique_parameters(always_active) if id(p) in managed]
        #: Indices of the units with something to train (the others the user froze before fit).
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

    def without_gradient(self, active: Sequence[int]) -> list[int]:
        """The ``active`` units none of whose parameters received a gradient."""
        return [i for i in active if all(p.grad is None for p in self.by_unit[i])]

    def not_in(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[nn.Parameter]:
        """Managed parameters that no optimizer updates."""
        known = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        return [p for p in self.managed if id(p) not in known]

    def restore(self) -> None:
        """Give every managed parameter back trainable, as it was before fit."""
        for p in self.managed:
            p.requires_grad_(True)
