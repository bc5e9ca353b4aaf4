"""Run by tests/test_fabric_dist.py: LISA in Fabric loops under DDP or FSDP2, 2 CPU processes over gloo.

Usage: ``python fabric_dist_run.py OUT ddp|fsdp2``. Each rank writes ``OUT/<strategy>-rank<r>.json``:

* ``train``: ``Fabric(callbacks=[LISA(...)])``, 6 optimizer steps of 2 micro-batches (accumulated under
  ``fabric.no_backward_sync``): the schedule, what changed at each step, the gradient elements DDP's hook
  all-reduced, a digest of the weights;
* ``resume``: ``lisa.attach`` on ``fabric.setup_module`` + ``setup_optimizers``; an uninterrupted run of 8
  steps against 4 steps + ``lisa.save`` + a new model, optimizer and LISA + ``lisa.load`` + 4 steps (under
  FSDP2 a distributed checkpoint: the sharded load sequence).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

from lightning_lisa import LISA, fully_shard_blocks
from lightning_lisa.testing import CausalLM, end_process_group, token_loader
from lightning_lisa.testing.fabric_loop import fabric_fit

OPTIONS: dict[str, Any] = {"n_layers": 2, "interval": 3, "seed": 9}


def shard(module: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """Fabric's ``parallelize_fn``: one FSDP2 unit per block, then the root."""
    fully_shard_blocks(module.model, mesh=mesh["data_parallel"])
    return module


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()).clone() for n, p in module.named_parameters()}


def main(out: Path, kind: str) -> None:
    warnings.filterwarnings("ignore")
    if kind == "ddp":
        strategy: Any = DDPStrategy(find_unused_parameters=True)
    else:
        strategy = ModelParallelStrategy(parallelize_fn=shard, data_parallel_size=2, tensor_parallel_size=1)
    lisa = LISA(**OPTIONS, verify_ranks=True)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, callbacks=[lisa])
    fabric.launch()
    rank = fabric.global_rank
    data = list(token_loader(n_batches=16, seed=rank))  # each rank its own batches

    # --- train, through Fabric's callbacks
    module = CausalLM()
    model = fabric.setup(module)
    optimizer = fabric.setup_optimizers(module.configure_optimizers())
    before = {n: local(p.detach()).clone() for n, p in module.named_parameters()}
    steps: list[dict[str, Any]] = []
    seen = [0]

    def record(step: int) -> None:
        params = dict(module.named_parameters())
        stats = lisa.communication
        reduced = stats.reduced_elements - seen[0] if stats is not None else -1
        seen[0] = stats.reduced_elements if stats is not None else 0
        steps.append(
            {
                "active": list(lisa.active_layers),
                "changed": sorted(n for n, p in params.items() if not torch.equal(local(p.detach()), before[n])),
                "with_state": sorted(n for n, p in params.items() if optimizer.state.get(p)),
                "reduced": reduced,
                "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
            }
        )
        before.update({n: local(p.detach()).clone() for n, p in params.items()})

    fabric_fit(fabric, model, optimizer, data, 6, accumulate=2, after_step=record)
    trained = weights(module)
    lisa.detach()
    result: dict[str, Any] = {
        "history": [[s.step, *s.active_layers] for s in lisa.history],
        "steps": steps,
        "hook_installed": lisa.communication is not None,
        "digest": {n: w.double().sum().item() for n, w in trained.items()},
        "all_trainable_after_detach": all(p.requires_grad for p in module.parameters()),
    }

    # --- resume, through lisa.attach
    def run(until: int, save: Path | None = None, load: Path | None = None) -> tuple[LISA, dict[str, torch.Tensor]]:
        run_lisa = LISA(**OPTIONS)
        run_module = CausalLM()
        run_model = fabric.setup_module(run_module)
        run_optimizer = fabric.setup_optimizers(run_module.configure_optimizers())
        run_lisa.attach(run_model, run_optimizer, fabric)
        state = {"model": run_model, "optimizer": run_optimizer, "lisa": run_lisa}
        start = 0
        if load is not None:
            run_lisa.load(fabric, load, state)
            start = run_lisa._step
        fabric_fit(fabric, run_model, run_optimizer, data, until, accumulate=2, start_step=start)
        if save is not None:
            run_lisa.save(fabric, save, state)
        final = weights(run_module)
        run_lisa.detach()
        return run_lisa, final

    checkpoint = out / ("fabric-ddp.ckpt" if kind == "ddp" else "fabric-fsdp2")
    reference_lisa, reference = run(8)
    run(4, save=checkpoint)
    resumed_lisa, resumed = run(8, load=checkpoint)
    result["resume"] = {
        "reference_history": [[s.step, *s.active_layers] for s in reference_lisa.history],
        "resumed_history": [[s.step, *s.active_layers] for s in resumed_lisa.history],
        "identical": all(torch.equal(resumed[n], w) for n, w in reference.items()),
        "max_abs_diff": max((resumed[n] - w).abs().max().item() for n, w in reference.items()),
        "sharded_checkpoint": checkpoint.is_dir(),
    }
    if kind == "fsdp2":  # the same checkpoint through a plain `fabric.load`: what `lisa.load` is for
        plain_lisa = LISA(**OPTIONS)
        plain_module = CausalLM()
        plain_model = fabric.setup_module(plain_module)
        plain_optimizer = fabric.setup_optimizers(plain_module.configure_optimizers())
        plain_lisa.attach(plain_model, plain_optimizer, fabric)
        try:
            fabric.load(checkpoint, {"model": plain_model, "optimizer": plain_optimizer, "lisa": plain_lisa})
            result["plain_load"] = "loaded"
        except BaseException as error:  # torch's CheckpointException is a BaseException
            result["plain_load"] = f"{type(error).__name__}: {error}"[:2000]
    (out / f"{kind}-rank{rank}.json").write_text(json.dumps(result))
    end_process_group()  # not left to interpreter finalization, where gloo may abort the process


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
