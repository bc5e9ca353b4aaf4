"""Run by tests/test_ddp.py: LISA under DDP with 2 CPU processes (gloo); each rank writes what it saw."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import CausalLM, token_loader
from recorder import Recorder

from lightning_lisa import LISA


class AgreeingRanks(pl.Callback):
    """All-gathers the active blocks at every step: every rank must train the same ones."""

    def __init__(self, lisa: LISA) -> None:
        self.lisa = lisa
        self.gathered: list[list[list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        active = torch.tensor(self.lisa.active_layers)
        self.gathered.append(trainer.strategy.all_gather(active).tolist())


class Elements(pl.Callback):
    """Gradient elements the hook all-reduced at each optimizer step, and the trainable elements."""

    def __init__(self, lisa: LISA) -> None:
        self.lisa = lisa
        self.reduced: list[int] = []
        self.buckets: list[int] = []
        self.trainable: list[int] = []
        self._seen = (0, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stats = self.lisa.communication
        if stats is None:
            return
        self.reduced.append(stats.reduced_elements - self._seen[0])
        self.buckets.append(stats.bucket_elements - self._seen[1])
        self._seen = (stats.reduced_elements, stats.bucket_elements)
        self.trainable.append(sum(p.numel() for p in pl_module.parameters() if p.requires_grad))


def main(out: Path, strategy: str, hook: bool) -> None:
    warnings.filterwarnings("ignore")
    lisa = LISA(n_layers=2, interval=3, seed=9, ddp_comm_hook=hook, verify_ranks=True)
    elements = Elements(lisa)
    recorder = Recorder(lisa)
    agree = AgreeingRanks(lisa)
    module = CausalLM()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=9,
        callbacks=[lisa, recorder, agree, elements],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, token_loader(n_batches=40))
    rank = trainer.global_rank
    result = {
        "find_unused_parameters": trainer.strategy._ddp_kwargs.get("find_unused_parameters"),
        "history": [list(s.active_layers) for s in lisa.history],
        "gathered": agree.gathered,
        "steps": [
            {"active": list(r.active_layers), "changed": sorted(r.changed), "with_state": sorted(r.with_state)}
            for r in recorder.steps
        ],
        "weights": {n: p.detach().double().sum().item() for n, p in module.named_parameters()},
        "hook_installed": lisa.communication is not None,
        "reduced": elements.reduced,
        "buckets": elements.buckets,
        "trainable": elements.trainable,
        "total": sum(p.numel() for p in module.parameters()),
        "unchanged": sorted(n for n, p in module.named_parameters() if torch.equal(p.detach(), start[n])),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "hook")
