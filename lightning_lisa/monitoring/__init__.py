"""Observability: per-block weight, change and gradient norms logged during training, and their figures."""

from lightning_lisa.monitoring.monitor import WeightNormMonitor
from lightning_lisa.monitoring.plots import plot_heatmap, plot_layer_means

__all__ = ["WeightNormMonitor", "plot_heatmap", "plot_layer_means"]
