"""``torch.compile`` with LISA: compile each block, not the whole model.

Dynamo guards a compiled graph on the ``requires_grad`` of every parameter it reads. A model compiled
as a whole therefore recompiles at every switch of the active blocks (each period has a new set), and
after ``torch._dynamo.config.recompile_limit`` recompiles (8 by default) it gives up and runs that
code eagerly for the rest of training, with only a logged warning.

A block compiled on its own sees two variants instead: trainable and frozen (a few more when the
input of the first blocks does not require grad, e.g. with frozen embeddings). Blocks of one class
share their compiled code, so the variants are compiled once per block class and reused by every
block at every later switch. :func:`compile_blocks` compiles each block in place with
``nn.Module.compile``, so the module tree and the checkpoint keys are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_lisa.layers import LayerInfo, find_layers


def compile_blocks(module: nn.Module, layers: str | Sequence[str] | None = None, **kwargs: Any) -> LayerInfo:
    """Compile every block of ``module`` in place, each on its own (``block.compile(**kwargs)``).

    Call it on the model before fit (e.g. in the ``LightningModule``'s ``__init__`` or
    ``configure_model``), with the same ``layers`` as given to :class:`~lightning_lisa.LISA`. The rest
    of the model (embeddings, head, loss) runs eagerly.

    Args:
        module: The model, or anything that holds it (e.g. the ``LightningModule``).
        layers: Dotted path(s) of the block lists, or ``None`` to detect them with
            :func:`~lightning_lisa.find_layers`.
        **kwargs: Passed to ``torch.compile`` for every block (``backend``, ``mode``, ``dynamic``, ...).

    Returns:
        What :func:`~lightning_lisa.find_layers` found: the blocks that were compiled.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Module()
        >>> model.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(3))
        >>> compile_blocks(model, backend="eager").num_blocks
        3
        >>> sorted(model.state_dict())[0]  # the checkpoint keys do not change
        'layers.0.linear1.bias'
    """
    info = find_layers(module, layers)
    for block in info.blocks:
        block.compile(**kwargs)
    return info


def compiled_over_blocks(module: nn.Module, info: LayerInfo) -> list[str]:
    """Names of the compiled modules of ``module`` that hold more than one block of ``info``.

    A module counts as compiled when it is a ``torch.compile`` wrapper (``OptimizedModule``), was
    compiled in place (``nn.Module.compile``), or is a ``LightningModule`` that Lightning unwrapped from
    ``torch.compile(lightning_module)``. The module itself is named ``""``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Module()
        >>> model.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32) for _ in range(3))
        >>> info = find_layers(model)
        >>> compiled_over_blocks(model, info)
        []
        >>> model.compile(backend="eager")
        >>> compiled_over_blocks(model, info)
        ['']
    """
    blocks = {id(b) for b in info.blocks}
    found: list[str] = []
    for name, m in module.named_modules():
        if not _is_compiled(m):
            continue
        if sum(1 for x in m.modules() if id(x) in blocks) > 1:
            found.append(name)
    return found


def warn_whole_model_compile(module: nn.Module, info: LayerInfo) -> list[str]:
    """Warn (on rank 0) when a compiled module holds several blocks; return their names.

    Examples:
        >>> from torch import nn
        >>> model = nn.Module()
        >>> model.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32) for _ in range(3))
        >>> warn_whole_model_compile(model, find_layers(model))
        []
    """
    names = compiled_over_blocks(module, info)
    if names:
        shown = ", ".join(f"`{n}`" if n else f"the {type(module).__name__}" for n in names)
        rank_zero_warn(
            f"LISA: {shown} is compiled as a whole (torch.compile), so each new set of active blocks fails its "
            "`requires_grad` guards and recompiles it; after torch._dynamo.config.recompile_limit recompiles it runs "
            "eagerly for the rest of training. Compile each block instead: "
            "`lightning_lisa.compile.compile_blocks(model)` (see the models guide)."
        )
    return names


def _is_compiled(m: nn.Module) -> bool:
    if type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod"):
        return True
    if getattr(m, "_compiled_call_impl", None) is not None:
        return True
    return getattr(m, "_compiler_ctx", None) is not None
