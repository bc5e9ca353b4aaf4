"""OptimizerStateHandler on real optimizers: what is freed, kept, re-created."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lisa import OptimizerStateHandler, optimizer_state_bytes
from lightning_lisa.optimizer_state import is_paged


def model_and_step(make_optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)])
    optimizer = make_optimizer(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    return model, optimizer


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
}


def adamw8bit(params):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=64)


@pytest.mark.parametrize("name", [*OPTIMIZERS, "adamw8bit"])
def test_drop_frees_state_and_it_is_recreated_lazily(name):
    make = adamw8bit if name == "adamw8bit" else OPTIMIZERS[name]
    model, optimizer = model_and_step(make)
    full = optimizer_state_bytes([optimizer])
    kept = sum(v.nbytes for v in optimizer.state[model[3].weight].values() if isinstance(v, torch.Tensor))
    assert full > kept > 0
    frozen = list(model[:3].parameters())
    for p in frozen:
        p.requires_grad_(False)
        p.grad = None
    OptimizerStateHandler("drop").release([optimizer], frozen)
    assert set(optimizer.state) == {model[3].weight}
    assert optimizer_state_bytes([optimizer]) == kept

    # the state_dict lists only what has state and loads back into a fresh optimizer
    fresh = make(model.parameters())
    fresh.load_state_dict(optimizer.state_dict())
    assert optimizer_state_bytes([fresh]) == optimizer_state_bytes([optimizer])

    # unfrozen again, the next step re-creates the state (from scratch)
    for p in frozen:
        p.requires_grad_(True)
    optimizer.zero_grad()
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    assert optimizer_state_bytes([optimizer]) == full


def test_keep_leaves_state():
    model, optimizer = model_and_step(OPTIMIZERS["adamw"])
    before = optimizer_state_bytes([optimizer])
    OptimizerStateHandler("keep").release([optimizer], model.parameters())
    assert optimizer_state_bytes([optimizer]) == before


def test_offload_keeps_values_on_cpu_and_restores_them():
    model, optimizer = model_and_step(OPTIMIZERS["adamw"])
    p = model[0].weight
    saved = {k: v.clone() for k, v in optimizer.state[p].items()}
    handler = OptimizerStateHandler("offload")
    handler.release([optimizer], [p])
    assert all(v.device.type == "cpu" for v in optimizer.state[p].values())
    handler.restore([optimizer], [p])
    for key, value in saved.items():
        assert torch.equal(optimizer.state[p][key], value)
        assert optimizer.state[p][key].device == value.device


def test_bytes_by_device_and_tensors_counted_once():
    _, optimizer = model_and_step(OPTIMIZERS["adamw"])
    total = optimizer_state_bytes([optimizer])
    assert total == 4 * (2 * 64 * 64 * 4 + 4)
    assert optimizer_state_bytes([optimizer], device="cpu") == total
    assert optimizer_state_bytes([optimizer], device="meta") == 0
    assert optimizer_state_bytes([optimizer, optimizer]) == total


class PagedAdamW(torch.optim.AdamW):
    is_paged = True


def test_paged_optimizers_keep_their_state_and_warn():
    model, optimizer = model_and_step(lambda p: PagedAdamW(p, lr=1e-3))
    assert is_paged(optimizer)
    before = optimizer_state_bytes([optimizer])
    handler = OptimizerStateHandler("drop")
    with pytest.warns(UserWarning, match="paged optimizer, whose buffers are never released"):
        handler.release([optimizer], model.parameters())
    assert optimizer_state_bytes([optimizer]) == before
    handler.release([optimizer], model.parameters())  # warns once only


def test_bitsandbytes_paged_optimizer_is_detected():
    bnb = pytest.importorskip("bitsandbytes")
    layer = nn.Linear(4, 4)
    assert is_paged(bnb.optim.PagedAdamW8bit(layer.parameters()))
    assert not is_paged(bnb.optim.AdamW8bit(layer.parameters()))


def test_unknown_mode():
    with pytest.raises(ValueError, match="`optimizer_state='free'` is not one of"):
        OptimizerStateHandler("free")  # type: ignore[arg-type]


def test_offload_with_prefetch_restores_exactly_the_state_it_moved():
    model, optimizer = model_and_step(OPTIMIZERS["adamw"])
    params = list(model[:2].parameters())
    saved = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    handler = OptimizerStateHandler("offload")
    handler.release([optimizer], params)
    host = {p: optimizer.state[p]["exp_avg"] for p in params}
    assert all(host[p].data_ptr() != saved[p]["exp_avg"].data_ptr() for p in params)  # really moved (copied)
    started = handler.prefetch([optimizer], params)
    assert started == sum(v.numel() * v.element_size() for p in params for v in saved[p].values())
    assert handler.prefetch([optimizer], params) == 0  # already in flight: nothing copied twice
    handler.restore([optimizer], params)
    assert (handler.prefetch_hits, handler.prefetch_misses) == (3 * len(params), 0)
    for p in params:
        assert optimizer.state[p]["exp_avg"] is not host[p]
        for key, value in saved[p].items():
            assert torch.equal(optimizer.state[p][key], value)
            assert optimizer.state[p][key].device == value.device

    # the next offload of the same parameters reuses their host buffers
    handler.release([optimizer], params)
    assert all(optimizer.state[p]["exp_avg"] is host[p] for p in params)


def test_prefetched_state_of_parameters_not_unfrozen_is_discarded():
    model, optimizer = model_and_step(OPTIMIZERS["adamw"])
    a, b = model[0].weight, model[1].weight
    handler = OptimizerStateHandler("offload")
    handler.release([optimizer], [a, b])
    handler.prefetch([optimizer], [a])  # the guess: a comes back
    handler.restore([optimizer], [b])  # but b does
    assert (handler.prefetch_hits, handler.prefetch_misses) == (0, 3)
    assert not handler._prefetched
    handler.restore([optimizer], [a])  # copied at the switch, still exact
    assert handler.prefetch_misses == 6


@pytest.mark.parametrize("sampling", ["uniform", "weight_norm"])
def test_lisa_prefetches_the_next_period_and_trains_as_with_keep(sampling):
    from lightning_lisa import LISA
    from lightning_lisa.testing import CausalLM, quiet_trainer, token_loader

    def run(mode: str) -> tuple[CausalLM, LISA]:
        lisa = LISA(n_layers=2, interval=2, optimizer_state=mode, sampling=sampling, seed=1)
        module = CausalLM(num_layers=6)
        quiet_trainer([lisa], max_steps=16).fit(module, token_loader(16))
        return module, lisa

    offloaded, lisa = run("offload")
    kept, _ = run("keep")
    for (name, a), b in zip(offloaded.named_parameters(), kept.parameters(), strict=True):
        assert torch.equal(a, b), name  # offloading (and prefetching) changes no value
    if sampling == "uniform":  # the schedule is known in advance: every block coming back was prefetched
        assert lisa._state.prefetch_hits > 0 and lisa._state.prefetch_misses == 0
    else:  # norms change until the switch: nothing is guessed
        assert lisa._state.prefetch_hits == 0 and lisa._state.prefetch_misses > 0


def test_offload_of_dtensor_state_restores_it(monkeypatch):
    # FSDP2 keeps DTensor state: it moves as a whole (no host buffer) and comes back at the switch
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    from lightning_lisa.testing import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = DeviceMesh("cpu", [0])
    p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    optimizer = torch.optim.AdamW([p], lr=0.1)
    p.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    optimizer.step()
    saved = {k: v.full_tensor().clone() for k, v in optimizer.state[p].items() if k != "step"}
    handler = OptimizerStateHandler("offload")
    handler.release([optimizer], [p])
    assert handler.prefetch([optimizer], [p]) == 4  # the step counter only
    handler.restore([optimizer], [p])
    for key, value in saved.items():
        assert torch.equal(optimizer.state[p][key].full_tensor(), value)
