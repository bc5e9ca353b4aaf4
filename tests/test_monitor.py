"""WeightNormMonitor in real Lightning runs of a tiny Llama: rows, logged keys, figures, LISA, resume, errors."""

from __future__ import annotations

import csv
import itertools
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import Logger

from lightning_lisa import LISA
from lightning_lisa.monitoring.monitor import WeightNormMonitor
from lightning_lisa.norms import layer_norms
from lightning_lisa.testing import CausalLM, quiet_trainer, token_loader

LAYERS = [
    "model.model.embed_tokens",
    *(f"model.model.layers.{i}" for i in range(6)),
    "model.model.norm",
    "model.lm_head",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fit(monitor: WeightNormMonitor, steps: int, module: CausalLM | None = None, **kwargs: Any) -> CausalLM:
    module = module or CausalLM()
    callbacks = kwargs.pop("callbacks", [])
    quiet_trainer([*callbacks, monitor], max_steps=steps, **kwargs).fit(module, token_loader(n_batches=steps))
    return module


class Snapshot(pl.Callback):
    """Direct norms of each monitored layer after chosen optimizer steps (and of its change since the start),
    and of its gradients before them."""

    def __init__(self, steps: set[int], start: dict[str, torch.Tensor]) -> None:
        self.steps = steps
        self.start = start
        self.weights: dict[int, dict[str, float]] = {}
        self.changes: dict[int, dict[str, float]] = {}
        self.grads: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 in self.steps:
            self.grads[trainer.global_step + 1] = {
                name: direct([p.grad for p in pl_module.get_submodule(name).parameters() if p.grad is not None])
                for name in LAYERS
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.weights[trainer.global_step] = {
                name: direct(list(pl_module.get_submodule(name).parameters())) for name in LAYERS
            }
            self.changes[trainer.global_step] = {
                name: direct(
                    [p - self.start[f"{name}.{n}"] for n, p in pl_module.get_submodule(name).named_parameters()]
                )
                for name in LAYERS
            }


def direct(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.cat([t.detach().flatten().double() for t in tensors])))


def test_one_row_per_logged_step_with_the_direct_norms():
    module = CausalLM()
    start = layer_norms([(name, module.get_submodule(name)) for name in LAYERS])
    monitor = WeightNormMonitor(logging_interval=5, track_change=True, track_grad=True, plot=False)
    snapshot = Snapshot({10}, start={n: p.detach().clone() for n, p in module.named_parameters()})
    fit(monitor, 12, module, callbacks=[snapshot])
    assert monitor.layer_names == LAYERS
    assert [row.step for row in monitor.history] == [0, 5, 10]
    assert monitor.history[0].weight == start
    assert monitor.history[0].grad == {}  # no gradient before the first step
    assert monitor.history[2].weight == pytest.approx(snapshot.weights[10], rel=1e-6)
    assert monitor.history[2].grad == pytest.approx(snapshot.grads[10], rel=1e-5)
    assert monitor.history[0].change == dict.fromkeys(LAYERS, 0.0)
    assert monitor.history[2].change == pytest.approx(snapshot.changes[10], rel=1e-5)
    assert min(monitor.history[2].change.values()) > 0.0
    assert monitor.history[1].weight != monitor.history[0].weight  # training moved the weights


def test_csv_logger_gets_exactly_the_documented_keys_and_the_figures_are_pngs(tmp_path: Path):
    image_module = pytest.importorskip("matplotlib.image")
    monitor = WeightNormMonitor(logging_interval=4, track_change=True, track_grad=True)
    logger = CSVLogger(tmp_path, name="run")
    fit(monitor, 8, logger=logger)
    log_dir = Path(logger.log_dir)
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    expected = {f"{prefix}/{name}" for prefix in ("weight_norm", "weight_change", "grad_norm") for name in LAYERS}
    assert set(rows[0]) == {"step"} | expected
    assert [int(r["step"]) for r in rows] == [0, 4, 8]
    assert all(rows[0][f"grad_norm/{name}"] == "" for name in LAYERS)
    assert all(float(rows[0][f"weight_change/{name}"]) == 0.0 for name in LAYERS)
    for row, record in zip(rows, monitor.history, strict=True):
        for name in LAYERS:
            assert float(row[f"weight_norm/{name}"]) == pytest.approx(record.weight[name])

    files = sorted(p.name for p in log_dir.glob("*.png"))
    assert files == [
        "grad_norms_heatmap.png",
        "weight_change_heatmap.png",
        "weight_norms_heatmap.png",
        "weight_norms_mean.png",
    ]
    for name in files:
        assert (log_dir / name).read_bytes()[:8] == PNG_SIGNATURE
    heatmap = image_module.imread(log_dir / "weight_norms_heatmap.png")
    height = 100 * (0.28 * len(LAYERS) + 1.5)  # figure inches at 100 dpi, as plot_heatmap sizes it
    assert heatmap.shape[1] == 600 and abs(heatmap.shape[0] - height) <= 1 and heatmap.shape[2] in (3, 4)
    assert image_module.imread(log_dir / "weight_norms_mean.png").shape[:2] == (450, 600)


def test_without_logger_figures_go_to_the_root_dir_and_save_plots_works_on_demand(tmp_path: Path):
    pytest.importorskip("matplotlib")
    monitor = WeightNormMonitor(logging_interval=3)
    fit(monitor, 3, default_root_dir=tmp_path)
    assert (tmp_path / "weight_norms_heatmap.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "weight_norms_mean.png").is_file()
    written = monitor.save_plots(tmp_path / "later")
    assert written == [tmp_path / "later" / "weight_norms_heatmap.png", tmp_path / "later" / "weight_norms_mean.png"]
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in written)
    fit(monitor, 3, default_root_dir=tmp_path)  # a second fit starts a fresh history
    assert [row.step for row in monitor.history] == [0, 3]


def test_with_lisa_frozen_blocks_keep_their_norm_and_get_no_gradient():
    lisa = LISA(n_layers=2, interval=3, seed=4)
    monitor = WeightNormMonitor(logging_interval=1, track_change=True, track_grad=True, plot=False)
    fit(monitor, 9, callbacks=[lisa])
    active_in_period = {switch.period: set(switch.active_layers) for switch in lisa.history}
    assert len(active_in_period) == 3
    rows = monitor.history
    assert [row.step for row in rows] == list(range(10))
    for before, after in itertools.pairwise(rows):
        active = active_in_period[before.step // 3]  # the blocks the step from `before` to `after` trained
        for i in range(6):
            name = f"model.model.layers.{i}"
            if i in active:
                assert after.weight[name] != before.weight[name], (after.step, name)
                assert after.grad[name] > 0.0
            else:
                assert after.weight[name] == before.weight[name], (after.step, name)
                assert after.change[name] == before.change[name], (after.step, name)
                assert after.grad[name] == 0.0
        assert after.grad["model.model.embed_tokens"] > 0.0  # always active
        assert after.grad["model.model.norm"] == 0.0  # not always active by default
    never = set(range(6)) - set().union(*active_in_period.values())
    for i in never:
        assert all(row.change[f"model.model.layers.{i}"] == 0.0 for row in rows)


class ImageLogger(Logger):
    """A logger with W&B's ``log_image(key, images, step)``."""

    def __init__(self, save_dir: Path) -> None:
        super().__init__()
        self._save_dir = str(save_dir)
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.images: list[tuple[str, list[Any], int | None]] = []

    @property
    def name(self) -> str:
        return "images"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key: str, images: list[Any], step: int | None = None) -> None:
        self.images.append((key, images, step))


class Writer:
    """TensorBoard's SummaryWriter, as far as figures go."""

    def __init__(self) -> None:
        self.images: list[tuple[str, Any, int, str]] = []

    def add_image(self, tag: str, image: Any, global_step: int, dataformats: str) -> None:
        self.images.append((tag, image, global_step, dataformats))


class BoardLogger(ImageLogger):
    log_image = None  # type: ignore[assignment]

    def __init__(self, save_dir: Path) -> None:
        super().__init__(save_dir)
        self.writer = Writer()

    @property
    def experiment(self) -> Writer:
        return self.writer


def test_figures_are_logged_to_loggers_that_take_images(tmp_path: Path):
    pytest.importorskip("matplotlib")
    images, board, csv_logger = ImageLogger(tmp_path / "first"), BoardLogger(tmp_path / "b"), CSVLogger(tmp_path)
    monitor = WeightNormMonitor(logging_interval=2)
    fit(monitor, 4, logger=[images, board, csv_logger])
    assert [step for step, _ in images.metrics] == [0, 2, 4]
    assert [step for step, _ in board.metrics] == [0, 2, 4]
    assert set(images.metrics[0][1]) == {f"weight_norm/{name}" for name in LAYERS}
    first = tmp_path / "first"  # the first logger's directory (it has no log_dir: its save_dir)
    assert images.images == [
        ("weight_norms_heatmap", [str(first / "weight_norms_heatmap.png")], 4),
        ("weight_norms_mean", [str(first / "weight_norms_mean.png")], 4),
    ]
    assert [(tag, step, fmt) for tag, _, step, fmt in board.writer.images] == [
        ("weight_norms_heatmap", 4, "HWC"),
        ("weight_norms_mean", 4, "HWC"),
    ]
    image = board.writer.images[0][1]
    assert image.ndim == 3 and image.shape[2] == 3 and 0.0 <= image.min() <= image.max() <= 1.0


def test_missing_matplotlib_warns_once_with_the_install_command_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    monitor = WeightNormMonitor(logging_interval=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = fit(monitor, 4, default_root_dir=tmp_path)
        assert monitor.save_plots(tmp_path / "again") == []
    hints = [w for w in caught if "lightning-lisa[plot]" in str(w.message)]
    assert len(hints) == 1
    assert 'pip install "lightning-lisa[plot]"' in str(hints[0].message)
    assert module.trainer.global_step == 4
    assert [row.step for row in monitor.history] == [0, 2, 4]
    assert not list(tmp_path.rglob("*.png"))


def test_history_survives_a_resume(tmp_path: Path):
    batches = 3
    first = WeightNormMonitor(logging_interval=2, plot=False)
    run = quiet_trainer([first], max_epochs=2)
    run.fit(CausalLM(), token_loader(n_batches=batches))
    run.save_checkpoint(tmp_path / "stop.ckpt")
    state = torch.load(tmp_path / "stop.ckpt", weights_only=False)["callbacks"]["WeightNormMonitor"]
    assert [row["step"] for row in state["history"]] == [0, 2, 4, 6]
    assert state["layer_names"] == LAYERS

    resumed = WeightNormMonitor(logging_interval=2, plot=False)
    run = quiet_trainer([resumed], max_epochs=4)
    run.fit(CausalLM(), token_loader(n_batches=batches), ckpt_path=str(tmp_path / "stop.ckpt"))
    assert [row.step for row in resumed.history] == [0, 2, 4, 6, 8, 10, 12]
    assert resumed.history[:4] == first.history


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logging_interval": 0}, r"`logging_interval=0` is not allowed; `logging_interval` must be an integer >= 1"),
        ({"logging_interval": "5"}, r"`logging_interval='5'`.*integer >= 1"),
        ({"logging_interval": True}, r"`logging_interval=True`.*integer >= 1"),
        ({"norm": "l3"}, r"`norm='l3'` is not allowed; `norm` must be one of \['l2', 'l1', 'linf'\]"),
        ({"track_change": "yes"}, r"`track_change='yes'` is not allowed; `track_change` must be True or False"),
        ({"track_grad": 1}, r"`track_grad=1`.*True or False"),
        ({"plot": None}, r"`plot=None`.*True or False"),
        ({"layers": []}, r"`layers=\[\]` is not allowed; `layers` must be a dotted path, a non-empty list"),
        ({"layers": [1]}, r"`layers=\[1\]` is not allowed"),
        ({"layers": 5}, r"`layers=5` is not allowed"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        WeightNormMonitor(**kwargs)


def test_a_wrong_layers_path_fails_before_training():
    module = CausalLM()
    with pytest.raises(MisconfigurationException, match=r"model\.blocks"):
        fit(WeightNormMonitor(layers="model.blocks"), 2, module)
    assert module.training_steps == 0


def test_deepspeed_zero3_and_deepspeed_gradients_are_refused():
    class DeepSpeedStrategy:
        def __init__(self, zero_stage_3: bool) -> None:
            self.zero_stage_3 = zero_stage_3

    module = CausalLM()
    with pytest.raises(MisconfigurationException, match="ZeRO stage 3"):
        WeightNormMonitor().setup(SimpleNamespace(strategy=DeepSpeedStrategy(True)), module, "fit")
    with pytest.raises(MisconfigurationException, match="`track_grad=True` is not allowed under DeepSpeed"):
        WeightNormMonitor(track_grad=True).setup(SimpleNamespace(strategy=DeepSpeedStrategy(False)), module, "fit")
    monitor = WeightNormMonitor()
    monitor.setup(SimpleNamespace(strategy=DeepSpeedStrategy(False)), module, "fit")
    assert monitor.layer_names == LAYERS
