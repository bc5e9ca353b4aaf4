"""The smallest complete Lightning Fabric loop with LISA: train, save, resume, and check the resume was exact.

A small Llama (random weights, Hugging Face ``transformers``) learns to reverse short token sequences
on the CPU in well under a minute. LISA joins through ``Fabric(callbacks=[lisa])``: the loop below is a
plain Fabric loop with gradient accumulation, and LISA adds no line to it. Halfway, the run saves a
checkpoint with ``lisa.save``; a second, fresh setup (a new model, optimizer and LISA, as after a restart)
loads it with ``lisa.load`` and trains on. A third run trains without interruption, and the script prints
whether the resumed weights equal it.

Usage: ``python examples/fabric_finetune.py [--steps 24] [--out fabric_output]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lisa import LISA

VOCAB, HALF = 32, 6  # tokens 2..31; each sequence is HALF tokens, a separator (1), then them reversed


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def make_batches(count: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences ``x 1 reversed(x)``; the loss counts the reversed half only (labels -100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randint(2, VOCAB, (batch_size, HALF), generator=g)
        ids = torch.cat([x, torch.ones(batch_size, 1, dtype=torch.long), x.flip(1)], dim=1)
        labels = ids.clone()
        labels[:, : HALF + 1] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def evaluate(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


def train(
    fabric: Fabric, model: Any, optimizer: Any, batches: list[Any], start: int, stop: int, accumulate: int
) -> None:
    """Optimizer steps ``start`` to ``stop``: each over ``accumulate`` micro-batches, synchronized at the last."""
    for step in range(start, stop):
        for micro in range(accumulate):
            batch = fabric.to_device(batches[step * accumulate + micro])
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                fabric.backward(model(**batch).loss / accumulate)
        optimizer.step()
        optimizer.zero_grad()


def setup(lisa: LISA) -> tuple[Fabric, Any, Any]:
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
    raw = make_model()
    model, optimizer = fabric.setup(raw, torch.optim.AdamW(raw.parameters(), lr=1e-2))
    return fabric, model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps in all (default 24)")
    parser.add_argument("--out", type=Path, default=Path("fabric_output"), help="checkpoint folder")
    args = parser.parse_args()
    accumulate, half = 2, args.steps // 2
    options = {"n_layers": 2, "interval": 4, "seed": 0}
    batches = make_batches(args.steps * accumulate, batch_size=8, seed=0)
    held_out = make_batches(4, batch_size=16, seed=1)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # first half, then save
    lisa = LISA(**options)
    fabric, model, optimizer = setup(lisa)
    print(f"held-out loss before training: {evaluate(model, held_out):.3f}")
    train(fabric, model, optimizer, batches, 0, half, accumulate)
    checkpoint = args.out / "lisa-fabric.ckpt"
    lisa.save(fabric, checkpoint, {"model": model, "optimizer": optimizer, "lisa": lisa, "step": half})
    print(f"saved {checkpoint} at step {half}; blocks trained so far: {[s.active_layers for s in lisa.history]}")

    # a fresh start from the checkpoint, as after a restart
    lisa = LISA(**options)
    fabric, model, optimizer = setup(lisa)
    state = {"model": model, "optimizer": optimizer, "lisa": lisa}
    step = lisa.load(fabric, checkpoint, state)["step"]
    train(fabric, model, optimizer, batches, step, args.steps, accumulate)
    resumed = {n: p.detach().clone() for n, p in model.named_parameters()}
    print(f"resumed at step {step}, trained to step {args.steps}: held-out loss {evaluate(model, held_out):.3f}")
    print(f"schedule: {[(s.step, s.active_layers) for s in lisa.history]}")

    # the same run without interruption
    reference_lisa = LISA(**options)
    fabric, model, optimizer = setup(reference_lisa)
    train(fabric, model, optimizer, batches, 0, args.steps, accumulate)
    same = all(torch.equal(resumed[n], p) for n, p in model.named_parameters())
    same_schedule = [s.active_layers for s in reference_lisa.history] == [s.active_layers for s in lisa.history]
    print(f"uninterrupted run: same schedule {same_schedule}, same weights {same}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    if not (same and same_schedule):
        raise SystemExit("the resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
