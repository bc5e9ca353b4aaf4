"""Fine-tuning quality of full fine-tuning, LoRA and LISA: a small, reproducible version of the paper's comparison.

A Llama-architecture model (default: 8 blocks, hidden 256, 7.9M parameters, a 4096-token byte-level BPE)
is first trained on the English help text that ships with Python (``pydoc_data.topics``) and cached on
disk. Then every arm fine-tunes it for the same number of steps, at its best learning rate from a small
grid, on two tasks:

* **code** (domain shift): Python standard-library source read from this Python install
  (``sysconfig.get_paths()["stdlib"]``), split by file. Reported: the held-out loss on code (lower is
  better) and the forgetting: the increase of the loss on held-out English text.
* **arithmetic**: word problems in a GSM8K-like format (``Question: ... Answer: 7 + 5 = 12. 12 - 3 = 9.
  #### 9``), generated with a fixed seed; one or two operations on numbers up to 20. Trained on the answers
  only. Reported: exact-match accuracy of the ``####`` number, decoding greedily.

Arms: full fine-tuning (AdamW), LoRA r=16 (all linear layers but the head), and LISA (gamma = 2 of 8
blocks, K = 10) with ``uniform``, ``weight_norm`` and ``cyclic`` sampling. Each arm's learning rate is
chosen on a validation split (code: validation loss; arithmetic: validation loss on the answers) with
the first seed; the other seeds reuse it. Seeds change the data order, LoRA's initialization and
LISA's schedule; the pretrained model and the data are the same for all.

Sizes of the default run (``python benchmarks/quality.py``): pretraining 600 steps of 8 x 128 tokens;
fine-tuning 100 steps of 8 x 128 tokens (code) or 16 problems (arithmetic), warm-up 10 steps then cosine
decay to 10%; learning-rate grids of 2 values per arm; 3 seeds; 64 x 128 held-out code tokens, 64 x 128
English tokens, 200 test problems. That is 40 fine-tuning runs of 60-90 s each on one thread of the 2-core
machine it was developed on, plus about 7 minutes of pretraining (cached for later runs): about 55 minutes on
one thread, an estimated 35-45 minutes with 2 threads on 2 idle cores. ``--threads 1`` is much faster when the
CPUs are shared with other work. ``--smoke`` runs a tiny version in well under a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import common
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_lisa import LISA
from lightning_lisa.recipes.corpus import embedded_corpus
from lightning_lisa.recipes.tokenizer import default_cache_dir, default_tokenizer

IGNORE = -100
ARMS = ("full", "lora", "lisa-uniform", "lisa-weight_norm", "lisa-cyclic")
ARM_NAMES = {
    "full": "full fine-tuning",
    "lora": "LoRA r=16",
    "lisa-uniform": "LISA uniform",
    "lisa-weight_norm": "LISA weight_norm",
    "lisa-cyclic": "LISA cyclic",
}
#: Learning-rate grids. A reduced run (grids 3e-4,1e-3 and, for LoRA, 1e-3,3e-3) chose the top value for
#: every arm on both tasks, so the default grids start there and go one step higher.
DEFAULT_LRS = {
    "full": [1e-3, 3e-3],
    "lora": [3e-3, 1e-2],
    "lisa-uniform": [1e-3, 3e-3],
    "lisa-weight_norm": [1e-3, 3e-3],
    "lisa-cyclic": [1e-3, 3e-3],
}
TASKS = ("code", "arithmetic")


@dataclass(frozen=True)
class Sizes:
    """Model and data sizes (``--smoke`` uses tiny ones)."""

    hidden: int = 256
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 688
    vocab: int = 4096
    seq_len: int = 128
    batch: int = 8
    arith_batch: int = 16
    pretrain_lr: float = 1e-3
    code_chars: int = 1_500_000
    eval_chunks: int = 64
    arith_train: int = 2000
    arith_val: int = 100
    arith_test: int = 200


SMOKE = Sizes(
    hidden=32,
    layers=4,
    heads=2,
    kv_heads=1,
    intermediate=64,
    vocab=512,
    seq_len=32,
    batch=4,
    arith_batch=4,
    pretrain_lr=3e-3,
    code_chars=60_000,
    eval_chunks=4,
    arith_train=64,
    arith_val=8,
    arith_test=8,
)


# ------------------------------------------------------------------------------------ data


def pack(texts: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Concatenate the token ids of ``texts`` (each followed by EOS) and cut them into ``seq_len`` rows."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def english(tokenizer: PreTrainedTokenizerFast, sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out rows of the pydoc topics: every 10th topic is held out."""
    texts = [e.text for e in embedded_corpus()]
    train = pack([t for i, t in enumerate(texts) if i % 10 != 3], tokenizer, sizes.seq_len)
    held_out = pack([t for i, t in enumerate(texts) if i % 10 == 3], tokenizer, sizes.seq_len)
    return train, held_out[: sizes.eval_chunks]


def code(tokenizer: PreTrainedTokenizerFast, sizes: Sizes) -> dict[str, torch.Tensor]:
    """Train / validation / test rows of standard-library source, split by file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    budget = {"train": sizes.code_chars, "val": sizes.code_chars // 10, "test": sizes.code_chars // 5}
    for index, path in enumerate(files):
        split = "val" if index % 10 == 1 else "test" if index % 10 == 2 else "train"
        if budget[split] <= 0:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[: budget[split]]
        budget[split] -= len(text)
        parts[split].append(text)
    rows = {split: pack(texts, tokenizer, sizes.seq_len) for split, texts in parts.items()}
    rows["val"] = rows["val"][: sizes.eval_chunks // 2]
    rows["test"] = rows["test"][: sizes.eval_chunks]
    return rows


NAMES = ["Ann", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kim", "Liam"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "coins", "cards", "shells"]


@dataclass(frozen=True)
class Problem:
    """One word problem: the question, the worked answer and the result."""

    question: str
    answer: str
    result: int


def make_problem(rng: random.Random) -> Problem:
    """A GSM8K-like problem with one or two operations."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(4)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if kind == 0:
        q = f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
        return Problem(q, f"{a} + {b} = {a + b}.\n#### {a + b}", a + b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {item}. {name} gives {b} {item} to {other}. How many {item} does {name} have left?"
        return Problem(q, f"{a} - {b} = {a - b}.\n#### {a - b}", a - b)
    if kind == 2:
        c = rng.randint(1, a + b)
        q = (
            f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {other}. "
            f"How many {item} does {name} have now?"
        )
        s = a + b
        return Problem(q, f"{a} + {b} = {s}. {s} - {c} = {s - c}.\n#### {s - c}", s - c)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy?"
    return Problem(q, f"{a} * {b} = {a * b}.\n#### {a * b}", a * b)


def problems(sizes: Sizes, seed: int = 1234) -> dict[str, list[Problem]]:
    """Disjoint train / validation / test problems, the same for every arm and seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[Problem]] = {"test": [], "val": [], "train": []}
    for split, count in (("test", sizes.arith_test), ("val", sizes.arith_val), ("train", sizes.arith_train)):
        while len(out[split]) < count:
            p = make_problem(rng)
            if p.question not in seen:
                seen.add(p.question)
                out[split].append(p)
    return out


def prompt(problem: Problem) -> str:
    return f"Question: {problem.question}\nAnswer:"


class ProblemSet(Dataset[dict[str, torch.Tensor]]):
    """Tokenized problems; labels only on the answer (and EOS)."""

    def __init__(self, items: list[Problem], tokenizer: PreTrainedTokenizerFast) -> None:
        self.rows: list[tuple[list[int], list[int]]] = []
        for p in items:
            head = tokenizer(prompt(p))["input_ids"]
            tail = tokenizer(" " + p.answer)["input_ids"] + [tokenizer.eos_token_id]
            self.rows.append((head + tail, [IGNORE] * len(head) + tail))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows[index]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


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


class Rows(Dataset[dict[str, torch.Tensor]]):
    """Packed rows of tokens, trained on every token."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)}


# ----------------------------------------------------------------------------------- model


def model_config(sizes: Sizes, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def schedule(warmup: int, total: int, floor: float = 0.1) -> Any:
    """Linear warm-up, then cosine decay to ``floor`` of the peak."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


class LM(pl.LightningModule):
    """Trains a causal LM with AdamW (over all parameters, or only trainable ones for LoRA)."""

    def __init__(self, model: torch.nn.Module, lr: float, steps: int, trainable_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.steps = steps
        self.trainable_only = trainable_only

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad or not self.trainable_only]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        warmup = max(1, self.steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(warmup, self.steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Progress(pl.Callback):
    """Prints the training loss every ``every`` steps (for the long pretraining)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float("nan")
            seconds = time.perf_counter() - self.start
            print(f"  pretraining step {step}/{trainer.max_steps}: loss {loss:.3f}, {seconds:.0f} s", flush=True)


class LossCurve(pl.Callback):
    """Records the training loss of every optimizer step (for the loss-curve plots)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        if isinstance(outputs, dict) and "loss" in outputs:
            self.losses.append(float(outputs["loss"]))


def fit(module: LM, data: Dataset[Any], batch: int, steps: int, seed: int, pad_id: int, callbacks: list[Any]) -> None:
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=generator, collate_fn=collate(pad_id))
    trainer = pl.Trainer(
        accelerator="cpu",
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
    total, count = 0.0, 0
    for items in DataLoader(data, batch_size=batch, collate_fn=collate(pad_id)):
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
    model: torch.nn.Module, items: list[Problem], tokenizer: PreTrainedTokenizerFast, batch: int = 50
) -> float:
    """Exact match of the ``####`` number, greedy decoding from the left-padded prompts."""
    model.eval()
    tokenizer.padding_side = "left"
    correct = 0
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        enc = tokenizer([prompt(p) for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            max_new_tokens=32,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for p, text in zip(chunk, texts, strict=True):
            found = re.search(r"####\s*(-?\d+)", text)
            correct += int(found is not None and int(found.group(1)) == p.result)
    model.train()
    return 100.0 * correct / max(len(items), 1)


# ------------------------------------------------------------------------------ experiment


class Benchmark:
    """Holds the tokenizer, the data and the pretrained weights; runs one fine-tuning at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes: Sizes = SMOKE if args.smoke else Sizes()
        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "quality"
        self.cache = cache
        texts = [e.text for e in embedded_corpus()]
        self.tokenizer = default_tokenizer(texts, vocab_size=self.sizes.vocab, cache_dir=cache)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.english_train, self.english_val = english(self.tokenizer, self.sizes)
        self.code = code(self.tokenizer, self.sizes)
        self.problems = problems(self.sizes)
        self.config = model_config(self.sizes, self.tokenizer)
        self.pretrained, self.pretrain_info = self._pretrained()
        self.english_before = self.pretrain_info["english_val_loss"]

    def _pretrained(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Pretrain on English (or load the cached weights of an identical earlier pretraining)."""
        args, sizes = self.args, self.sizes
        key = json.dumps(
            {"sizes": asdict(sizes), "steps": args.pretrain_steps, "config": self.config.to_dict(), "v": 1},
            sort_keys=True,
            default=str,
        )
        path = self.cache / f"pretrained-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        self.loaded = path.is_file()
        if self.loaded:
            saved = torch.load(path, weights_only=True)
            return saved["state_dict"], {**saved["info"], "cached": str(path)}
        start, cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(0)
        model = LlamaForCausalLM(self.config)
        module = LM(model, sizes.pretrain_lr, args.pretrain_steps)
        every = max(1, args.pretrain_steps // 6)
        fit(module, Rows(self.english_train), sizes.batch, args.pretrain_steps, 0, self.pad_id, [Progress(every)])
        info = {
            "steps": args.pretrain_steps,
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu,
            "english_val_loss": mean_loss(model, Rows(self.english_val), self.pad_id),
            "code_test_loss": mean_loss(model, Rows(self.code["test"]), self.pad_id),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)
        return model.state_dict(), {**info, "cached": str(path)}

    def run(self, task: str, arm: str, lr: float, seed: int) -> dict[str, Any]:
        """Fine-tune a fresh copy of the pretrained model; return its metrics and its training-loss curve."""
        args, sizes = self.args, self.sizes
        start, cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(seed)
        model: torch.nn.Module = LlamaForCausalLM(self.config)
        model.load_state_dict(self.pretrained)
        curve = LossCurve()
        callbacks: list[Any] = [curve]
        if arm == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
            model = get_peft_model(model, lora)
        elif arm.startswith("lisa-"):
            sampling = arm.removeprefix("lisa-")
            callbacks.append(LISA(n_layers=args.n_layers, interval=args.interval, sampling=sampling, seed=seed))  # type: ignore[arg-type]
        module = LM(model, lr, args.steps, trainable_only=arm == "lora")
        if task == "code":
            data: Dataset[Any] = Rows(self.code["train"])
            batch = sizes.batch
        else:
            data = ProblemSet(self.problems["train"], self.tokenizer)
            batch = sizes.arith_batch
        fit(module, data, batch, args.steps, seed, self.pad_id, callbacks)
        if task == "code":
            metrics: dict[str, Any] = {
                "val_loss": mean_loss(model, Rows(self.code["val"]), self.pad_id),
                "test_loss": mean_loss(model, Rows(self.code["test"]), self.pad_id),
                "english_loss": mean_loss(model, Rows(self.english_val), self.pad_id),
            }
            metrics["forgetting"] = metrics["english_loss"] - self.english_before
        else:
            metrics = {
                "val_loss": mean_loss(model, ProblemSet(self.problems["val"], self.tokenizer), self.pad_id),
                "accuracy": accuracy(model, self.problems["test"], self.tokenizer),
            }
        metrics["seconds"] = time.perf_counter() - start
        metrics["cpu_seconds"] = time.process_time() - cpu
        return {**metrics, "train_loss": curve.losses}


def parse_lrs(values: list[str] | None, arms: list[str]) -> dict[str, list[float]]:
    """``--lrs 1e-4,3e-4`` (every arm) and/or ``--lrs lora=1e-3,3e-3 full=1e-4`` (per arm)."""
    grids = {arm: list(DEFAULT_LRS[arm]) for arm in arms}
    for value in values or []:
        name, _, numbers = value.rpartition("=")
        try:
            lrs = [float(x) for x in numbers.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(
                f"--lrs {value!r}: learning rates must be numbers, e.g. 1e-4,3e-4 or lora=1e-3,3e-3"
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


def report(results: dict[str, Any], arms: list[str], tasks: list[str]) -> dict[str, Any]:
    """Print the tables and the goals (LISA >= LoRA, LISA within 2% of full); return the goals."""
    goals: dict[str, Any] = {}
    if "code" in tasks:
        print(
            "\ncode (domain shift): held-out loss on stdlib source (lower is better); "
            "forgetting = increase of the English loss"
        )
        print(f"{'arm':<18}{'best lr':>9}{'code loss':>18}{'forgetting':>18}{'val loss by lr (seed 0)':>40}")
        for arm in arms:
            r = results["code"][arm]
            loss = spread([s["test_loss"] for s in r["seeds"].values()])
            forget = spread([s["forgetting"] for s in r["seeds"].values()])
            grid = "  ".join(f"{lr:g}:{v:.3f}" for lr, v in r["grid"].items())
            print(
                f"{ARM_NAMES[arm]:<18}{r['best_lr']:>9g}{loss[0]:>11.4f} ± {loss[1]:.4f}"
                f"{forget[0]:>+11.4f} ± {forget[1]:.4f}    {grid}"
            )
    if "arithmetic" in tasks:
        print("\narithmetic: exact-match accuracy % of the #### answer, greedy decoding (higher is better)")
        print(f"{'arm':<18}{'best lr':>9}{'accuracy %':>18}{'val loss by lr (seed 0)':>40}")
        for arm in arms:
            r = results["arithmetic"][arm]
            acc = spread([s["accuracy"] for s in r["seeds"].values()])
            grid = "  ".join(f"{lr:g}:{v:.3f}" for lr, v in r["grid"].items())
            print(f"{ARM_NAMES[arm]:<18}{r['best_lr']:>9g}{acc[0]:>11.1f} ± {acc[1]:>4.1f}    {grid}")

    print("\ngoals (means over seeds): LISA at least LoRA's, and within 2% of full fine-tuning")
    for arm in [a for a in arms if a.startswith("lisa-")]:
        for task in tasks:
            metric = "test_loss" if task == "code" else "accuracy"

            def mean(name: str, task: str = task, metric: str = metric) -> float | None:
                if name not in results[task]:
                    return None
                return statistics.mean(s[metric] for s in results[task][name]["seeds"].values())

            lisa, lora, full = mean(arm), mean("lora"), mean("full")
            assert lisa is not None
            if task == "code":  # losses: lower is better; "within 2%" relative to full's loss
                vs_lora = None if lora is None else lisa <= lora
                vs_full = None if full is None else lisa <= 1.02 * full
            else:  # accuracy in %: "within 2%" = 2 percentage points
                vs_lora = None if lora is None else lisa >= lora
                vs_full = None if full is None else lisa >= full - 2.0
            goals[f"{task}/{arm}"] = {"lisa": lisa, "lora": lora, "full": full, ">=lora": vs_lora, "~full": vs_full}
            verdict = ", ".join(
                f"{what} {'met' if ok else 'missed'}"
                for what, ok in (("vs LoRA", vs_lora), ("vs full", vs_full))
                if ok is not None
            )
            print(f"  {task:<11}{ARM_NAMES[arm]:<18}{verdict}")
    return goals


def versions() -> dict[str, str]:
    return common.versions("torch", "lightning", "transformers", "peft", "tokenizers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, a few steps (under a minute)")
    parser.add_argument("--pretrain-steps", type=int, help="English pretraining steps (default 600; smoke 30)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps of every run (default 100; smoke 6)")
    parser.add_argument("--seeds", type=int, help="seeds per arm (default 3; smoke 2)")
    parser.add_argument(
        "--lrs", nargs="+", help="learning-rate grid: '1e-4,3e-4' for every arm, 'lora=1e-3,3e-3' per arm"
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--n-layers", type=int, default=2, help="LISA's gamma (default 2)")
    parser.add_argument("--interval", type=int, help="LISA's K (default 10; smoke 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cache-dir", help="where the tokenizer and the pretrained model are cached")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.pretrain_steps = args.pretrain_steps if args.pretrain_steps is not None else (30 if smoke else 600)
    args.steps = args.steps if args.steps is not None else (6 if smoke else 100)
    args.seeds = args.seeds if args.seeds is not None else (2 if smoke else 3)
    args.interval = args.interval if args.interval is not None else (2 if smoke else 10)
    for name in ("pretrain_steps", "steps", "seeds", "n_layers", "interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; it must be >= 1")
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.arm_list or any(a not in ARMS for a in args.arm_list):
        parser.error(f"--arms={args.arms!r}: allowed arms are {', '.join(ARMS)}")
    if not args.task_list or any(t not in TASKS for t in args.task_list):
        parser.error(f"--tasks={args.tasks!r}: allowed tasks are {', '.join(TASKS)}")
    if smoke and args.lrs is None:
        args.lrs = ["1e-3", "lora=3e-3"]
    args.grids = parse_lrs(args.lrs, args.arm_list)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_lisa", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = datetime.now(timezone.utc)
    began = time.perf_counter()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date: {started.isoformat(timespec='seconds')}")
    cores = f"{os.cpu_count()} cores ({platform.machine()})"
    print(f"machine: CPU only, no GPU: {cores}; torch threads: {torch.get_num_threads()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))

    bench = Benchmark(args)
    sizes = bench.sizes
    info = bench.pretrain_info
    print(
        f"model: Llama, {info['parameters']:,} parameters ({sizes.layers} blocks, hidden {sizes.hidden}, "
        f"vocab {len(bench.tokenizer)}); pretrained {info['steps']} steps on English in {info['seconds']:.0f} s "
        f"({'loaded from' if bench.loaded else 'saved to'} {info['cached']}); held-out loss: English "
        f"{info['english_val_loss']:.3f}, code {info['code_test_loss']:.3f}"
    )
    print(
        f"fine-tuning: {args.steps} steps, batch {sizes.batch} x {sizes.seq_len} tokens (code) / {sizes.arith_batch} "
        f"problems; LISA gamma={args.n_layers} K={args.interval}; seeds {args.seeds}; grids {args.grids}"
    )
    results: dict[str, Any] = {task: {} for task in args.task_list}
    for task in args.task_list:
        select = "val_loss"
        for arm in args.arm_list:
            grid: dict[float, dict[str, Any]] = {}
            for lr in args.grids[arm]:
                grid[lr] = bench.run(task, arm, lr, seed=0)
                print(f"  {task} {ARM_NAMES[arm]} lr={lr:g} seed=0: {fmt(grid[lr])}", flush=True)
            best = min(grid, key=lambda lr: grid[lr][select])
            seeds = {0: grid[best]}
            for seed in range(1, args.seeds):
                seeds[seed] = bench.run(task, arm, best, seed=seed)
                print(f"  {task} {ARM_NAMES[arm]} lr={best:g} seed={seed}: {fmt(seeds[seed])}", flush=True)
            results[task][arm] = {
                "grid": {lr: m[select] for lr, m in grid.items()},
                "best_lr": best,
                "seeds": seeds,
            }
    goals = report(results, args.arm_list, args.task_list)
    elapsed = time.perf_counter() - began
    print(f"\ntotal time: {elapsed / 60:.1f} min")
    if args.json:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k not in ("grids",)},
            "grids": args.grids,
            "date": started.isoformat(timespec="seconds"),
            "machine": f"CPU only, no GPU: {os.cpu_count()} cores; torch threads {torch.get_num_threads()}",
            "versions": versions(),
            "sizes": asdict(sizes),
            "pretrain": info,
            "results": results,
            "goals": goals,
            "seconds": elapsed,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


def fmt(metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    return ", ".join(f"{k} {v:.0f} s" if k.endswith("seconds") else f"{k} {v:.4f}" for k, v in shown.items())


if __name__ == "__main__":
    raise SystemExit(main())
