"""Figures of the benchmarks page from the results the benchmark scripts wrote.

* ``--memory A.json [B.json ...]``: one panel per ``memory_speed.py`` result (e.g. one per model
  shape): the peak memory of every arm, split into the training state (weights, gradients and
  optimizer state on the device) and the rest (activations, temporaries), with its ratio to full
  fine-tuning.
* ``--quality Q.json``: the training-loss curves of ``quality.py``, per task, one line per arm (the
  mean over seeds at the arm's chosen learning rate, smoothed over a few steps), seeds as a band; and,
  when the results hold each arm's estimated peak memory, the test metric of every arm against its
  peak memory at the 7B shape (mean and standard deviation over seeds).

    make figures    # runs this script on the committed results (see the Makefile for the files)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

GIB = 2**30
QUALITY_NAMES = {
    "full": "full fine-tuning",
    "lora": "LoRA r=16",
    "lisa-uniform": "LISA uniform",
    "lisa-weight_norm": "LISA weight_norm",
    "lisa-cyclic": "LISA cyclic",
}
TASK_TITLES = {
    "code": "domain shift: Python source",
    "arithmetic": "arithmetic word problems",
    "reverse": "reversing 3 words (SmolLM2-135M)",
}
#: Arms joined by a line in the quality-against-memory panel (LoRA's ranks are joined too).
FAMILIES = {"lisa": "lisa-gamma", "lisa4": "lisa-gamma", "lisa-share20": "lisa-gamma"}
FAMILY_NAMES = {"lora": "LoRA, rank by rank", "lisa-gamma": "LISA, gamma by gamma"}
#: Arms named in a corner of the quality-against-memory panel instead of drawn (full fine-tuning's memory
#: and the embeddings and head's quality would squeeze the other arms into a corner).
ASIDE = ("full", "eh")
METRICS = {"reverse": ("accuracy", "exact match, %"), "code": ("test_loss", "held-out code loss")}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory(paths: list[Path], out: Path) -> None:
    """Horizontal bars of peak memory per arm, one panel per result file."""
    plt = _pyplot()
    runs = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 4.1), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        arms = [a for a in run["arms"] if a["status"] == "ok"]
        full = next((a for a in arms if a["key"] == "full"), None)
        names = [a["name"] for a in arms][::-1]
        state = [a["training_state_bytes"] / GIB for a in arms][::-1]
        rest = [max(0, a["arm_peak_bytes"] - a["training_state_bytes"]) / GIB for a in arms][::-1]
        ax.barh(names, state, color="#4c72b0", label="training state (weights, grads, optimizer state)")
        ax.barh(names, rest, left=state, color="#dd8452", label="activations and temporaries")
        for i, a in enumerate(arms[::-1]):
            peak = a["arm_peak_bytes"] / GIB
            label = f"{peak:.1f}" + (f"  ({a['arm_peak_bytes'] / full['arm_peak_bytes']:.2f}x)" if full else "")
            ax.text(peak, i, " " + label, va="center", fontsize=8)
        args = run["args"]
        ax.set_title(f"{args['shape']}, {args['dtype']}, batch {args['batch_size']} x {args['seq_len']}", fontsize=10)
        ax.set_xlabel(f"peak memory, GiB ({run['machine'].split(',')[0]})")
        ax.set_xlim(0, 1.3 * max(a["arm_peak_bytes"] for a in arms) / GIB)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_quality(path: Path, out: Path, window: int = 5) -> None:
    """Training-loss curves per task: the mean over seeds of each arm, with the seeds' range as a band."""
    plt = _pyplot()
    run = json.loads(path.read_text())
    names = {**QUALITY_NAMES, **run.get("arm_names", {})}
    tasks = [t for t in run["results"] if run["results"][t]]
    memory = run.get("memory", {}).get("llama-2-7b")
    rows = 2 if memory else 1
    fig, axes = plt.subplots(rows, len(tasks), figsize=(6.2 * len(tasks), 3.8 * rows), squeeze=False)
    arms = list(dict.fromkeys(arm for task in tasks for arm in run["results"][task]))
    colors = {arm: plt.get_cmap("tab20" if len(arms) > 10 else "tab10")(i) for i, arm in enumerate(arms)}
    for ax, task in zip(axes[0], tasks, strict=True):
        for arm, result in run["results"][task].items():
            if not result.get("seeds"):
                continue
            curves = [s["train_loss"] for s in result["seeds"].values() if s.get("train_loss")]
            if not curves:
                continue
            steps = min(len(c) for c in curves)
            curves = [smooth(c[:steps], window) for c in curves]
            mean = [statistics.mean(c[i] for c in curves) for i in range(steps)]
            low = [min(c[i] for c in curves) for i in range(steps)]
            high = [max(c[i] for c in curves) for i in range(steps)]
            x = list(range(1, steps + 1))
            ax.plot(x, mean, label=f"{names.get(arm, arm)} (lr {result['best_lr']:g})", lw=1.4, color=colors[arm])
            ax.fill_between(x, low, high, color=colors[arm], alpha=0.15, lw=0)
        ax.set_title(f"{TASK_TITLES.get(task, task)}: training loss", fontsize=10)
        ax.set_xlabel(f"optimizer step (moving average over {window})")
        ax.set_ylabel("loss")
        ax.legend(fontsize=6.5)
    if memory:
        for ax, task in zip(axes[1], tasks, strict=True):
            metric, label = METRICS.get(task, ("test_loss", "test loss"))
            families: dict[str, list[tuple[float, float]]] = {}
            aside: list[str] = []
            for arm, result in run["results"][task].items():
                values = [s[metric] for s in result.get("seeds", {}).values() if metric in s]
                if not values or arm not in memory:
                    continue
                x = memory[arm]["peak_bytes"] / GIB
                y = statistics.mean(values)
                err = statistics.stdev(values) if len(values) > 1 else 0.0
                if arm in ASIDE:  # far from the others in memory or quality: named, not drawn, so the rest can be read
                    aside.append(f"{names.get(arm, arm)}: {y:.3g} ± {err:.2g} at {x:.1f} GiB")
                    continue
                ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3, label=names.get(arm, arm), color=colors[arm])
                family = FAMILIES.get(arm, "lora" if arm.startswith("lora") else None)
                if family:
                    families.setdefault(family, []).append((x, y))
            for family, points in families.items():  # each method's frontier: its settings in order of memory
                if len(points) > 1:
                    xs, ys = zip(*sorted(points), strict=True)
                    style = "--" if family == "lora" else ":"
                    ax.plot(xs, ys, color="0.5", lw=1, ls=style, zorder=0, label=FAMILY_NAMES.get(family, family))
            xlabel = f"estimated peak memory at the 7B shape, GiB ({memory.get('regime', '')})"
            if aside:
                xlabel += "\nnot drawn: " + "; ".join(aside)
            ax.set_title(f"{TASK_TITLES.get(task, task)}: quality against memory", fontsize=10)
            ax.set_xlabel(xlabel, fontsize=7.5)
            ax.set_ylabel(label)
            ax.legend(fontsize=6.5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--memory", nargs="+", type=Path, default=[], help="memory_speed.py --json results")
    parser.add_argument("--memory-out", type=Path, default=Path("docs/images/memory_h100.png"))
    parser.add_argument("--quality", type=Path, help="a quality.py --json result")
    parser.add_argument("--quality-out", type=Path, default=Path("docs/images/quality_loss_curves.png"))
    args = parser.parse_args(argv)
    if not args.memory and args.quality is None:
        parser.error("nothing to plot: give --memory and/or --quality")
    for path in [*args.memory, *([args.quality] if args.quality else [])]:
        if not path.is_file():
            parser.error(f"{path} does not exist")
    if args.memory:
        plot_memory(args.memory, args.memory_out)
        print(f"wrote {args.memory_out}")
    if args.quality:
        plot_quality(args.quality, args.quality_out)
        print(f"wrote {args.quality_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
