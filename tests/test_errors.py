"""Bad input gets a clear error before any training step, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_lisa import LISA
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.strategies import adapter_for, check_supported
from lightning_lisa.testing import CausalLM, quiet_trainer, token_loader


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_layers": 0}, r"`n_layers=0` is not allowed; `n_layers` must be an integer >= 1"),
        ({"n_layers": 1.5}, r"`n_layers=1.5` is not allowed"),
        ({"n_layers": True}, r"`n_layers=True` is not allowed"),
        ({"interval": 0}, r"`interval=0` is not allowed; `interval` must be an integer >= 1"),
        ({"interval": -3}, r"`interval=-3`"),
        ({"seed": "1"}, r"`seed='1'` is not allowed; `seed` must be an integer"),
        ({"optimizer_state": "free"}, r"`optimizer_state='free'` is not one of \['drop', 'offload', 'keep'\]"),
        ({"sampling": "random"}, r"`sampling='random'` is not one of \['uniform', 'cyclic', 'weight_norm'\]"),
        ({"sampling": [0.5, "a"]}, r"`sampling=\[0.5, 'a'\]` is not allowed; give one of"),
        ({"sampling": [1.0, -1, 1]}, r"`sampling=\[1.0, -1, 1\]` is not allowed: .*non-negative.* \(got \[-1\]\)"),
        ({"sampling": [float("nan"), 1.0]}, r"needs finite, non-negative values.* \(got \[nan\]\)"),
        ({"sampling": [0.0, 0.0]}, r"at least one of them positive\.$"),
        ({"temperature": 0}, r"`temperature=0` is not allowed; it must be a number > 0"),
        ({"granularity": "layer"}, r"`granularity='layer'` is not one of \['block', 'module'\]"),
        ({"train_head": "no"}, r"`train_head='no'` is not allowed; it must be True or False"),
        (
            {"always_active": ["model.lm_head"], "train_final_norm": True},
            r"`always_active=\['model.lm_head'\]` and `train_final_norm=True` both choose",
        ),
        ({"always_active": "lm_head"}, r"`always_active='lm_head'` must be a list of names, e.g. .*\['lm_head'\]"),
        ({"always_active": [1]}, r"`always_active=\[1\]` is not allowed"),
        ({"layers": 3}, r"`layers=3` is not allowed; `layers` must be a dotted path"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        LISA(**kwargs)


def fit_fails(lisa: LISA, message: str, module: CausalLM | None = None, **trainer_kwargs) -> None:
    module = module or CausalLM()
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in module.named_parameters()}
    with pytest.raises(MisconfigurationException, match=message):
        quiet_trainer([lisa], max_steps=2, **trainer_kwargs).fit(module, token_loader(2))
    assert module.training_steps == 0
    for n, p in module.named_parameters():
        assert p.requires_grad == before[n][0], n
        assert torch.equal(p.detach(), before[n][1]), n


def test_n_layers_larger_than_the_blocks():
    fit_fails(LISA(n_layers=7), r"`n_layers=7` is larger than the 6 blocks of `model.model.layers`; allowed: 1 to 6")


def test_layers_path_that_does_not_exist_lists_candidates():
    fit_fails(LISA(layers="model.layers"), r"'model.layers' does not exist .*\['model.model.layers'\]")


def test_layers_path_that_is_not_a_module_list():
    fit_fails(LISA(layers="model.model.norm"), r"'model.model.norm' is a LlamaRMSNorm, not an nn.ModuleList")


def test_always_active_name_that_matches_nothing():
    fit_fails(
        LISA(always_active=["model.lm_heads"]),
        r"`always_active` names 'model.lm_heads', which is neither a module nor a parameter.*model.lm_head",
    )


def test_model_without_block_list():
    class Flat(CausalLM):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64))

    fit_fails(LISA(), r"LISA found no block list in Flat", module=Flat())


def test_not_enough_trainable_blocks():
    module = CausalLM()
    for block in module.model.model.layers[:5]:
        block.requires_grad_(False)
    fit_fails(
        LISA(n_layers=2),
        r"`n_layers=2`, but only 1 of the 6 blocks of `model.model.layers` has parameters to sample",
        module,
    )


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ([1.0] * 5, r"has 5 values, but there are 6 blocks"),
        ([0.0] * 5 + [1.0], r"has 1 positive value, fewer than n_layers=2"),
    ],
)
def test_bad_probabilities(sampling, message):
    fit_fails(LISA(sampling=sampling), message)


def test_tied_embeddings_cannot_train_on_one_side_only():
    from lightning_lisa.testing import tiny_llama

    fit_fails(LISA(train_embeddings=False), r"share \(tie\) their weights", module=CausalLM(model=tiny_llama(tie=True)))


def test_module_granularity_counts_modules():
    fit_fails(LISA(n_layers=13, granularity="module"), r"`n_layers=13` is larger than the 12 block modules")


def test_two_lisa_callbacks():
    # one LISA per Trainer: its state_key is fixed, and Lightning refuses duplicates at construction
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        quiet_trainer([LISA(), LISA()], max_steps=1)


class _WrappedDDP:
    """What the DDP adapter reads of a wrapped model (DistributedDataParallel's public attributes)."""

    def __init__(self, find_unused_parameters: bool, static_graph: bool) -> None:
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph


def _ddp_prepare(find_unused_parameters: bool, static_graph: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    adapter = adapter_for(DDPStrategy())
    model = _WrappedDDP(find_unused_parameters, static_graph)
    model.__class__ = type("DDP", (_WrappedDDP, DistributedDataParallel), {})
    adapter.strategy.model = model  # type: ignore[assignment]
    adapter.prepare(None, [])  # type: ignore[arg-type]


def test_ddp_static_graph_is_refused():
    with pytest.raises(LISAConfigError, match=r"static_graph=True.*ddp_find_unused_parameters_true"):
        _ddp_prepare(find_unused_parameters=True, static_graph=True)


def test_ddp_without_find_unused_parameters_is_refused_with_the_fix():
    # Lightning's public DDP settings cannot be changed after construction: LISA names the fix instead
    with pytest.raises(LISAConfigError, match=r"find_unused_parameters=True.*'ddp_find_unused_parameters_true'"):
        _ddp_prepare(find_unused_parameters=False, static_graph=False)
    _ddp_prepare(find_unused_parameters=True, static_graph=False)


def test_deepspeed_is_refused():
    # recognised by class name, so the optional back-end need not be installed
    strategy_cls = type("DeepSpeedStrategy", (SingleDeviceStrategy,), {})
    with pytest.raises(MisconfigurationException, match=r"LISA does not support `strategy=DeepSpeedStrategy`"):
        check_supported(strategy_cls(device=torch.device("cpu")))


def test_fsdp1_without_original_parameters_is_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(MisconfigurationException, match=r"use_orig_params=True.*got `use_orig_params=False`"):
        adapter_for(FSDPStrategy(use_orig_params=False)).check(None, "block")


def test_model_parallel_strategy_needs_the_lisa_subclass():
    # ModelParallelStrategy refuses checkpoints with optimizer state for the trained blocks only
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_lisa import LISAModelParallelStrategy

    adapter_for(LISAModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)).check(None, "block")
    with pytest.raises(LISAConfigError, match=r"needs `strategy=lightning_lisa.LISAModelParallelStrategy"):
        adapter_for(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)).check(None, "block")


def test_empty_layers_list():
    fit_fails(LISA(layers=[]), r"`layers` is an empty list; give at least one dotted path or None")


def test_final_norm_requested_where_there_is_none():
    class NoFinalNorm(CausalLM):
        def __init__(self) -> None:
            super().__init__()
            self.model.model.norm = torch.nn.Identity()

    fit_fails(
        LISA(train_final_norm=True),
        r"`train_final_norm=True`, but no final normalization layer was found",
        NoFinalNorm(),
    )
