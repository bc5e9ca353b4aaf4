"""A memory map of real fine-tuning settings: LISA's peak against LoRA r=16's, per setting, estimated.

For each shape (Llama-2-7B, Llama-3-8B, Qwen2.5-7B, Gemma-2-9B), batch (1 x 1024 and 8 x 2048
tokens), gradient checkpointing (off, on) and loss (the model's own, or chunked by 1024 tokens in
both arms), :func:`lightning_lisa.estimate.estimate_memory` gives the peak of LoRA r=16 and of LISA
(gamma=2, AdamW, bf16-true) in seven variants: the default; with the step in backward
(``step_in_backward``); with it and ``torch.optim.AdamW(fused=True)`` (``fused``, both arms); with the
8-bit always-active state (``compact_always_active``); with the step in backward and that state; with
factored moments everywhere (``compact_always_active="factored"``, ``compact_blocks="factored"``); and
with those and the step in backward. Every cell is an estimate (see ``benchmarks/estimate_check.py``
for how close the estimate comes to measured peaks); cells of a setting that was measured on a GPU are
listed beside it.

Examples::

    python benchmarks/memory_map.py                                   # prints the tables (a few minutes)
    python benchmarks/memory_map.py --out benchmarks/results/memory_map/memory_map  # also writes .json and .md
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import common

from lightning_lisa.estimate import estimate_memory

MAP_SHAPES = ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "gemma-2-9b"]
BATCHES = [(1, 1024), (8, 2048)]
FACTORED: dict[str, Any] = {"compact_always_active": "factored", "compact_blocks": "factored"}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "step in backward": {"step_in_backward": True},
    "+ fused AdamW": {"step_in_backward": True, "fused": True},
    "compact": {"compact_always_active": "8bit"},
    "both": {"step_in_backward": True, "compact_always_active": "8bit"},
    "factored everywhere": FACTORED,
    "+ step in backward": {"step_in_backward": True, **FACTORED},
}
#: Columns whose options are exact (the same update as AdamW's); the others are lossy.
EXACT = ("default", "step in backward", "+ fused AdamW")
LOSS_CHUNK = 1024
GIB = 2**30

#: Peaks measured on a GPU in the same setting as a cell (bf16-true, AdamW, gamma=2, model's own loss).
MEASURED: dict[tuple[str, int, int, bool, bool, str], dict[str, Any]] = {
    ("llama-2-7b", 1, 1024, False, False, "default"): {
        "card": "H100 80GB",
        "lisa_gib": 20.794,
        "lora_gib": 18.424,
        "source": "benchmarks/results/gpu_h100/llama-2-7b.txt",
    },
}


def cells(shapes: list[str]) -> list[dict[str, Any]]:
    """One row per shape, batch, checkpointing and loss: LoRA's peak and LISA's for every variant."""
    rows = []
    for shape, (batch, seq), checkpointing, chunked in itertools.product(shapes, BATCHES, (False, True), (False, True)):
        row: dict[str, Any] = {
            "shape": shape,
            "batch_size": batch,
            "seq_len": seq,
            "gradient_checkpointing": checkpointing,
            "loss_chunk_size": LOSS_CHUNK if chunked else None,
            "lisa_gib": {},
            "ratio": {},
        }
        for name, options in VARIANTS.items():
            est = estimate_memory(
                shape,
                batch_size=batch,
                seq_len=seq,
                dtype="bf16",
                gradient_checkpointing=checkpointing,
                loss_chunk_size=LOSS_CHUNK if chunked else None,
                **options,
            )
            if name == "default":
                row["lora_gib"] = est.lora.total / GIB
            row["lisa_gib"][name] = est.lisa.total / GIB
            row["ratio"][name] = est.lisa.total / est.lora.total
            measured = MEASURED.get((shape, batch, seq, checkpointing, chunked, name))
            if measured is not None:
                row.setdefault("measured", {})[name] = {
                    **measured,
                    "ratio": measured["lisa_gib"] / measured["lora_gib"],
                }
        rows.append(row)
        print(markdown_row(row), flush=True)
    return rows


def markdown_row(row: dict[str, Any]) -> str:
    label = {
        "llama-2-7b": "Llama-2-7B",
        "llama-3-8b": "Llama-3-8B",
        "qwen2.5-7b": "Qwen2.5-7B",
        "gemma-2-9b": "Gemma-2-9B",
    }
    ratios = []
    for name in VARIANTS:
        cell = f"{row['ratio'][name]:.2f}"
        measured = row.get("measured", {}).get(name)
        if measured is not None:
            cell += f" (measured {measured['ratio']:.2f}, {measured['card']})"
        ratios.append(cell)
    checkpointing = "on" if row["gradient_checkpointing"] else "off"
    return (
        f"| {label.get(row['shape'], row['shape'])} | {row['batch_size']} x {row['seq_len']} | {checkpointing} "
        f"| {row['lora_gib']:.1f} | " + " | ".join(ratios) + " |"
    )


def tables(rows: list[dict[str, Any]]) -> str:
    """Two markdown tables: the model's own loss, and the loss chunked in both arms."""
    header = (
        "| shape | batch x seq | checkpointing | LoRA r=16 peak GiB | LISA default | step in backward "
        "| + fused AdamW | 8-bit E+H | 8-bit E+H, step in backward | factored everywhere | + step in backward |\n"
        + "|---" * 11
        + "|"
    )
    parts = []
    for chunked, title in ((False, "the model's own loss"), (True, f"loss chunked by {LOSS_CHUNK} tokens, both arms")):
        selected = [r for r in rows if (r["loss_chunk_size"] is not None) == chunked]
        parts.append(
            f"LISA / LoRA r=16 peak, {title} (estimated):\n\n{header}\n" + "\n".join(map(markdown_row, selected))
        )
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=MAP_SHAPES)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    rows = cells(args.shapes)
    text = tables(rows)
    print("\n" + text)
    if args.out is not None:
        settings = "bf16-true, torch.optim.AdamW, LISA gamma=2 (optimizer_state='drop'), LoRA r=16 on all linear layers"
        payload = {
            "settings": settings,
            "estimated_with": "lightning_lisa.estimate.estimate_memory (device='cuda': fused attention)",
            "versions": common.versions("torch", "transformers"),
            "rows": rows,
        }
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(f"Settings: {settings}. Made by `benchmarks/memory_map.py`.\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
