"""LISA in Lightning Fabric loops and plain PyTorch loops: the same schedule, weights and state as the Trainer."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy

from lightning_lisa import LISA, LISAConfigError
from lightning_lisa.testing import CausalLM, block_of, quiet_trainer, token_loader
from lightning_lisa.testing.fabric_loop import fabric_fit

ALWAYS = {"model.model.embed_tokens.weight", "model.lm_head.weight"}
BATCHES = 8  # micro-batches per epoch of token_loader


def batches(epochs: int = 3) -> list[torch.Tensor]:
    return list(itertools.chain.from_iterable(token_loader(n_batches=BATCHES) for _ in range(epochs)))


def fabric_run(lisa: LISA, steps: int, accumulate: int = 2, **module_kwargs: Any) -> tuple[CausalLM, Any]:
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
    module = CausalLM(**module_kwargs)
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    fabric_fit(fabric, model, optimizer, batches(), steps, accumulate)
    return module, optimizer


def trainer_run(lisa: LISA, steps: int, accumulate: int = 2, **module_kwargs: Any) -> tuple[CausalLM, Any]:
    module = CausalLM(**module_kwargs)
    trainer = quiet_trainer([lisa], max_steps=steps, accumulate_grad_batches=accumulate)
    trainer.fit(module, token_loader(n_batches=BATCHES))
    return module, trainer.optimizers[0]


def assert_same_training(a: CausalLM, opt_a: Any, b: CausalLM, opt_b: Any) -> None:
    """Bit-identical weights, and the same optimizer state for the same parameters."""
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (name, key)


@pytest.mark.parametrize("mode", ["drop", "offload"])
def test_trainer_and_fabric_give_identical_weights_and_state(mode: str):
    options = {"n_layers": 2, "interval": 3, "seed": 5, "optimizer_state": mode}
    in_trainer, in_fabric = LISA(**options), LISA(**options)
    steps = 10  # 3 full periods and a part, with gradient accumulation over 2 micro-batches
    reference = trainer_run(in_trainer, steps)
    fabric = fabric_run(in_fabric, steps)
    assert [(s.step, s.active_layers) for s in in_fabric.history] == [
        (s.step, s.active_layers) for s in in_trainer.history
    ]
    assert [s.optimizer_state_bytes for s in in_fabric.history] == [s.optimizer_state_bytes for s in in_trainer.history]
    assert len(in_fabric.history) == 4
    assert_same_training(*reference, *fabric)


def test_attach_in_a_plain_pytorch_loop_equals_the_fabric_callback():
    options = {"n_layers": 1, "interval": 2, "seed": 3}
    via_fabric = LISA(**options)
    reference = fabric_run(via_fabric, 5, accumulate=1)
    lisa = LISA(**options)
    module = CausalLM()
    optimizer = module.configure_optimizers()
    lisa.attach(module, optimizer)  # the loop below has no other line for LISA
    for index, batch in enumerate(batches()[:5]):
        module.training_step(batch, index).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [(s.step, s.active_layers) for s in lisa.history] == [(s.step, s.active_layers) for s in via_fabric.history]
    assert_same_training(*reference, module, optimizer)
    lisa.detach()
    assert all(p.requires_grad for p in module.parameters())


def test_fabric_trains_only_sampled_blocks_and_releases_their_state():
    lisa = LISA(n_layers=2, interval=2, seed=1)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
    module = CausalLM()
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    seen: list[tuple[list[int], set[str], set[str]]] = []
    before = {n: p.detach().clone() for n, p in module.named_parameters()}

    def record(step: int) -> None:
        params = dict(module.named_parameters())
        changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
        with_state = {n for n, p in params.items() if optimizer.state.get(p)}
        seen.append((list(lisa.active_layers), changed, with_state))
        before.update({n: p.detach().clone() for n, p in params.items()})

    fabric_fit(fabric, model, optimizer, batches(), 6, accumulate=2, after_step=record)
    assert len(seen) == 6
    assert len(lisa.history) == 3
    for active, changed, with_state in seen:
        expected = {n for n in before if block_of(n) in active or n in ALWAYS}
        assert changed == expected
        assert with_state == expected  # drop: frozen blocks hold no state


def test_setup_module_without_attach_raises_at_the_first_step():
    lisa = LISA(n_layers=1, interval=2)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
    module = CausalLM()
    model = fabric.setup_module(module)  # runs no callback hook
    optimizer = fabric.setup_optimizers(module.configure_optimizers())
    fabric.backward(model.training_step(batches()[0], 0))
    with pytest.raises(LISAConfigError, match=r"setup_module.*lisa\.attach"):
        optimizer.step()


def test_an_optimizer_stepping_outside_fabric_raises():
    lisa = LISA(n_layers=1, interval=2)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
    module = CausalLM()
    model = fabric.setup(module)
    optimizer = module.configure_optimizers()  # not set up through Fabric: its steps run no Fabric hook
    fabric.backward(model.training_step(batches()[0], 0))
    optimizer.step()
    with pytest.raises(LISAConfigError, match="not through Fabric's optimizer wrapper"):
        model.training_step(batches()[1], 1)
    assert all(p.requires_grad for p in module.parameters())  # the model as it was given


def test_setup_module_loop_with_attach_equals_the_callback():
    options = {"n_layers": 1, "interval": 2, "seed": 8}
    via_callbacks = LISA(**options)
    reference = fabric_run(via_callbacks, 4)
    lisa = LISA(**options)
    fabric = Fabric(accelerator="cpu", devices=1)
    module = CausalLM()
    model = fabric.setup_module(module)
    optimizer = fabric.setup_optimizers(module.configure_optimizers())
    lisa.attach(model, optimizer, fabric)
    fabric_fit(fabric, model, optimizer, batches(), 4, accumulate=2)
    assert [s.active_layers for s in lisa.history] == [s.active_layers for s in via_callbacks.history]
    assert_same_training(*reference, module, optimizer)
    with pytest.raises(LISAConfigError, match="already set up"):
        lisa.attach(model, optimizer, fabric)


def test_unsupported_options_and_strategies_are_refused_at_setup():
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[LISA(step_in_backward=True)])
    with pytest.raises(LISAConfigError, match=r"step_in_backward=True.*Fabric"):
        fabric.setup(CausalLM())

    class DeepSpeedStrategy(FabricDDPStrategy):  # refused by class name, as Lightning's own
        pass

    class FakeFabric:
        def __init__(self) -> None:
            self.strategy = DeepSpeedStrategy()
            self.loggers: list[Any] = []

    with pytest.raises(LISAConfigError, match=r"DeepSpeed ZeRO.*Supported: a single device"):
        LISA().on_after_setup(FakeFabric(), CausalLM())  # type: ignore[arg-type]


def test_switches_are_logged_to_fabric_loggers():
    class Collect:
        def __init__(self) -> None:
            self.logged: list[tuple[dict[str, float], int | None]] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.logged.append((metrics, step))

    collect = Collect()
    lisa = LISA(n_layers=1, interval=2, seed=2)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa], loggers=[collect])  # type: ignore[list-item]
    module = CausalLM()
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    fabric_fit(fabric, model, optimizer, batches(), 4)
    assert [step for _, step in collect.logged] == [0, 2]
    assert [m["lisa/active_block_0"] for m, _ in collect.logged] == [float(s.active_layers[0]) for s in lisa.history]


@pytest.mark.parametrize("mode", ["drop", "offload", "keep"])
def test_fabric_save_and_load_resume_bit_identically(tmp_path: Path, mode: str):
    options = {"n_layers": 2, "interval": 3, "seed": 4, "optimizer_state": mode}
    total, stop = 8, 4  # stop inside the second period
    reference_lisa = LISA(**options)
    reference = fabric_run(reference_lisa, total)

    def start(lisa: LISA) -> tuple[Fabric, CausalLM, Any, Any]:
        fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
        module = CausalLM()
        model, optimizer = fabric.setup(module, module.configure_optimizers())
        return fabric, module, model, optimizer

    first_lisa = LISA(**options)
    fabric, _, model, optimizer = start(first_lisa)
    fabric_fit(fabric, model, optimizer, batches(), stop, accumulate=2)
    first_lisa.save(fabric, tmp_path / "ckpt.pt", {"model": model, "optimizer": optimizer, "lisa": first_lisa})

    lisa = LISA(**options)
    fabric, module, model, optimizer = start(lisa)
    state = {"model": model, "optimizer": optimizer, "lisa": lisa}
    remainder = lisa.load(fabric, tmp_path / "ckpt.pt", state)
    assert remainder == {}
    assert lisa._step == stop
    fabric_fit(fabric, model, optimizer, batches(), total, accumulate=2, start_step=stop)
    assert [(s.step, s.active_layers) for s in lisa.history] == [
        (s.step, s.active_layers) for s in reference_lisa.history
    ]
    assert_same_training(*reference, module, optimizer)


def test_plain_fabric_load_resumes_on_a_single_device(tmp_path: Path):
    options = {"n_layers": 1, "interval": 2, "seed": 6}
    reference_lisa = LISA(**options)
    reference = fabric_run(reference_lisa, 6)
    first = LISA(**options)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[first])
    module = CausalLM()
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    fabric_fit(fabric, model, optimizer, batches(), 3, accumulate=2)
    fabric.save(tmp_path / "plain.pt", {"model": model, "optimizer": optimizer, "lisa": first})

    lisa = LISA(**options)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
    module = CausalLM()
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    fabric.load(tmp_path / "plain.pt", {"model": model, "optimizer": optimizer, "lisa": lisa})
    fabric_fit(fabric, model, optimizer, batches(), 6, accumulate=2, start_step=3)
    assert [s.active_layers for s in lisa.history] == [s.active_layers for s in reference_lisa.history]
    assert_same_training(*reference, module, optimizer)


def plain_loop(lisa: LISA, module: CausalLM, optimizer: Any, start: int, stop: int) -> None:
    for index, batch in enumerate(batches()[start:stop], start=start):
        module.training_step(batch, index).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("mode", ["drop", "offload"])
@pytest.mark.parametrize("order", ["_".join(o) for o in itertools.permutations(["attach", "optimizer", "lisa"])])
@pytest.mark.parametrize("stop", [3, 4])
def test_plain_loop_resume_in_any_load_order_matches_the_uninterrupted_run(order: str, mode: str, stop: int):
    """Saved in the middle of the second period (3) or after its last step (4).

    After its last step the saved optimizer state belongs to the ending period's blocks, now frozen. In its
    middle it belongs to the restored period's blocks, which a fresh draw at ``attach`` must not release.
    """
    options = {"n_layers": 2, "interval": 2, "seed": 7, "optimizer_state": mode}
    total = 8
    reference_lisa, reference = LISA(**options), CausalLM()
    reference_optimizer = reference.configure_optimizers()
    reference_lisa.attach(reference, reference_optimizer)
    plain_loop(reference_lisa, reference, reference_optimizer, 0, total)

    first, module = LISA(**options), CausalLM()
    optimizer = module.configure_optimizers()
    first.attach(module, optimizer)
    plain_loop(first, module, optimizer, 0, stop)
    saved = {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "lisa": first.state_dict()}
    periods = [set(s.active_layers) for s in reference_lisa.history]
    assert periods[0] != periods[1] != periods[2]  # the cases that matter: another draw would release state

    lisa, module = LISA(**options), CausalLM()
    module.load_state_dict(saved["model"])
    optimizer = module.configure_optimizers()
    steps = {
        "attach": lambda: lisa.attach(module, optimizer),
        "optimizer": lambda: optimizer.load_state_dict(saved["optimizer"]),
        "lisa": lambda: lisa.load_state_dict(saved["lisa"]),
    }
    for name in order.split("_"):
        steps[name]()
    plain_loop(lisa, module, optimizer, stop, total)
    assert [s.active_layers for s in lisa.history] == [s.active_layers for s in reference_lisa.history]
    assert_same_training(reference, reference_optimizer, module, optimizer)


def test_an_optimizer_over_trainable_parameters_only_is_refused_after_the_first_step():
    # LISA freezes at fabric.setup(model): an optimizer built afterwards over `requires_grad` parameters misses
    # the blocks sampled later (they would never train)
    lisa = LISA(n_layers=1, interval=2)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
    module = CausalLM()
    model = fabric.setup(module)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in module.parameters() if p.requires_grad]))
    fabric.backward(model.training_step(batches()[0], 0))
    optimizer.step()
    assert not all(p.requires_grad for p in module.parameters())
    with pytest.raises(LISAConfigError, match=r"in no optimizer that stepped.*model\.parameters\(\)"):
        model.training_step(batches()[1], 1)
    assert all(p.requires_grad for p in module.parameters())  # the model as it was given


class CompactLM(CausalLM):
    """The tiny model with 8-bit moments for the embeddings and the head (CompactAdamW)."""

    def configure_optimizers(self) -> Any:
        from lightning_lisa import compact_adamw

        return compact_adamw(self, lr=1e-2)


def test_compact_state_under_fabric_equals_the_trainer():
    options = {"n_layers": 1, "interval": 2, "seed": 7}
    in_trainer, in_fabric = LISA(**options), LISA(**options)
    module = CompactLM()
    trainer = quiet_trainer([in_trainer], max_steps=5, accumulate_grad_batches=2)
    trainer.fit(module, token_loader(n_batches=BATCHES))
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[in_fabric])
    other = CompactLM()
    model, optimizer = fabric.setup(other, other.configure_optimizers())
    fabric_fit(fabric, model, optimizer, batches(), 5, accumulate=2)
    assert [s.active_layers for s in in_fabric.history] == [s.active_layers for s in in_trainer.history]
    assert_same_training(module, trainer.optimizers[0], other, optimizer)
