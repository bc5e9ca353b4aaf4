"""Per-layer norms: equal to a direct norm of each layer's parameters, exact over shards and replicas."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_lisa import find_layers
from lightning_lisa.norms import (
    NormAccumulator,
    NormRecord,
    layer_norms,
    local_part,
    monitored_layers,
    partial_norm,
    partial_norms,
)
from lightning_lisa.testing import free_port, run_script, tiny_llama

HERE = Path(__file__).resolve().parent
ORDERS = {"l2": 2.0, "l1": 1.0, "linf": math.inf}
LLAMA_LAYERS = [
    "model.embed_tokens",
    *(f"model.layers.{i}" for i in range(6)),
    "model.norm",
    "lm_head",
]


def direct_norm(module: nn.Module, norm: str) -> float:
    unique = {id(p): p for p in module.parameters()}.values()
    flat = torch.cat([p.detach().flatten().double() for p in unique])
    return float(torch.linalg.vector_norm(flat, ORDERS[norm]))


@pytest.mark.parametrize("norm", ["l2", "l1", "linf"])
@pytest.mark.parametrize("tie", [False, True])
def test_layer_norms_equal_a_direct_norm_over_each_layers_parameters(norm, tie):
    model = tiny_llama(tie=tie)
    layers = monitored_layers(model)
    assert [name for name, _ in layers] == LLAMA_LAYERS
    norms = layer_norms(layers, norm)
    assert list(norms) == LLAMA_LAYERS
    for name, module in layers:
        assert norms[name] == pytest.approx(direct_norm(module, norm), rel=1e-6), name
    if tie:  # the tied head reports the embedding's weight, under its own name
        assert norms["lm_head"] == norms["model.embed_tokens"]
    else:
        assert norms["lm_head"] != norms["model.embed_tokens"]


def test_a_parameter_shared_inside_a_layer_counts_once():
    inner = nn.Linear(4, 4, bias=False)
    layer = nn.Sequential(inner, nn.ReLU(), inner)
    expected = float(torch.linalg.vector_norm(inner.weight.detach()))
    assert layer_norms({"layer": layer})["layer"] == pytest.approx(expected, rel=1e-6)


def test_fake_two_shard_split_sums_of_squares_give_the_full_norm():
    """Each "rank" holds one half of every parameter; the all-reduce is a plain sum (max for linf)."""
    model = tiny_llama(num_layers=2)
    layers = monitored_layers(model)
    for norm in ("l2", "l1", "linf"):
        per_rank = []
        for rank in range(2):
            groups = [[p.detach().flatten().chunk(2)[rank] for p in m.parameters()] for _, m in layers]
            per_rank.append(partial_norms(groups, norm, plain="sharded"))
        accumulator = NormAccumulator(len(layers), norm)
        for partials in per_rank:  # what the all-reduce does across ranks
            accumulator.update(partials)
        combined = accumulator.compute().tolist()
        for (name, module), value in zip(layers, combined, strict=True):
            assert value == pytest.approx(direct_norm(module, norm), rel=1e-6), (norm, name)
    # l2 state is the sum of squares: two halves of [3, 4] hold 9 and 16
    halves = torch.tensor([3.0, 4.0]).chunk(2)
    assert [partial_norm([h]).item() for h in halves] == [9.0, 16.0]


def test_replicated_plain_tensors_are_counted_on_rank_zero_only():
    weight = torch.full((2, 2), 3.0)
    assert local_part(weight, "replicated", rank=0) is weight
    assert local_part(weight, "replicated", rank=1) is None
    assert local_part(weight, "sharded", rank=1) is weight
    # two DDP ranks: rank 0 counts 36, rank 1 counts 0; the reduced total is the norm, not sqrt(2) times it
    partials = [partial_norms([[weight]], "l2") if r == 0 else partial_norms([[]], "l2") for r in range(2)]
    accumulator = NormAccumulator(1)
    for p in partials:
        accumulator.update(p)
    assert accumulator.compute().item() == pytest.approx(6.0)


class FakePlacement:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def is_replicate(self) -> bool:
        return self.kind == "replicate"

    def is_shard(self) -> bool:
        return self.kind == "shard"

    def is_partial(self) -> bool:
        return self.kind == "partial"


class FakeDTensor:
    """What local_part reads of a DTensor: to_local, placements and the rank's mesh coordinate."""

    def __init__(self, local: torch.Tensor, placements: list[str], coordinate: list[int] | None) -> None:
        self.local = local
        self.placements = [FakePlacement(p) for p in placements]
        self.device_mesh = SimpleNamespace(get_coordinate=lambda: coordinate)

    def to_local(self) -> torch.Tensor:
        return self.local


def test_dtensor_local_shards_count_once_per_replica_group():
    shard = torch.ones(3)
    # HSDP on a (replicate=2, shard=2) mesh: the first replica counts its shard, the second does not
    assert local_part(FakeDTensor(shard, ["replicate", "shard"], [0, 1]), rank=3) is shard
    assert local_part(FakeDTensor(shard, ["replicate", "shard"], [1, 1]), rank=3) is None
    # FSDP2: every rank counts its shard, whatever its global rank
    assert local_part(FakeDTensor(shard, ["shard"], [1]), rank=1) is shard
    assert local_part(FakeDTensor(shard, ["shard"], None), rank=5) is None  # not in the mesh
    with pytest.raises(ValueError, match="partial"):
        local_part(FakeDTensor(shard, ["partial"], [0]))


def test_two_gloo_ranks_replicated_dtensor_and_fsdp2_equal_the_single_process_norms(tmp_path: Path):
    result = run_script(HERE / "norms_dist_run.py", tmp_path, str(free_port()), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert zero == one  # every rank gets the same values
    assert zero["names"] == ["embed", "layers.0", "layers.1", "layers.2", "norm", "head"]
    assert zero["fsdp_is_dtensor"]
    assert zero["dtensor_local_numel"] == 40  # half of the 10 x 8 head weight: really sharded
    head = zero["reference"]["l2"]["head"]
    assert zero["dtensor"] == pytest.approx({"shard": head, "replicate": head}, rel=1e-6)
    # counting replicated weights on every rank would inflate the norm by sqrt(world size)
    assert zero["replicated_as_sharded"]["head"] == pytest.approx(math.sqrt(2) * head, rel=1e-6)
    for norm in ("l2", "l1", "linf"):
        assert zero["replicated"][norm] == pytest.approx(zero["reference"][norm], rel=1e-6), norm
        assert zero["fsdp"][norm] == pytest.approx(zero["reference"][norm], rel=1e-6), norm
        assert zero["fsdp_grad"][norm] == pytest.approx(zero["reference_grad"][norm], rel=1e-5), norm


def test_final_norm_is_the_norm_right_after_the_blocks():
    model = tiny_llama(num_layers=2)
    assert find_layers(model).final_norm_names == ("model.norm",)

    class Plain(nn.Module):
        def __init__(self, final: bool) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.embed_norm = nn.LayerNorm(4)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(3))
            self.dropout = nn.Dropout()
            if final:
                self.final = nn.RMSNorm(4)
            self.head = nn.Linear(4, 5)

    with_final = Plain(final=True)
    assert [n for n, _ in monitored_layers(with_final)] == [
        "embed",
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "final",
        "head",
    ]
    # the norm before the blocks belongs to the embeddings: no final norm here
    assert find_layers(Plain(final=False)).final_norm_names == ()


def test_bad_arguments_raise_naming_the_argument():
    with pytest.raises(MisconfigurationException, match=r"`norm='l3'`.*\['l2', 'l1', 'linf'\]"):
        layer_norms({"a": nn.Linear(2, 2)}, "l3")
    with pytest.raises(MisconfigurationException, match=r"`plain='both'`"):
        layer_norms({"a": nn.Linear(2, 2)}, plain="both")
    with pytest.raises(MisconfigurationException, match="`norm='max'`"):
        NormAccumulator(2, "max")


def test_records_give_values_by_kind():
    row = NormRecord(5, weight={"a": 1.0}, grad={"a": 0.5})
    assert row.values("weight") == {"a": 1.0}
    assert row.values("change") == {}
    assert row.values("grad") == {"a": 0.5}
    with pytest.raises(ValueError, match="kind"):
        row.values("bias")
