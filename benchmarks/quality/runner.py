"""One cell of the study: fine-tune a fresh copy of the base model with one arm, one learning rate and one seed.

A cell trains through Lightning as a :class:`~lightning_lisa.recipes.module.CausalLMModule` (via
:meth:`~lightning_lisa.recipes.module.CausalLMModule.from_model`), scores the validation data at the end of
every period of K = 10 steps (a subset of it; all of it at the last step), and records, per block, the
norm of its weight change and the periods it was active. With ``test=True`` it also scores the test data and
both measures of forgetting; the study asks for that only at an arm's chosen learning rate.

Seed *s* fixes the data order (the same batches for every arm: paired comparisons), LoRA's initialisation
(``torch.manual_seed(s)`` before the adapters are made) and LISA's draws (``LISA(seed=s)``: a generator per
period of its own, separate from the data's).
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from arms import ARMS, Arm
from tasks import IGNORE, Examples, Item, Rows, Scores, Sizes, Task, build_task, collate, english, evaluate
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lightning_lisa import LISA
from lightning_lisa.recipes.module import CausalLMModule, always_active_parameters

EVAL_EVERY = 10  # steps between validation points (K of the LISA arms)


def schedule(warmup: int, total: int, floor: float = 0.1) -> Any:
    """Linear warm-up, then cosine decay to ``floor`` of the peak."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def is_embedding_or_head(name: str) -> bool:
    """Whether a parameter is the token embeddings or the output head (Llama naming; tied here)."""
    return "embed_tokens" in name or "lm_head" in name


def is_block(name: str) -> bool:
    """Whether a parameter belongs to one of the transformer blocks (Llama naming)."""
    return ".layers." in name


class LM(CausalLMModule):
    """:class:`CausalLMModule` with the study's optimizer and schedule.

    The optimizer is AdamW over all parameters (LISA decides what trains), or over the trainable ones for
    LoRA (``trainable_only``); the module's own ``always_active_lr_scale`` gives the embeddings and the head
    their rate. The rate follows :func:`schedule` over ``steps`` (warm-up: a tenth).
    """

    def __init__(self, steps: int, trainable_only: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        self.trainable_only = trainable_only

    def make_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if not self.trainable_only:
            return super().make_optimizer(model)
        lr, scale = self.hparams["learning_rate"], self.hparams["always_active_lr_scale"]
        trainable = [p for p in self.parameters() if p.requires_grad]
        if scale == 1.0:
            return torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        # LoRA with the embeddings and head (`Arm.lora_eh`): the set the scale acts on in the parent's optimizer
        # (LISA's default always-active set) gets a parameter group at its own rate
        always = always_active_parameters(self.model, "always_active_lr_scale", scale)
        own = {id(p) for p in always if p.requires_grad}
        assert own, "always_active_lr_scale needs trainable embeddings or head beside LoRA's adapters"
        groups = [
            {"params": [p for p in trainable if id(p) not in own], "lr": lr},
            {"params": [p for p in trainable if id(p) in own], "lr": lr * scale},
        ]
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(max(1, self.steps // 10), self.steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Curve(pl.Callback):
    """Scores the validation data every ``every`` steps (all of it at the last step); records each step's loss."""

    def __init__(self, task: Task, pad_id: int, device: str, steps: int, every: int = EVAL_EVERY) -> None:
        self.task, self.pad_id, self.device, self.steps, self.every = task, pad_id, device, steps, every
        self.points: list[dict[str, Any]] = []
        self.train_loss: list[float] = []
        self.final: Scores | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        if isinstance(outputs, dict) and "loss" in outputs:
            self.train_loss.append(float(outputs["loss"]))
        step = trainer.global_step
        if step % self.every and step != self.steps:
            return
        last = step == self.steps
        data = self.task.val if last else self.task.curve
        scores = evaluate(pl_module.model, data, self.pad_id, self.device, self.task.exact)
        self.points.append({"step": step, "value": self.task.value(scores), "loss": scores.loss, "all": last})
        if last:
            self.final = scores


@dataclass
class Base:
    """What every cell shares: the tokenizer, the base model's weights, and the forgetting data."""

    tokenizer: PreTrainedTokenizerBase
    config: Any
    state: dict[str, torch.Tensor]
    pad_id: int
    sizes: Sizes
    english: Rows
    control: list[Item]
    device: str = "cpu"

    def fresh(self) -> LlamaForCausalLM:
        """A copy of the base model."""
        model = LlamaForCausalLM(self.config)
        model.load_state_dict(self.state)
        return model


def load_base(
    smoke: bool, cache: Path, model_file: str
) -> tuple[PreTrainedTokenizerBase, Any, dict[str, torch.Tensor]]:
    """The tokenizer, the config and the weights of the base model (a tiny random Llama with ``smoke``)."""
    if smoke:
        from lightning_lisa.recipes.corpus import embedded_corpus
        from lightning_lisa.recipes.tokenizer import default_tokenizer

        tokenizer = default_tokenizer([e.text for e in embedded_corpus()][:40], 512, cache)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=256,
        )  # fmt: skip
        torch.manual_seed(0)
        return tokenizer, config, LlamaForCausalLM(config).state_dict()
    from lightning_lisa.recipes.gguf import load_gguf_model, load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(model_file, cache)
    model = load_gguf_model(model_file, cache)
    return tokenizer, model.config, model.state_dict()


def build_model(base: Base, arm: Arm, seed: int) -> tuple[Any, list[pl.Callback]]:
    """A fresh model set up for ``arm`` (LoRA adapters, frozen parameters) and the callbacks it trains with."""
    torch.manual_seed(seed)
    model: Any = base.fresh()
    callbacks: list[pl.Callback] = []
    if arm.method == "lora":
        from peft import LoraConfig, get_peft_model

        assert arm.rank is not None
        config = LoraConfig(r=arm.rank, lora_alpha=2 * arm.rank, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, config)
        if arm.lora_eh:  # in place (not peft's `modules_to_save` copies), so the tied weight stays one tensor
            for name, p in model.named_parameters():
                if is_embedding_or_head(name):
                    p.requires_grad_(True)
    elif arm.method == "eh":
        for name, p in model.named_parameters():
            p.requires_grad_(is_embedding_or_head(name))
    return model, callbacks


def lisa_callback(arm: Arm, seed: int, steps: int) -> LISA | None:
    """The LISA callback of a ``lisa`` or ``fixed`` arm (``fixed``: one period as long as the run)."""
    if arm.method not in ("lisa", "fixed"):
        return None
    assert arm.n_layers is not None
    return LISA(n_layers=arm.n_layers, interval=arm.interval or steps, seed=seed, **arm.lisa)


def fit(
    base: Base, arm: Arm, task: Task, lr: float, seed: int, steps: int, extra: Sequence[pl.Callback] = ()
) -> tuple[Any, Curve | None, LISA | None]:
    """Fine-tune a fresh model; return it, its validation curve and its LISA callback (if any).

    With ``extra`` callbacks (a measurement), they replace the validation curve.
    """
    model, callbacks = build_model(base, arm, seed)
    curve = None if extra else Curve(task, base.pad_id, base.device, steps)
    callbacks += [*extra, *([curve] if curve else [])]
    lisa = lisa_callback(arm, seed, steps)
    lora = arm.method == "lora"
    module = LM.from_model(
        model, steps=steps, learning_rate=lr, trainable_only=lora, always_active_lr_scale=arm.eh_lr_scale
    )
    loader = DataLoader(
        task.train, batch_size=task.batch, shuffle=True, generator=torch.Generator().manual_seed(seed),
        collate_fn=_training_collate(base.pad_id),
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="gpu" if base.device == "cuda" else "cpu", devices=1, max_steps=steps, max_epochs=-1,
        callbacks=[*callbacks, *([lisa] if lisa else [])], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, loader)
    return model, curve, lisa


def _training_collate(pad_id: int) -> Any:
    pad = collate(pad_id)

    def without_exact(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = pad(items)
        batch.pop("exact")
        return batch

    return without_exact


@torch.no_grad()
def block_changes(model: Any, base_state: dict[str, torch.Tensor]) -> tuple[dict[int, float], float]:
    """Per block index, the norm of its weight change from the base model; and the embeddings and head's.

    LoRA's adapters are merged first (the change of the weights the model computes with).
    """
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    squares: dict[int, float] = {}
    eh = 0.0
    for name, p in model.state_dict().items():
        if name not in base_state:
            continue
        delta = float((p.detach().float().cpu() - base_state[name].float()).pow(2).sum())
        if is_block(name):
            index = int(name.split(".layers.")[1].split(".")[0])
            squares[index] = squares.get(index, 0.0) + delta
        elif "embed_tokens" in name or "lm_head" in name:
            eh += delta
    return {i: math.sqrt(v) for i, v in sorted(squares.items())}, math.sqrt(eh)


def test_scores(base: Base, task: Task, model: Any) -> dict[str, Any]:
    """The test metric and both measures of forgetting of a fine-tuned model."""
    scores = evaluate(model, task.test, base.pad_id, base.device, task.exact)
    english_loss = evaluate(model, base.english, base.pad_id, base.device, exact=False).loss
    control = evaluate(model, Examples(base.control, base.tokenizer), base.pad_id, base.device, exact=True)
    return {
        "test": task.value(scores),
        "test_loss": scores.loss,
        "test_correct": scores.correct,
        "english_loss": english_loss,
        "control": control.accuracy,
        "control_correct": control.correct,
    }


def commit() -> str:
    """The commit of the code that runs (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_cell(
    base: Base, task: Task, arm_name: str, lr: float, seed: int, steps: int, test: bool, weights: Path | None = None
) -> dict[str, Any]:
    """Train one cell and return everything the study keeps of it; save its weights to ``weights`` if given."""
    arm = ARMS[arm_name]
    start, cpu = time.perf_counter(), time.process_time()
    model, curve, lisa = fit(base, arm, task, lr, seed, steps)
    assert curve is not None
    assert curve.final is not None
    changes, eh_change = block_changes(model, base.state)
    periods = [list(p.active_layers) for p in lisa.history] if lisa else []
    active = {i: sum(i in p for p in periods) for i in changes}
    result: dict[str, Any] = {
        "task": task.name, "arm": arm_name, "lr": lr, "seed": seed, "steps": steps, "commit": commit(),
        "val": task.value(curve.final), "val_loss": curve.final.loss, "val_correct": curve.final.correct,
        "curve": curve.points, "train_loss": curve.train_loss, "periods": periods,
        "blocks": {str(i): {"change_norm": changes[i], "periods_active": active[i]} for i in changes},
        "eh_change_norm": eh_change,
    }  # fmt: skip
    if test:
        result.update(test_scores(base, task, model))
    if weights is not None:
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu
    return result


def test_from_weights(base: Base, task: Task, arm_name: str, seed: int, weights: Path) -> dict[str, Any]:
    """The test scores of a cell whose trained weights were saved by :func:`run_cell`."""
    model, _ = build_model(base, ARMS[arm_name], seed)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.to(base.device)
    return test_scores(base, task, model)


def make_base(smoke: bool, cache: Path, model_file: str, device: str, control: list[Item] | None) -> Base:
    """Load the base model and the forgetting data; the control set is given, or chosen from the base model."""
    from tasks import SMOKE, control_items

    sizes = SMOKE if smoke else Sizes()
    tokenizer, config, state = load_base(smoke, cache, model_file)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    base = Base(tokenizer, config, state, pad_id, sizes, english(tokenizer, sizes), control or [], device)
    if control is None:
        model = base.fresh().to(device)
        base.control = control_items(model, tokenizer, pad_id, device)
    return base


def task_for(base: Base, name: str) -> Task:
    """Task ``name``'s data for this base model."""
    return build_task(name, base.tokenizer, base.sizes)


__all__ = ["IGNORE", "Base", "make_base", "run_cell", "task_for", "test_from_weights"]
