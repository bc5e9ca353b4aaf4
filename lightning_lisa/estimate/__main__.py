"""``lightning-lisa estimate MODEL`` (or ``python -m lightning_lisa.estimate MODEL``): print the memory estimate."""

from __future__ import annotations

import argparse
import json
import sys

from lightning_lisa.compact import COMPACT_MODES
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.estimate.api import DTYPES, OPTIMIZERS, estimate_memory, format_estimate
from lightning_lisa.estimate.shapes import SHAPES

#: Options given to :func:`estimate_memory` under their own names.
PASSED_ON = [
    "n_layers",
    "batch_size",
    "seq_len",
    "dtype",
    "optimizer",
    "lora_rank",
    "device",
    "gradient_checkpointing",
    "loss_chunk_size",
    "step_in_backward",
    "compact_always_active",
    "compact_blocks",
    "fused",
]


def main(argv: list[str] | None = None) -> int:
    """Print the estimate of a model (a shape name, a local directory or config.json, a Hub name).

    Returns 0, or 2 with the error on standard error for a bad argument.

    Examples:
        >>> main(["tiny", "--seq-len", "64", "--dtype", "fp32", "--unit", "MiB"])  # doctest: +ELLIPSIS
        tiny: 287,552 parameters, ...
        0
        >>> main(["tiny", "--seq-len", "64", "--step-in-backward", "--compact-always-active"])  # doctest: +ELLIPSIS
        tiny: ...
        LISA with step in backward and 8bit always-active state
        ...
        0
        >>> main(["tiny", "--seq-len", "64", "--compact-always-active", "factored", "--compact-blocks", "factored",
        ...       "--fused"])  # doctest: +ELLIPSIS
        tiny: ..., adamw (fused); ...
        LISA with factored always-active state and factored blocks' state
        ...
        0
        >>> main(["--compact-always-active", "tiny", "--seq-len", "64"])  # doctest: +ELLIPSIS
        tiny: ...
        LISA with 8bit always-active state
        ...
        0
    """
    parser = argparse.ArgumentParser(
        prog="lightning-lisa estimate",
        description="Estimate the memory of full fine-tuning, LoRA and LISA without loading the model.",
    )
    parser.add_argument("model", help=f"a shape ({', '.join(SHAPES)}), a local directory or config.json, a Hub name")
    parser.add_argument("--n-layers", type=int, default=2, help="blocks LISA trains at once (default 2)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="bf16", help="dtype of everything (of the computation with --mixed)"
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="mixed precision (Lightning's bf16-mixed): float32 weights, gradients and optimizer state, "
        "computation in --dtype",
    )
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--freeze-embeddings", action="store_true", help="LISA with train_embeddings=False")
    parser.add_argument("--freeze-head", action="store_true", help="LISA with train_head=False")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="Hugging Face gradient checkpointing (every arm)"
    )
    parser.add_argument(
        "--loss-chunk-size",
        type=int,
        default=None,
        metavar="TOKENS",
        help="compute the logits and the loss in chunks of this many tokens (every arm)",
    )
    parser.add_argument(
        "--step-in-backward",
        action="store_true",
        help="LISA steps each parameter in the backward pass and frees its gradient at once",
    )
    parser.add_argument(
        "--compact-always-active",
        nargs="?",
        const="8bit",
        default=None,
        choices=list(COMPACT_MODES),
        help="LISA keeps CompactAdamW's compact moments for the embeddings and the head: 8bit (without a value, "
        "or followed by anything but a mode) or factored",
    )
    parser.add_argument(
        "--compact-blocks",
        choices=list(COMPACT_MODES),
        default=None,
        help="LISA keeps compact moments for its blocks too (compact_adamw(..., compact_blocks=...))",
    )
    parser.add_argument(
        "--fused", action="store_true", help="torch.optim.AdamW(fused=True): no temporary copy in the step (every arm)"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where training runs")
    parser.add_argument("--unit", choices=["GiB", "MiB", "auto"], default="auto")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(_compact_flag_takes_modes_only(sys.argv[1:] if argv is None else argv))
    try:
        options = {name: getattr(args, name) for name in PASSED_ON}
        estimate = estimate_memory(
            args.model,
            train_embeddings=not args.freeze_embeddings,
            train_head=not args.freeze_head,
            mixed_precision=args.mixed,
            **options,
        )
    except LISAConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else format_estimate(estimate, unit=args.unit))
    return 0


def _compact_flag_takes_modes_only(argv: list[str]) -> list[str]:
    """``--compact-always-active`` followed by anything but a mode means 8-bit, as before it took a value.

    So ``--compact-always-active tiny`` (the flag, then the model) keeps working: the next token is
    taken as the flag's value only when it is one of the modes.
    """
    flag = "--compact-always-active"
    out = list(argv)
    for i, token in enumerate(out):
        if token == "--":
            break
        abbreviation = token.startswith("--compact-a") and flag.startswith(token)
        if abbreviation and (i + 1 == len(out) or out[i + 1] not in COMPACT_MODES):
            out[i] = f"{flag}=8bit"
    return out


if __name__ == "__main__":
    raise SystemExit(main())
