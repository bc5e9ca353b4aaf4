"""Command-line overrides that shrink any lightning-lisa config to a few seconds on CPU, and a runner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lightning_lisa.recipes.cli import cli_main

VOCAB = 300

TINY_MODEL = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}


def tiny(tmp_path: Path, cache_dir: Path, steps: int = 4) -> list[str]:
    """Overrides for a tiny model, a slice of the embedded corpus and a few CPU steps, written under tmp_path."""
    return [
        f"--model.config={json.dumps(TINY_MODEL)}",
        "--model.learning_rate=0.01",
        f"--data.vocab_size={VOCAB}",
        f"--data.cache_dir={cache_dir}",
        "--data.max_examples=4",
        "--data.max_length=32",
        "--data.batch_size=4",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.limit_predict_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads: tiny models are fastest on one, and a busy machine cannot stall them."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], periods: int, threads: int = 1) -> str:
    """Run ``lightning-lisa`` with ``args``; check that it printed the validation loss before and after fit
    and ``periods`` LISA periods; return what it printed."""
    with torch_threads(threads):
        cli_main(args)
    out: str = capsys.readouterr().out
    assert "validation loss:" in out and " before -> " in out
    assert out.count("  period ") == periods
    return out
