"""The LISA callback in real Lightning runs of a tiny Llama: what trains, what holds state, when it switches."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.checkpoint import checkpoint

from lightning_lisa import LISA, sample_layers
from lightning_lisa.testing import CausalLM, Recorder, block_of, quiet_trainer, tiny_llama, token_loader

ALWAYS = ("model.model.embed_tokens.weight", "model.lm_head.weight")


def expected_trainable(names: set[str], active: tuple[int, ...]) -> set[str]:
    return {n for n in names if block_of(n) in active or n in ALWAYS}


def run(lisa: LISA, steps: int = 12, module: CausalLM | None = None, **kwargs) -> tuple[CausalLM, Recorder]:
    module = module or CausalLM()
    recorder = Recorder(lisa)
    quiet_trainer([lisa, recorder], max_steps=steps, **kwargs).fit(module, token_loader(n_batches=steps))
    return module, recorder


def test_exactly_sampled_blocks_and_always_active_are_updated_each_step():
    lisa = LISA(n_layers=2, interval=3, seed=7)
    module, rec = run(lisa, steps=12)
    names = {n for n, _ in module.named_parameters()}
    assert len(rec.steps) == 12
    for record in rec.steps:
        assert len(record.active_layers) == 2
        expected = expected_trainable(names, record.active_layers)
        assert record.trainable == expected, record.step
        assert record.changed == expected, record.step
    # the schedule follows (seed, period) and changes over the run
    periods = [sample_layers("uniform", 6, 2, 7, p) for p in range(4)]
    assert [list(s.active_layers) for s in lisa.history] == periods
    assert [s.step for s in lisa.history] == [0, 3, 6, 9]
    assert len({tuple(p) for p in periods}) > 1


def test_frozen_blocks_are_bit_identical_across_their_frozen_periods():
    lisa = LISA(n_layers=1, interval=4, seed=1)
    module = CausalLM()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    run(lisa, steps=12, module=module)
    trained = {i for s in lisa.history for i in s.active_layers}
    for name, p in module.named_parameters():
        block = block_of(name)
        if block is not None and block not in trained:
            assert torch.equal(p.detach(), start[name]), name
        if block is None and name not in ALWAYS:  # final norm: not always-active by default
            assert torch.equal(p.detach(), start[name]), name
    assert trained, "some block must have trained"


def test_drop_keeps_optimizer_state_only_for_trainable_params_bytes_counted():
    lisa = LISA(n_layers=2, interval=2, optimizer_state="drop")
    module, rec = run(lisa, steps=10)
    params = dict(module.named_parameters())
    for record in rec.steps:
        assert record.with_state == record.trainable, record.step
        # AdamW: exp_avg + exp_avg_sq in fp32 plus a 4-byte step counter per parameter tensor
        expected = sum(2 * params[n].numel() * 4 + 4 for n in record.trainable)
        assert record.state_bytes == expected, record.step


def test_keep_accumulates_state_of_every_block_ever_trained():
    lisa = LISA(n_layers=1, interval=2, optimizer_state="keep", seed=3)
    _, rec = run(lisa, steps=12)
    ever = set()
    for record in rec.steps:
        ever |= record.trainable
        assert record.with_state == ever
    assert rec.steps[-1].state_bytes > rec.steps[0].state_bytes


def test_offload_keeps_state_values_and_restores_them():
    # the state of a block trained, frozen and trained again continues where it stopped
    lisa = LISA(n_layers=3, interval=1, optimizer_state="offload", seed=0)
    module, rec = run(lisa, steps=8)
    for record in rec.steps:
        assert record.trainable <= record.with_state
        assert record.changed == record.trainable
    steps = module.trainer.optimizers[0].state
    counts = {int(s["step"]) for s in steps.values()}
    assert max(counts) == 8  # embeddings trained every step: step counter never reset
    assert len(counts) > 1  # blocks trained in some periods only: their counters were kept, not reset


@pytest.mark.parametrize("accumulate", [2, 3])
def test_gradient_accumulation_switches_only_on_step_boundaries(accumulate):
    lisa = LISA(n_layers=2, interval=2, seed=5)
    module = CausalLM()
    recorder = Recorder(lisa)
    quiet_trainer([lisa, recorder], max_steps=8, accumulate_grad_batches=accumulate).fit(
        module, token_loader(n_batches=8 * accumulate)
    )
    names = {n for n, _ in module.named_parameters()}
    assert len(recorder.steps) == 8
    for record in recorder.steps:  # every optimizer step trained one active set, entirely
        assert record.changed == expected_trainable(names, record.active_layers)
    for batch_idx, step, active in recorder.batch_starts:
        assert list(active) == sample_layers("uniform", 6, 2, 5, step // 2), (batch_idx, step)
    changes = [
        i
        for i in range(1, len(recorder.batch_starts))
        if recorder.batch_starts[i][2] != recorder.batch_starts[i - 1][2]
    ]
    assert changes and all(recorder.batch_starts[i][0] % accumulate == 0 for i in changes)


def test_user_frozen_parameters_stay_frozen():
    module = CausalLM()
    module.model.model.embed_tokens.weight.requires_grad_(False)
    for p in module.model.model.layers[0].parameters():
        p.requires_grad_(False)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    lisa = LISA(n_layers=5, interval=2)
    _, rec = run(lisa, steps=6, module=module)
    for record in rec.steps:
        assert 0 not in record.active_layers  # only blocks with trainable parameters are sampled
        assert "model.model.embed_tokens.weight" not in record.changed
    assert torch.equal(module.model.model.embed_tokens.weight, start["model.model.embed_tokens.weight"])
    # after fit, LISA gives back what it froze, and only that
    assert not module.model.model.embed_tokens.weight.requires_grad
    assert not any(p.requires_grad for p in module.model.model.layers[0].parameters())
    assert all(p.requires_grad for p in module.model.model.layers[1].parameters())


def test_always_active_empty_and_custom():
    module = CausalLM()
    lisa = LISA(n_layers=1, interval=3, always_active=["model.model.norm"])
    _, rec = run(lisa, steps=6, module=module)
    for record in rec.steps:
        outside = {n for n in record.changed if block_of(n) is None}
        assert outside == {"model.model.norm.weight"}

    lisa = LISA(n_layers=1, interval=3, always_active=[])
    _, rec = run(lisa, steps=3)
    assert all(all(block_of(n) is not None for n in r.changed) for r in rec.steps)


def test_a_block_in_always_active_trains_throughout_and_leaves_the_sampling_pool():
    module = CausalLM()
    lisa = LISA(n_layers=2, interval=2, seed=3, always_active=["model.model.layers.0", "model.model.embed_tokens"])
    _, rec = run(lisa, steps=10, module=module)
    for record in rec.steps:
        assert 0 not in record.active_layers and len(record.active_layers) == 2
        assert {block_of(n) for n in record.changed} == {None, 0, *record.active_layers}
    # every period trains the block, the embeddings and two sampled blocks: the same count in each
    assert len({s.trainable_params for s in lisa.history}) == 1 and len(lisa.history) == 5
    assert lisa.report is not None
    assert [e.name for e in lisa.report.sampled] == ["model.model.layers (5 of 6 blocks)"]
    assert str(lisa.report).startswith("LISA trains 2 of 5 blocks at a time, re-sampled every 2 steps")
    block = sum(p.numel() for p in module.model.model.layers[1].parameters())
    assert lisa.report.per_period == 2 * block


def test_tied_embeddings_are_counted_once():
    module = CausalLM(model=tiny_llama(tie=True))
    lisa = LISA(n_layers=2, interval=2)
    run(lisa, steps=2, module=module)
    embed = module.model.model.embed_tokens.weight
    assert module.model.lm_head.weight is embed
    block = sum(p.numel() for p in module.model.model.layers[0].parameters())
    assert lisa.history[0].trainable_params == embed.numel() + 2 * block


def test_logs_each_switch_to_the_trainers_loggers(tmp_path: Path):
    lisa = LISA(n_layers=2, interval=4)
    logger = CSVLogger(tmp_path, name="run")
    quiet_trainer([lisa], max_steps=9, logger=logger, log_every_n_steps=1).fit(CausalLM(), token_loader(9))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    switches = [r for r in rows if r.get("lisa/period")]
    assert [int(r["step"]) for r in switches] == [0, 4, 8]
    for row, switch in zip(switches, lisa.history, strict=True):
        assert [int(float(row[f"lisa/active_block_{j}"])) for j in range(2)] == list(switch.active_layers)
        assert int(float(row["lisa/trainable_params"])) == switch.trainable_params
        assert int(float(row["lisa/optimizer_state_bytes"])) == switch.optimizer_state_bytes
    assert lisa.active_layers == list(lisa.history[-1].active_layers)


def test_lr_scheduler_keeps_its_global_schedule():
    module = CausalLM(scheduler=True, lr=0.1)
    lisa = LISA(n_layers=2, interval=2)
    run(lisa, steps=7, module=module)
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


@pytest.mark.parametrize(
    ("optimizer", "kwargs"),
    [
        ("adamw", {"foreach": True}),
        ("adamw", {"fused": True}),
        ("adam", {}),
        ("sgd", {}),
        ("adamw8bit", {}),
    ],
)
def test_drop_works_with_each_optimizer(optimizer, kwargs):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    module = CausalLM(optimizer=optimizer, optimizer_kwargs=kwargs, lr=1e-2)
    lisa = LISA(n_layers=2, interval=2, seed=2)
    _, rec = run(lisa, steps=6, module=module)
    names = {n for n, _ in module.named_parameters()}
    for record in rec.steps:
        assert record.changed == expected_trainable(names, record.active_layers)
        assert record.with_state == record.trainable


def test_a_second_fit_starts_from_the_users_trainable_set():
    module = CausalLM()
    lisa = LISA(n_layers=2, interval=2)
    run(lisa, steps=3, module=module)
    assert all(p.requires_grad for p in module.parameters())
    _, rec = run(lisa, steps=3, module=module)
    assert len(rec.steps[-1].trainable) == len(expected_trainable({n for n, _ in module.named_parameters()}, (0, 1)))


def test_peft_lora_trains_only_the_adapters_of_sampled_blocks():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(6), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    module = CausalLM(model=model)
    lisa = LISA(n_layers=2, interval=2, seed=3)
    _, rec = run(lisa, steps=6, module=module)
    prefix = "model.base_model.model.model.layers."
    for record in rec.steps:
        assert record.changed, record.step
        assert all("lora_" in n for n in record.changed)  # base weights and embeddings stay frozen by PEFT
        assert {block_of(n, prefix) for n in record.changed} == set(record.active_layers)
        assert record.with_state == record.changed


class TwoOptimizers(CausalLM):
    """Manual optimization: one optimizer for the blocks, one for everything else."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
        return loss

    def configure_optimizers(self):
        blocks = list(self.model.model.layers.parameters())
        ids = {id(p) for p in blocks}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [torch.optim.AdamW(blocks, lr=1e-2), torch.optim.SGD(rest, lr=1e-2, momentum=0.9)]


def test_several_optimizers_under_manual_optimization():
    module = TwoOptimizers()
    lisa = LISA(n_layers=2, interval=4, seed=6)  # two optimizer steps per batch: a period is 2 batches
    run(lisa, steps=8, module=module)
    assert [s.step for s in lisa.history] == [0, 4]
    blocks_opt, rest_opt = module.trainer.optimizers
    names = dict(module.named_parameters())
    assert all(p.requires_grad for p in names.values())  # after fit, LISA gives every parameter back
    active = set(lisa.active_layers)
    with_state = {n for n, p in names.items() if p in blocks_opt.state}
    assert {block_of(n) for n in with_state} == active
    assert {n for n, p in names.items() if p in rest_opt.state} == set(ALWAYS)


def test_module_granularity_trains_and_frees_per_sub_module():
    lisa = LISA(n_layers=3, interval=2, granularity="module", seed=4)
    module, rec = run(lisa, steps=8)
    assert len(lisa.unit_names) == 12
    assert lisa.unit_names[:2] == ["model.model.layers.0.self_attn", "model.model.layers.0.mlp"]
    names = {n for n, _ in module.named_parameters()}
    for record in rec.steps:
        units = [lisa.unit_names[i] for i in record.active_layers]
        blocks = {int(u.split(".")[3]) for u in units}
        expected = {n for n in names if any(n.startswith(u + ".") for u in units)}
        # a block's norms train whenever one of its modules does
        expected |= {n for n in names if block_of(n) in blocks and "layernorm" in n}
        expected |= set(ALWAYS)
        assert record.changed == expected, record.step
        assert record.with_state == expected, record.step
    assert len({r.active_layers for r in rec.steps}) > 1


def test_always_active_flags():
    lisa = LISA(n_layers=1, interval=3, train_embeddings=False, train_head=False, train_final_norm=True)
    _, rec = run(lisa, steps=3)
    for record in rec.steps:
        assert {n for n in record.changed if block_of(n) is None} == {"model.model.norm.weight"}


@pytest.mark.parametrize("sampling", ["cyclic", "weight_norm", [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
def test_sampling_strategies_in_a_run(sampling):
    lisa = LISA(n_layers=2, interval=2, sampling=sampling, temperature=0.5)
    module, rec = run(lisa, steps=12)
    names = {n for n, _ in module.named_parameters()}
    for record in rec.steps:
        assert record.changed == expected_trainable(names, record.active_layers)
    chosen = [s.active_layers for s in lisa.history]
    assert len(chosen) == 6
    if sampling == "cyclic":
        assert {i for a in chosen[:3] for i in a} == set(range(6))
    if isinstance(sampling, list):
        assert {i for a in chosen for i in a} <= {1, 2, 3, 5}


class CheckpointedLM(pl.LightningModule):
    """Blocks run under reentrant activation checkpointing (which gives no gradient to a block whose
    inputs do not require grad), unless ``input_grads`` makes the embedding output require grad."""

    def __init__(self, input_grads: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(4)
        )
        self.head = torch.nn.Linear(16, 64)
        self.input_grads = input_grads

    def training_step(self, batch, batch_idx):
        hidden = self.embed(batch)
        if self.input_grads:
            hidden.requires_grad_(True)
        for block in self.blocks:
            hidden = checkpoint(block, hidden, use_reentrant=True)
        return torch.nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), batch.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_warns_when_sampled_blocks_get_no_gradient():
    lisa = LISA(n_layers=2, interval=2, train_embeddings=False)
    with pytest.warns(UserWarning, match=r"received no gradient at step 0.*enable_input_require_grads"):
        run(lisa, steps=2, module=CheckpointedLM(input_grads=False))
    _, rec = run(LISA(n_layers=2, interval=2, train_embeddings=False), steps=2, module=CheckpointedLM(input_grads=True))
    for record in rec.steps:
        assert {block_of(n, "blocks.") for n in record.changed} == {*record.active_layers, None}
