"""Draw the documentation's figures from real runs: ``python docs/make_figures.py``.

* ``images/schedule.png``: which layers trained at which step in a LISA run of a tiny Llama
  (8 blocks, n_layers=2, interval=10, 60 steps), read from ``LISA.history``.
* ``images/weight_norms_heatmap.png``, ``images/weight_change_heatmap.png`` and
  ``images/weight_norms_mean.png``: a ``WeightNormMonitor`` over 240 steps of a LISA run
  (n_layers=2, interval=20) of the demo's model (a byte-level Llama with 8 blocks, 1.25M parameters)
  on the English text that ships with Python.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from pydoc_data.topics import topics

import matplotlib.pyplot as plt
import torch
from torch.utils.data import DataLoader

from lightning_lisa import LISA, WeightNormMonitor
from lightning_lisa.testing import CausalLM, quiet_trainer, tiny_llama

HERE = Path(__file__).resolve().parent


def LM(vocab_size: int = 128, hidden_size: int = 32, lr: float = 1e-3) -> CausalLM:  # noqa: N802 - reads as a class
    """A Llama with 8 blocks and random weights, trained with AdamW."""
    model = tiny_llama(
        8, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    return CausalLM(model, lr=lr)


def schedule(path: Path, steps: int = 60) -> None:
    lisa = LISA(n_layers=2, interval=10, seed=0)
    torch.manual_seed(0)
    data = DataLoader(list(torch.randint(0, 128, (steps, 16))), batch_size=1)
    trainer = quiet_trainer([lisa], max_steps=steps)
    trainer.fit(LM(), data)
    rows = ["head (lm_head)"] + [f"block {i}" for i in reversed(range(8))] + ["embeddings"]
    grid = torch.zeros(len(rows), steps)
    grid[0] = grid[-1] = 1
    for k, switch in enumerate(lisa.history):
        end = lisa.history[k + 1].step if k + 1 < len(lisa.history) else steps
        for block in switch.active_layers:
            grid[1 + (7 - block), switch.step : end] = 1
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("optimizer step")
    for switch in lisa.history:
        ax.axvline(switch.step - 0.5, color="grey", lw=0.6)
    ax.set_title("LISA(n_layers=2, interval=10): trained layers (dark) per step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def norms(directory: Path, steps: int = 240) -> None:
    torch.manual_seed(0)
    text = torch.frombuffer(bytearray("\n".join(topics.values()).encode()), dtype=torch.uint8).long()
    chunks = text[: len(text) // 64 * 64].view(-1, 64)
    data = DataLoader(list(chunks), batch_size=16, shuffle=True)
    monitor = WeightNormMonitor(logging_interval=5, track_change=True, plot=False)
    trainer = quiet_trainer([LISA(n_layers=2, interval=20), monitor], max_steps=steps)
    trainer.fit(LM(vocab_size=256, hidden_size=128, lr=3e-3), data)
    monitor.save_plots(directory)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    schedule(HERE / "images" / "schedule.png")
    norms(HERE / "images")
