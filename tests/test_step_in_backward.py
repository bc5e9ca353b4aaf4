"""The optimizer step inside the backward pass: same weights as a normal run, gradients never all resident."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_lisa import LISA, StepInBackward, compact_adamw
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.step_in_backward import step_one, steps_per_parameter
from lightning_lisa.testing import CausalLM, quiet_trainer, tiny_llama, token_loader

OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {"weight_decay": 0.1}),
    "adamw-foreach": ("adamw", {"foreach": True, "weight_decay": 0.1}),
    "adamw-fused": ("adamw", {"fused": True, "weight_decay": 0.1}),
    "adam": ("adam", {"weight_decay": 0.01}),
    "adam-foreach-amsgrad": ("adam", {"foreach": True, "amsgrad": True}),
    "adam-fused": ("adam", {"fused": True}),
    "sgd-momentum": ("sgd", {}),
    "sgd-nesterov-foreach": ("sgd", {"nesterov": True, "foreach": True}),
}


def fit(
    step_in_backward: bool,
    optimizer: str = "adamw",
    kwargs: dict[str, Any] | None = None,
    callbacks: list[pl.Callback] | None = None,
    n_batches: int = 8,
    **trainer_kwargs: Any,
) -> CausalLM:
    module = CausalLM(tiny_llama(4), optimizer=optimizer, lr=1e-2, scheduler=True, optimizer_kwargs=kwargs)
    extra = [StepInBackward()] if step_in_backward else []
    quiet_trainer(extra + list(callbacks or []), max_epochs=1, **trainer_kwargs).fit(module, token_loader(n_batches))
    return module


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("accumulate", [1, 2])
def test_same_weights_as_a_normal_run(name, accumulate):
    optimizer, kwargs = OPTIMIZERS[name]
    normal = fit(False, optimizer, kwargs, accumulate_grad_batches=accumulate)
    callback = StepInBackward()
    module = CausalLM(tiny_llama(4), optimizer=optimizer, lr=1e-2, scheduler=True, optimizer_kwargs=kwargs)
    quiet_trainer([callback], max_epochs=1, accumulate_grad_batches=accumulate).fit(module, token_loader(8))
    assert callback.steps_in_backward == 8 // accumulate  # every step ran in the backward pass
    assert_same_weights(normal, module)
    # the scheduler halved the learning rate every 3 steps in both runs, and the weights moved
    assert not torch.equal(module.model.lm_head.weight, tiny_llama(4).lm_head.weight)


def test_same_weights_with_lisa_and_an_odd_epoch_end():
    # 7 batches with accumulation 2: Lightning steps on the last, lone micro-batch too
    lisa = {"n_layers": 1, "interval": 2}
    normal = fit(False, callbacks=[LISA(**lisa)], n_batches=7, accumulate_grad_batches=2)
    flag = LISA(**lisa, step_in_backward=True)
    module = fit(False, callbacks=[flag], n_batches=7, accumulate_grad_batches=2)
    assert flag._in_backward is not None and flag._in_backward.steps_in_backward == 4  # the lone 7th included
    assert_same_weights(normal, module)
    assert_same_weights(normal, fit(True, callbacks=[LISA(**lisa)], n_batches=7, accumulate_grad_batches=2))


def test_lisa_sees_the_gradients_it_got():
    # LISA warns about sampled units without gradients; those updated in the backward pass received one
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*received no gradient.*")
        fit(False, callbacks=[LISA(n_layers=1, interval=2, step_in_backward=True)])


def test_lisa_flag_is_checked():
    with pytest.raises(LISAConfigError, match="`step_in_backward='yes'` is not allowed"):
        LISA(step_in_backward="yes")  # type: ignore[arg-type]
    with pytest.raises(LISAConfigError, match="`step_in_backward=True` is not supported with `gradient_clip_val"):
        quiet_trainer([LISA(n_layers=1, step_in_backward=True)], gradient_clip_val=1.0).fit(
            CausalLM(tiny_llama(2)), token_loader(2)
        )


class GradientCounter(pl.Callback):
    """Sums the bytes of every ``.grad`` resident whenever a gradient becomes final during backward."""

    def __init__(self) -> None:
        self.peak = 0
        self.trainable = 0
        self.largest = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # registered before StepInBackward's hooks (on_fit_start), so each runs before the update
        self.params = list(pl_module.parameters())
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._count)

    def _count(self, _: torch.Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        self.peak = max(self.peak, sum(g.numel() * g.element_size() for g in grads))

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        trainable = [p for p in self.params if p.requires_grad]
        self.trainable = max(self.trainable, sum(p.numel() * p.element_size() for p in trainable))
        self.largest = max(self.largest, max(p.numel() * p.element_size() for p in trainable))


@pytest.mark.parametrize("with_lisa", [False, True])
def test_gradients_of_all_trainable_parameters_never_coexist(with_lisa):
    normal, step = GradientCounter(), GradientCounter()
    lisa = [LISA(n_layers=1, interval=2)] if with_lisa else []
    fit(False, callbacks=[normal, *lisa])
    lisa = [LISA(n_layers=1, interval=2, step_in_backward=True)] if with_lisa else [StepInBackward()]
    fit(False, callbacks=[step, *lisa])
    assert normal.peak == normal.trainable  # a normal backward ends with every trainable gradient resident
    assert step.trainable == normal.trainable
    assert step.peak == step.largest < step.trainable  # here only one gradient at a time


class PlainStep(torch.optim.AdamW):
    """A subclass: its step could differ, so it is refused unless it declares ``per_parameter_step``."""


class Manual(CausalLM):
    def __init__(self) -> None:
        super().__init__(tiny_llama(2))
        self.automatic_optimization = False


class Clipping(CausalLM):
    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, **kwargs: Any) -> None:
        pass


class TwoOptimizers(CausalLM):
    def __init__(self) -> None:
        super().__init__(tiny_llama(2))
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        return [torch.optim.AdamW(self.model.model.parameters()), torch.optim.AdamW(self.model.lm_head.parameters())]


class LBFGS(CausalLM):
    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters())


class Subclassed(CausalLM):
    def configure_optimizers(self) -> Any:
        return PlainStep(self.parameters())


REFUSED: dict[str, tuple[Any, dict[str, Any], str]] = {
    "clip-norm": (
        CausalLM,
        {"gradient_clip_val": 1.0},
        "gradient_clip_val=1.0.*'norm'.*by norm needs every gradient.*gradient_clip_algorithm='value'",
    ),
    "fp16": (CausalLM, {"plugins": "fp16-scaler"}, "precision='16-mixed'.*GradScaler.*bf16-mixed"),
    "manual": (Manual, {}, "automatic_optimization=False"),
    "two-optimizers": (TwoOptimizers, {}, "automatic_optimization=False"),
    "configure_gradient_clipping": (Clipping, {}, "overridden `configure_gradient_clipping`"),
    "lbfgs": (LBFGS, {}, "torch.optim.lbfgs.LBFGS.*Allowed: torch.optim.AdamW"),
    "subclass": (Subclassed, {}, "PlainStep.*per_parameter_step = True"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_settings_raise_before_any_step(name):
    make, kwargs, message = REFUSED[name]
    module = make()
    if make is CausalLM:
        module = CausalLM(tiny_llama(2))
    before = [p.detach().clone() for p in module.parameters()]
    if kwargs.get("plugins") == "fp16-scaler":  # on CPU, Trainer(precision="16-mixed") turns into bf16-mixed
        scaler = torch.amp.GradScaler("cpu")
        kwargs = {"plugins": [pl.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    with pytest.raises(LISAConfigError, match=message):
        quiet_trainer([StepInBackward()], max_epochs=1, **kwargs).fit(module, token_loader(2))
    assert module.training_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "fsdp2"])
def test_multi_device_strategies_are_refused(strategy):
    # checked on the Trainer before fit (fit would launch processes); fit runs the same check in `setup`
    from lightning_lisa.step_in_backward import check_trainer

    kwargs: dict[str, Any] = {"strategy": strategy, "devices": 2}
    if strategy == "fsdp2":
        kwargs["strategy"] = pl.strategies.ModelParallelStrategy()
    with pytest.raises(LISAConfigError, match=r"not supported with `strategy=.*Strategy`.*one device"):
        check_trainer(quiet_trainer([], **kwargs), CausalLM(tiny_llama(2)))


def test_several_optimizers_are_refused():
    from lightning_lisa.step_in_backward import check_optimizers

    layer = torch.nn.Linear(2, 2)
    with pytest.raises(LISAConfigError, match=r"exactly one optimizer.*returned 2"):
        check_optimizers([torch.optim.AdamW(layer.parameters()), torch.optim.SGD(layer.parameters())])


def test_step_one_equals_the_full_step_and_keeps_the_state_in_the_optimizer():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(2)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    full = torch.optim.AdamW(a, lr=0.1, foreach=True)
    single = torch.optim.AdamW(b, lr=0.1, foreach=True)
    for _ in range(3):
        grads = [torch.randn(3, 3) for _ in a]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        full.step()
        for q in b:
            step_one(single, 0, q)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(full.state[p]["exp_avg_sq"], single.state[q]["exp_avg_sq"])
    assert single.state_dict()["state"].keys() == full.state_dict()["state"].keys()
    assert steps_per_parameter(single)
    assert not steps_per_parameter(PlainStep(b))


class CompactEverywhere(CausalLM):
    def configure_optimizers(self) -> Any:
        return compact_adamw(self, lr=1e-2, compact="factored", compact_blocks="factored")


@pytest.mark.parametrize(
    ("mode", "module_class"), [("drop", CausalLM), ("offload", CausalLM), ("drop", CompactEverywhere)]
)
def test_resume_with_the_step_in_backward_equals_an_uninterrupted_run(tmp_path, mode, module_class):
    def run(epochs: int, ckpt: str | None = None) -> tuple[CausalLM, pl.Trainer]:
        module = module_class(tiny_llama(4), lr=1e-2, scheduler=True)
        callbacks = [LISA(n_layers=1, interval=4, optimizer_state=mode, seed=3, step_in_backward=True)]
        fitting = quiet_trainer(callbacks, max_epochs=epochs)
        fitting.fit(module, token_loader(3), ckpt_path=ckpt)
        return module, fitting

    uninterrupted, _ = run(4)
    first, stopped = run(2)  # 6 steps: in the middle of the second period (K=4)
    stopped.save_checkpoint(tmp_path / "stop.ckpt")
    resumed, _ = run(4, ckpt=str(tmp_path / "stop.ckpt"))
    assert resumed.trainer.global_step == 12
    assert_same_weights(uninterrupted, resumed)
    assert not torch.equal(first.model.lm_head.weight, uninterrupted.model.lm_head.weight)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_clipping_by_value_is_applied_to_each_gradient_as_it_arrives(accumulate: int):
    clip = {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"}
    normal = fit(False, accumulate_grad_batches=accumulate, **clip)
    callback = StepInBackward()
    module = CausalLM(tiny_llama(4), optimizer="adamw", lr=1e-2, scheduler=True)
    trainer = quiet_trainer([callback], max_epochs=1, accumulate_grad_batches=accumulate, **clip)
    trainer.fit(module, token_loader(8))
    assert trainer.gradient_clip_val == 1e-3  # given back after fit (Lightning's own clipping is off during it)
    assert callback.steps_in_backward == 8 // accumulate
    assert_same_weights(normal, module)  # bit for bit, as Lightning's clip_grad_value_ after the backward pass
    unclipped = fit(False, accumulate_grad_batches=accumulate)
    assert not torch.equal(unclipped.model.lm_head.weight, module.model.lm_head.weight)  # the clip bit


def test_lisa_with_the_step_in_backward_clips_by_value_as_a_normal_run():
    clip = {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"}
    normal = fit(False, callbacks=[LISA(n_layers=2, interval=3, seed=1)], **clip)
    module = CausalLM(tiny_llama(4), optimizer="adamw", lr=1e-2, scheduler=True)
    quiet_trainer([LISA(n_layers=2, interval=3, seed=1, step_in_backward=True)], max_epochs=1, **clip).fit(
        module, token_loader(8)
    )
    assert_same_weights(normal, module)


class EmbeddingsFromFirstMicroBatch(CausalLM):
    """The embeddings get a gradient only from the first micro-batch of each optimizer step (of 2)."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        embeds = self.model.model.embed_tokens(batch)
        if batch_idx % 2 == 1:
            embeds = embeds.detach()
        loss: torch.Tensor = self.model(inputs_embeds=embeds, labels=batch).loss
        return loss


def test_lisa_clips_by_value_a_gradient_that_arrived_only_in_an_earlier_micro_batch():
    clip = {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value", "accumulate_grad_batches": 2}
    modules = []
    for in_backward in (False, True):
        module = EmbeddingsFromFirstMicroBatch(tiny_llama(4), optimizer="adamw", lr=1e-2, scheduler=True)
        lisa = LISA(n_layers=2, interval=3, seed=1, step_in_backward=in_backward)
        quiet_trainer([lisa], max_epochs=1, **clip).fit(module, token_loader(8))
        modules.append(module)
    assert_same_weights(*modules)  # the embeddings' gradient is clipped too, after the last backward pass
    unclipped = EmbeddingsFromFirstMicroBatch(tiny_llama(4), optimizer="adamw", lr=1e-2, scheduler=True)
    quiet_trainer([LISA(n_layers=2, interval=3, seed=1)], max_epochs=1, accumulate_grad_batches=2).fit(
        unclipped, token_loader(8)
    )
    embeddings = unclipped.model.model.embed_tokens.weight
    assert not torch.equal(embeddings, modules[1].model.model.embed_tokens.weight)  # the clip bit
