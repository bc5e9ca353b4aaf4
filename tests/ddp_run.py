"""Run by tests/test_ddp.py: LISA under DDP with 2 CPU processes (gloo); each rank writes what it saw.

Usage: ``python ddp_run.py OUT STRATEGY hook|no-hook`` (writes ``OUT/rank<r>.json``) or
``python ddp_run.py OUT resume MODE`` (writes ``OUT/resume-<MODE>-rank<r>.json``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_lisa import LISA
from lightning_lisa.testing import CausalLM, Recorder, end_process_group, token_loader


class AgreeingRanks(pl.Callback):
    """All-gathers the active blocks at every step: every rank must train the same ones."""

    def __init__(self, lisa: LISA) -> None:
        self.lisa = lisa
        self.gathered: list[list[list[int]]] = []
        self.find_unused_parameters: bool | None = None

    def on_train_start(self, trainer, pl_module):
        self.find_unused_parameters = trainer.strategy.model.find_unused_parameters  # the wrapped DDP model

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
        "find_unused_parameters": agree.find_unused_parameters,
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


def resume(out: Path, mode: str) -> None:
    """Uninterrupted 4 epochs vs 2 epochs + save + resume to 4 epochs; the save falls mid-period (step 6 of 4..7)."""
    options: dict[str, Any] = {"n_layers": 2, "interval": 4, "seed": 11, "optimizer_state": mode, "verify_ranks": True}
    data = {"n_batches": 6}  # 12 sequences, 2 per batch: 3 batches per rank and epoch

    def fit(epochs: int, ckpt: Path | None = None, save: Path | None = None) -> dict[str, Any]:
        lisa = LISA(**options)
        agree = AgreeingRanks(lisa)
        module = CausalLM()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp_find_unused_parameters_true",
            max_epochs=epochs,
            callbacks=[lisa, agree],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, token_loader(**data), ckpt_path=str(ckpt) if ckpt else None)
        if save is not None:
            trainer.save_checkpoint(save)
        params = dict(module.named_parameters())
        return {
            "history": [[s.step, *s.active_layers] for s in lisa.history],
            "gathered": agree.gathered,
            "global_step": trainer.global_step,
            "weights": {n: p.detach().clone() for n, p in params.items()},
            "state_names": sorted(n for n, p in params.items() if trainer.optimizers[0].state.get(p)),
        }

    ckpt = out / f"stop-{mode}.ckpt"
    reference = fit(4)
    first = fit(2, save=ckpt)
    resumed = fit(4, ckpt=ckpt)

    def compare(run: dict[str, Any]) -> dict[str, Any]:
        weights = run["weights"]
        return {
            "history": run["history"],
            "gathered": run["gathered"],
            "global_step": run["global_step"],
            "state_names": run["state_names"],
            "digest": {n: hashlib.sha256(w.numpy().tobytes()).hexdigest() for n, w in weights.items()},
            "identical": all(torch.equal(weights[n], w) for n, w in reference["weights"].items()),
            "max_abs_diff": {n: (weights[n] - w).abs().max().item() for n, w in reference["weights"].items()},
        }

    result = {"reference": compare(reference), "first": compare(first), "resumed": compare(resumed)}
    rank = torch.distributed.get_rank()
    (out / f"resume-{mode}-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[2] == "resume":
        warnings.filterwarnings("ignore")
        resume(Path(sys.argv[1]), sys.argv[3])
    else:
        main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "hook")
    end_process_group()  # not left to interpreter finalization, where gloo may abort the process
