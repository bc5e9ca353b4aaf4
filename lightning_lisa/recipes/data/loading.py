"""From cached rows to batches: best-fit-decreasing packing, the collator, and a sampler that knows each step.

* :func:`best_fit_decreasing` packs examples into rows of at most ``max_length`` tokens.
* :class:`Collator` pads a batch; for packed rows it writes ``position_ids`` that restart at every
  example and no attention mask, so that the model keeps the examples apart.
* :class:`StepSampler` (a ``DistributedSampler``) deals the rows of each optimizer step to the ranks and
  micro-batches, and tells every micro-batch how many target tokens the whole step has, so a step's
  gradient is the mean over all of its target tokens.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from lightning_lisa.recipes.data.records import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets

Batch = dict[str, torch.Tensor]

#: The batch key holding the number of target tokens of the whole optimizer step (all micro-batches, all ranks).
STEP_TARGETS = "step_targets"


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into bins of ``capacity``: longest first, each into the fullest bin it fits (a new one if none).

    Args:
        lengths: Each item's size (at most ``capacity``).
        capacity: A bin's size.

    Returns:
        The bins, as lists of item indices (each bin's items in the order they were placed).

    Raises:
        ValueError: If an item is larger than ``capacity``.

    Examples:
        >>> best_fit_decreasing([5, 3, 4, 2, 6], capacity=8)
        [[4, 3], [0, 1], [2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin), sorted
    for item in order:
        size = lengths[item]
        if size > capacity:
            raise ValueError(f"item {item} has {size} tokens, more than a row's {capacity}.")
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([item])
            space, index = capacity - size, len(bins) - 1
        else:
            space, index = free.pop(at)
            bins[index].append(item)
            space -= size
        if space > 0:
            bisect.insort(free, (space, index))
    return bins


def position_ids(seq_lengths: Sequence[int], length: int) -> torch.Tensor:
    """Positions that restart at 0 at every example of a packed row; the padding after them counts as one more.

    Examples:
        >>> position_ids([3, 2], 7).tolist()
        [0, 1, 2, 0, 1, 0, 1]
    """
    pieces = [torch.arange(n) for n in seq_lengths]
    rest = length - sum(seq_lengths)
    if rest > 0:
        pieces.append(torch.arange(rest))
    return torch.cat(pieces)


class RowDataset(Dataset[Batch]):
    """Token rows of a cached (memory-mapped) ``datasets.Dataset``, as tensors.

    Item ``i`` is ``{"input_ids", "labels"}`` (and ``"seq_lengths"`` for packed rows). Indexed by a pair
    ``(i, step_targets)``, as :class:`StepSampler` yields, the item also holds ``step_targets``.
    """

    def __init__(self, table: datasets.Dataset) -> None:
        self.table = table.with_format("numpy")
        self.arrow = table.with_format("arrow")
        self.packed = "seq_lengths" in table.column_names

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: int | tuple[int, int]) -> Batch:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[Batch]:
        """The items of ``keys`` read in one slice of the Arrow table (the loader asks for a batch at once)."""
        pairs = [key if isinstance(key, tuple) else (key, None) for key in keys]
        indices = [int(index) for index, _ in pairs]
        for index in indices:
            if not 0 <= index < len(self.table):
                raise IndexError(f"row {index} of {len(self.table)}")
        rows = self.arrow[indices]
        columns = ["input_ids", "labels", *(["seq_lengths"] if self.packed else [])]
        split = {name: _rows(rows.column(name)) for name in columns}
        items = []
        for position, (_, targets) in enumerate(pairs):
            item = {name: torch.from_numpy(split[name][position].astype(np.int64)) for name in columns}
            if targets is not None:
                item[STEP_TARGETS] = torch.tensor(int(targets))
            items.append(item)
        return items

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))

    def targets(self) -> np.ndarray:
        """The number of target tokens of every row (labels other than ``-100``, after the first position)."""
        return np.asarray(self.table["n_targets"], dtype=np.int64)


def _rows(column: object) -> list[np.ndarray]:
    """The lists of an Arrow list column, as numpy views of its values."""
    array = column.combine_chunks()  # type: ignore[attr-defined]
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]


class Collator:
    """Pads rows to the longest; packed rows get ``position_ids`` per example and no attention mask.

    Args:
        pad_id: The padding token.

    Examples:
        >>> rows = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]),
        ...          "seq_lengths": torch.tensor([2, 1])},
        ...         {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "seq_lengths": torch.tensor([1])}]
        >>> batch = Collator(pad_id=0)(rows)
        >>> sorted(batch), batch["position_ids"].tolist()
        (['input_ids', 'labels', 'position_ids'], [[0, 1, 0], [0, 0, 1]])
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[Batch]) -> Batch:
        """Stack ``rows`` into one padded batch."""
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        packed = "seq_lengths" in rows[0]
        extra = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[index, :n] = row["input_ids"]
            labels[index, :n] = row["labels"]
            if packed:
                extra[index] = position_ids(row["seq_lengths"].tolist(), length)
            else:
                extra[index, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "position_ids" if packed else "attention_mask": extra}
        if STEP_TARGETS in rows[0]:
            batch[STEP_TARGETS] = rows[0][STEP_TARGETS].clone()
        return batch


class StepSampler(DistributedSampler[tuple[int, int]]):
    """A seeded order of rows, dealt to ranks and micro-batches step by step, with each step's target count.

    Every epoch has its own order (``seed + epoch``), the same on every rank. It is padded by repeating
    its start to a multiple of ``num_replicas * batch_size`` rows, so every rank gets the same number of
    full micro-batches (as ``DistributedSampler`` pads). An optimizer step takes
    ``batch_size * accumulate * num_replicas`` consecutive rows: micro-batch ``m`` of rank ``r`` is the
    ``(m * num_replicas + r)``-th slice of ``batch_size`` rows. Each index comes with the number of target
    tokens of its whole step, which :class:`~lightning_lisa.recipes.module.CausalLMModule` divides by.

    The order depends only on the seed and the epoch, so a loader restored mid-epoch (``StatefulDataLoader``
    skips the batches it already gave) continues with the same batches.

    Args:
        targets: Target tokens of every row.
        batch_size: Rows per micro-batch.
        accumulate: Micro-batches per optimizer step.
        num_replicas: Ranks.
        rank: This rank.
        shuffle: A new random order every epoch; ``False``: the rows in order.
        seed: The seed of the orders.

    Examples:
        >>> sampler = StepSampler(np.array([1, 2, 3, 4, 5]), batch_size=2, accumulate=1, num_replicas=1, rank=0,
        ...                       shuffle=False)
        >>> list(sampler)
        [(0, 3), (1, 3), (2, 7), (3, 7), (4, 6), (0, 6)]
    """

    def __init__(
        self,
        targets: np.ndarray,
        batch_size: int,
        accumulate: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(_Sized(len(targets)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.row_targets = np.asarray(targets, dtype=np.int64)
        self.batch_size = batch_size
        self.accumulate = accumulate
        group = num_replicas * batch_size
        self.padded = math.ceil(len(targets) / group) * group
        self.num_samples = self.padded // num_replicas
        self.total_size = self.padded

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.row_targets)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()
        else:
            order = np.arange(n)
        if self.padded > n:
            order = np.concatenate([order, np.resize(order, self.padded - n)])
        step = self.batch_size * self.accumulate * self.num_replicas
        for start in range(0, self.padded, step):
            rows = order[start : start + step]
            total = int(self.row_targets[rows].sum())
            for micro in range(len(rows) // (self.batch_size * self.num_replicas)):
                at = (micro * self.num_replicas + self.rank) * self.batch_size
                for index in rows[at : at + self.batch_size]:
                    yield int(index), total

    def micro_batches(self) -> int:
        """Micro-batches per epoch on each rank."""
        return self.num_samples // self.batch_size


class _Sized(Dataset[int]):
    """A stand-in data set of ``n`` items (``DistributedSampler`` only asks for its length)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index
