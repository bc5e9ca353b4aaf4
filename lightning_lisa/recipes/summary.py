"""What a fit did, in a few lines: validation loss, LISA's blocks per period, optimizer-state bytes.

:class:`~lightning_lisa.recipes.cli.LisaCLI` prints :func:`format_summary` after ``fit``. The optimizer-state
bytes of LISA are the peak over all optimizer steps (:class:`OptimizerStateTracker`); those of full
fine-tuning are either measured for real (one optimizer step of every parameter on a copy of the
model, :func:`measure_full_finetuning_state`) or estimated from the parameter count.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lisa.callback import LISA
from lightning_lisa.estimate import optimizer_state_nbytes
from lightning_lisa.optimizer_state import optimizer_state_bytes


@dataclass
class SummaryOptions:
    """What the CLI reports after ``fit``.

    Attributes:
        enabled: Print the summary.
        validate_before: Run validation before training, to report the loss before and after.
        measure_full_finetuning: Measure full fine-tuning's optimizer state with one real step on a
            copy of the model (needs memory for a second model, its gradients and its optimizer
            state: for small models). Otherwise it is estimated from the parameter count.
    """

    enabled: bool = True
    validate_before: bool = False
    measure_full_finetuning: bool = False


@dataclass
class FitReport:
    """The numbers of a summary.

    Attributes:
        val_loss_before: Validation loss before training, if measured.
        val_loss_after: Validation loss after training, if measured.
        peak_state_bytes: Largest optimizer-state bytes seen after an optimizer step.
        full_state_bytes: Optimizer-state bytes of full fine-tuning.
        full_state_measured: Whether ``full_state_bytes`` was measured (else estimated).
        paths: Where things were written, by description (e.g. ``"checkpoint"``).
    """

    val_loss_before: float | None = None
    val_loss_after: float | None = None
    peak_state_bytes: int = 0
    full_state_bytes: int = 0
    full_state_measured: bool = False
    paths: dict[str, str] = field(default_factory=dict)


class OptimizerStateTracker(Callback):
    """Records the largest optimizer-state bytes after any optimizer step of a fit.

    Attributes:
        peak: The largest value seen, in bytes.
    """

    def __init__(self) -> None:
        self.peak = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Read the optimizer state after the batch (and its optimizer step, if any)."""
        self.peak = max(self.peak, optimizer_state_bytes(trainer.optimizers))


def measure_full_finetuning_state(
    model: torch.nn.Module,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    batch: dict[str, torch.Tensor],
) -> int:
    """Optimizer-state bytes of full fine-tuning: one step of every parameter, on a copy of ``model``.

    Args:
        model: A Hugging Face model that returns a loss for ``model(**batch)``; it is not changed.
        make_optimizer: Builds the run's optimizer over a model's parameters (e.g.
            :meth:`~lightning_lisa.recipes.module.CausalLMModule.make_optimizer`).
        batch: One training batch.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2))
        >>> ids = torch.randint(0, 32, (1, 4))
        >>> state = measure_full_finetuning_state(model, lambda m: torch.optim.AdamW(m.parameters()), {"input_ids": ids,
        ...     "labels": ids})
        >>> state == estimate_full_finetuning_state(model)
        True
    """
    copied = copy.deepcopy(model).requires_grad_(True).train()
    device = next(copied.parameters()).device
    optimizer = make_optimizer(copied)
    copied(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
    optimizer.step()
    measured = optimizer_state_bytes([optimizer])
    del optimizer, copied
    return measured


def estimate_full_finetuning_state(model: torch.nn.Module, optimizer: str = "adamw") -> int:
    """Optimizer-state bytes of full fine-tuning, from the parameters (tied weights once).

    The count of the memory estimate, :func:`lightning_lisa.estimate.optimizer_state_nbytes`:
    ``"adamw"`` keeps two moments in each parameter's dtype and a 4-byte step per tensor;
    ``"adamw8bit"`` one byte per moment for tensors of at least 4096 elements (plus a 4-byte scale per
    256 elements and the quantization maps), float32 moments for smaller ones.

    Examples:
        >>> estimate_full_finetuning_state(torch.nn.Linear(100, 100, bias=False))
        80004
        >>> estimate_full_finetuning_state(torch.nn.Linear(100, 100, bias=False), "adamw8bit")
        22368
    """
    params = list(dict.fromkeys(model.parameters()))
    return optimizer_state_nbytes(((p.numel(), p.element_size()) for p in params), optimizer)


def validation_loss(results: Sequence[Mapping[str, float]]) -> float | None:
    """The ``val_loss`` of ``trainer.validate``'s results, if any.

    Examples:
        >>> validation_loss([{"val_loss": 2.5, "val_ppl": 12.2}])
        2.5
    """
    for result in results:
        if "val_loss" in result:
            return float(result["val_loss"])
    return None


def find_callback(trainer: pl.Trainer, name: str) -> Callback | None:
    """The first callback of ``trainer`` whose class (or a base class) is called ``name``."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if any(cls.__name__ == name for cls in type(callback).__mro__):
            return callback  # type: ignore[no-any-return]
    return None


def output_paths(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
    """Checkpoint, Hugging Face directory, log directory and weight-norm figures of a finished fit."""
    paths: dict[str, str] = {}
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None:
        paths["checkpoint"] = "none (checkpointing is off)"
    else:
        saved = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
        paths["checkpoint"] = saved or "none saved (no checkpoint was due)"
    hf_dir = pl_module.hparams.get("save_hf_dir") if hasattr(pl_module, "hparams") else None
    if hf_dir:
        paths["Hugging Face model"] = str(Path(hf_dir).expanduser())
    if trainer.loggers:
        logger = trainer.loggers[0]
        paths["metrics"] = str(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or "-")
    plots = _weight_norm_plots(trainer)
    if plots:
        paths["weight-norm plots"] = ", ".join(plots)
    return paths


def _weight_norm_plots(trainer: pl.Trainer) -> list[str]:
    if find_callback(trainer, "WeightNormMonitor") is None:
        return []
    try:
        from lightning_lisa.monitoring import monitor
    except ImportError:
        return []
    names = [
        getattr(monitor, n, None) for n in ("HEATMAP_FILE", "MEANS_FILE", "CHANGE_HEATMAP_FILE", "GRAD_HEATMAP_FILE")
    ]
    directory = Path(trainer.default_root_dir)
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = Path(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or directory)
    return [str(directory / n) for n in names if isinstance(n, str) and (directory / n).is_file()]


def mib(n: int) -> str:
    """Bytes as MiB.

    Examples:
        >>> mib(3 * 2**20)
        '3.00 MiB'
    """
    return f"{n / 2**20:.2f} MiB"


def format_summary(
    report: FitReport, pl_module: pl.LightningModule, lisa: LISA | None, steps: int, title: str = "lightning-lisa"
) -> str:
    """The summary printed after fit.

    Args:
        report: The numbers.
        pl_module: The trained module (its parameters are counted).
        lisa: The LISA callback of the run, or ``None`` for full fine-tuning.
        steps: Optimizer steps taken.
        title: The heading.
    """
    model = getattr(pl_module, "model", pl_module)
    total = sum(p.numel() for p in model.parameters())
    lines = [f"\n=== {title}: what the fit did ===", f"model: {type(model).__name__}, {total / 1e6:.2f}M parameters"]
    if lisa is not None:
        blocks = lisa.layer_info.num_blocks if lisa.layer_info is not None else "?"
        lines.append(
            f"LISA: n_layers={lisa.n_layers} of {blocks} blocks, interval={lisa.interval}, sampling={lisa.sampling}, "
            f"optimizer_state={lisa.optimizer_state}; {steps} optimizer steps"
        )
    else:
        lines.append(f"no LISA: full fine-tuning; {steps} optimizer steps")
    lines.append(f"validation loss: {_loss(report.val_loss_before)} before -> {_loss(report.val_loss_after)} after")
    if lisa is not None:
        lines.append("blocks trained per period:")
        names = getattr(lisa, "unit_names", [])
        by_name = getattr(lisa, "granularity", "block") != "block" and names
        for switch in lisa.history:
            active = [names[i] for i in switch.active_layers] if by_name else list(switch.active_layers)
            lines.append(
                f"  period {switch.period:2d} (from step {switch.step:4d}): blocks {active}, "
                f"{switch.trainable_params / 1e6:.2f}M trainable, optimizer state {mib(switch.optimizer_state_bytes)}"
            )
    how = "measured" if report.full_state_measured else "estimated"
    lines.append(f"optimizer state, this run (peak over all steps): {mib(report.peak_state_bytes)}")
    lines.append(f"optimizer state, full fine-tuning ({how}): {mib(report.full_state_bytes)}")
    if report.full_state_bytes:
        lines.append(f"ratio: {report.peak_state_bytes / report.full_state_bytes:.2f}x full fine-tuning")
    lines.extend(f"{name}: {path}" for name, path in report.paths.items())
    return "\n".join(lines)


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
