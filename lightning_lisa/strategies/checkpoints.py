"""Which parameters of a model have optimizer state in a checkpoint of a sharded strategy.

LISA saves optimizer state only for the parameters it trained. ``ModelParallelStrategy`` (FSDP2)
and ``FSDPStrategy`` (FSDP1) load optimizer state strictly: they expect saved state for every
parameter that requires gradients (a distributed checkpoint fails with ``Missing key in checkpoint
state_dict: optimizer_0.state...``, a full one with ``Missing optimizer state for parameter ...``).
No callback hook runs between the moment the checkpoint path is known and the moment the strategy
loads it, so LISA's strategy subclasses override ``load_checkpoint``: the parameters that
:func:`params_without_saved_state` returns are frozen while it loads (:func:`frozen_while`), and
start without state afterwards, as they would have in the saved run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import Strategy
from torch import nn


@contextmanager
def frozen_while(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Freeze ``params`` inside the block and let them train again afterwards, whatever happens.

    Examples:
        >>> layer = nn.Linear(2, 2)
        >>> with frozen_while([layer.weight]):
        ...     layer.weight.requires_grad
        False
        >>> layer.weight.requires_grad
        True
    """
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def checkpoint_names(module: nn.Module) -> list[str]:
    """The name under which each parameter of ``module`` (in ``parameters()`` order) is saved in checkpoints.

    ``torch.distributed.checkpoint.state_dict`` drops wrapper prefixes that ``named_parameters()``
    keeps, e.g. ``_checkpoint_wrapped_module`` of activation checkpointing, ``_orig_mod`` of
    ``torch.compile`` and ``_fsdp_wrapped_module`` of FSDP1.
    """
    try:
        # Private, but it is the function torch.distributed.checkpoint itself names parameters with; the
        # fallback below strips the wrapper prefixes we know of.
        from torch.distributed.checkpoint.state_dict import _get_fqns
    except ImportError:  # pragma: no cover - older or newer torch
        return [_strip_wrappers(name) for name, _ in module.named_parameters()]
    return [next(iter(_get_fqns(module, name))) for name, _ in module.named_parameters()]


def _strip_wrappers(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts if p not in ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"))


def params_with_saved_state(
    path: str | Path,
    module: nn.Module,
    num_optimizers: int,
    weights_only: bool | None = None,
    optimizer_keys: Sequence[str] | None = None,
) -> set[str]:
    """Names of the parameters of ``module`` that have optimizer state in a ``ModelParallelStrategy`` checkpoint.

    Args:
        path: A distributed checkpoint (a folder) or a full checkpoint (a file).
        module: The module the strategy saved (``strategy.model``).
        num_optimizers: How many optimizers the checkpoint holds (``optimizer_0``, ...).
        weights_only: Passed to ``torch.load`` for a full checkpoint (``None``: ``False``, as Lightning
            loads its own checkpoints).
        optimizer_keys: The keys of the optimizers' states in a Fabric checkpoint (``fabric.save(path,
            {"optimizer": optimizer, ...})`` saves under ``"optimizer"``); ``None`` for a Trainer checkpoint.

    Returns:
        The names, as :func:`checkpoint_names` gives them, with an entry in the saved state of any of
        the optimizers.
    """
    names = checkpoint_names(module)
    known = set(names)
    path = Path(path)
    found: set[str] = set()
    if path.is_dir():
        from torch.distributed.checkpoint.filesystem import FileSystemReader

        keys = FileSystemReader(path).read_metadata().state_dict_metadata.keys()
        keys_of = optimizer_keys if optimizer_keys is not None else [f"optimizer_{i}" for i in range(num_optimizers)]
        prefixes = [f"{k}.state." for k in keys_of]
        for key in keys:
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                continue
            rest = key[len(prefix) :]  # "<parameter name>.<state name>"
            while "." in rest and rest not in known:
                rest = rest.rsplit(".", 1)[0]
            if rest in known:
                found.add(rest)
        return found
    checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=bool(weights_only))
    states = (
        checkpoint.get("optimizer_states", [])[:num_optimizers]
        if optimizer_keys is None
        else [checkpoint[k] for k in optimizer_keys if k in checkpoint]
    )
    for state in states:
        for key in state.get("state", {}):
            if isinstance(key, int) and 0 <= key < len(names):  # keyed by position in parameters()
                found.add(names[key])
            elif isinstance(key, str) and key in known:
                found.add(key)
    return found


def load_partial(
    strategy: Strategy, load: Callable[..., dict[str, Any]], path: str | Path, weights_only: bool | None
) -> dict[str, Any]:
    """Run a strategy's own loading with the parameters that have no saved optimizer state frozen meanwhile.

    A strict loader then finds every trainable parameter in the checkpoint.

    Args:
        strategy: The strategy that loads (its wrapped ``model``, ``optimizers`` and ``broadcast``).
        load: The parent class's ``load_checkpoint``, bound to ``strategy``.
        path: The checkpoint.
        weights_only: Passed on.
    """
    if strategy.model is None or not path:
        return load(path, weights_only=weights_only)
    path = strategy.broadcast(path)
    held = params_without_saved_state(path, strategy.model, len(strategy.optimizers), weights_only)
    with frozen_while(held):
        return load(path, weights_only=weights_only)


def save_complete(
    strategy: Strategy,
    save: Callable[[dict[str, Any], Path, Any], None],
    checkpoint: dict[str, Any],
    filepath: str | Path,
    storage_options: Any | None,
) -> None:
    """Run a strategy's own saving into a hidden sibling of ``filepath``, moved into place once complete.

    A sharded checkpoint is a folder that every rank writes its shards into, and Lightning's FSDP
    strategies write it in place, over the previous checkpoint of that name: a run killed halfway left a
    folder mixing new shards with old metadata, which loaded without an error. A full checkpoint is one
    file that rank 0 writes in place. Here every rank writes into :func:`partial_path`, and rank 0 moves
    it over ``filepath`` (:func:`move_into_place`) after all ranks are done; this needs a file system that
    every rank sees, as the strategies' own metadata, which rank 0 alone writes, already does. A partial
    write left by a killed run is removed before the next save.

    Args:
        strategy: The strategy that saves (its ``broadcast``, ``barrier`` and ``is_global_zero``).
        save: The parent class's ``save_checkpoint``, bound to ``strategy``.
        checkpoint: Passed on.
        filepath: Where the complete checkpoint ends up.
        storage_options: Passed on.
    """
    target = Path(strategy.broadcast(filepath))
    partial = partial_path(target)
    if strategy.is_global_zero:
        remove_path(partial)
    strategy.barrier("lisa_checkpoint_start")
    save(checkpoint, partial, storage_options)
    strategy.barrier("lisa_checkpoint_written")
    if strategy.is_global_zero:
        move_into_place(partial, target)
    strategy.barrier("lisa_checkpoint_in_place")


def params_without_saved_state(
    path: str | Path,
    module: nn.Module,
    num_optimizers: int,
    weights_only: bool | None = None,
    optimizer_keys: Sequence[str] | None = None,
) -> list[nn.Parameter]:
    """The parameters of ``module`` that require gradients but have no optimizer state in the checkpoint.

    Empty when the checkpoint holds no optimizer state at all (then nothing is loaded strictly).

    Args:
        path: A distributed checkpoint (a folder) or a full checkpoint (a file).
        module: The wrapped model (``strategy.model``).
        num_optimizers: How many optimizers the checkpoint holds.
        weights_only: Passed to ``torch.load`` for a full checkpoint.
        optimizer_keys: The keys of the optimizers' states in a Fabric checkpoint; ``None`` for a Trainer one.
    """
    saved = params_with_saved_state(path, module, num_optimizers, weights_only, optimizer_keys)
    if not saved:
        return []
    params = zip(checkpoint_names(module), module.parameters(), strict=True)
    return [p for name, p in params if p.requires_grad and name not in saved]


def partial_path(target: str | Path) -> Path:
    """Where a checkpoint for ``target`` is written before it is complete: a hidden sibling.

    Its name neither ends in ``.ckpt`` nor starts with ``last``, so Lightning never takes it for a
    checkpoint (``ckpt_path="last"`` looks for ``last*.ckpt``).

    Examples:
        >>> partial_path("checkpoints/last.ckpt").as_posix()
        'checkpoints/.last.ckpt.incomplete'
    """
    target = Path(target)
    return target.with_name(f".{target.name}.incomplete")


def remove_path(path: Path) -> None:
    """Remove a file or a folder (and what it holds); nothing when it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        renameat2 = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100  # AT_FDCWD
    result = renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(result == 0)


def move_into_place(partial: Path, target: Path) -> None:
    """Replace ``target`` (a file, a folder, or nothing) by the complete checkpoint ``partial``.

    A file over a file, or anything where nothing was, is one atomic rename. A folder over an existing
    checkpoint is swapped with it in one step where the system can (Linux ``renameat2``); elsewhere the
    old one is first renamed aside, so that for the moment between the two renames no checkpoint is at
    ``target``, but never an incomplete one. The old checkpoint is removed last.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "new").mkdir(); _ = (folder / "new" / "meta.pt").write_text("new")
        >>> (folder / "last.ckpt").mkdir(); _ = (folder / "last.ckpt" / "meta.pt").write_text("old")
        >>> move_into_place(folder / "new", folder / "last.ckpt")
        >>> (folder / "last.ckpt" / "meta.pt").read_text(), sorted(p.name for p in folder.iterdir())
        ('new', ['last.ckpt'])
    """
    if not target.exists() and not target.is_symlink():
        os.replace(partial, target)
        return
    if partial.is_file() and target.is_file():
        os.replace(partial, target)
        return
    if _exchange(partial, target):  # now the old checkpoint is at `partial`
        remove_path(partial)
        return
    old = target.with_name(f".{target.name}.old")
    remove_path(old)
    os.replace(target, old)
    os.replace(partial, target)
    remove_path(old)
