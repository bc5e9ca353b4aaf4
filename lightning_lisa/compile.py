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

Two things still make a compiled block recompile for every block, and LISA says so:

* A Hugging Face model with ``config.use_cache=True`` (the default of most) passes a key/value cache
  to each block, and each block's attention reads its own ``layer_idx`` from it: the compiled code
  is guarded on that index and recompiles per block until the recompile limit, after which the
  remaining blocks run eagerly. Train with ``use_cache=False`` (LISA's recipe does); LISA's start-up
  warns when compiled blocks belong to a model whose config says ``use_cache=True``.
* Whatever else makes torch give up: :class:`CompileWatch`, installed by :func:`compile_blocks`,
  counts compilations and warns (once per function) with the count and torch's last reason when
  torch stops compiling a function and runs it eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_lisa.layers import LayerInfo, find_layers

#: The logger through which torch reports that it stopped compiling a function (the recompile limit).
DYNAMO_LOGGER = "torch._dynamo.convert_frame"


@dataclass(frozen=True)
class Fallback:
    """torch stopped compiling a function and runs it eagerly from now on.

    Attributes:
        function: The function, as torch names it (``'forward' (file:line)``).
        limit: The name of the limit that was reached (``recompile_limit``).
        compiles: Its value: how many times the function was compiled before torch gave up.
        reason: torch's reason for the last recompilation (a guard that failed).
    """

    function: str
    limit: str
    compiles: int
    reason: str


@dataclass
class CompileWatch(logging.Handler):
    """Counts torch's compilations in this process and catches the functions it stops compiling.

    :func:`compile_blocks` installs one for the process (:func:`compile_watch`). ``compiles`` counts
    every graph torch compiles while it is installed, the blocks' and any other; where only the blocks
    are compiled it is theirs. A function that reaches the recompile limit is recorded in ``fallbacks``
    and LISA warns, once per function, with the count and the reason.

    Attributes:
        compiles: Compilations started since the watch was installed.
        fallbacks: The functions torch stopped compiling.
    """

    compiles: int = 0
    fallbacks: list[Fallback] = field(default_factory=list)

    def __post_init__(self) -> None:
        logging.Handler.__init__(self, level=logging.WARNING)

    def __hash__(self) -> int:  # logging keeps handlers in sets and lists by identity
        return id(self)

    def count(self, *args: Any) -> None:
        """Count one compilation (a start callback of torch's compiler)."""
        self.compiles += 1

    def emit(self, record: logging.LogRecord) -> None:
        """Record and warn about a "hit config.recompile_limit" message of torch's compiler."""
        if not str(record.msg).startswith("torch._dynamo hit config.") or len(record.args or ()) < 4:
            return
        args: Any = record.args
        fallback = Fallback(function=str(args[2]), limit=str(args[0]), compiles=int(args[1]), reason=str(args[3]))
        if any(f.function == fallback.function for f in self.fallbacks):
            return
        self.fallbacks.append(fallback)
        reason = fallback.reason.strip().splitlines()[0] if fallback.reason.strip() else "unknown"
        rank_zero_warn(
            f"LISA: torch.compile gave up on {fallback.function} after {fallback.compiles} compiles "
            f"(torch._dynamo.config.{fallback.limit}={fallback.compiles}) and runs it eagerly from now on. Last reason "
            f"for recompiling: {reason}. For a Hugging Face model with compiled blocks, train with "
            "`use_cache=False` (`model.config.use_cache = False`): the key/value cache makes every block recompile."
        )


_WATCH: CompileWatch | None = None


def compile_watch() -> CompileWatch:
    """The process's :class:`CompileWatch`, installed (again, after ``torch._dynamo.reset()``) on every call.

    Examples:
        >>> compile_watch() is compile_watch()
        True
    """
    global _WATCH
    if _WATCH is None:
        _WATCH = CompileWatch()
    logger = logging.getLogger(DYNAMO_LOGGER)
    if _WATCH not in logger.handlers:
        logger.addHandler(_WATCH)
    # torch's compiler calls its start callbacks once per compilation; torch._dynamo.reset() removes them
    from torch._dynamo.callback import callback_handler

    if _WATCH.count not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_WATCH.count)
    return _WATCH


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
    compile_watch()
    for block in info.blocks:
        block.compile(**kwargs)
    return info


def cache_config_owner(module: nn.Module, info: LayerInfo) -> str | None:
    """The name of the Hugging Face model whose compiled blocks would build a key/value cache, if any.

    That is: a block of ``info`` is compiled (per block, :func:`compile_blocks`) and the model holding
    it has ``config.use_cache=True``. The module itself is named ``""``.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
        >>> info = compile_blocks(model, backend="eager")
        >>> cache_config_owner(model, info)
        ''
        >>> model.config.use_cache = False
        >>> cache_config_owner(model, info) is None
        True
    """
    if not any(_is_compiled(b) for b in info.blocks):
        return None
    blocks = {id(b) for b in info.blocks}
    for name, m in module.named_modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", False) is True and any(id(x) in blocks for x in m.modules()):
            return str(name)
    return None


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

    Also warn, once, when the blocks are compiled one by one but belong to a Hugging Face model with
    ``config.use_cache=True`` (:func:`cache_config_owner`): every block would recompile.

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
    if any(_is_compiled(b) for b in info.blocks):
        compile_watch()
    owner = cache_config_owner(module, info)
    if owner is not None:
        shown = f"`{owner}`" if owner else f"the {type(module).__name__}"
        rank_zero_warn(
            f"LISA: the blocks are compiled, but {shown} has `config.use_cache=True`: in training each block's forward "
            "would build a key/value cache and read its own layer index from it, so the compiled code recompiles for "
            "every block and, after torch._dynamo.config.recompile_limit compiles, runs the rest eagerly. Set "
            "`model.config.use_cache = False` for training (or pass `use_cache=False` to the model's forward)."
        )
    return names


def _is_compiled(m: nn.Module) -> bool:
    if type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod"):
        return True
    if getattr(m, "_compiled_call_impl", None) is not None:
        return True
    return getattr(m, "_compiler_ctx", None) is not None
