"""Stopping and resuming from a checkpoint continues the same schedule and ends with the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lisa import LISA
from lightning_lisa.testing import CausalLM, quiet_trainer, token_loader

BATCHES_PER_EPOCH = 3


def fit(lisa: LISA | None, epochs: int, module: CausalLM, ckpt_path: str | None = None) -> CausalLM:
    callbacks = [lisa] if lisa is not None else []
    run = quiet_trainer(callbacks, max_epochs=epochs)
    run.fit(module, token_loader(n_batches=BATCHES_PER_EPOCH), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("mode", ["drop", "offload", "keep"])
@pytest.mark.parametrize(
    ("interval", "stop_epoch"),
    [(4, 2), (3, 2)],  # stop mid-period (step 6 of period 4..7), and exactly at a period boundary (step 6)
)
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, mode: str, interval: int, stop_epoch: int):
    total_epochs = 5
    reference_lisa = LISA(n_layers=2, interval=interval, optimizer_state=mode, seed=11)
    reference = fit(reference_lisa, total_epochs, CausalLM())

    first_lisa = LISA(n_layers=2, interval=interval, optimizer_state=mode, seed=11)
    first = CausalLM()
    run = quiet_trainer([first_lisa], max_epochs=stop_epoch)
    run.fit(first, token_loader(n_batches=BATCHES_PER_EPOCH))
    ckpt = tmp_path / "stop.ckpt"
    run.save_checkpoint(ckpt)

    resumed_lisa = LISA(n_layers=2, interval=interval, optimizer_state=mode, seed=11)
    resumed = fit(resumed_lisa, total_epochs, CausalLM(), ckpt_path=str(ckpt))

    assert resumed.trainer.global_step == reference.trainer.global_step == total_epochs * BATCHES_PER_EPOCH
    assert [(s.step, s.active_layers) for s in resumed_lisa.history] == [
        (s.step, s.active_layers) for s in reference_lisa.history
    ]
    assert resumed_lisa.active_layers == reference_lisa.active_layers
    for (name, a), (_, b) in zip(resumed.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    # and the interrupted run did differ from the start: the comparison is not vacuous
    assert not torch.equal(first.model.model.embed_tokens.weight, reference.model.model.embed_tokens.weight)


@pytest.mark.parametrize(
    "options",
    [{"sampling": "weight_norm"}, {"sampling": "cyclic"}, {"granularity": "module", "n_layers": 3}],
)
def test_resume_with_other_strategies(tmp_path: Path, options: dict):
    options = {"n_layers": 2, "interval": 4, "seed": 2, **options}
    reference_lisa = LISA(**options)
    reference = fit(reference_lisa, 4, CausalLM())
    run = quiet_trainer([LISA(**options)], max_epochs=2)
    run.fit(CausalLM(), token_loader(n_batches=BATCHES_PER_EPOCH))
    run.save_checkpoint(tmp_path / "stop.ckpt")
    resumed_lisa = LISA(**options)
    resumed = fit(resumed_lisa, 4, CausalLM(), ckpt_path=str(tmp_path / "stop.ckpt"))
    assert [s.active_layers for s in resumed_lisa.history] == [s.active_layers for s in reference_lisa.history]
    for (name, a), (_, b) in zip(resumed.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_checkpoint_holds_the_schedule_and_loads_without_the_callback(tmp_path: Path):
    lisa = LISA(n_layers=2, interval=2, seed=4)
    module = CausalLM()
    every = ModelCheckpoint(tmp_path / "every", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    run = quiet_trainer([lisa, every], max_epochs=2, enable_checkpointing=True)
    run.fit(module, token_loader(n_batches=BATCHES_PER_EPOCH))
    ckpt = tmp_path / "lisa.ckpt"
    run.save_checkpoint(ckpt)

    state = torch.load(ckpt, weights_only=False)["callbacks"]["LISA"]
    assert state["step"] == run.global_step == 2 * BATCHES_PER_EPOCH  # optimizer steps taken
    for path in sorted((tmp_path / "every").glob("*.ckpt")):  # written during the run, after a step
        saved = torch.load(path, weights_only=False)
        assert saved["callbacks"]["LISA"]["step"] == saved["global_step"], path.name
    assert state["active_layers"] == lisa.active_layers
    assert state["period"] == (2 * BATCHES_PER_EPOCH - 1) // 2  # the period of the last step taken
    assert state["seed"] == 4

    # inference: load the weights alone
    loaded = CausalLM.load_from_checkpoint(ckpt)
    for (name, a), (_, b) in zip(loaded.named_parameters(), module.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in loaded.parameters())
    # training on without LISA: the optimizer state (active blocks only) loads into a full optimizer
    with pytest.warns(UserWarning, match="LISA"):
        fit(None, 3, loaded, ckpt_path=str(ckpt))
    assert loaded.trainer.global_step == 3 * BATCHES_PER_EPOCH


def test_resuming_with_other_arguments_warns(tmp_path: Path):
    run = quiet_trainer([LISA(n_layers=2, interval=2, seed=1)], max_epochs=1)
    run.fit(CausalLM(), token_loader(n_batches=BATCHES_PER_EPOCH))
    run.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.warns(UserWarning, match="seed=2"):
        fit(LISA(n_layers=2, interval=2, seed=2), 2, CausalLM(), ckpt_path=str(tmp_path / "a.ckpt"))
