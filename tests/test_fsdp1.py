"""FSDP1 (``FSDPStrategy``): what can be checked without an accelerator.

FSDP1 itself needs CUDA; the training, freeing and resume checks under it are in
``benchmarks/gpu/fsdp1_check.py`` (run on a GPU, figures in docs/guides/multi-gpu.md).
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_llama
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

from lightning_lisa import LISA, lisa_auto_wrap_policy
from lightning_lisa.layers import find_layers, split_units
from lightning_lisa.strategies.checks import check_strategy
from lightning_lisa.strategies.fsdp1 import blocks_without_own_unit, save_partial_optimizer_state


def classes(policy: object) -> set[type[nn.Module]]:
    assert isinstance(policy, ModuleWrapPolicy)
    return set(policy._module_classes)


def test_auto_wrap_policy_has_one_unit_per_block_or_module():
    model = tiny_llama(3)
    assert classes(lisa_auto_wrap_policy(model)) == {LlamaDecoderLayer}
    assert classes(lisa_auto_wrap_policy(model, granularity="module")) == {LlamaAttention, LlamaMLP}
    with pytest.raises(ValueError, match="granularity='layer'"):
        lisa_auto_wrap_policy(model, granularity="layer")


def test_lisa_sets_the_policy_when_the_strategy_has_none(caplog):
    units = split_units(find_layers(tiny_llama(3)), "block")
    strategy = FSDPStrategy()
    with caplog.at_level(logging.INFO):
        check_strategy(strategy, units, "block")
    assert classes(strategy.kwargs["auto_wrap_policy"]) == {LlamaDecoderLayer}
    assert "auto_wrap_policy" in caplog.text


def test_lisa_keeps_the_users_policy():
    units = split_units(find_layers(tiny_llama(3)), "block")
    strategy = FSDPStrategy(auto_wrap_policy={LlamaMLP})
    check_strategy(strategy, units, "block")
    assert classes(strategy.kwargs["auto_wrap_policy"]) == {LlamaMLP}


def test_model_built_in_configure_model_gets_a_warning():
    strategy = FSDPStrategy()
    with pytest.warns(UserWarning, match="no `auto_wrap_policy`"):
        check_strategy(strategy, None, "block")
    assert strategy.kwargs.get("auto_wrap_policy") is None


def test_setup_with_fsdp_strategy_prepares_it():
    # LISA.setup runs before the strategy wraps anything; it must not need an accelerator
    from helpers import CausalLM

    lisa = LISA(n_layers=1)
    strategy = FSDPStrategy()

    class Trainer:
        pass

    trainer = Trainer()
    trainer.strategy = strategy  # type: ignore[attr-defined]
    lisa.setup(trainer, CausalLM(num_layers=3), "fit")  # type: ignore[arg-type]
    assert classes(strategy.kwargs["auto_wrap_policy"]) == {LlamaDecoderLayer}


def test_saving_freezes_parameters_without_state_meanwhile():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model[0](torch.ones(1, 2)).sum().backward()
    optimizer.step()  # state for model[0] only
    strategy = FSDPStrategy()
    seen: list[list[bool]] = []

    def original(opt: torch.optim.Optimizer) -> dict[str, object]:
        seen.append([p.requires_grad for p in model.parameters()])
        return {"ok": True}

    strategy.optimizer_state = original  # type: ignore[method-assign]
    save_partial_optimizer_state(strategy)
    save_partial_optimizer_state(strategy)  # applied once
    assert strategy.optimizer_state(optimizer) == {"ok": True}
    assert seen == [[True, True, False, False]]
    assert all(p.requires_grad for p in model.parameters())


def test_blocks_without_own_unit_is_empty_without_fsdp():
    model = tiny_llama(2)
    assert blocks_without_own_unit(model, split_units(find_layers(model), "block")) == []


def test_weight_norm_sampling_sums_fsdp1_slices_across_ranks(monkeypatch):
    # under FSDP1 each rank holds a plain slice of each parameter: the norms must add every rank's squares
    from lightning.pytorch.strategies import SingleDeviceStrategy

    import lightning_lisa.callback as callback

    units = split_units(find_layers(tiny_llama(3)), "block")
    expected = [float(torch.cat([p.detach().flatten() for p in u.modules[0].parameters()]).norm()) for u in units]
    single = SingleDeviceStrategy(device=torch.device("cpu"))
    assert callback._unit_norms(units, single) == pytest.approx(expected, rel=1e-6)
    assert callback._unit_norms(units, FSDPStrategy()) == pytest.approx(expected, rel=1e-6)  # one process
    layouts: list[str] = []
    original = callback.layer_norms

    def spy(named, plain="replicated", **kwargs):  # type: ignore[no-untyped-def]
        layouts.append(plain)
        return original(named, plain=plain, **kwargs)

    monkeypatch.setattr(callback, "layer_norms", spy)
    callback._unit_norms(units, FSDPStrategy())
    callback._unit_norms(units, single)
    assert layouts == ["sharded", "replicated"]
