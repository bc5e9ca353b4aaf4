"""CausalLMModule: model construction, optimizer over all parameters, schedule, metrics, saving."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from cli_args import TINY_MODEL, VOCAB, torch_threads
from lightning.fabric.utilities.exceptions import MisconfigurationException
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_lisa import LISA
from lightning_lisa.recipes.data import TextDataModule
from lightning_lisa.recipes.module import CausalLMModule
from lightning_lisa.recipes.optim import lr_lambda


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def tiny_module(**kwargs: object) -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(config=dict(TINY_MODEL), **kwargs)  # type: ignore[arg-type]


def tiny_data(cache: Path, **kwargs: object) -> TextDataModule:
    settings: dict[str, object] = {
        "max_examples": 4, "vocab_size": VOCAB, "max_length": 32, "batch_size": 4, "cache_dir": str(cache),
    }  # fmt: skip
    settings.update(kwargs)
    return TextDataModule(**settings)  # type: ignore[arg-type]


def trainer(root: Path, steps: int = 3, **kwargs: object) -> pl.Trainer:
    settings: dict[str, object] = dict(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2, limit_test_batches=2,
        default_root_dir=str(root),
    )  # fmt: skip
    settings.update(kwargs)
    return pl.Trainer(**settings)  # type: ignore[arg-type]


def test_exactly_one_source_of_weights():
    with pytest.raises(MisconfigurationException, match="exactly one of `model_name_or_path`"):
        CausalLMModule()
    with pytest.raises(MisconfigurationException, match="exactly one of `model_name_or_path`"):
        CausalLMModule(model_name_or_path="x", config=dict(TINY_MODEL))


def test_config_errors_name_the_problem():
    with pytest.raises(MisconfigurationException, match=r"`model_type` string.*got keys \['hidden_size'\]"):
        CausalLMModule(config={"hidden_size": 8})
    with pytest.raises(MisconfigurationException, match=r"`config.model_type='no-such-model'`"):
        CausalLMModule(config={"model_type": "no-such-model"})
    with pytest.raises(MisconfigurationException, match=r"`lr_schedule='sawtooth'` is not one of"):
        tiny_module(lr_schedule="sawtooth")
    with pytest.raises(MisconfigurationException, match=r"`optimizer='sgd'` is not one of"):
        tiny_module(optimizer="sgd").make_optimizer()


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizer_holds_every_parameter_even_frozen_ones(name: str):
    module = tiny_module(optimizer=name, weight_decay=0.1)
    module.model.model.layers.requires_grad_(False)
    optimizer = module.make_optimizer()
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in module.model.parameters()}
    assert len(in_optimizer) == len(list(module.model.parameters()))
    decays = {g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {0.1, 0.0}


def test_warmup_then_cosine_schedule():
    f = lr_lambda("cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.0)
    assert [f(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, math.inf)(100) == 1.0
    with pytest.raises(MisconfigurationException, match="the run has no end"):
        lr_lambda("cosine", 0, math.inf)


def test_fit_logs_loss_and_perplexity_and_follows_the_schedule(tmp_path: Path):
    module = tiny_module(learning_rate=0.01, warmup_steps=2)
    dm = tiny_data(tmp_path)
    lrs: list[float] = []

    class LR(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit = trainer(tmp_path, steps=4, val_check_interval=4, callbacks=[LR()])
    fit.fit(module, dm)
    metrics = fit.callback_metrics
    for key in ("train_loss", "train_ppl", "val_loss", "val_ppl"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
    assert lrs[:3] == pytest.approx([0.0, 0.005, 0.01])
    assert lrs[3] < 0.01
    # validation and test share the held-out split; the token-weighted loss is the same
    test = fit.test(module, datamodule=dm, verbose=False)[0]
    val = fit.validate(module, datamodule=dm, verbose=False)[0]
    assert test["test_loss"] == pytest.approx(val["val_loss"])


def test_predict_scores_each_sequence(tmp_path: Path):
    module, dm = tiny_module(), tiny_data(tmp_path)
    batches = trainer(tmp_path, limit_predict_batches=1).predict(module, datamodule=dm)
    assert batches is not None
    scores = batches[0]
    assert isinstance(scores, dict)
    assert scores["loss"].shape == (4,) and (scores["tokens"] == 31).all()
    assert scores["loss"].mean() == pytest.approx(math.log(VOCAB), rel=0.1)


def test_save_hf_dir_round_trips_through_from_pretrained(tmp_path: Path):
    out = tmp_path / "hf"
    module, dm = tiny_module(save_hf_dir=str(out)), tiny_data(tmp_path)
    trainer(tmp_path, steps=2, callbacks=[LISA(n_layers=1, interval=1)]).fit(module, dm)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    loaded = CausalLMModule(model_name_or_path=str(out))  # offline, from the local directory
    for (name, a), b in zip(module.model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == VOCAB
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), torch.nn.Module)


def test_vocabulary_larger_than_the_model_is_refused(tmp_path: Path):
    module = tiny_module()
    dm = tiny_data(tmp_path, vocab_size=VOCAB + 20)
    with pytest.raises(MisconfigurationException, match=rf"tokenizer has {VOCAB + 20} tokens.*{VOCAB} rows"):
        trainer(tmp_path).fit(module, dm)


def test_gradient_checkpointing_trains_with_lisa(tmp_path: Path):
    module = tiny_module(gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in module.model.modules())
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    lisa = LISA(n_layers=1, interval=10)
    trainer(tmp_path, steps=2, callbacks=[lisa]).fit(module, tiny_data(tmp_path))
    (active,) = lisa.history[0].active_layers
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith(f"model.layers.{active}.") for n in changed)
    assert not any(n.startswith("model.layers.") and not n.startswith(f"model.layers.{active}.") for n in changed)


@pytest.mark.parametrize("compact", ["8bit", "factored"])
def test_compact_always_active_keeps_compact_moments_for_embeddings_and_head_only(tmp_path: Path, compact: str):
    module = tiny_module(compact_always_active=compact, learning_rate=1e-2)
    lisa = LISA(n_layers=1, interval=10)
    trainer(tmp_path, steps=2, callbacks=[lisa]).fit(module, tiny_data(tmp_path))
    optimizer = module.trainer.optimizers[0]
    assert type(optimizer).__name__ == "CompactAdamW"
    compact_params = {id(p) for g in optimizer.param_groups if g["compact"] == compact for p in g["params"]}
    names = {n for n, p in module.model.named_parameters() if id(p) in compact_params}
    assert names == {"model.embed_tokens.weight", "lm_head.weight"}
    # the embeddings keep codes, the sampled block exact AdamW moments, the frozen blocks nothing
    embed = module.model.model.embed_tokens.weight
    assert not {"exp_avg", "exp_avg_sq"} & set(optimizer.state[embed])
    (active,) = lisa.active_layers
    block = module.model.model.layers[active].mlp.up_proj.weight
    assert {"exp_avg", "exp_avg_sq"} <= set(optimizer.state[block])
    frozen = next(i for i in range(len(module.model.model.layers)) if i != active)
    assert not optimizer.state.get(module.model.model.layers[frozen].mlp.up_proj.weight)


def test_compact_blocks_gives_the_sampled_block_compact_moments_and_keeps_weight_decay_groups(tmp_path: Path):
    module = tiny_module(compact_always_active="factored", compact_blocks="factored", weight_decay=0.1)
    lisa = LISA(n_layers=1, interval=10)
    trainer(tmp_path, steps=2, callbacks=[lisa]).fit(module, tiny_data(tmp_path))
    optimizer = module.trainer.optimizers[0]
    assert {g["compact"] for g in optimizer.param_groups} == {"factored"}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.1}  # norms undecayed, as without
    (active,) = lisa.active_layers
    block = module.model.model.layers[active].mlp.up_proj.weight
    assert {"exp_avg_codes", "exp_avg_sq_row", "exp_avg_sq_col"} <= set(optimizer.state[block])
    assert not any("exp_avg" in state for state in optimizer.state.values())


def test_compact_blocks_with_exact_always_active_moments(tmp_path: Path):
    # compact_always_active=None with compact_blocks: the embeddings and head keep exact AdamW moments
    module = tiny_module(compact_blocks="8bit", learning_rate=1e-2)
    trainer(tmp_path, steps=2, callbacks=[LISA(n_layers=1, interval=10)]).fit(module, tiny_data(tmp_path))
    optimizer = module.trainer.optimizers[0]
    exact = {id(p) for g in optimizer.param_groups if g["compact"] is None for p in g["params"]}
    assert {n for n, p in module.model.named_parameters() if id(p) in exact} == {
        "model.embed_tokens.weight",
        "lm_head.weight",
    }
    assert {g["compact"] for g in optimizer.param_groups} == {None, "8bit"}
    assert sorted(optimizer.state[module.model.lm_head.weight]) == ["exp_avg", "exp_avg_sq", "step"]
    (active,) = module.trainer.callbacks[0].active_layers  # type: ignore[index]
    block = module.model.model.layers[active].mlp.up_proj.weight
    assert "exp_avg_sq_codes" in optimizer.state[block]


@pytest.mark.parametrize("compact", [None, "8bit"])
def test_fused_adamw_with_the_step_in_backward_equals_a_normal_fused_run(tmp_path: Path, compact: str | None):
    weights = []
    for step_in_backward in (True, False):
        module = tiny_module(fused_adamw=True, compact_always_active=compact, learning_rate=1e-2)
        lisa = LISA(n_layers=1, interval=2, step_in_backward=step_in_backward)
        trainer(tmp_path, steps=4, callbacks=[lisa]).fit(module, tiny_data(tmp_path))
        optimizer = module.trainer.optimizers[0]
        assert type(optimizer).__name__ == ("AdamW" if compact is None else "CompactAdamW")
        assert optimizer.defaults["fused"] is True
        weights.append({n: p.detach().clone() for n, p in module.model.named_parameters()})
    in_backward, normal = weights
    initial = tiny_module().model.state_dict()
    changed = [n for n in normal if not torch.equal(normal[n], initial[n])]
    assert "lm_head.weight" in changed and any(n.startswith("model.layers.") for n in changed)
    for name, value in normal.items():
        torch.testing.assert_close(in_backward[name], value, msg=name)
    with pytest.raises(MisconfigurationException, match=r"`fused_adamw=True` needs `optimizer='adamw'`"):
        tiny_module(fused_adamw=True, optimizer="adamw8bit")


@pytest.mark.parametrize(("compact", "tied"), [(None, False), ("8bit", False), (None, True), ("8bit", True)])
def test_always_active_lr_scale_steps_the_embeddings_and_head_at_their_own_rate(
    tmp_path: Path, compact: str | None, tied: bool
):
    settings = {"learning_rate": 1e-2, "weight_decay": 0.1, "warmup_steps": 10, "compact_always_active": compact}
    torch.manual_seed(0)
    config = {**TINY_MODEL, "tie_word_embeddings": tied}
    module = CausalLMModule(config=config, always_active_lr_scale=0.25, **settings)  # type: ignore[arg-type]
    optimizer = module.make_optimizer()
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert sorted(map(id, in_groups)) == sorted(map(id, module.model.parameters()))  # every parameter, once
    rates = {n: g["lr"] for g in optimizer.param_groups for p in g["params"] for n, q in module.model.named_parameters()
             if q is p}  # fmt: skip
    own = {"model.embed_tokens.weight"} if tied else {"model.embed_tokens.weight", "lm_head.weight"}
    assert {n for n, lr in rates.items() if lr == 2.5e-3} == own
    assert {lr for n, lr in rates.items() if n.startswith("model.layers.")} == {1e-2}
    trainer(tmp_path, steps=3, callbacks=[LISA(n_layers=1, interval=10)]).fit(module, tiny_data(tmp_path))
    # the warm-up scales both rates alike
    trained = module.trainer.optimizers[0]
    (multiplier,) = {round(g["lr"] / rates[n], 9) for g in trained.param_groups for p in g["params"]
                     for n, q in module.model.named_parameters() if q is p}  # fmt: skip
    assert 0 < multiplier < 1
    # AdamW's first step moves each weight by about its group's rate: the head 4x less than the sampled block
    fresh = tiny_module(always_active_lr_scale=0.25, learning_rate=1e-2, weight_decay=0.1)
    initial = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    first = LISA(n_layers=1, interval=10)
    trainer(tmp_path, steps=1, callbacks=[first]).fit(fresh, tiny_data(tmp_path))
    moved = {n: (p - initial[n]).abs().max().item() for n, p in fresh.model.named_parameters()}
    (active,) = first.history[0].active_layers
    assert 2.4e-3 < moved["lm_head.weight"] < 2.6e-3
    assert 9.6e-3 < moved[f"model.layers.{active}.mlp.up_proj.weight"] < 1.04e-2
    with pytest.raises(MisconfigurationException, match=r"`always_active_lr_scale=0` is not allowed"):
        tiny_module(always_active_lr_scale=0)


def test_always_active_lr_scale_errors_name_the_option():
    with pytest.raises(MisconfigurationException, match=r"`always_active_lr_scale=inf` is not allowed"):
        tiny_module(always_active_lr_scale=float("inf"))
    # a model LISA cannot analyse: the error names the option, at construction
    plain = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 8))
    with pytest.raises(MisconfigurationException, match=r"`always_active_lr_scale` acts on the embeddings"):
        CausalLMModule.from_model(plain, always_active_lr_scale=0.5)
    CausalLMModule.from_model(plain)  # without the option, nothing is asked of the model


def test_always_active_lr_scale_with_the_step_in_backward_equals_a_normal_run(tmp_path: Path):
    weights = []
    for step_in_backward in (True, False):
        module = tiny_module(always_active_lr_scale=0.25, learning_rate=1e-2, warmup_steps=2)
        lisa = LISA(n_layers=1, interval=2, step_in_backward=step_in_backward)
        trainer(tmp_path, steps=4, callbacks=[lisa]).fit(module, tiny_data(tmp_path))
        weights.append({n: p.detach().clone() for n, p in module.model.named_parameters()})
    in_backward, normal = weights
    for name, value in normal.items():
        torch.testing.assert_close(in_backward[name], value, msg=name)


def test_compact_always_active_needs_adamw():
    with pytest.raises(MisconfigurationException, match=r"compact_always_active='8bit'.*optimizer='adamw'"):
        tiny_module(compact_always_active="8bit", optimizer="adamw8bit")
    with pytest.raises(MisconfigurationException, match=r"compact_blocks='8bit'.*optimizer='adamw'"):
        tiny_module(compact_blocks="8bit", optimizer="adamw8bit")
    with pytest.raises(MisconfigurationException, match=r"`compact_always_active='4bit'` is not one of"):
        tiny_module(compact_always_active="4bit")
    with pytest.raises(MisconfigurationException, match=r"`compact_blocks='4bit'` is not one of"):
        tiny_module(compact_blocks="4bit")


def test_from_model_trains_exactly_like_the_module_that_built_the_same_model(tmp_path: Path):
    built = tiny_module(learning_rate=1e-2)
    ready = copy.deepcopy(built.model)
    wrapped = CausalLMModule.from_model(ready, learning_rate=1e-2, gradient_checkpointing=True)
    assert wrapped.model is ready and wrapped.hparams["config"] is None
    assert any(getattr(m, "gradient_checkpointing", False) for m in ready.modules())  # options act on it
    before = {n: p.detach().clone() for n, p in ready.named_parameters()}
    for module in (built, wrapped):
        torch.manual_seed(1)  # the same data order
        trainer(tmp_path, steps=3, callbacks=[LISA(n_layers=1, interval=2, seed=3)]).fit(module, tiny_data(tmp_path))
    after = dict(ready.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in after.items())  # it trained
    for name, p in built.model.named_parameters():
        assert torch.equal(p, after[name]), name


def test_from_model_trains_a_peft_model_and_passes_subclass_arguments(tmp_path: Path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_module().model
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Scaled(CausalLMModule):
        def __init__(self, scale: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.scale = scale

    module = Scaled.from_model(model, scale=2.0, learning_rate=1e-2)
    assert isinstance(module, Scaled) and module.scale == 2.0 and module.hparams["scale"] == 2.0
    trainer(tmp_path, steps=2).fit(module, tiny_data(tmp_path))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_from_model_refuses_a_second_source_and_a_non_module():
    model = tiny_module().model
    with pytest.raises(MisconfigurationException, match=r"from_model.*got model_name_or_path=None and config=\{"):
        CausalLMModule.from_model(model, config=dict(TINY_MODEL))
    with pytest.raises(MisconfigurationException, match=r"`model` must be a torch.nn.Module.*str"):
        CausalLMModule.from_model("path/to/model")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="exactly one of `model_name_or_path`"):
        CausalLMModule()  # the ready model of a call does not outlive it
