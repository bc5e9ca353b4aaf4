"""Figures of a per-layer norm history: a layers-by-steps heatmap and a bar chart of per-layer means.

matplotlib is optional (``pip install "lightning-lisa[plot]"``). It is imported inside the functions,
and figures are drawn with the Agg canvas directly, so the global pyplot backend of the caller
(e.g. a notebook's) is left alone. Without matplotlib the functions raise ``ModuleNotFoundError``
with the install command.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_lisa.norms import Kind, NormRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The command that installs the optional plotting dependency.
PLOT_INSTALL = 'pip install "lightning-lisa[plot]"'

_LABELS: dict[str, str] = {"weight": "weight norm", "change": "weight change", "grad": "gradient norm"}


def plot_heatmap(
    history: Sequence[NormRecord],
    layer_names: Sequence[str],
    path: str | os.PathLike[str],
    kind: Kind = "weight",
    log_scale: bool = False,
    title: str | None = None,
) -> Path:
    """Draw a heatmap of per-layer values over the logged steps and save it as a PNG.

    Layers run down the y axis in model order, logged steps along the x axis; the colour is the
    value. Layers without a value at a step (e.g. gradients at the first row) are left blank.

    Args:
        history: The logged rows, e.g. ``WeightNormMonitor.history``.
        layer_names: The layers to draw, top to bottom, e.g. ``WeightNormMonitor.layer_names``.
        path: Where the PNG is written; missing parent folders are created.
        kind: Which values: ``"weight"``, ``"change"`` or ``"grad"``.
        log_scale: Use a logarithmic colour scale (values <= 0 are left blank).
        title: The figure title; by default one naming ``kind``.

    Returns:
        The path of the written file.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.

    Examples:
        >>> import tempfile
        >>> rows = [NormRecord(0, {"a": 1.0, "b": 2.0}), NormRecord(5, {"a": 1.5, "b": 2.0})]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     written = plot_heatmap(rows, ["a", "b"], Path(tmp) / "heatmap.png")
        ...     written.name, written.read_bytes()[1:4]
        ('heatmap.png', b'PNG')
    """
    np = _import("numpy")
    colors = _import("matplotlib.colors")
    steps = [row.step for row in history]
    data = np.array(
        [[row.values(kind).get(name, math.nan) for row in history] for name in layer_names], dtype=float
    ).reshape(len(layer_names), len(steps))
    data = np.ma.masked_invalid(data)
    color_norm = None
    if log_scale:
        data = np.ma.masked_less_equal(data, 0.0)
        color_norm = colors.LogNorm()

    height = max(3.0, 0.28 * len(layer_names) + 1.5)
    fig = _figure(width=max(6.0, min(16.0, 0.2 * len(steps) + 5.0)), height=height)
    ax = fig.add_subplot()
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", norm=color_norm)
    fig.colorbar(image, ax=ax, label=_LABELS[kind])
    ax.set_yticks(range(len(layer_names)), _short_names(layer_names), fontsize=8)
    ticks = _tick_positions(len(steps))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_title(title or f"Per-layer {_LABELS[kind]}")
    return _save(fig, path)


def plot_layer_means(
    history: Sequence[NormRecord],
    layer_names: Sequence[str],
    path: str | os.PathLike[str],
    kind: Kind = "weight",
    title: str | None = None,
) -> Path:
    """Draw a bar chart of each layer's mean value over the logged steps and save it as a PNG.

    This is the view of the LISA paper's weight-norm figure: one bar per layer, in model order,
    showing how unevenly the layers (embeddings and head against the blocks) carry weight.

    Args:
        history: The logged rows, e.g. ``WeightNormMonitor.history``.
        layer_names: The layers to draw, left to right.
        path: Where the PNG is written; missing parent folders are created.
        kind: Which values: ``"weight"``, ``"change"`` or ``"grad"``.
        title: The figure title; by default one naming ``kind`` and the number of steps.

    Returns:
        The path of the PNG.

    Raises:
        ModuleNotFoundError: Without matplotlib (the ``plot`` extra: ``pip install "lightning-lisa[plot]"``).

    Examples:
        >>> import tempfile
        >>> rows = [NormRecord(0, {"a": 1.0, "b": 2.0}), NormRecord(5, {"a": 3.0, "b": 2.0})]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_layer_means(rows, ["a", "b"], Path(tmp) / "means.png").name
        'means.png'
    """
    means = []
    for name in layer_names:
        values = [v for row in history if not math.isnan(v := row.values(kind).get(name, math.nan))]
        means.append(sum(values) / len(values) if values else 0.0)

    fig = _figure(width=max(6.0, 0.3 * len(layer_names) + 2.0), height=4.5)
    ax = fig.add_subplot()
    ax.bar(range(len(layer_names)), means, color="tab:blue")
    ax.set_xticks(range(len(layer_names)), _short_names(layer_names), rotation=90, fontsize=8)
    ax.set_ylabel(f"mean {_LABELS[kind]}")
    ax.set_title(title or f"Mean {_LABELS[kind]} per layer over {len(history)} logged steps")
    return _save(fig, path)


def read_image(path: str | os.PathLike[str]) -> Any:
    """Read a PNG back as an ``(height, width, 3)`` float array in [0, 1] (e.g. for TensorBoard).

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
    """
    image = _import("matplotlib.image").imread(os.fspath(path))
    return image[..., :3]


def _import(name: str) -> Any:
    """Import an optional plotting module, with the install command in the error."""
    import importlib

    try:
        importlib.import_module("matplotlib")  # the parent first: a cached submodule must not hide its absence
        return importlib.import_module(name)
    except ImportError as err:
        raise ModuleNotFoundError(
            f"Plotting weight norms needs matplotlib, which could not be imported ({err}). "
            f"Install it with: {PLOT_INSTALL}"
        ) from err


def _figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas, outside pyplot's global state."""
    figure_module = _import("matplotlib.figure")
    agg = _import("matplotlib.backends.backend_agg")
    fig: Figure = figure_module.Figure(figsize=(width, height), layout="constrained")
    agg.FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png", dpi=100)
    return target


def _short_names(names: Sequence[str]) -> list[str]:
    """Drop the leading dotted components all names share (``model.model.layers.0`` -> ``layers.0``)."""
    parts = [name.split(".") for name in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _tick_positions(count: int, most: int = 12) -> list[int]:
    """At most ``most`` evenly spaced indices in ``range(count)``, the last one included."""
    if count <= most:
        return list(range(count))
    stride = math.ceil(count / most)
    ticks = list(range(0, count, stride))
    if ticks[-1] != count - 1:
        ticks.append(count - 1)
    return ticks
