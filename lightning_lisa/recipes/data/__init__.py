"""The recipe's data: records from files or the Hub, a tokenization cache, packing, and a resumable loader.

:class:`TextDataModule` is the data module of ``lightning-lisa fit``; the submodules are its parts:
:mod:`~lightning_lisa.recipes.data.sources` (reading), :mod:`~lightning_lisa.recipes.data.records`
(record formats and tokenization), :mod:`~lightning_lisa.recipes.data.cache` (the cache, packing) and
:mod:`~lightning_lisa.recipes.data.loading` (collation and the step-aware sampler).
"""

from lightning_lisa.recipes.data.cache import PACKING_MODES, PackingMode
from lightning_lisa.recipes.data.loading import STEP_TARGETS, Batch, Collator, StepSampler, best_fit_decreasing
from lightning_lisa.recipes.data.module import PadCollator, SequenceDataset, TextDataModule, format_data_summary
from lightning_lisa.recipes.data.records import IGNORE_INDEX, RecordFormat, TrainOn, chat_tokens
from lightning_lisa.recipes.data.sources import DataSource

__all__ = [
    "IGNORE_INDEX",
    "PACKING_MODES",
    "STEP_TARGETS",
    "Batch",
    "Collator",
    "DataSource",
    "PackingMode",
    "PadCollator",
    "RecordFormat",
    "SequenceDataset",
    "StepSampler",
    "TextDataModule",
    "TrainOn",
    "best_fit_decreasing",
    "chat_tokens",
    "format_data_summary",
]
