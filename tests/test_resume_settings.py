"""Resuming with other settings than the checkpoint's: the same rules under the Trainer and under Fabric.

The rows of the table in docs/guides/resuming.md: another ``n_layers``, ``interval``, ``seed``, ``sampling``
or ``always_active`` continues with a warning that names the old and the new value; another model depth
or ``granularity`` is refused with LISA's own error, naming both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric

from lightning_lisa import LISA, LISAConfigError
from lightning_lisa.testing import CausalLM, quiet_trainer, token_loader
from lightning_lisa.testing.fabric_loop import fabric_fit

SAVED: dict[str, Any] = {"n_layers": 2, "interval": 2, "seed": 1}
STEPS = 4  # steps before the checkpoint; periods 0 and 1 draw blocks of a 6-block model

#: setting -> (the resumed LISA's arguments, text the warning must hold)
CONTINUES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "n_layers": ({"n_layers": 3}, ["`n_layers=3`", "`n_layers=2`"]),
    "interval": ({"interval": 3}, ["`interval=3`", "`interval=2`"]),
    "seed": ({"seed": 2}, ["`seed=2`", "`seed=1`"]),
    "sampling": ({"sampling": "cyclic"}, ["`sampling='cyclic'`", "`sampling='uniform'`"]),
    "always_active": (
        {"always_active": ["model.lm_head"]},
        ["`always_active=['model.lm_head']`", "The restored units stay", "'model.model.embed_tokens', 'model.lm_head'"],
    ),
}


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trainer") / "saved.ckpt"
    trainer = quiet_trainer([LISA(**SAVED)], max_steps=STEPS)
    trainer.fit(CausalLM(), token_loader(n_batches=8))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def fabric_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fabric") / "saved.pt"
    lisa = LISA(**SAVED)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
    module = CausalLM()
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    fabric_fit(fabric, model, optimizer, token_loader(n_batches=8), STEPS)
    lisa.save(fabric, path, {"model": model, "optimizer": optimizer, "lisa": lisa})
    return path


def resume_trainer(path: Path, lisa: LISA, module: CausalLM) -> None:
    quiet_trainer([lisa], max_steps=STEPS + 2).fit(module, token_loader(n_batches=8), ckpt_path=str(path))


def resume_fabric(path: Path, lisa: LISA, module: CausalLM) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[lisa])
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    lisa.load(fabric, path, {"model": model, "optimizer": optimizer, "lisa": lisa})
    fabric_fit(fabric, model, optimizer, token_loader(n_batches=8), STEPS + 2, start_step=STEPS)


LOOPS = {"trainer": (resume_trainer, "trainer_checkpoint"), "fabric": (resume_fabric, "fabric_checkpoint")}


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("setting", sorted(CONTINUES))
def test_other_settings_continue_with_a_warning_naming_both_values(loop: str, setting: str, request):
    resume, fixture = LOOPS[loop]
    path = request.getfixturevalue(fixture)
    changed, expected = CONTINUES[setting]
    lisa = LISA(**{**SAVED, **changed})
    module = CausalLM()
    with pytest.warns(UserWarning, match="LISA resumes with") as caught:
        resume(path, lisa, module)
    messages = [str(w.message) for w in caught if "LISA resumes with" in str(w.message)]
    assert any(all(text in m for text in expected) for m in messages), messages
    # it goes on with the new settings from the restored step: what trains is the new always-active set and
    # the new number of blocks
    last = lisa.history[-1]
    assert last.step >= STEPS
    assert len(last.active_layers) == lisa.n_layers
    always = ["model.lm_head"] if setting == "always_active" else ["model.model.embed_tokens", "model.lm_head"]
    modules = [module.get_submodule(name) for name in always]
    modules += [module.model.model.layers[i] for i in last.active_layers]
    assert last.trainable_params == sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_another_model_depth_is_refused_with_lisas_own_error(loop: str, request):
    resume, fixture = LOOPS[loop]
    path = request.getfixturevalue(fixture)
    state = torch.load(path, weights_only=False)
    saved = state["callbacks"]["LISA"] if loop == "trainer" else state["lisa"]
    highest = max(i for s in saved["history"] for i in s["active_layers"])
    message = rf"names blocks up to {highest} \(it was written for a model with 6 blocks\), and the model has 3"
    with pytest.raises(LISAConfigError, match=message):
        resume(path, LISA(**SAVED), CausalLM(num_layers=3))


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_another_granularity_is_refused_naming_both(loop: str, request):
    resume, fixture = LOOPS[loop]
    path = request.getfixturevalue(fixture)
    with pytest.raises(LISAConfigError, match=re.escape("`granularity='module'`") + ".*" + re.escape("'block'")):
        resume(path, LISA(**SAVED, granularity="module"), CausalLM())


class BuiltLater(CausalLM):
    """The tiny model, built in ``configure_model`` (LISA inspects it only then)."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(model=torch.nn.Identity())
        self.depth = num_layers

    def configure_model(self) -> None:
        from lightning_lisa.testing import tiny_llama

        if isinstance(self.model, torch.nn.Identity):
            self.model = tiny_llama(self.depth)


def test_another_depth_is_refused_before_the_weights_load_for_a_model_built_in_configure_model(trainer_checkpoint):
    with pytest.raises(LISAConfigError, match=r"written for a model with 6 blocks\), and the model has 3 blocks"):
        resume_trainer(trainer_checkpoint, LISA(**SAVED), BuiltLater(3))
