"""FSDP1 (``FSDPStrategy``): what can be checked without an accelerator.

FSDP1 itself needs CUDA; the training, freeing and resume checks under it are in
``benchmarks/gpu/fsdp1_check.py`` (run on a GPU, figures in docs/guides/multi-gpu.md).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

from lightning_lisa import LISA, lisa_auto_wrap_policy
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.layers import find_layers, split_units
from lightning_lisa.parameters import ParameterSet
from lightning_lisa.strategies import adapter_for
from lightning_lisa.strategies.fsdp1 import LISAFSDPStrategy, blocks_without_own_unit
from lightning_lisa.testing import tiny_llama


def classes(policy: object) -> set[type[nn.Module]]:
    assert isinstance(policy, ModuleWrapPolicy)
    return set(policy._module_classes)


def test_auto_wrap_policy_has_one_unit_per_block_or_module():
    model = tiny_llama(3)
    assert classes(lisa_auto_wrap_policy(model)) == {LlamaDecoderLayer}
    assert classes(lisa_auto_wrap_policy(model, granularity="module")) == {LlamaAttention, LlamaMLP}
    with pytest.raises(ValueError, match="granularity='layer'"):
        lisa_auto_wrap_policy(model, granularity="layer")


class _Trainer:
    """What ``LISAFSDPStrategy.setup`` reads of a Trainer: its callbacks."""

    def __init__(self, units) -> None:
        self.callbacks = [type("LISA", (), {"units": units})()]


def _setup_policy(strategy: LISAFSDPStrategy, units, monkeypatch) -> None:
    """Run ``LISAFSDPStrategy.setup`` up to the point where ``FSDPStrategy.setup`` would wrap the model."""
    monkeypatch.setattr(FSDPStrategy, "setup", lambda self, trainer: None)
    strategy.setup(_Trainer(units))


def test_lisa_strategy_sets_one_unit_per_block_when_it_has_no_policy(caplog, monkeypatch):
    units = split_units(find_layers(tiny_llama(3)), "block")
    strategy = LISAFSDPStrategy()
    with caplog.at_level(logging.INFO):
        _setup_policy(strategy, units, monkeypatch)
    assert classes(strategy.kwargs["auto_wrap_policy"]) == {LlamaDecoderLayer}
    assert "one FSDP unit per sampled unit" in caplog.text


def test_lisa_strategy_keeps_the_users_policy(monkeypatch):
    units = split_units(find_layers(tiny_llama(3)), "block")
    strategy = LISAFSDPStrategy(auto_wrap_policy={LlamaMLP})
    _setup_policy(strategy, units, monkeypatch)
    assert classes(strategy.kwargs["auto_wrap_policy"]) == {LlamaMLP}


def test_plain_fsdp_strategy_is_refused_with_the_fix():
    # A plain FSDPStrategy cannot save LISA's partial optimizer state after fit; LISA names the subclass.
    units = split_units(find_layers(tiny_llama(3)), "block")
    with pytest.raises(LISAConfigError, match=r"needs `strategy=lightning_lisa.LISAFSDPStrategy\(...\)`"):
        adapter_for(FSDPStrategy()).check(units, "block")


def test_model_built_in_configure_model_gets_a_warning():
    strategy = LISAFSDPStrategy()
    with pytest.warns(UserWarning, match="no `auto_wrap_policy`"):
        adapter_for(strategy).check(None, "block")
    assert strategy.kwargs.get("auto_wrap_policy") is None


def test_setup_with_fsdp_strategy_prepares_it():
    # LISA.setup runs before the strategy wraps anything; it must not need an accelerator
    from lightning_lisa.testing import CausalLM

    lisa = LISA(n_layers=1)

    class Trainer:
        pass

    trainer = Trainer()
    trainer.strategy = LISAFSDPStrategy()  # type: ignore[attr-defined]
    lisa.setup(trainer, CausalLM(num_layers=3), "fit")  # type: ignore[arg-type]
    assert len(lisa.units) == 3
    trainer.strategy = FSDPStrategy()  # type: ignore[attr-defined]
    with pytest.raises(LISAConfigError, match="LISAFSDPStrategy"):
        lisa.setup(trainer, CausalLM(num_layers=3), "fit")  # type: ignore[arg-type]


def test_saving_freezes_parameters_without_state_meanwhile(monkeypatch):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model[0](torch.ones(1, 2)).sum().backward()
    optimizer.step()  # state for model[0] only
    seen: list[list[bool]] = []

    def original(self, opt: torch.optim.Optimizer) -> dict[str, object]:
        seen.append([p.requires_grad for p in model.parameters()])
        return {"ok": True}

    monkeypatch.setattr(FSDPStrategy, "optimizer_state", original)
    assert LISAFSDPStrategy().optimizer_state(optimizer) == {"ok": True}
    assert seen == [[True, True, False, False]]
    assert all(p.requires_grad for p in model.parameters())


def test_blocks_without_own_unit_is_empty_without_fsdp():
    model = tiny_llama(2)
    assert blocks_without_own_unit(model, split_units(find_layers(model), "block")) == []


def test_weight_norm_sampling_sums_fsdp1_slices_across_ranks(monkeypatch):
    # under FSDP1 each rank holds a plain slice of each parameter: the norms must add every rank's squares
    from lightning.pytorch.strategies import SingleDeviceStrategy

    import lightning_lisa.engine as engine
    from lightning_lisa.engine import LoopView

    single = SingleDeviceStrategy(device=torch.device("cpu"))
    assert adapter_for(FSDPStrategy()).plain_tensors == "sharded"
    assert adapter_for(single).plain_tensors == "replicated"
    module = CausalLMForNorms()
    lisa = LISA(n_layers=1, sampling="weight_norm")
    lisa.setup(FakeTrainer(single), module, "fit")  # type: ignore[arg-type]
    lisa._params = ParameterSet(module, lisa.units, [])
    expected = [float(torch.cat([p.detach().flatten() for p in u.modules[0].parameters()]).norm()) for u in lisa.units]
    layouts: list[str] = []
    seen: list[list[float]] = []
    original = engine.layer_norms

    def spy(named, plain="replicated", **kwargs):  # type: ignore[no-untyped-def]
        layouts.append(plain)
        values = original(named, plain=plain, **kwargs)
        seen.append(list(values.values()))
        return values

    monkeypatch.setattr(engine, "layer_norms", spy)
    lisa._draw(LoopView(0, [], adapter_for(FSDPStrategy())), 0)
    lisa._draw(LoopView(0, [], adapter_for(single)), 0)
    assert layouts == ["sharded", "replicated"]
    assert seen[0] == pytest.approx(expected, rel=1e-6)  # one process: its slice is the whole tensor
    assert seen[1] == pytest.approx(expected, rel=1e-6)


class FakeTrainer:
    def __init__(self, strategy) -> None:
        self.strategy = strategy


def CausalLMForNorms():  # noqa: N802 - a factory named like the class it returns
    from lightning_lisa.testing import CausalLM

    return CausalLM(num_layers=3)


class _Killed(BaseException):
    """Stands for the process dying in the middle of a write."""


def _kill(*args: object, **kwargs: object) -> None:
    raise _Killed


@pytest.mark.parametrize("cls", [LISAFSDPStrategy, FSDPStrategy])
def test_a_full_checkpoint_killed_while_written_leaves_the_previous_one(tmp_path: Path, monkeypatch, cls):
    """One process, no process group (FSDP1's own save paths need none): rank 0 writes the file."""
    target = tmp_path / "last.ckpt"
    strategy = cls()
    strategy.save_checkpoint({"step": 1}, target)

    def half_written(checkpoint: dict, path: Path, storage_options: object = None) -> None:
        Path(path).write_bytes(b"\x80\x02 half a pickle")
        raise _Killed

    monkeypatch.setattr(strategy.checkpoint_io, "save_checkpoint", half_written)
    with pytest.raises(_Killed):
        strategy.save_checkpoint({"step": 2}, target)
    if cls is FSDPStrategy:  # the behaviour LISAFSDPStrategy fixes: the previous checkpoint is gone
        with pytest.raises(pickle.UnpicklingError):
            torch.load(target, weights_only=False)
        return
    assert torch.load(target, weights_only=False) == {"step": 1}
    monkeypatch.undo()
    strategy.save_checkpoint({"step": 3}, target)
    assert torch.load(target, weights_only=False) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial write is gone


def test_a_sharded_checkpoint_killed_after_its_shards_leaves_the_previous_one(tmp_path: Path, monkeypatch):
    """The shards of step 2 are written, its metadata never: last.ckpt still holds step 1 whole."""
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    from lightning_lisa.strategies.checkpoints import partial_path

    target = tmp_path / "last.ckpt"
    strategy = LISAFSDPStrategy(state_dict_type="sharded")

    def checkpoint(step: int) -> dict:
        return {"step": step, "state_dict": {"w": torch.full((4,), float(step))}, "optimizer_states": []}

    strategy.save_checkpoint(checkpoint(1), target)
    write_shards = lightning_fsdp._distributed_checkpoint_save

    def shards_then_killed(state: dict, path: Path) -> None:
        write_shards(state, path)
        raise _Killed

    monkeypatch.setattr(lightning_fsdp, "_distributed_checkpoint_save", shards_then_killed)
    with pytest.raises(_Killed):
        strategy.save_checkpoint(checkpoint(2), target)
    assert (partial_path(target) / ".metadata").exists()  # step 2's shards, set apart
    assert torch.load(target / "meta.pt", weights_only=False) == {"step": 1}
    loaded = {"model": {"w": torch.zeros(4)}}
    torch.distributed.checkpoint.load(loaded, checkpoint_id=target)
    assert torch.equal(loaded["model"]["w"], torch.full((4,), 1.0))  # the shards of the same step
    monkeypatch.undo()
    strategy.save_checkpoint(checkpoint(3), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(target / "meta.pt", weights_only=False) == {"step": 3}
