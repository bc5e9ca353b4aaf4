"""The memory figure of the benchmarks page, from ``memory_speed.py``'s results (the quality study draws its own).

* ``--memory A.json [B.json ...]``: one panel per ``memory_speed.py`` result (e.g. one per model
  shape): the peak memory of every arm, split into the training state (weights, gradients and
  optimizer state on the device) and the rest (activations, temporaries), with its ratio to full
  fine-tuning.

    make figures    # runs this script on the committed results (see the Makefile for the files)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

GIB = 2**30


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--memory", nargs="+", type=Path, default=[], help="memory_speed.py --json results")
    parser.add_argument("--memory-out", type=Path, default=Path("docs/images/memory_h100.png"))
    args = parser.parse_args(argv)
    if not args.memory:
        parser.error("nothing to plot: give --memory")
    for path in args.memory:
        if not path.is_file():
            parser.error(f"{path} does not exist")
    plot_memory(args.memory, args.memory_out)
    print(f"wrote {args.memory_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
