"""The study's report: ``summary.json``, one table per task, verdicts between arms, and the figures.

Everything is drawn from the cell files and ``base.json`` (and, where present, ``cost.json`` of ``cost.py``
for peak memory and step time), so the tables can be rebuilt from the committed results alone::

    python benchmarks/quality report            # writes summary.json and tables.md beside the cells
    python benchmarks/quality report --figures  # and the benchmarks page's figures

A difference between two arms is claimed only when their means differ by more than the larger of their
standard deviations over seeds; otherwise they are "level". Every verdict also gives the paired difference
over seeds (seed *s* is the same data order in every arm: the mean of the per-seed differences, its
standard error, and on how many seeds the arm was better), and exact-match tasks a paired count over items
(test items right in one arm and wrong in the other, summed over the seeds both ran).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from arms import ARMS
from study import chosen, grid_state, read

#: Pairs compared in every task's verdicts: (arm, against).
PAIRS = (
    ("lisa2", "fixed2"), ("lisa4", "fixed4"), ("lisa2", "lora64"), ("lisa4", "lora64"), ("lisa2", "lora16"),
    ("lisa2", "full"), ("lisa4", "full"), ("lora64", "full"), ("lisa6", "lisa2"), ("lisa6", "lisa4"),
    ("lisa6", "lora64"), ("lisa6", "full"), ("lisa2-blocks", "lisa2"),
    ("lisa2-eh025", "lisa2"), ("lisa2-offload", "lisa2"), ("lisa2", "lora104"), ("lisa4", "lora104"),
    ("lisa2", "eh"), ("lisa4", "eh"), ("lora64-eh", "lora64"), ("lora64-eh", "eh"), ("lisa2", "lora64-eh"),
    ("lisa4", "lora64-eh"), ("lora64-eh10", "lora64"), ("lora64-eh10", "eh"), ("lisa2", "lora64-eh10"),
    ("lora64-eh10", "lora64-eh"), ("lisa4", "lora16-eh10"), ("lisa2", "lora16-eh10"), ("lisa6", "lora16-eh10"),
    ("lora16-eh10", "lora16"), ("lora16-eh10", "lora64-eh10"), ("lisa2-blocks", "lora16"),
)  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fact_se(cells: list[dict[str, Any]], groups: list[int]) -> float:
    """Standard error of the mean accuracy over facts (each fact: its test items, over the seeds)."""
    per: dict[int, list[float]] = {}
    for cell in cells:
        for group, right in zip(groups, cell["test_correct"], strict=True):
            per.setdefault(group, []).append(float(right))
    means = [100.0 * statistics.mean(v) for v in per.values()]
    return statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else math.nan


def arm_summary(out: Path, task: str, arm: str, base: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any] | None:
    """One arm's entry of ``summary.json`` (``None`` before its grid has a finished cell)."""
    grid, cells = grid_state(out, task, arm)
    if not cells:
        return None
    lr = chosen(task, cells) if len(cells) == len(grid) else None
    seeds: list[dict[str, Any]] = []
    if lr is not None:
        for seed in range(10):
            cell = read(out / "cells" / task / arm / f"lr{lr:g}_s{seed}.json")
            if cell is not None and "test" in cell:
                seeds.append(cell)
    english = base["english_loss"]
    entry: dict[str, Any] = {
        **ARMS[arm].record(),
        "steps": next(iter(cells.values()))["steps"],
        "lr_grid": sorted(grid),
        "val_by_lr": {f"{k:g}": cells[k]["val"] for k in sorted(cells)},
        "grid_complete": len(cells) == len(grid),
        "lr": lr,
        "seeds": [c["seed"] for c in seeds],
        "test": [c["test"] for c in seeds],
        "forgetting": [c["english_loss"] - english for c in seeds],
        "control": [c["control"] for c in seeds],
        "curve": [[p["value"] for p in c["curve"]] for c in seeds],
        "curve_steps": [p["step"] for p in seeds[0]["curve"]] if seeds else [],
        "commits": sorted({c["commit"] for c in [*cells.values(), *seeds]}),
        "step_time_s": cost.get(arm, {}).get("step_time_s"),
        "peak_bytes": cost.get(arm, {}).get("peak_bytes"),
    }
    entry["test_mean"], entry["test_std"] = mean_std(entry["test"])
    entry["forgetting_mean"], entry["forgetting_std"] = mean_std(entry["forgetting"])
    entry["control_mean"], entry["control_std"] = mean_std(entry["control"])
    return entry


def verdict(a: dict[str, Any], b: dict[str, Any], higher: bool) -> str:
    """``"ahead"``, ``"behind"`` or ``"level"`` for arm ``a`` against ``b`` (means against the larger spread)."""
    if len(a["test"]) < 2 or len(b["test"]) < 2:
        return "pending"
    diff = a["test_mean"] - b["test_mean"]
    if abs(diff) <= max(a["test_std"], b["test_std"]):
        return "level"
    return "ahead" if (diff > 0) == higher else "behind"


def paired_seeds(a: dict[str, Any], b: dict[str, Any], higher: bool) -> dict[str, Any]:
    """Arm ``a`` minus arm ``b`` seed by seed, over the seeds both ran (the same data order: paired).

    ``better`` counts the seeds on which ``a`` scored better (higher, or lower for a loss).

    >>> row = paired_seeds({"seeds": [0, 1, 2], "test": [90.0, 80.0, 70.0]},
    ...                    {"seeds": [0, 1], "test": [60.0, 75.0]}, higher=True)
    >>> row["differences"], row["mean"], round(row["se"], 1), row["better"]
    ([30.0, 5.0], 17.5, 12.5, 2)
    """
    ours, theirs = dict(zip(a["seeds"], a["test"], strict=True)), dict(zip(b["seeds"], b["test"], strict=True))
    seeds = sorted(set(ours) & set(theirs))
    differences = [ours[s] - theirs[s] for s in seeds]
    mean, std = mean_std(differences)
    se = std / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    better = sum((d > 0) if higher else (d < 0) for d in differences)
    return {"seeds": seeds, "differences": differences, "mean": mean, "se": se, "better": better}


def paired(out: Path, task: str, a: dict[str, Any], b: dict[str, Any], arm_a: str, arm_b: str) -> dict[str, int]:
    """Test items right in ``a`` only and in ``b`` only, summed over the seeds both arms ran."""
    only_a = only_b = 0
    for seed in sorted(set(a["seeds"]) & set(b["seeds"])):
        ca = read(out / "cells" / task / arm_a / f"lr{a['lr']:g}_s{seed}.json")
        cb = read(out / "cells" / task / arm_b / f"lr{b['lr']:g}_s{seed}.json")
        if ca is None or cb is None:
            continue
        for x, y in zip(ca["test_correct"], cb["test_correct"], strict=True):
            only_a += int(x and not y)
            only_b += int(y and not x)
    return {"a_only": only_a, "b_only": only_b}


def summarize(out: Path) -> dict[str, Any]:
    """Build ``summary.json``'s content from the results folder."""
    base = read(out / "base.json")
    if base is None:
        raise SystemExit(f"{out / 'base.json'} is missing: nothing to report")
    cost_file = read(out / "cost.json") or {}
    summary: dict[str, Any] = {"model": base["model"], "base_english_loss": base["english_loss"], "tasks": {}}
    for task, info in base["tasks"].items():
        higher = bool(info["higher_is_better"])
        arms: dict[str, Any] = {}
        for arm in ARMS:
            entry = arm_summary(out, task, arm, base, cost_file.get("tasks", {}).get(task, {}))
            if entry is not None:
                arms[arm] = entry
        if task == "facts":
            import sys

            sys.path.insert(0, str(Path(__file__).parent))
            from tasks import SMOKE, Sizes, fact_items

            sizes = SMOKE if base["model"].startswith("tiny") else Sizes()
            groups = [item.group for item in fact_items(sizes)["test"]]
            for arm, entry in arms.items():
                cells = [read(out / "cells" / task / arm / f"lr{entry['lr']:g}_s{s}.json") for s in entry["seeds"]]
                entry["test_se_over_facts"] = fact_se([c for c in cells if c], groups) if cells else None
        verdicts = []
        for a, b in PAIRS:
            if a in arms and b in arms and arms[a]["test"] and arms[b]["test"]:
                row = {"arm": a, "against": b, "verdict": verdict(arms[a], arms[b], higher),
                       "difference": arms[a]["test_mean"] - arms[b]["test_mean"],
                       "per_seed": paired_seeds(arms[a], arms[b], higher)}  # fmt: skip
                if info["metric"] == "accuracy":
                    row["paired_items"] = paired(out, task, arms[a], arms[b], a, b)
                verdicts.append(row)
        summary["tasks"][task] = {
            "metric": info["metric"], "higher_is_better": higher, "base": info["test"],
            "base_val": info["val"], "arms": arms, "verdicts": verdicts,
        }  # fmt: skip
    summary["cost_regime"] = {"time": cost_file.get("time_regime"), "peak": cost_file.get("peak_regime")}
    summary["cost"] = cost_file.get("tasks", {})
    return summary


def tables(summary: dict[str, Any]) -> str:
    """One markdown table per task, then its verdicts."""
    lines: list[str] = []
    for task, info in summary["tasks"].items():
        unit = "exact match, %" if info["metric"] == "accuracy" else "loss"
        lines += [f"### {task} ({unit}; base model {info['base']:.3g})", ""]
        lines += ["| arm | lr (grid) | test | forgetting (English loss) | control % | peak MiB | step s |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for e in info["arms"].values():
            grid = ", ".join(f"{lr:g}" for lr in e["lr_grid"])
            lr = f"**{e['lr']:g}** ({grid})" if e["lr"] is not None else f"grid running ({grid})"
            digits = 1 if info["metric"] == "accuracy" else 3
            test = (
                f"{e['test_mean']:.{digits}f} ± {e['test_std']:.{digits}f} (n={len(e['test'])})" if e["test"] else "-"
            )
            if e.get("test_se_over_facts"):
                test += f", SE over facts {e['test_se_over_facts']:.1f}"
            forget = f"{e['forgetting_mean']:+.3f} ± {e['forgetting_std']:.3f}" if e["test"] else "-"
            control = f"{e['control_mean']:.1f} ± {e['control_std']:.1f}" if e["test"] else "-"
            peak = f"{e['peak_bytes'] / 2**20:.0f}" if e.get("peak_bytes") else "-"
            step = f"{e['step_time_s']:.2f}" if e.get("step_time_s") else "-"
            lines.append(f"| {e['title']} | {lr} | {test} | {forget} | {control} | {peak} | {step} |")
        if info["verdicts"]:
            lines += [
                "",
                "| arm | against | difference | verdict | per seed, paired (mean ± SE; better on) "
                "| test items right in one only |",
                "|---|---|---|---|---|---|",
            ]
            for v in info["verdicts"]:
                items = v.get("paired_items")
                pair = f"{items['a_only']} vs {items['b_only']}" if items else "-"
                ps = v["per_seed"]
                seeds = "-"
                if ps["seeds"]:
                    seeds = f"{ps['mean']:+.3g} ± {ps['se']:.2g}; {ps['better']} of {len(ps['seeds'])}"
                lines.append(
                    f"| {v['arm']} | {v['against']} | {v['difference']:+.3g} | {v['verdict']} | {seeds} | {pair} |"
                )
        lines.append("")
    if summary.get("cost"):
        lines += ["### cost (cost.py)", "", f"Peak: {summary['cost_regime']['peak']}.",
                  f"Step time: {summary['cost_regime']['time'] or 'not measured yet (needs a quiet machine)'}.", "",
                  "| task | arm | peak MiB | step s |", "|---|---|---|---|"]  # fmt: skip
        for task, rows in summary["cost"].items():
            for arm, row in rows.items():
                peak = f"{row['peak_bytes'] / 2**20:.1f}" if row.get("peak_bytes") else "-"
                step = f"{row['step_time_s']:.3f}" if row.get("step_time_s") else "-"
                lines.append(f"| {task} | {ARMS[arm].title} | {peak} | {step} |")
        lines.append("")
    return "\n".join(lines)


def figures(summary: dict[str, Any], images: Path) -> list[Path]:
    """Quality against peak memory (a point per arm, a panel per task) and the validation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, info in summary["tasks"].items() if any(e["test"] for e in info["arms"].values())]
    made: list[Path] = []
    if not tasks:
        return made
    markers = {"full": "s", "lora": "^", "lisa": "o", "fixed": "D", "eh": "x"}
    # one colour per arm in every panel: the ten dark shades of tab20 first, then the light ones
    palette = plt.get_cmap("tab20")
    colors = {arm: palette((2 * i) % 20 + (2 * i) // 20) for i, arm in enumerate(ARMS)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        info = summary["tasks"][task]
        tested = {arm: e for arm, e in info["arms"].items() if e["test"] and e.get("peak_bytes")}
        # an exact-match arm far below the others (the embeddings and head alone) would flatten the axis
        off = {a: e for a, e in tested.items() if info["metric"] == "accuracy" and e["test_mean"] < 50}
        for arm, e in tested.items():
            if arm in off:
                continue
            variant = ARMS[arm].role != "core"
            ax.errorbar(e["peak_bytes"] / 2**20, e["test_mean"], yerr=e["test_std"], capsize=3, label=arm,
                        color=colors[arm], fmt=markers.get(e["method"], "o"),
                        mfc="none" if variant else None)  # fmt: skip
        note = ", ".join(f"{a}: {e['test_mean']:.1f}% (off the axis)" for a, e in off.items())
        ax.set_title(task + (f"\n{note}" if note else ""), fontsize=9)
        ax.set_xlabel("peak memory, MiB (cost.py)")
        ax.set_ylabel("test exact match, %" if info["metric"] == "accuracy" else "test loss (lower is better)")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = images / "quality_vs_memory.png"
    fig.savefig(path, dpi=110)
    made.append(path)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        info = summary["tasks"][task]
        for arm, e in info["arms"].items():
            if not e["curve"] or arm not in ("full", "lora16", "lora64", "lisa2", "lisa4", "fixed2", "fixed4", "eh"):
                continue
            mean = [statistics.mean(v) for v in zip(*e["curve"], strict=True)]
            ax.plot(e["curve_steps"], mean, marker=".", label=arm, color=colors[arm])
        ax.set_title(f"{task}: validation at the end of every period")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("exact match, % (last point: all items)" if info["metric"] == "accuracy" else "loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = images / "quality_curves.png"
    fig.savefig(path, dpi=110)
    made.append(path)
    return made


def report(out: Path, images: Path | None) -> int:
    """Write ``summary.json`` and ``tables.md`` into ``out``; draw the figures into ``images`` if given."""
    import common

    summary = summarize(out)
    common.save_json(out / "summary.json", summary)
    text = tables(summary)
    (out / "tables.md").write_text(text + "\n")
    print(text)
    if images is not None:
        for path in figures(summary, images):
            print(f"wrote {path}")
    return 0
