"""The tokenization cache: records tokenized once, truncated or dropped, split, packed, saved as Arrow.

:func:`build_cache` reads the sources, tokenizes them with ``datasets.map`` (``num_proc`` processes and
a progress bar), applies the length policy, splits off the validation rows, packs, and saves
``train/`` and ``val/`` with ``save_to_disk`` plus a ``summary.json``, into a folder named by
:func:`cache_key`. The key covers the data's content, the tokenizer's content (vocabulary, merges,
special tokens, chat template; not its path), the prompt templates and every setting that changes the
rows, so an edited file or template is tokenized again and an unchanged one is not.
:func:`load_cache` memory-maps the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lightning_lisa.recipes.corpus import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from lightning_lisa.recipes.data.loading import best_fit_decreasing
from lightning_lisa.recipes.data.records import (
    HERE,
    IGNORE_INDEX,
    RECORD_FORMATS,
    located,
    record_format,
    to_example,
    tokenize_examples,
)
from lightning_lisa.recipes.data.sources import Part

if TYPE_CHECKING:
    import datasets

#: How examples become rows: ``none`` (one example per row, padded), ``stream`` (every example, ending with
#: EOS, concatenated into one stream cut into rows of ``max_length``: for raw text; examples attend to
#: each other), ``isolated`` (whole examples packed into rows by best-fit decreasing, ``position_ids``
#: restarting at each, so no token attends to another example).
PackingMode = Literal["none", "stream", "isolated"]
PACKING_MODES: tuple[str, ...] = get_args(PackingMode)

#: What happens to an example longer than ``max_length`` (``none`` and ``isolated`` packing).
Overlong = Literal["truncate", "drop"]
OVERLONG: tuple[str, ...] = get_args(Overlong)

#: Changes whenever the rows this code writes change.
CACHE_VERSION = "rows-v1"

# the status of a tokenized record
KEPT, TRUNCATED, DROPPED_LONG, DROPPED_NO_TARGET = 0, 1, 2, 3


@dataclass(frozen=True)
class RowSettings:
    """Everything besides the data and the tokenizer that changes the cached rows."""

    max_length: int
    packing: str
    train_on: str
    overlong: str
    val_fraction: float
    seed: int
    max_examples: int | None
    separate_val: bool


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what a tokenizer does: vocabulary, merges, normalization, special tokens, chat template.

    The path it was loaded from is not part of it: the same files elsewhere give the same digest.
    """
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True, default=str).encode())
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return digest.hexdigest()


def cache_key(data_digests: list[str], tokenizer: PreTrainedTokenizerBase, settings: RowSettings) -> str:
    """The cache folder's name: a digest of the data, the tokenizer, the templates and the settings."""
    payload = {
        "version": CACHE_VERSION,
        "data": data_digests,
        "tokenizer": tokenizer_digest(tokenizer),
        "templates": [ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT],
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class TokenizeRecords:
    """The ``datasets.map`` function of one part: records to ``input_ids``, ``labels`` and their status.

    Picklable, so ``map(num_proc=...)`` can send it to worker processes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, part: Part, record_type: str, settings: RowSettings) -> None:
        self.tokenizer = tokenizer
        self.label = part.label
        self.json_lines = part.json_lines
        self.record_type = record_type
        self.settings = settings

    def where(self, index: int) -> str:
        """The record's place, for errors (``file:line`` for JSON Lines)."""
        return Part(self.label, None, self.json_lines).where(index)

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        """Tokenize a batch of records."""
        rows = [{key: batch[key][j] for key in batch} for j in range(len(indices))]
        kinds: list[int] = []
        pairs: list[tuple[list[int], list[int]] | None] = []
        text_rows, examples = [], []
        for j, row in enumerate(rows):
            with located(lambda: self.where(indices[j])):  # noqa: B023 (called before `j` moves on)
                kind = record_format(row, self.record_type, HERE)
                kinds.append(RECORD_FORMATS.index(kind))
                if kind == "tokens":
                    pairs.append(_tokens(row, HERE))
                else:
                    pairs.append(None)
                    text_rows.append(j)
                    examples.append(to_example(row, kind, HERE))
        tokenized = tokenize_examples(
            self.tokenizer, examples, self.settings.train_on, lambda k: self.where(indices[text_rows[k]])
        )
        for j, pair in zip(text_rows, tokenized, strict=True):
            pairs[j] = pair
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "n_targets": [], "status": [], "kind": kinds}
        stream = self.settings.packing == "stream"
        limit = self.settings.max_length
        for filled in pairs:
            assert filled is not None
            ids, labels = filled
            status = KEPT
            if not stream and len(ids) > limit:
                if self.settings.overlong == "drop":
                    status, ids, labels = DROPPED_LONG, [], []
                else:
                    status, ids, labels = TRUNCATED, ids[:limit], labels[:limit]
            targets = _targets(labels)
            if not stream and status != DROPPED_LONG and targets == 0:
                status, ids, labels = DROPPED_NO_TARGET, [], []
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["n_targets"].append(targets)
            out["status"].append(status)
        return out


def _tokens(row: dict[str, Any], where: str) -> tuple[list[int], list[int]]:
    ids = row["input_ids"]
    labels = row.get("labels")
    checked = []
    for name, value in (("input_ids", ids), ("labels", ids if labels is None else labels)):
        array = np.asarray(value)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise ValueError(f"{where}: field {name!r} must be a list of integers, got {value!r:.60}.")
        checked.append(array.astype(np.int64).tolist())
    if len(checked[1]) != len(checked[0]):
        raise ValueError(f"{where}: 'labels' has {len(checked[1])} tokens but 'input_ids' has {len(checked[0])}.")
    return checked[0], checked[1]


def _targets(labels: list[int]) -> int:
    """Labels other than ``-100`` after the first position (the first token is never predicted)."""
    if len(labels) > 256:
        return int((np.asarray(labels[1:]) != IGNORE_INDEX).sum())
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def _plain_tokens(table: datasets.Dataset, record_type: str) -> bool:
    """Whether a part is pre-tokenized ids only (an integer-list ``input_ids`` column, no ``labels``)."""
    import datasets

    feature = table.features.get("input_ids")
    inner = getattr(feature, "feature", None)
    return (
        record_type in ("auto", "tokens")
        and "labels" not in table.column_names
        and isinstance(feature, datasets.List | datasets.Sequence)
        and isinstance(inner, datasets.Value)
        and inner.dtype.startswith(("int", "uint"))
    )


def _token_rows(table: datasets.Dataset, settings: RowSettings, label: str) -> datasets.Dataset:
    """Rows of a pre-tokenized part, computed on Arrow batches (no Python list per token): labels are the ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    limit, stream, drop = settings.max_length, settings.packing == "stream", settings.overlong == "drop"

    def rows(batch: pa.Table) -> pa.Table:
        ids = batch.column("input_ids").combine_chunks().cast(pa.list_(pa.int32()))
        if ids.null_count:
            raise ValueError(f"{label}: a record has no 'input_ids' (null); every record needs its token ids.")
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        status = np.full(len(lengths), KEPT, dtype=np.int8)
        if not stream:
            long = lengths > limit
            status[long] = DROPPED_LONG if drop else TRUNCATED
            ids = pc.list_slice(ids, 0, limit)
            kept_lengths = np.minimum(lengths, limit)
            if drop:
                ids = pc.if_else(pa.array(long), pa.scalar([], pa.list_(pa.int32())), ids)
                kept_lengths[long] = 0
            status[(kept_lengths < 2) & (status != DROPPED_LONG)] = DROPPED_NO_TARGET
            lengths = kept_lengths
        targets = np.maximum(lengths - 1, 0)
        kinds = np.full(len(lengths), RECORD_FORMATS.index("tokens"), dtype=np.int8)
        return pa.table(
            {
                "input_ids": ids,
                "labels": ids,
                "n_targets": pa.array(targets),
                "status": pa.array(status),
                "kind": pa.array(kinds),
            }
        )

    return (
        table.with_format("arrow")
        .map(
            rows,
            batched=True,
            batch_size=2000,
            remove_columns=table.column_names,
            desc=f"Rows of {Path(label).name}",
            load_from_cache_file=False,
            new_fingerprint=hashlib.sha256(f"tokens:{label}:{limit}".encode()).hexdigest()[:16],
            features=row_features(),
        )
        .with_format(None)
    )


def row_features() -> datasets.Features:
    """The columns of a tokenized row, as the cache stores them."""
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "n_targets": datasets.Value("int64"),
            "status": datasets.Value("int8"),
            "kind": datasets.Value("int8"),
        }
    )


def tokenize_parts(
    parts: list[tuple[Part, str, dict[str, str] | None]],
    tokenizer: PreTrainedTokenizerBase,
    settings: RowSettings,
    num_proc: int,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Tokenize every part (in order) and keep the rows the length policy keeps; with counts."""
    import datasets

    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the Rust thread pool must not be running across a fork
    tokenized = []
    for part, record_type, columns in parts:
        table = part.dataset
        if columns:
            missing = [c for c in columns.values() if c not in table.column_names]
            if missing:
                raise ValueError(
                    f"{part.label}: `columns={columns!r}` names the columns {missing}, which the data does not "
                    f"have; it has {table.column_names}."
                )
            table = table.rename_columns({data: ours for ours, data in columns.items() if data != ours})
        if _plain_tokens(table, record_type):
            tokenized.append(_token_rows(table, settings, part.label))
            continue
        function = TokenizeRecords(tokenizer, part, record_type, settings)
        tokenized.append(
            table.map(
                function,
                batched=True,
                batch_size=500,
                with_indices=True,
                remove_columns=table.column_names,
                num_proc=num_proc if num_proc > 1 and len(table) >= 2 * num_proc else None,
                desc=f"Tokenizing {Path(part.label).name}",
                load_from_cache_file=False,
                new_fingerprint=hashlib.sha256(f"{part.label}{id(function)}".encode()).hexdigest()[:16],
                features=row_features(),
            )
        )
    table = datasets.concatenate_datasets(tokenized) if len(tokenized) > 1 else tokenized[0]
    status = np.asarray(table["status"])
    kinds = np.asarray(table["kind"])
    counts: dict[str, Any] = {
        "records": len(table),
        "formats": {RECORD_FORMATS[k]: int((kinds == k).sum()) for k in np.unique(kinds)},
        "truncated": int((status == TRUNCATED).sum()),
        "dropped_too_long": int((status == DROPPED_LONG).sum()),
        "dropped_without_targets": int((status == DROPPED_NO_TARGET).sum()),
    }
    kept = np.flatnonzero(status <= TRUNCATED)
    counts["examples"] = len(kept)
    if len(kept) == 0:
        sources = ", ".join(part.label for part, _, _ in parts)
        raise ValueError(
            f"{sources}: none of the {len(table)} records is left to train on: {counts['dropped_without_targets']} "
            f"have no trained token in their first `max_length={settings.max_length}` tokens (a prompt that fills "
            f"them, or an empty answer) and {counts['dropped_too_long']} are longer than that (`overlong='drop'`). "
            "Raise `max_length`, or shorten the prompts."
        )
    if len(kept) < len(table):
        table = table.select(kept)
    return table.remove_columns(["status", "kind"]), counts


def stream_rows(table: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Concatenate the examples into one stream and cut it into rows of ``max_length`` (the rest is dropped)."""

    def chunk(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids = [t for row in batch["input_ids"] for t in row]
        labels = [t for row in batch["labels"] for t in row]
        n = len(ids) // max_length * max_length
        starts = range(0, n, max_length)
        out_labels = [labels[i : i + max_length] for i in starts]
        return {
            "input_ids": [ids[i : i + max_length] for i in starts],
            "labels": out_labels,
            "n_targets": [sum(1 for t in row[1:] if t != IGNORE_INDEX) for row in out_labels],
        }

    # one stream over the whole corpus for corpora of up to 100k examples (then per block of 100k)
    return table.map(chunk, batched=True, batch_size=100_000, desc="Cutting the stream into rows")


def pack_rows(table: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Pack whole examples into rows of at most ``max_length`` tokens (best-fit decreasing).

    Each row lists its examples' lengths (``seq_lengths``); the first label of every example is ``-100``,
    so that no example is trained to predict the start of the next one.
    """
    import datasets

    lengths = row_lengths(table).tolist()
    bins = best_fit_decreasing(lengths, max_length)

    def pack(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        members = batch["members"]
        flat = [i for row in members for i in row]
        rows = table[flat]
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "seq_lengths": [], "n_targets": []}
        at = 0
        for row in members:
            ids: list[int] = []
            labels: list[int] = []
            seq_lengths = []
            targets = 0
            for k in range(at, at + len(row)):
                example_ids, example_labels = rows["input_ids"][k], list(rows["labels"][k])
                example_labels[0] = IGNORE_INDEX
                ids.extend(example_ids)
                labels.extend(example_labels)
                seq_lengths.append(len(example_ids))
                targets += int(rows["n_targets"][k])
            at += len(row)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["seq_lengths"].append(seq_lengths)
            out["n_targets"].append(targets)
        return out

    bins_table = datasets.Dataset.from_dict({"members": bins})
    return bins_table.map(pack, batched=True, batch_size=1000, remove_columns=["members"], desc="Packing")


def row_lengths(table: datasets.Dataset) -> np.ndarray:
    """The number of tokens of every row, read from Arrow without converting the rows to Python."""
    import pyarrow.compute as pc

    column = table.with_format("arrow")["input_ids"]
    return np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=np.int64)


def split_rows(table: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded share of the rows (at least one) for validation, the rest for training."""
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, math.floor(len(order) * fraction))
    return table.select(order[n_val:]), table.select(sorted(order[:n_val]))


def build_cache(
    folder: Path,
    train_parts: list[tuple[Part, str, dict[str, str] | None]],
    val_parts: list[tuple[Part, str, dict[str, str] | None]],
    tokenizer: PreTrainedTokenizerBase,
    settings: RowSettings,
    num_proc: int,
    source: str,
    examples: tuple[Path, Path] | None = None,
    rebuild: bool = False,
) -> dict[str, Any]:
    """Tokenize, filter, split, pack and save the rows to ``folder`` (written to a temporary folder first).

    Args:
        folder: Where the rows go.
        train_parts: The training records, with their format and column mapping.
        val_parts: The validation records (``[]``: split off ``val_fraction`` of the training rows).
        tokenizer: The tokenizer.
        settings: What shapes the rows.
        num_proc: Tokenizing processes.
        source: The data's name, for messages.
        examples: Folders for the tokenized examples of the training and the validation records, before
            splitting and packing (see :func:`examples_key`), so that another packing mode or split of the
            same examples does not tokenize again; ``None``: not kept.
        rebuild: Tokenize again even if ``examples`` holds them.

    Returns:
        The summary (also saved as ``summary.json``).

    Raises:
        ValueError: If fewer than one training and one validation row remain.
    """
    train_folder, val_folder = examples if examples is not None else (None, None)
    train, counts = _examples(train_folder, train_parts, tokenizer, settings, num_proc, rebuild)
    if settings.max_examples is not None and len(train) > settings.max_examples:
        train = train.select(range(settings.max_examples))
    summary: dict[str, Any] = {"train": counts}
    val = None
    if val_parts:
        val, summary["val"] = _examples(val_folder, val_parts, tokenizer, settings, num_proc, rebuild)
    if settings.packing == "stream":
        train = stream_rows(train, settings.max_length)
        val = stream_rows(val, settings.max_length) if val is not None else None
    if val is None:
        if len(train) < 2:
            raise ValueError(
                f"{source}: the corpus gives {len(train)} sequence(s) of `max_length={settings.max_length}` tokens; "
                "at least 2 are needed (one to train on, one to validate). Use more text or a smaller `max_length`."
            )
        train, val = split_rows(train, settings.val_fraction, settings.seed)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{source}: no {'training' if len(train) == 0 else 'validation'} rows are left.")
    if settings.packing == "isolated":
        summary["train_examples"], summary["val_examples"] = len(train), len(val)
        train, val = pack_rows(train, settings.max_length), pack_rows(val, settings.max_length)
    summary["train_rows"], summary["val_rows"] = len(train), len(val)
    summary["train_tokens"] = int(row_lengths(train).sum())
    summary["train_targets"] = int(np.asarray(train["n_targets"]).sum())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        train.save_to_disk(str(tmp / "train"))
        val.save_to_disk(str(tmp / "val"))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # a concurrent reader never sees a half-written cache
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def examples_settings(settings: RowSettings, validation: bool = False) -> RowSettings:
    """The settings that shape the tokenized examples (before splitting and packing), for their own cache key.

    Packing matters only as far as ``stream`` keeps examples whole while the other modes cut or drop them.
    """
    stream = settings.packing == "stream"
    return RowSettings(
        max_length=0 if stream else settings.max_length,
        packing="stream" if stream else "none",
        train_on=settings.train_on,
        overlong="" if stream else settings.overlong,
        val_fraction=0.0,
        seed=0,
        max_examples=None if validation else settings.max_examples,
        separate_val=validation,
    )


def _examples(
    folder: Path | None,
    parts: list[tuple[Part, str, dict[str, str] | None]],
    tokenizer: PreTrainedTokenizerBase,
    settings: RowSettings,
    num_proc: int,
    rebuild: bool,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The tokenized examples of ``parts``: from ``folder`` if it holds them, else tokenized (and saved there)."""
    import datasets

    if folder is not None and not rebuild and is_cached(folder):
        loaded = datasets.load_from_disk(str(folder / "examples"))
        return loaded, json.loads((folder / "summary.json").read_text())
    table, counts = tokenize_parts(parts, tokenizer, settings, num_proc)
    if folder is None:
        return table, counts
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        table.save_to_disk(str(tmp / "examples"))
        (tmp / "summary.json").write_text(json.dumps(counts, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    saved = datasets.load_from_disk(str(folder / "examples"))  # memory-mapped from here on
    return saved, counts


def load_cache(folder: Path) -> tuple[datasets.Dataset, datasets.Dataset, dict[str, Any]]:
    """The cached train and validation rows (memory-mapped) and the summary."""
    import datasets

    train = datasets.load_from_disk(str(folder / "train"))
    val = datasets.load_from_disk(str(folder / "val"))
    assert isinstance(train, datasets.Dataset)
    assert isinstance(val, datasets.Dataset)
    summary: dict[str, Any] = json.loads((folder / "summary.json").read_text())
    return train, val, summary


def is_cached(folder: Path) -> bool:
    """Whether ``folder`` holds a complete cache."""
    return (folder / "summary.json").is_file()
