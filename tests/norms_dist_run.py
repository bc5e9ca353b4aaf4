"""Run by tests/test_norms.py: per-layer norms over 2 CPU processes (gloo), replicated and FSDP2-sharded.

Usage: ``python norms_dist_run.py OUT_DIR PORT``.

Each rank writes what it measured next to the single-process reference of the same model.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from lightning_lisa.norms import NormAccumulator, layer_norms, monitored_layers, partial_norms
from lightning_lisa.testing import end_process_group

NORMS = ("l2", "l1", "linf")
ORDERS = {"l2": 2.0, "l1": 1.0, "linf": float("inf")}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.proj(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def direct(tensors: list[torch.Tensor], norm: str) -> float:
    flat = torch.cat([t.detach().flatten().double() for t in tensors])
    return float(torch.linalg.vector_norm(flat, ORDERS[norm]))


def worker(rank: int, out: Path, port: str) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same model on both ranks
    model = Net()
    with torch.no_grad():  # LayerNorm weights start at 1: make them distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    layers = monitored_layers(model)
    names = [n for n, _ in layers]
    result: dict[str, object] = {"names": names}

    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    model(ids).square().mean().backward()
    result["reference"] = {norm: {n: direct(list(m.parameters()), norm) for n, m in layers} for norm in NORMS}
    result["reference_grad"] = {
        norm: {n: direct([p.grad for p in m.parameters()], norm) for n, m in layers} for norm in NORMS
    }
    # DDP-like: every rank holds the full weights; counted once, not world-size times
    result["replicated"] = {norm: layer_norms(layers, norm) for norm in NORMS}
    result["replicated_as_sharded"] = layer_norms(layers, "l2", plain="sharded")

    # DTensors by hand: sharded on dim 0, and replicated over the mesh
    mesh = init_device_mesh("cpu", (2,))
    weight = model.head.weight.detach()
    shards = {
        "shard": distribute_tensor(weight, mesh, [Shard(0)]),
        "replicate": distribute_tensor(weight, mesh, [Replicate()]),
    }
    result["dtensor"] = {
        kind: layer_norms({"head": nn.ParameterList([nn.Parameter(t)])}, "l2")["head"] for kind, t in shards.items()
    }
    result["dtensor_local_numel"] = shards["shard"].to_local().numel()

    # FSDP2: one unit per block, the root over the rest
    sharded = copy.deepcopy(model)
    sharded.zero_grad(set_to_none=True)
    for block in sharded.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded_layers = monitored_layers(sharded)
    result["fsdp_is_dtensor"] = all(hasattr(p, "to_local") for p in sharded.parameters())
    result["fsdp"] = {norm: layer_norms(sharded_layers, norm) for norm in NORMS}
    sharded(ids).square().mean().backward()  # the same batch on both ranks: averaged gradients equal the reference
    groups = [[p.grad for p in m.parameters()] for _, m in sharded_layers]
    result["fsdp_grad"] = {}
    for norm in NORMS:
        accumulator = NormAccumulator(len(groups), norm)
        accumulator.update(partial_norms(groups, norm))
        result["fsdp_grad"][norm] = dict(zip(names, accumulator.compute().tolist(), strict=True))

    (out / f"rank{rank}.json").write_text(json.dumps(result))
    end_process_group()  # every rank wrote its file before the group goes


if __name__ == "__main__":
    # fork after the imports: the two ranks share them instead of paying for them twice
    mp.start_processes(worker, args=(Path(sys.argv[1]), sys.argv[2]), nprocs=2, start_method="fork")
