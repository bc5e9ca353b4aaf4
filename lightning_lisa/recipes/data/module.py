"""A ``LightningDataModule`` of tokenized records for causal language modelling.

:class:`TextDataModule` reads one or several sources through Hugging Face ``datasets`` (see
:mod:`~lightning_lisa.recipes.data.sources`), tokenizes them once in ``prepare_data`` into a cache keyed
by the data's and the tokenizer's content (:mod:`~lightning_lisa.recipes.data.cache`), memory-maps the
cache in ``setup``, and serves the rows through a ``torchdata`` ``StatefulDataLoader``, whose position
Lightning saves in checkpoints: a run resumed mid-epoch sees the same batches as one never stopped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_lisa.errors import LISAConfigError, check_bool, check_choice, check_int
from lightning_lisa.recipes.corpus import CorpusFormat
from lightning_lisa.recipes.data.cache import (
    OVERLONG,
    PACKING_MODES,
    Overlong,
    PackingMode,
    RowSettings,
    build_cache,
    cache_key,
    examples_settings,
    is_cached,
    load_cache,
)
from lightning_lisa.recipes.data.loading import Batch, Collator, RowDataset, StepSampler
from lightning_lisa.recipes.data.records import (
    HERE,
    IGNORE_INDEX,
    TRAIN_ON,
    TrainOn,
    located,
    record_format,
    to_example,
)
from lightning_lisa.recipes.data.sources import (
    EXTENSIONS,
    DataSource,
    Part,
    embedded_digest,
    embedded_source,
    hf_cache,
    read_source,
    source_digest,
)
from lightning_lisa.recipes.tokenizer import default_cache_dir, default_tokenizer, load_tokenizer

if TYPE_CHECKING:
    pass

_Parts = list[tuple[Part, str, dict[str, str] | None]]


class SequenceDataset(Dataset[Batch]):
    """Token sequences with their labels (``-100`` where no loss is taken), held in memory.

    Examples:
        >>> ds = SequenceDataset([[1, 2, 3]], [[-100, 2, 3]])
        >>> len(ds), ds[0]["labels"].tolist()
        (1, [-100, 2, 3])
    """

    def __init__(self, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> None:
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in input_ids]
        self.labels = [torch.tensor(lab, dtype=torch.long) for lab in labels]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> Batch:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


class PadCollator(Collator):
    """Pads a list of examples to the longest one, with an attention mask and ``-100`` labels.

    Examples:
        >>> batch = PadCollator(pad_id=0)([{"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([5, 6])},
        ...                                {"input_ids": torch.tensor([7]), "labels": torch.tensor([7])}])
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
        ([[5, 6], [7, 0]], [[1, 1], [1, 0]], [[5, 6], [7, -100]])
    """


class TextDataModule(pl.LightningDataModule):
    """Tokenized records for causal LM fine-tuning, from local files, folders or the Hugging Face Hub.

    Args:
        path: One source: a file (``.jsonl``/``.json``, ``.parquet``, ``.csv``, ``.arrow``, or plain text with
            paragraphs separated by blank lines), a folder of such files or of ``save_to_disk``, or a Hub
            name. Records are ``{"text"}``, Alpaca ``{"instruction", "input", "output"}``, ``{"prompt",
            "completion"}``, chat ``{"messages": [{"role", "content"}, ...]}`` (rendered with the tokenizer's
            chat template), ShareGPT ``{"conversations": [{"from", "value"}, ...]}`` or pre-tokenized
            ``{"input_ids"}``. ``None`` (and no ``sources``): the English help text that ships with Python
            (``pydoc_data.topics``), so nothing is downloaded.
        format: How ``path`` is read: ``"jsonl"`` (JSON records), ``"text"`` (paragraphs), or ``"auto"``
            (by extension; unknown extensions are read as text).
        sources: Instead of ``path``, several sources mixed into one training set (each a
            :class:`~lightning_lisa.recipes.data.sources.DataSource`: ``path``, ``type``, ``split``,
            ``data_files``, ``name``, ``columns``, ``reader``, ``max_examples``).
        val_sources: Sources of the validation rows; ``None``: ``val_fraction`` of the training rows.
        tokenizer: A Hugging Face tokenizer, a path/name for ``AutoTokenizer.from_pretrained``, or a GGUF
            file (``*.gguf``: the tokenizer stored in it).
            ``None``: a byte-level BPE of ``vocab_size`` tokens trained on the corpus and cached.
        vocab_size: Vocabulary of the default tokenizer (the model's ``vocab_size`` must be at least this).
        cache_dir: Where the default tokenizer and the tokenized rows are cached; ``None``:
            ``$LIGHTNING_LISA_CACHE`` or ``~/.cache/lightning_lisa``.
        max_length: Tokens per row.
        packing: ``"stream"``: every example (ending with EOS) concatenated into one stream cut into rows
            of exactly ``max_length`` tokens; for raw text, since the examples of a row attend to each
            other. ``"isolated"``: whole examples packed into rows of up to ``max_length`` tokens (best-fit
            decreasing), with ``position_ids`` restarting at each example and no attention mask, so no
            token attends to another example (the model's attention must support it; checked at the first
            batch). ``"none"``: one example per row, padded. ``True``/``False`` are deprecated spellings of
            ``"stream"``/``"none"``.
        train_on: Where the loss is taken: ``"answers"`` (Alpaca outputs, completions, every assistant turn;
            plain text entirely), ``"all"`` (every token) or ``"last_answer"`` (a conversation's final
            assistant turn only).
        mask_prompt: Deprecated: ``True`` is ``train_on="answers"``, ``False`` is ``train_on="all"``.
        overlong: An example longer than ``max_length`` (with ``packing`` ``"none"`` or ``"isolated"``) is
            cut to ``max_length`` (``"truncate"``) or left out (``"drop"``); either way counted in the
            summary. An example left without a target token is left out and counted.
        val_fraction: Share of the rows held out for validation when there are no ``val_sources`` (at
            least one row; of the examples before packing with ``"isolated"``).
        max_examples: Use only the first this many records of the training data (``None``: all).
        batch_size: Rows per batch.
        num_workers: Data-loader worker processes.
        num_proc: Processes that tokenize (``datasets.map``); ``TOKENIZERS_PARALLELISM`` is set to
            ``false`` before they start.
        rebuild_cache: Tokenize again even if the cache holds these rows (in ``prepare_data``).
        seed: Seed of the train/validation split and of the order of the training rows (each epoch
            its own order).

    Attributes:
        tokenizer: The tokenizer, after :meth:`setup`.
        summary: What the cache holds and what was truncated or left out, after :meth:`setup`.

    Examples:
        >>> dm = TextDataModule(max_examples=20, vocab_size=512, max_length=64, cache_dir=getfixture("tmp_path"))
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["input_ids"].shape
        torch.Size([8, 64])
    """

    def __init__(
        self,
        path: str | None = None,
        format: CorpusFormat = "auto",
        sources: list[DataSource] | None = None,
        val_sources: list[DataSource] | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        vocab_size: int = 4096,
        cache_dir: str | None = None,
        max_length: int = 128,
        packing: PackingMode | bool = "stream",
        train_on: TrainOn = "answers",
        mask_prompt: bool | None = None,
        overlong: Overlong = "truncate",
        val_fraction: float = 0.05,
        max_examples: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        num_proc: int = 1,
        rebuild_cache: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_positive("max_length", max_length, minimum=2)
        _check_positive("batch_size", batch_size)
        _check_positive("vocab_size", vocab_size)
        if max_examples is not None:
            _check_positive("max_examples", max_examples)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction={val_fraction!r}` is not allowed; it must be between 0 and 1 (exclusive).")
        check_int("num_workers", num_workers, 0)
        check_int("num_proc", num_proc, 1)
        check_bool("rebuild_cache", rebuild_cache)
        if isinstance(packing, bool):
            new = "stream" if packing else "none"
            warnings.warn(
                f"`packing={packing}` is deprecated: write `packing={new!r}`. (`True` concatenates examples into "
                "one stream, where they attend to each other; `packing='isolated'` packs whole examples and keeps "
                "them apart.)",
                DeprecationWarning,
                stacklevel=2,
            )
            packing = new  # type: ignore[assignment]
        check_choice("packing", packing, PACKING_MODES)
        check_choice("train_on", train_on, TRAIN_ON)
        check_choice("overlong", overlong, OVERLONG)
        if mask_prompt is not None:
            check_bool("mask_prompt", mask_prompt)
            replacement = "answers" if mask_prompt else "all"
            warnings.warn(
                f"`mask_prompt={mask_prompt}` is deprecated: write `train_on={replacement!r}`.",
                DeprecationWarning,
                stacklevel=2,
            )
            if train_on != "answers" and train_on != replacement:
                raise LISAConfigError(
                    f"`mask_prompt={mask_prompt}` and `train_on={train_on!r}` disagree; give `train_on` only."
                )
            train_on = replacement  # type: ignore[assignment]
        if path is not None and sources:
            raise LISAConfigError(
                f"Give `path` or `sources`, not both; got path={path!r} and {len(sources)} source(s)."
            )
        self.path = path
        self.format = format
        self.sources = list(sources or [])
        self.val_sources = list(val_sources or [])
        self.tokenizer_spec = tokenizer
        self.vocab_size = vocab_size
        self.cache_dir = cache_dir
        self.max_length = max_length
        self.packing: PackingMode = packing  # type: ignore[assignment]
        self.train_on: TrainOn = train_on
        self.overlong: Overlong = overlong
        self.val_fraction = val_fraction
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.rebuild_cache = rebuild_cache
        self.seed = seed
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: RowDataset | None = None
        self.val_set: RowDataset | None = None
        self.summary: dict[str, Any] = {}
        self.cache_path: Path | None = None
        self._built: Path | None = None

    # ---------------------------------------------------------------------------------- hooks

    def prepare_data(self) -> None:
        """Tokenize the data once per node into the cache (unless it holds these rows already)."""
        tokenizer = self._load_tokenizer()
        folder = self._cache_folder(tokenizer)
        if self.rebuild_cache or not is_cached(folder):
            self._build(folder, tokenizer)
        else:
            rank_zero_info(f"Tokenized data: using the cache {folder}")

    def setup(self, stage: str) -> None:
        """Memory-map the cached rows (tokenizing first if ``prepare_data`` did not run)."""
        if self.train_set is not None:
            return
        tokenizer = self._load_tokenizer()
        folder = self._cache_folder(tokenizer)
        own_process = self.trainer is None  # without a Trainer nobody calls prepare_data
        if not is_cached(folder) or (own_process and self.rebuild_cache and self._built != folder):
            self._build(folder, tokenizer)
        train, val, summary = load_cache(folder)
        self.train_set, self.val_set = RowDataset(train), RowDataset(val)
        self.summary, self.cache_path, self.tokenizer = summary, folder, tokenizer
        counts = summary["train"]
        if self.packing == "stream" and set(counts.get("formats", {})) - {"text", "tokens"}:
            rank_zero_warn(
                f"{self._source()}: `packing='stream'` concatenates the examples, so the tokens of one attend to the "
                "others (prompts and conversations too); use `packing='isolated'` to pack them apart, or "
                "`packing='none'`."
            )
        rank_zero_info(format_data_summary(summary, self.packing, self.max_length))

    def train_dataloader(self) -> DataLoader[Batch]:
        """The training rows in a seeded order per epoch, as a ``StatefulDataLoader`` (resumable mid-epoch)."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        train = self._splits()[0]
        trainer = self.trainer
        sampler = StepSampler(
            train.targets(),
            batch_size=self.batch_size,
            accumulate=int(trainer.accumulate_grad_batches) if trainer is not None else 1,
            num_replicas=int(trainer.world_size) if trainer is not None else 1,
            rank=int(trainer.global_rank) if trainer is not None else 0,
            shuffle=True,
            seed=self.seed,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 on torch >= 2.9
            loader: DataLoader[Batch] = StatefulDataLoader(
                train,
                batch_size=self.batch_size,
                sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=self._collator(),
                persistent_workers=self.num_workers > 0,
            )
        return loader

    def val_dataloader(self) -> DataLoader[Batch]:
        """The held-out rows."""
        return DataLoader(
            self._splits()[1],
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self._collator(),
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader[Batch]:
        """The held-out rows (there is no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[Batch]:
        """The held-out rows, to score them."""
        return self.val_dataloader()

    def optimizer_steps_per_epoch(self, world_size: int = 1, accumulate: int = 1) -> int:
        """Optimizer steps of one epoch over the training rows (for the learning-rate schedule's length)."""
        rows = len(self._splits()[0])
        batches = math.ceil(rows / (self.batch_size * world_size))
        return math.ceil(batches / accumulate)

    # ------------------------------------------------------------------------------- helpers

    def _collator(self) -> Collator:
        assert self.tokenizer is not None
        pad = self.tokenizer.pad_token_id
        return Collator(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def _source(self) -> str:
        if self.sources:
            return ", ".join(s.path for s in self.sources)
        return "the embedded corpus (pydoc_data.topics)" if self.path is None else str(self.path)

    def _train_sources(self) -> list[DataSource]:
        if self.sources:
            return self.sources
        if self.path is None:
            return []
        reader = {"jsonl": "json", "text": "text"}.get(self.format, "auto")
        if reader == "auto" and Path(self.path).suffix.lower() not in EXTENSIONS and Path(self.path).is_file():
            reader = "text"  # `format="auto"`: files other than the known kinds are plain text
        return [DataSource(self.path, reader=reader)]  # type: ignore[arg-type]

    def _cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()

    def _settings(self) -> RowSettings:
        return RowSettings(
            max_length=self.max_length,
            packing=self.packing,
            train_on=self.train_on,
            overlong=self.overlong,
            val_fraction=self.val_fraction,
            seed=self.seed,
            max_examples=self.max_examples,
            separate_val=bool(self.val_sources),
        )

    def _digests(self) -> tuple[list[str], list[str]]:
        """Content digests of the training and the validation sources."""
        hf = hf_cache(self._cache_root())
        sources = self._train_sources()
        train = [source_digest(s, hf) for s in sources] if sources else [embedded_digest()]
        return train, [source_digest(s, hf) for s in self.val_sources]

    def _cache_folder(self, tokenizer: PreTrainedTokenizerBase) -> Path:
        train, val = self._digests()
        return self._cache_root() / "tokenized" / cache_key([*train, "val", *val], tokenizer, self._settings())

    def _examples_folders(self, tokenizer: PreTrainedTokenizerBase) -> tuple[Path, Path]:
        """Where the tokenized examples (before splitting and packing) of the training and validation data go."""
        train, val = self._digests()
        root = self._cache_root() / "examples"
        settings = self._settings()
        return (
            root / cache_key(train, tokenizer, examples_settings(settings)),
            root / cache_key(val, tokenizer, examples_settings(settings, validation=True)),
        )

    def _parts(self, sources: list[DataSource]) -> _Parts:
        hf = hf_cache(self._cache_root())
        parts: _Parts = []
        for source in sources:
            read = read_source(source, hf)
            if source.max_examples is not None:
                read = _first(read, source.max_examples)
            parts.extend((part, source.type, source.columns) for part in read)
        return parts

    def _train_parts(self) -> _Parts:
        sources = self._train_sources()
        parts: _Parts = self._parts(sources) if sources else [(p, "text", None) for p in embedded_source()]
        if self.max_examples is not None:
            kept = _first([p for p, _, _ in parts], self.max_examples)
            parts = [(p, t, c) for p, (_, t, c) in zip(kept, parts, strict=False)]
        return parts

    def _build(self, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        rank_zero_info(f"Tokenized data: building the cache {folder}")
        build_cache(
            folder,
            self._train_parts(),
            self._parts(self.val_sources),
            tokenizer,
            self._settings(),
            self.num_proc,
            self._source(),
            examples=self._examples_folders(tokenizer),
            rebuild=self.rebuild_cache,
        )
        self._built = folder

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_spec is not None:
            self.tokenizer = load_tokenizer(self.tokenizer_spec)
            return self.tokenizer
        texts = []
        for part, record_type, columns in self._train_parts():
            table = part.dataset
            if columns:
                table = table.rename_columns({data: ours for ours, data in columns.items() if data != ours})
            for index, row in enumerate(table):
                assert isinstance(row, dict)
                if row.get("input_ids") is not None:
                    raise LISAConfigError(
                        f"{part.where(index)}: pre-tokenized records need the tokenizer they were made with; set "
                        "`tokenizer`."
                    )
                with located(lambda: part.where(index)):  # noqa: B023 (called before `index` moves on)
                    example = to_example(row, record_format(row, record_type, HERE), HERE)
                texts.append(example.prompt + example.text)
        self.tokenizer = default_tokenizer(texts, self.vocab_size, self.cache_dir)
        return self.tokenizer

    def _splits(self) -> tuple[RowDataset, RowDataset]:
        if self.train_set is None or self.val_set is None:
            self.setup("fit")
        assert self.train_set is not None
        assert self.val_set is not None
        return self.train_set, self.val_set


def format_data_summary(summary: dict[str, Any], packing: str, max_length: int) -> str:
    """The data summary, one line: records read, truncated and left out, rows and tokens.

    Examples:
        >>> text = format_data_summary({"train": {"records": 10, "examples": 9, "truncated": 1, "dropped_too_long": 0,
        ...     "dropped_without_targets": 1}, "train_rows": 4, "val_rows": 1, "train_tokens": 300,
        ...     "train_targets": 200}, "isolated", 128)
        >>> text.split("; ")[0]
        'Data: 10 records, 1 truncated to 128 tokens, 0 dropped as too long, 1 without a target token left out'
        >>> text.split("; ")[1]
        "4 training rows (isolated packing, 300 tokens, 200 targets, 59% of the rows' capacity), 1 validation rows"
    """
    counts = summary["train"]
    fill = summary["train_tokens"] / max(1, summary["train_rows"] * max_length)
    return (
        f"Data: {counts['records']} records, {counts['truncated']} truncated to {max_length} tokens, "
        f"{counts['dropped_too_long']} dropped as too long, {counts['dropped_without_targets']} without a target "
        f"token left out; {summary['train_rows']} training rows ({packing} packing, {summary['train_tokens']} tokens, "
        f"{summary['train_targets']} targets, {fill:.0%} of the rows' capacity), {summary['val_rows']} validation rows"
    )


def _first(parts: list[Part], n: int) -> list[Part]:
    """The first ``n`` records of a list of parts."""
    out = []
    for part in parts:
        if n <= 0:
            break
        take = min(n, len(part.dataset))
        out.append(Part(part.label, part.dataset.select(range(take)), part.json_lines))
        n -= take
    return out


def _check_positive(name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}={value!r}` is not allowed; it must be an integer >= {minimum}.")


__all__ = ["IGNORE_INDEX", "Batch", "PadCollator", "SequenceDataset", "TextDataModule"]
