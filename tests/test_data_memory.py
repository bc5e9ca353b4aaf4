"""Training on a memory-mapped cache: anonymous memory does not grow with the size of the data (about 200 MB)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from lightning_lisa.recipes.data import TextDataModule
from lightning_lisa.recipes.module import CausalLMModule
from lightning_lisa.testing import tiny_llama
from lightning_lisa.testing.trainer import quiet_trainer

ROWS, LENGTH = 48_000, 1024  # int32 tokens: 48,000 x 1,024 x 4 bytes = 197 MB


def anonymous_rss() -> int:
    """This process's anonymous resident memory in bytes (``RssAnon`` of /proc/self/status).

    Freed memory that Python's and Arrow's allocators still hold is handed back first: Arrow's pool
    returns it on a timer, which a loaded machine delays (rows held by the data would not be released).
    """
    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def write_tokens(path: Path) -> int:
    """A pre-tokenized Arrow file (``input_ids`` lists of int32), written in slices; its size in bytes."""
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32()))])
    rng = np.random.default_rng(0)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for _ in range(ROWS // 2000):
            values = pa.array(rng.integers(0, 32, 2000 * LENGTH, dtype=np.int32))
            offsets = pa.array(np.arange(0, 2000 * LENGTH + 1, LENGTH, dtype=np.int32))
            writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(offsets, values)], schema=schema))
    return path.stat().st_size


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_training_on_a_large_arrow_file_keeps_anonymous_memory_flat(tmp_path: Path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    size = write_tokens(tmp_path / "tokens.arrow")
    assert size > 190e6
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(32)}, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1")
    cache = str(tmp_path / "cache")
    dm = TextDataModule(
        path=str(tmp_path / "tokens.arrow"), tokenizer=tokenizer, packing="none", max_length=LENGTH, batch_size=512,
        val_fraction=0.001, cache_dir=cache,
    )  # fmt: skip
    dm.prepare_data()
    gc.collect()
    before = anonymous_rss()
    dm.setup("fit")
    module = CausalLMModule.from_model(tiny_llama(num_layers=1, vocab_size=32), learning_rate=1e-3)
    dm.batch_size = 2
    quiet_trainer([], max_steps=3, limit_val_batches=0).fit(module, datamodule=dm)
    dm.batch_size = 512
    rows = 0
    for batch in dm.train_dataloader():  # read a quarter of the rows (50 MB), in the training order
        rows += batch["input_ids"].shape[0]
        if rows >= ROWS // 4:
            break
    gc.collect()
    grown = anonymous_rss() - before
    # rows held in memory would add the whole file (setup) or at least what was read (50 MB)
    assert grown < size / 8, f"anonymous memory grew by {grown / 2**20:.0f} MiB reading a {size / 2**20:.0f} MiB cache"
