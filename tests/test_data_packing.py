"""Isolated packing: packed rows give the losses and logits of their examples run one by one; the attention check;
the loss of a step is the mean over all of its target tokens, however they fall into micro-batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_lisa.errors import LISAConfigError
from lightning_lisa.recipes.data import IGNORE_INDEX, STEP_TARGETS, TextDataModule
from lightning_lisa.recipes.data.loading import StepSampler, best_fit_decreasing
from lightning_lisa.recipes.module import CausalLMModule, check_packing_isolation
from lightning_lisa.testing import tiny_llama
from lightning_lisa.testing.trainer import quiet_trainer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
         "xi", "omicron", "pi", "rho", "sigma", "tau"]  # fmt: skip


def records(n: int = 24) -> list[dict[str, str]]:
    """Alpaca-like records of unequal lengths."""
    out = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 5))
        answer = " ".join(WORDS[(2 * i + k) % len(WORDS)] for k in range(1 + (i * 7) % 9))
        out.append({"prompt": prompt, "completion": answer})
    return out


def data(tmp_path: Path, **kwargs: Any) -> TextDataModule:
    path = tmp_path / "data.jsonl"
    if not path.exists():
        path.write_text("\n".join(json.dumps(r) for r in records()) + "\n")
    settings: dict[str, Any] = {"path": str(path), "vocab_size": 300, "max_length": 48, "packing": "isolated",
                                "batch_size": 2, "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.2}  # fmt: skip
    settings.update(kwargs)
    return TextDataModule(**settings)


def model(attn: str = "sdpa", seed: int = 0) -> Any:
    return tiny_llama(num_layers=2, seed=seed, vocab_size=300, attn_implementation=attn)


def test_best_fit_decreasing_fills_rows_and_keeps_every_item():
    lengths = [7, 3, 9, 1, 4, 4, 6, 2, 8, 5]
    bins = best_fit_decreasing(lengths, capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # 49 tokens: the least possible number of rows of 10
    with pytest.raises(ValueError, match="item 0 has 11 tokens"):
        best_fit_decreasing([11], capacity=10)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_packed_rows_give_the_losses_and_logits_of_their_examples(tmp_path: Path, attn: str, chunk: int | None):
    dm = data(tmp_path, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "attention_mask" not in batch and "position_ids" in batch
    assert all(len(row["seq_lengths"]) > 1 for row in [dm.train_set[i] for i in range(4)])  # type: ignore[index]
    module = CausalLMModule.from_model(model(attn), loss_chunk_size=chunk)
    module.eval()
    inputs = {k: v for k, v in batch.items() if k != STEP_TARGETS}
    with torch.no_grad():
        packed_loss = module(inputs).loss if chunk is None else module.chunked_loss(inputs, chunk)
        packed_logits = module(inputs).logits
    summed, count, compared = 0.0, 0, 0
    for row in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist()
        ends = [*starts[1:], batch["input_ids"].shape[1]]
        for start, end in zip(starts, ends, strict=True):
            labels = batch["labels"][row, start:end]
            if (labels == IGNORE_INDEX).all():
                continue  # the padding after the last example
            ids = batch["input_ids"][row, start:end][None]
            with torch.no_grad():
                alone = module.model(input_ids=ids, labels=labels[None])
            torch.testing.assert_close(packed_logits[row, start:end], alone.logits[0], rtol=1e-5, atol=1e-5)
            n = int((labels[1:] != IGNORE_INDEX).sum())
            summed += alone.loss.item() * n
            count += n
            compared += 1
    assert compared >= 8
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(packed_loss.item(), summed / count, rtol=1e-5, atol=1e-6)


def leaky_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    """sdpa that ignores the mask: causal over the whole row, so packed examples attend to each other."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def test_attention_that_crosses_examples_is_refused(tmp_path: Path):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("leaky_test", leaky_attention)
    AttentionMaskInterface.register("leaky_test", sdpa_mask)
    check_packing_isolation(model("sdpa"))
    leaky = model("leaky_test")
    with pytest.raises(LISAConfigError, match=r"`packing='isolated'` needs attention.*'leaky_test'"):
        check_packing_isolation(leaky)
    dm = data(tmp_path)
    module = CausalLMModule.from_model(leaky)
    with pytest.raises(LISAConfigError, match="attends across them"):
        quiet_trainer([], max_steps=1).fit(module, datamodule=dm)
    unpacked = data(tmp_path, packing="none")
    quiet_trainer([], max_steps=1, limit_val_batches=0).fit(CausalLMModule.from_model(leaky), datamodule=unpacked)


class Gradients(pl.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.tokens.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", ["none", "isolated"])
def test_a_step_is_the_mean_over_all_target_tokens_of_its_micro_batches(tmp_path: Path, packing: str):
    runs = {}
    for batch_size, accumulate in ((4, 1), (2, 2)):
        recorder = Gradients()
        module = CausalLMModule.from_model(model(), learning_rate=1e-3)
        trainer = quiet_trainer([recorder], max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0)
        trainer.fit(module, datamodule=data(tmp_path, packing=packing, batch_size=batch_size))
        runs[accumulate] = recorder
    assert sum(runs[2].tokens) == runs[1].tokens[0]  # the same rows in the step
    assert runs[2].tokens[0] != runs[2].tokens[1]  # unequal micro-batches: a mean of means would differ
    assert runs[1].grads.keys() == runs[2].grads.keys() and runs[1].grads
    for name, grad in runs[1].grads.items():
        torch.testing.assert_close(runs[2].grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_sampler_deals_each_step_to_ranks_with_the_step_total():
    targets = torch.arange(1, 12).numpy()  # 11 rows
    ranks = [StepSampler(targets, batch_size=2, accumulate=2, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(1)
    dealt = [list(s) for s in ranks]
    assert len(dealt[0]) == len(dealt[1]) == len(ranks[0]) == 6  # 11 rows padded to 12, 6 per rank
    seen = sorted(i for rank in dealt for i, _ in rank)
    assert set(seen) == set(range(11)) and len(seen) == 12
    for start in (0, 4):  # each optimizer step: 2 micro-batches of 2 rows on each of 2 ranks
        rows = [i for rank in dealt for i, _ in rank[start : start + 4]]
        totals = {t for rank in dealt for _, t in rank[start : start + 4]}
        assert totals == {int(targets[rows].sum())}
    ranks[0].set_epoch(2)
    assert [i for i, _ in ranks[0]] != [i for i, _ in dealt[0]]  # a new order each epoch


def test_a_batch_without_step_targets_or_positions_is_computed_as_before():
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 300, (3, 10)), "labels": torch.randint(0, 300, (3, 10)),
             "attention_mask": torch.ones(3, 10, dtype=torch.long)}  # fmt: skip
    plain, wrapped = model(seed=1), model(seed=1)
    module = CausalLMModule.from_model(wrapped)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no Trainer, nothing to log to
    reference = plain(**batch).loss
    loss = module.training_step(batch, 0)
    assert torch.equal(loss, reference)
    reference.backward()
    loss.backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
