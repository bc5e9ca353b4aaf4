"""The memory estimate against tensors counted during real training steps, on CPU, at small shapes.

For each setting (precision, gradient checkpointing, chunked loss, LISA's step in backward and compact
always-active state) and arm (full fine-tuning, LoRA r=16, LISA), one model is trained for two steps
the way Lightning's automatic optimization runs them (forward pass, zero the gradients, backward pass,
optimizer step). The second step runs inside :class:`~lightning_lisa.estimate.measure.TensorPeak`,
which counts every tensor storage alive at once (weights, gradients and optimizer state tracked from
before). Its peak is set against :func:`~lightning_lisa.estimate.estimate_memory` on the same device.
With ``--device cuda`` the same runs on a GPU, with the CUDA allocator's peak
(``torch.cuda.max_memory_allocated``) reported beside the tensor count.

* The step in backward is modelled here by one optimizer per parameter, stepped and zeroed in a
  post-accumulate-grad hook (what ``LISA(step_in_backward=True)`` does); the compact state by
  :class:`~lightning_lisa.compact.CompactAdamW` groups with ``compact="8bit"`` or ``"factored"`` for
  the embeddings and the head (``compact_always_active``) and for the blocks (``compact_blocks``).
* ``torch.optim.AdamW(foreach=True)``, as it runs on CUDA by default, or ``fused=True``; without compact
  moments, every parameter in one group (``foreach`` makes its temporary copy per group).
* LISA trains its first ``n_layers`` blocks (the estimate's worst case).

Examples::

    python benchmarks/estimate_check.py                 # every case, a few minutes on 2 cores
    python benchmarks/estimate_check.py --quick         # a few cases
    python benchmarks/estimate_check.py --targets --device cuda --shape llama-3-8b --batch-size 1 --seq-len 1024
    python benchmarks/estimate_check.py --tiny          # every case at tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import common
import torch
from transformers import AutoModelForCausalLM

from lightning_lisa import CompactAdamW, find_layers
from lightning_lisa.estimate import SHAPES, estimate_memory, load_config
from lightning_lisa.estimate.measure import TensorPeak
from lightning_lisa.layers import unique_parameters
from lightning_lisa.recipes.loss import causal_lm_loss

#: The shapes checked: small ones of :data:`lightning_lisa.estimate.SHAPES` with a large vocabulary.
CHECK_SHAPES: dict[str, dict[str, Any]] = {name: dict(SHAPES[name]) for name in ("llama-small", "gemma2-small")}


@dataclass(frozen=True)
class Case:
    """One setting."""

    shape: str = "llama-small"
    device: str = "cpu"
    dtype: str = "bf16"
    mixed_precision: bool = False
    fused: bool = False  # torch.optim.AdamW(fused=True) in every arm
    gradient_checkpointing: bool = False
    loss_chunk_size: int | None = None
    step_in_backward: bool = False  # this and the compact options: LISA only
    compact_always_active: str | None = None
    compact_blocks: str | None = None
    batch_size: int = 2
    seq_len: int = 256

    @property
    def label(self) -> str:
        parts = [self.shape, f"{self.dtype}-mixed" if self.mixed_precision else f"{self.dtype}-true"]
        if self.device != "cpu":
            parts.append(self.device)
        parts.append(f"{self.batch_size}x{self.seq_len}")
        parts += [
            name
            for name, on in (
                ("checkpointing", self.gradient_checkpointing),
                (f"loss chunks of {self.loss_chunk_size}", self.loss_chunk_size is not None),
                ("step in backward", self.step_in_backward),
                (f"{self.compact_always_active} E+H", self.compact_always_active),
                (f"{self.compact_blocks} blocks", self.compact_blocks),
                ("fused AdamW", self.fused),
            )
            if on
        ]
        return ", ".join(parts)


CASES: list[Case] = [
    Case(),
    Case(dtype="fp32"),
    Case(mixed_precision=True),
    Case(gradient_checkpointing=True),
    Case(loss_chunk_size=128),
    Case(step_in_backward=True),
    Case(compact_always_active="8bit"),
    Case(step_in_backward=True, compact_always_active="8bit"),
    Case(gradient_checkpointing=True, loss_chunk_size=128, step_in_backward=True, compact_always_active="8bit"),
    Case(compact_always_active="factored", compact_blocks="factored"),
    Case(step_in_backward=True, compact_always_active="factored", compact_blocks="factored"),
    Case(step_in_backward=True, compact_always_active="8bit", compact_blocks="8bit", loss_chunk_size=128),
    Case(step_in_backward=True, fused=True),
    Case(fused=True),
    # at 2 x 256 the peak is in the backward pass, where fused AdamW changes nothing; at 1 x 32 it is
    # in the optimizer step (foreach: a temporary copy of what it steps), where fused AdamW saves it
    Case(batch_size=1, seq_len=32),
    Case(batch_size=1, seq_len=32, fused=True),
    Case(batch_size=1, seq_len=32, step_in_backward=True),
    Case(batch_size=1, seq_len=32, step_in_backward=True, fused=True),
    Case(batch_size=4, seq_len=512, gradient_checkpointing=True),
    Case(batch_size=4, seq_len=512, gradient_checkpointing=True, loss_chunk_size=256, step_in_backward=True),
    Case(shape="gemma2-small"),
    Case(shape="gemma2-small", step_in_backward=True, compact_always_active="8bit", loss_chunk_size=128),
    Case(
        shape="gemma2-small",
        step_in_backward=True,
        compact_always_active="factored",
        compact_blocks="factored",
        loss_chunk_size=128,
    ),
]
QUICK = [CASES[0], CASES[3], CASES[7]]
#: ``--targets``: the settings the memory targets are held against (default LISA; the exact options, the
#: step in backward with fused AdamW; factored moments everywhere with the step in backward).
TARGETS = [
    Case(),
    Case(step_in_backward=True, fused=True),
    Case(step_in_backward=True, compact_always_active="factored", compact_blocks="factored"),
]
#: ``--tiny``: the same proportions, a few seconds per case (the test-suite runs these).
TINY: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 4, "vocab_size": 4000}
for _name in list(CHECK_SHAPES):
    CHECK_SHAPES[f"{_name}-tiny"] = {**CHECK_SHAPES[_name], **TINY}
CHECK_SHAPES["gemma2-small-tiny"]["head_dim"] = 16
CHECK_SHAPES["gemma2-small-tiny"]["query_pre_attn_scalar"] = 16
SHAPES = {**SHAPES, **CHECK_SHAPES}  # the estimate's shapes, and the tiny variants of the checked ones


def tiny(case: Case) -> Case:
    """``case`` at the tiny shapes: a quarter of the tokens, and of the loss's chunks."""
    chunk = None if case.loss_chunk_size is None else case.loss_chunk_size // 4
    return replace(case, shape=f"{case.shape}-tiny", seq_len=case.seq_len // 4, loss_chunk_size=chunk)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row:
    """Estimated and measured peak of one arm in one case (bytes)."""

    case: str
    arm: str
    estimated: int
    measured: int
    allocator: int | None = None  # CUDA: torch.cuda.max_memory_allocated during the step

    @property
    def error(self) -> float:
        return self.estimated / self.measured - 1


def build(case: Case, arm: str) -> tuple[torch.nn.Module, list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The model of an arm, its trainable always-active parameters and its other trainable ones."""
    torch.manual_seed(0)
    config = load_config(SHAPES[case.shape])[1]
    weights = torch.float32 if case.mixed_precision else DTYPES[case.dtype]
    with torch.device(case.device):
        model = AutoModelForCausalLM.from_config(config, dtype=weights)
    if case.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    if arm == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, lora, autocast_adapter_dtype=False)
        return model, [], [p for p in model.parameters() if p.requires_grad]
    if arm == "full":
        return model, [], list(dict.fromkeys(model.parameters()))
    info = find_layers(model)
    model.requires_grad_(False)
    always = unique_parameters(model.get_submodule(n) for n in [*info.embedding_names, *info.head_names])
    blocks = unique_parameters(info.blocks[:2])
    for p in [*always, *blocks]:
        p.requires_grad_(True)
    return model, always, blocks


def measure(case: Case, arm: str) -> tuple[int, int | None]:
    """Peak tensor bytes of the second of two training steps (and the CUDA allocator's peak on a GPU)."""
    model, always, others = build(case, arm)
    lisa = arm == "lisa"
    in_backward = lisa and case.step_in_backward
    modes = (case.compact_always_active, case.compact_blocks) if lisa else (None, None)

    def adamw(groups: list[tuple[list[torch.nn.Parameter], str | None]]) -> torch.optim.Optimizer:
        speed = {"fused": True} if case.fused else {"foreach": True}
        return CompactAdamW([{"params": ps, "compact": mode} for ps, mode in groups if ps], lr=1e-4, **speed)

    optimizers: list[torch.optim.Optimizer] = []
    if in_backward:
        for p in [*always, *others]:
            opt = adamw([([p], modes[0] if any(p is q for q in always) else modes[1])])
            optimizers.append(opt)
            p.register_post_accumulate_grad_hook(_step_now(opt))
    elif modes == (None, None):  # one group, as torch.optim.AdamW(model.parameters()): foreach copies it whole
        optimizers = [adamw([([*others, *always], None)])]
    else:  # torch steps each exact group on its own: its foreach copy is one group's (see the estimate's notes)
        optimizers = [adamw([(others, modes[1]), (always, modes[0])])]
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[case.shape]["vocab_size"]
    ids = torch.randint(0, vocab, (case.batch_size, case.seq_len), generator=g).to(case.device)
    mixed = torch.autocast(case.device, dtype=DTYPES[case.dtype])
    autocast = mixed if case.mixed_precision else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            if case.loss_chunk_size is None:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                hidden = model.get_decoder()(input_ids=ids)[0]
                softcap = getattr(model.config, "final_logit_softcapping", None)
                head = model.get_output_embeddings()
                loss = causal_lm_loss(hidden, head, ids, chunk_size=case.loss_chunk_size, softcap=softcap)
        for opt in optimizers:
            opt.zero_grad(set_to_none=False)  # Lightning zeroes after the forward pass; keep the grads until here
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if not in_backward:
            for opt in optimizers:
                opt.step()

    step()
    existing = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    for opt in optimizers:
        existing += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    cuda = case.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with TensorPeak() as peak:
        peak.track(existing)
        del existing  # the gradients must be freed when the step zeroes them
        step()
    return peak.peak, torch.cuda.max_memory_allocated() if cuda else None


def _step_now(optimizer: torch.optim.Optimizer) -> Any:
    def hook(param: torch.Tensor) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return hook


def estimated(case: Case) -> dict[str, int]:
    est = estimate_memory(
        SHAPES[case.shape],
        batch_size=case.batch_size,
        seq_len=case.seq_len,
        dtype=case.dtype,  # type: ignore[arg-type]
        device=case.device,  # type: ignore[arg-type]
        mixed_precision=case.mixed_precision,
        gradient_checkpointing=case.gradient_checkpointing,
        loss_chunk_size=case.loss_chunk_size,
        step_in_backward=case.step_in_backward,
        compact_always_active=case.compact_always_active,  # type: ignore[arg-type]
        compact_blocks=case.compact_blocks,  # type: ignore[arg-type]
        fused=case.fused,
    )
    return {"full": est.full.total, "lora": est.lora.total, "lisa": est.lisa.total}


def run(cases: list[Case], arms: list[str]) -> list[Row]:
    rows = []
    for case in cases:
        est = estimated(case)
        for arm in arms:
            lisa_only = case.step_in_backward or case.compact_always_active or case.compact_blocks
            if arm != "lisa" and lisa_only and case != cases[0]:
                continue  # LISA-only options: the other arms are those of the case without them
            row = Row(case.label, arm, est[arm], *measure(case, arm))
            rows.append(row)
            allocator = "" if row.allocator is None else f"  (CUDA allocator {row.allocator / 2**20:8.1f} MiB)"
            print(
                f"{row.case:<75} {arm:<5} estimated {row.estimated / 2**20:8.1f} MiB  measured "
                f"{row.measured / 2**20:8.1f} MiB  {100 * row.error:+6.1f}%{allocator}",
                flush=True,
            )
    return rows


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three cases only")
    parser.add_argument("--targets", action="store_true", help="the three settings of the memory targets only")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (hidden size 64, vocabulary 4000)")
    parser.add_argument("--arms", nargs="+", default=["full", "lora", "lisa"], choices=["full", "lora", "lisa"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the same count on a GPU")
    parser.add_argument("--shape", choices=list(SHAPES), default=None, help="every case at this shape instead")
    parser.add_argument("--batch-size", type=int, default=None, help="every case at this batch size instead")
    parser.add_argument("--seq-len", type=int, default=None, help="every case at this sequence length instead")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with quiet():
        chosen = TARGETS if args.targets else QUICK if args.quick else CASES
        cases = [tiny(c) for c in chosen] if args.tiny else chosen
        overrides = {"shape": args.shape, "batch_size": args.batch_size, "seq_len": args.seq_len}
        cases = [replace(c, device=args.device, **{k: v for k, v in overrides.items() if v is not None}) for c in cases]
        rows = run(list(dict.fromkeys(cases)), args.arms)
    worst = max(abs(r.error) for r in rows)
    print(
        f"largest error: {100 * worst:.1f}% over {len(rows)} arms; versions: {common.versions('torch', 'transformers')}"
    )
    if args.out is not None:
        payload = {
            "shapes": CHECK_SHAPES,
            "versions": common.versions("torch", "transformers", "peft", "bitsandbytes"),
            "rows": [{**asdict(r), "error": r.error} for r in rows],
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
