"""The WeightNormMonitor callback: per-layer weight norms logged during training, and their figures.

What it measures, every ``logging_interval`` optimizer steps and once when training starts:

* ``weight_norm/<layer>``: the norm of the layer's weights;
* ``weight_change/<layer>`` (``track_change=True``): the norm of the difference between the layer's
  weights now and when training started;
* ``grad_norm/<layer>`` (``track_grad=True``): the norm of the layer's gradients, read in
  ``on_before_optimizer_step`` (after gradient accumulation and mixed-precision unscaling) of the
  optimizer step that reaches the logged step. A layer without gradients, e.g. a block LISA froze,
  reports 0. There is no gradient when training starts, so the first row has no ``grad_norm`` keys.

``<layer>`` is the module name relative to the ``LightningModule``, e.g. ``model.model.layers.3``. The
layers are those of :func:`~lightning_lisa.norms.monitored_layers`: input embeddings, blocks, final
norm, output head. All values use the same ``norm`` (``"l2"`` by default); the keys do not change
with it.

The monitor only reads weights, with or without :class:`~lightning_lisa.LISA` in the Trainer. Under
DDP, FSDP and model parallelism it is exact and gathers no weights: see :mod:`lightning_lisa.norms`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import unique_parameters
from lightning_lisa.monitoring.plots import plot_heatmap, plot_layer_means, read_image
from lightning_lisa.norms import (
    NORM_TYPES,
    Kind,
    NormAccumulator,
    NormRecord,
    NormType,
    PlainTensors,
    accumulator_dtype,
    local_part,
    monitored_layers,
    partial_norm,
    partial_norms,
)
from lightning_lisa.strategies import adapter_for, unsupported_reason

#: Metric-key prefix of each kind of value; a key is ``f"{prefix}/{layer name}"``.
KEY_PREFIXES: dict[Kind, str] = {"weight": "weight_norm", "change": "weight_change", "grad": "grad_norm"}

#: The figures :meth:`WeightNormMonitor.save_plots` writes, by file name.
HEATMAP_FILE = "weight_norms_heatmap.png"
MEANS_FILE = "weight_norms_mean.png"
CHANGE_HEATMAP_FILE = "weight_change_heatmap.png"
GRAD_HEATMAP_FILE = "grad_norms_heatmap.png"


class WeightNormMonitor(Callback):
    """Log per-layer weight norms (and optionally their change and gradient norms) to every logger.

    Every ``logging_interval`` optimizer steps, and when training starts, the monitor measures each
    monitored layer and calls ``logger.log_metrics(metrics, step=trainer.global_step)`` on every
    logger of the Trainer, with the keys ``weight_norm/<layer>``, ``weight_change/<layer>`` and
    ``grad_norm/<layer>`` described in :mod:`lightning_lisa.monitoring.monitor`. When several optimizer steps
    pass in one batch (manual optimization), a row is logged at the first step at or past each
    multiple of ``logging_interval``. At the end of fit, rank zero saves the figures (see
    :meth:`save_plots`) and logs them as images to loggers that take images.

    Args:
        logging_interval: Optimizer steps between two measurements, at least 1.
        norm: ``"l2"`` (default), ``"l1"`` or ``"linf"`` (largest absolute value).
        track_change: Also log the norm of each layer's change since training started. This keeps
            a copy of the weights (of this rank's shards) in CPU memory. After a resume, the change
            is measured from the weights at the resume.
        track_grad: Also log each layer's gradient norm (0 for layers without gradients).
        layers: Dotted path(s) of the block lists, passed to :func:`~lightning_lisa.find_layers`;
            ``None`` detects them.
        plot: Save and log the figures at the end of fit. Needs matplotlib
            (``pip install "lightning-lisa[plot]"``); without it the monitor warns once and goes on.

    Attributes:
        history: One :class:`~lightning_lisa.norms.NormRecord` per logged step, in order. It is part
            of the checkpoint, so it survives a resume.
        layer_names: The monitored layers, in model order (set when fit starts).

    Raises:
        LISAConfigError: For an argument of the wrong type or value; at ``setup``, for
            DeepSpeed ZeRO-3 (whose parameters are empty placeholders outside forward) and for
            ``track_grad=True`` under DeepSpeed (gradients live in DeepSpeed's buffers, not in ``.grad``).

    Examples:
        >>> import lightning.pytorch as pl
        >>> monitor = WeightNormMonitor(logging_interval=5, track_change=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)
        >>> monitor.state_key
        'WeightNormMonitor'
    """

    def __init__(
        self,
        logging_interval: int = 10,
        norm: NormType = "l2",
        track_change: bool = False,
        track_grad: bool = False,
        layers: str | Sequence[str] | None = None,
        plot: bool = True,
    ) -> None:
        if not isinstance(logging_interval, int) or isinstance(logging_interval, bool) or logging_interval < 1:
            raise LISAConfigError(
                f"`logging_interval={logging_interval!r}` is not allowed; `logging_interval` must be an integer >= 1."
            )
        if norm not in NORM_TYPES:
            raise LISAConfigError(f"`norm={norm!r}` is not allowed; `norm` must be one of {list(NORM_TYPES)}.")
        for name, value in (("track_change", track_change), ("track_grad", track_grad), ("plot", plot)):
            if not isinstance(value, bool):
                raise LISAConfigError(f"`{name}={value!r}` is not allowed; `{name}` must be True or False.")
        _check_layers(layers)
        self.logging_interval = logging_interval
        self.norm = norm
        self.track_change = track_change
        self.track_grad = track_grad
        self.layers = layers if layers is None or isinstance(layers, str) else list(layers)
        self.plot = plot

        self.history: list[NormRecord] = []
        self.layer_names: list[str] = []
        self._modules: list[torch.nn.Module] = []
        self._params: list[list[torch.nn.Parameter]] = []
        self._references: dict[int, torch.Tensor] = {}  # id(parameter) -> its counted part at the start
        self._grad_partials: torch.Tensor | None = None
        self._accumulator: NormAccumulator | None = None
        self._device = torch.device("cpu")
        self._plain: PlainTensors = "replicated"
        self._bucket = -1  # global_step // logging_interval of the last logged row
        self._restored: dict[str, Any] | None = None
        self._warned_matplotlib = False

    @property
    def state_key(self) -> str:
        """One monitor per Trainer: its checkpoint key is the class name."""
        return "WeightNormMonitor"

    # ------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the strategy and find the layers, before anything trains."""
        if stage != "fit":
            return
        self._plain = _check_strategy(trainer.strategy, self.track_grad)
        self._modules = []  # a later fit may bring another model
        if not is_overridden("configure_model", pl_module):
            self._select(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the layers of models built in ``configure_model``, which runs after ``setup``."""
        if not self._modules:
            self._select(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect the parameters, keep the starting weights if needed and log the first row."""
        if not self._modules:
            self._select(pl_module)
        self._params = [unique_parameters([m]) for m in self._modules]
        self._device = trainer.strategy.root_device
        self._accumulator = NormAccumulator(
            len(self._modules) * self._kinds_count(), self.norm, dtype=accumulator_dtype(self._device)
        ).to(self._device)
        self._restore_history()
        if self.track_change:
            self._references = {  # tied weights (embedding and head) are copied once
                id(p): part.detach().to("cpu", copy=True)
                for group in self._params
                for p in group
                if (part := local_part(p, self._plain)) is not None
            }
        self._grad_partials = None
        step = trainer.global_step
        self._bucket = step // self.logging_interval
        if step % self.logging_interval == 0 and not any(row.step == step for row in self.history):
            self._record(trainer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Measure the gradients of the optimizer step that reaches the next logged step."""
        if self.track_grad and (trainer.global_step + 1) // self.logging_interval > self._bucket:
            grads = [[p.grad for p in group if p.grad is not None] for group in self._params]
            self._grad_partials = partial_norms(grads, self.norm, self._plain, self._device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log a row when the optimizer step reached a new multiple of ``logging_interval``."""
        if trainer.global_step // self.logging_interval > self._bucket:
            self._bucket = trainer.global_step // self.logging_interval
            self._record(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On rank zero: save the figures next to the first logger's files and log them as images."""
        if not self.plot or not trainer.is_global_zero or not self.history:
            return
        paths = self.save_plots(_plot_directory(trainer))
        _log_images(trainer, paths)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Free the copy of the starting weights."""
        self._references = {}
        self._grad_partials = None

    def state_dict(self) -> dict[str, Any]:
        """The history and the monitored layers."""
        return {
            "logging_interval": self.logging_interval,
            "norm": self.norm,
            "layer_names": list(self.layer_names),
            "history": [asdict(row) for row in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history; ``on_train_start`` continues it."""
        if state_dict.get("norm") != self.norm:
            rank_zero_warn(
                f"WeightNormMonitor resumes with `norm={self.norm!r}`, but the checkpoint was written with "
                f"`norm={state_dict.get('norm')!r}`: the history mixes two norms."
            )
        self._restored = dict(state_dict)
        self.history = [NormRecord(**row) for row in state_dict.get("history", [])]

    # ---------------------------------------------------------------------------------- figures

    def save_plots(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the figures of :attr:`history` into ``directory``.

        Files: ``weight_norms_heatmap.png`` (layers by steps), ``weight_norms_mean.png`` (mean per
        layer), and with tracking on, ``weight_change_heatmap.png`` and ``grad_norms_heatmap.png``.
        Without matplotlib, warns once with the install command and writes nothing.

        Args:
            directory: Where to write; created if missing.

        Returns:
            The paths written (empty when there is no history or no matplotlib).
        """
        if not self.history:
            return []
        target = Path(directory)
        label = self.norm.upper() if self.norm != "linf" else "L-inf"
        figures: list[tuple[str, Kind, bool]] = [(HEATMAP_FILE, "weight", True), (MEANS_FILE, "weight", False)]
        if self.track_change:
            figures.append((CHANGE_HEATMAP_FILE, "change", True))
        if self.track_grad and any(row.grad for row in self.history):
            figures.append((GRAD_HEATMAP_FILE, "grad", True))
        written: list[Path] = []
        try:
            for file, kind, heatmap in figures:
                name = {"weight": "weight norm", "change": "weight change", "grad": "gradient norm"}[kind]
                if heatmap:
                    title = f"Per-layer {name} ({label})"
                    written.append(plot_heatmap(self.history, self.layer_names, target / file, kind, title=title))
                else:
                    title = f"Mean {name} ({label}) per layer over {len(self.history)} logged steps"
                    written.append(plot_layer_means(self.history, self.layer_names, target / file, kind, title=title))
        except ModuleNotFoundError as err:
            if not self._warned_matplotlib:
                self._warned_matplotlib = True
                rank_zero_warn(f"WeightNormMonitor: no figures written. {err}")
        return written

    # ---------------------------------------------------------------------------------- helpers

    def _select(self, pl_module: pl.LightningModule) -> None:
        named = monitored_layers(pl_module, self.layers)
        self.layer_names = [name for name, _ in named]
        self._modules = [module for _, module in named]

    def _kinds_count(self) -> int:
        return 1 + int(self.track_change) + int(self.track_grad)

    def _restore_history(self) -> None:
        restored, self._restored = self._restored, None
        if restored is None:  # a fresh run: forget the rows of an earlier fit
            self.history = []
        elif restored.get("layer_names") != self.layer_names:
            rank_zero_warn(
                "WeightNormMonitor resumes with other layers than the checkpoint's history: "
                f"{len(self.layer_names)} now, {len(restored.get('layer_names', []))} before."
            )

    @torch.no_grad()
    def _record(self, trainer: pl.Trainer) -> None:
        """Measure every layer, all-reduce once, append a row and log it."""
        assert self._accumulator is not None, "WeightNormMonitor.on_train_start did not run"
        count = len(self._modules)
        parts = [partial_norms(self._params, self.norm, self._plain, self._device)]
        if self.track_change:
            diffs = [partial_norm(self._differences(group), self.norm, self._device) for group in self._params]
            parts.append(torch.stack(diffs))
        has_grad = self._grad_partials is not None
        if self.track_grad:
            grads = self._grad_partials
            parts.append(grads if grads is not None else torch.zeros(count, device=self._device))
        self._grad_partials = None

        dtype = accumulator_dtype(self._device)
        self._accumulator.update(torch.cat([p.to(self._device, dtype) for p in parts]))
        values = self._accumulator.compute().reshape(-1).tolist()
        self._accumulator.reset()

        kinds: list[Kind] = ["weight"]
        if self.track_change:
            kinds.append("change")
        if self.track_grad:
            kinds.append("grad")
        columns = {
            kind: dict(zip(self.layer_names, values[i * count : (i + 1) * count], strict=True))
            for i, kind in enumerate(kinds)
        }
        row = NormRecord(
            step=trainer.global_step,
            weight=columns["weight"],
            change=columns.get("change", {}),
            grad=columns.get("grad", {}) if has_grad else {},
        )
        self.history.append(row)
        metrics = {
            f"{KEY_PREFIXES[kind]}/{name}": value for kind in KEY_PREFIXES for name, value in row.values(kind).items()
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _differences(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """This rank's counted parts of ``params`` minus their values at the start."""
        diffs = []
        for param in params:
            reference = self._references.get(id(param))
            part = local_part(param, self._plain)
            if part is not None and reference is not None:
                diffs.append(part.detach() - reference.to(part.device, non_blocking=True))
        return diffs


def _check_layers(layers: object) -> None:
    if layers is None or isinstance(layers, str):
        return
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(v, str) for v in layers):
        raise LISAConfigError(
            f"`layers={layers!r}` is not allowed; `layers` must be a dotted path, a non-empty list of dotted paths "
            "(e.g. 'model.model.layers'), or None to detect the blocks."
        )


def _check_strategy(strategy: Strategy, track_grad: bool) -> PlainTensors:
    """How plain parameters are laid out under ``strategy``; refuse what the monitor cannot read."""
    if unsupported_reason(strategy) is not None:  # DeepSpeed: LISA refuses it, the monitor reads ZeRO-1/2
        if getattr(strategy, "zero_stage_3", False):
            raise LISAConfigError(
                "WeightNormMonitor does not support DeepSpeed ZeRO stage 3: its parameters are empty placeholders "
                "outside forward. Supported: a single device, DDP, FSDP, model parallelism, DeepSpeed ZeRO-1/2."
            )
        if track_grad:
            raise LISAConfigError(
                "`track_grad=True` is not allowed under DeepSpeed: gradients live in DeepSpeed's buffers, not in "
                "`.grad`. Use `track_grad=False`."
            )
    return adapter_for(strategy).plain_tensors


def _plot_directory(trainer: pl.Trainer) -> Path:
    """The first logger's ``log_dir`` (else its ``save_dir``), or the Trainer's ``default_root_dir``."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


def _log_images(trainer: pl.Trainer, paths: list[Path]) -> None:
    """Log the figures to loggers that take images: ``log_image`` (W&B) or ``experiment.add_image`` (TensorBoard)."""
    for logger in trainer.loggers:
        log_image = getattr(logger, "log_image", None)
        if callable(log_image):
            for path in paths:
                log_image(key=path.stem, images=[str(path)], step=trainer.global_step)
            continue
        add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
        if callable(add_image):
            for path in paths:
                add_image(path.stem, read_image(path), global_step=trainer.global_step, dataformats="HWC")
