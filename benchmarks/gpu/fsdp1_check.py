"""LISA under FSDP1 (Lightning's ``FSDPStrategy``) on one CUDA GPU: what changes, what holds state, resume.

FSDP1 needs an accelerator, so this runs where a GPU is: one process, world size 1 (where FSDP1 runs
its flat parameters unsharded, ``NO_SHARD``). With ``--strategy fsdp2`` the same checks run under
``ModelParallelStrategy`` + ``fully_shard``, which also works on CPU (``--accelerator cpu``); that is
how the checks themselves are tested without a GPU.

Checks, each reported as passed or failed with its figures:

* train (fp32 and bf16 mixed precision), 12 steps, K=3, gamma=2: at every step exactly the sampled
  blocks plus embeddings and head change; frozen blocks stay bit-identical; optimizer state exists
  for exactly the trainable parameters and its bytes equal the analytic count; every sampled block
  is its own FSDP unit; gradient elements reduced per step (all-reduce or reduce-scatter) against the
  trainable elements.
* resume (full and sharded checkpoints): 7 steps (in the middle of a LISA period), save, resume to
  12 equals 12 uninterrupted steps (schedule and weights).
* fabric (one device): the same under Lightning Fabric's own ``FSDPStrategy(auto_wrap_policy={block})``
  (or ``ModelParallelStrategy``) with ``Fabric(callbacks=[lisa])``: only active blocks change, and
  ``lisa.save`` + ``lisa.load`` (full and sharded checkpoints) resume to the uninterrupted weights.

    python benchmarks/gpu/fsdp1_check.py --out DIR                    # FSDP1 on CUDA
    python benchmarks/gpu/fsdp1_check.py --out DIR --strategy fsdp2 --accelerator cpu
    python benchmarks/gpu/fsdp1_check.py --out DIR --devices 2           # FSDP1 on 2 GPUs (sharded)

With ``--devices N`` (N > 1) every rank runs the checks on its own shards and writes
``DIR/fsdp1_check_<strategy>_rank<r>.json``; otherwise ``DIR/fsdp1_check_<strategy>.json``. Exits 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lightning_lisa from this tree

from lightning_lisa import LISA
from lightning_lisa.testing import CausalLM, tiny_llama

STEPS = 12
INTERVAL = 3
N_LAYERS = 2
BLOCKS = 6
SAVE_AT = 7  # mid-period: periods start at 0, 3, 6, 9
ALWAYS = ("embed_tokens", "lm_head")
SCRATCH = "LISA_FSDP_CHECK_SCRATCH"  # checkpoints; set by the first process, inherited by the ranks it starts


class LM(CausalLM):
    """A tiny Llama trained with AdamW (under FSDP1, the strategy wraps one unit per block)."""

    def __init__(self, bf16: bool) -> None:
        model = tiny_llama(
            BLOCKS, seed=0, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, attn_implementation="eager",  # deterministic kernels: a resume can match bit for bit
        )  # fmt: skip
        super().__init__(model, lr=1e-2, optimizer_kwargs={"weight_decay": 0.01})
        self.bf16 = bf16


class ShardedLM(LM):
    """Under FSDP2: one ``fully_shard`` unit per block, in ``configure_model``."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from lightning_lisa import fully_shard_blocks

        extra: dict[str, Any] = {}
        if self.bf16:
            extra["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard_blocks(self.model, mesh=self.device_mesh["data_parallel"], **extra)


def loader() -> DataLoader[torch.Tensor]:
    """One batch per epoch, so a checkpoint saved after any step is at an epoch boundary.

    (Lightning restarts a loader without state from its start when resuming mid-epoch.)
    """
    g = torch.Generator().manual_seed(0)
    return DataLoader(list(torch.randint(0, 256, (4, 32), generator=g)), batch_size=4, shuffle=False)


def local(t: torch.Tensor) -> torch.Tensor:
    to_local: Callable[[], torch.Tensor] | None = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class Collectives:
    """Counts the elements of gradient collectives (all-reduce, reduce-scatter) between optimizer steps."""

    def __init__(self) -> None:
        self.elements = 0
        self.calls = 0
        self._originals: dict[str, Any] = {}
        for name in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single"):
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(self._originals[name]))

    def _wrap(self, collective: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if tensors:
                self.calls += 1
                self.elements += max(t.numel() for t in tensors)
            return collective(*args, **kwargs)

        return counted

    def restore(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def moment_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of AdamW's moment tensors on this rank (the scalar step counters left out)."""
    tensors = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t.dim() > 0)


class Recorder(pl.Callback):
    """Per optimizer step: changed and trainable parameters, state holders and bytes, reduced elements."""

    def __init__(self, lisa: LISA, counter: Collectives) -> None:
        self.lisa = lisa
        self.counter = counter
        self.steps: list[dict[str, Any]] = []
        self._before: dict[str, torch.Tensor] = {}
        self._seen = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._before = {n: local(p.detach()).clone() for n, p in pl_module.named_parameters()}
        self._units_with_grad = flat_params_with_grad(trainer.strategy.model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._before:
            return
        params = dict(pl_module.named_parameters())
        opt = trainer.optimizers[0]
        trainable = sorted(n for n, p in params.items() if p.requires_grad)
        expected_bytes = sum(
            2 * local(p).numel() * local(p).element_size() for n, p in params.items() if p.requires_grad
        )
        self.steps.append(
            {
                "step": trainer.global_step,
                "active": list(self.lisa.active_layers),
                "changed": sorted(n for n, p in params.items() if not torch.equal(local(p.detach()), self._before[n])),
                "trainable": trainable,
                "with_state": sorted(n for n, p in params.items() if opt.state.get(p)),
                "state_bytes": moment_bytes(opt),
                "expected_state_bytes": expected_bytes,
                "trainable_elements": sum(p.numel() for n, p in params.items() if p.requires_grad),
                "model_elements": sum(p.numel() for p in params.values()),
                "reduced_elements": self.counter.elements - self._seen,
                "fsdp1_units_with_grad": self._units_with_grad,
            }
        )
        self._seen = self.counter.elements
        self._before = {}


def flat_params_with_grad(root: Any) -> list[int] | None:
    """FSDP1 only: [units whose flat parameter has a gradient, all units] (private FSDP1 attributes)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in root.modules() if isinstance(m, FullyShardedDataParallel)] if root is not None else []
    handles = [getattr(m, "_handle", None) for m in units]
    flats = [h.flat_param for h in handles if h is not None]
    if not flats:
        return None
    return [sum(f.grad is not None for f in flats), len(flats)]


def block_of(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


def strategy_for(args: argparse.Namespace, sharded: bool) -> Any:
    if args.strategy == "fsdp1":
        from lightning_lisa import LISAFSDPStrategy

        return LISAFSDPStrategy(state_dict_type="sharded" if sharded else "full")
    from lightning_lisa import LISAModelParallelStrategy

    return LISAModelParallelStrategy(
        data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=sharded
    )


def fit(
    args: argparse.Namespace,
    bf16: bool,
    max_steps: int,
    sharded: bool = False,
    ckpt_path: str | None = None,
    save_to: str | None = None,
) -> tuple[LM, LISA, Recorder, pl.Trainer]:
    module = ShardedLM(bf16) if args.strategy == "fsdp2" else LM(bf16)
    lisa = LISA(n_layers=N_LAYERS, interval=INTERVAL, seed=3)
    counter = Collectives()
    recorder = Recorder(lisa, counter)
    precision = "bf16-mixed" if bf16 and args.strategy == "fsdp1" else "32-true"
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy_for(args, sharded),
        precision=precision,  # type: ignore[arg-type]
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=[lisa, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic="warn",  # deterministic kernels where torch has them; warn (not fail) elsewhere
    )
    try:
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
        if save_to is not None:
            trainer.save_checkpoint(save_to)
    finally:
        counter.restore()
    return module, lisa, recorder, trainer


def flat_weights(module: LM) -> torch.Tensor:
    return torch.cat([local(p.detach()).float().flatten().cpu() for p in module.parameters()])


def check_training(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    module, lisa, recorder, trainer = fit(args, bf16, STEPS)
    names = [n for n, _ in module.named_parameters()]
    # with sharded flat parameters (FSDP1, world size > 1) a rank may hold none of a parameter
    held = {n for n, p in module.named_parameters() if local(p).numel() > 0}
    problems: list[str] = []
    ratios = []
    for s in recorder.steps:
        expected = {n for n in names if block_of(n) in s["active"] or any(a in n for a in ALWAYS)}
        if set(s["trainable"]) != expected:
            problems.append(f"step {s['step']}: trainable {len(s['trainable'])} != expected {len(expected)}")
        if set(s["changed"]) != expected & held:
            extra = sorted(set(s["changed"]) - expected)[:3]
            missing = sorted((expected & held) - set(s["changed"]))[:3]
            problems.append(f"step {s['step']}: changed differs (extra {extra}, missing {missing})")
        if set(s["with_state"]) - expected or (expected & held) - set(s["with_state"]):
            problems.append(f"step {s['step']}: state held by {len(s['with_state'])} != {len(expected)} params")
        if s["state_bytes"] != s["expected_state_bytes"]:
            problems.append(f"step {s['step']}: state bytes {s['state_bytes']} != {s['expected_state_bytes']}")
        if s["reduced_elements"]:
            ratios.append(s["reduced_elements"] / s["trainable_elements"])
        with_grad = s["fsdp1_units_with_grad"]
        if with_grad is not None and with_grad[0] != N_LAYERS + 1:  # the sampled blocks and the root unit
            problems.append(f"step {s['step']}: {with_grad[0]} of {with_grad[1]} FSDP units have a gradient")
    own_units = None
    if args.strategy == "fsdp1":
        from lightning_lisa.strategies.fsdp1 import blocks_without_own_unit

        assert trainer.strategy.model is not None
        own_units = not blocks_without_own_unit(trainer.strategy.model, lisa.units)
        if not own_units:
            problems.append("some blocks are not FSDP units of their own")
    return {
        "passed": not problems,
        "problems": problems[:10],
        "steps": len(recorder.steps),
        "switches": [list(s.active_layers) for s in lisa.history],
        "blocks_are_own_units": own_units,
        "state_bytes_per_step": [s["state_bytes"] for s in recorder.steps],
        "trainable_fraction": [round(s["trainable_elements"] / s["model_elements"], 4) for s in recorder.steps],
        "reduced_over_trainable": [round(r, 4) for r in ratios],
        "reduced_calls_seen": bool(ratios),
        "fsdp1_units_with_grad": [s["fsdp1_units_with_grad"] for s in recorder.steps],
        "weights_dtype": str(next(module.parameters()).dtype),
    }


def check_resume(args: argparse.Namespace, sharded: bool) -> dict[str, Any]:
    path = str(Path(os.environ[SCRATCH]) / ("ckpt" if sharded else "ckpt.ckpt"))  # the same folder on every rank
    full, lisa_full, _, _ = fit(args, False, STEPS, sharded)
    fit(args, False, SAVE_AT, sharded, save_to=path)
    resumed, lisa_resumed, recorder, _ = fit(args, False, STEPS, sharded, ckpt_path=path)
    a, b = flat_weights(full), flat_weights(resumed)
    schedule_full = [list(s.active_layers) for s in lisa_full.history]
    schedule_resumed = [list(s.active_layers) for s in lisa_resumed.history]
    max_diff = float((a - b).abs().max())
    problems = []
    if schedule_full != schedule_resumed:
        problems.append(f"schedules differ: {schedule_full} vs {schedule_resumed}")
    if max_diff > 1e-5:
        problems.append(f"weights differ by up to {max_diff:.3g}")
    left = sorted(p.name for p in Path(path).parent.iterdir() if p.name.endswith(".incomplete"))
    if left:
        problems.append(f"partial checkpoint writes left beside the checkpoint: {left}")
    return {
        "passed": not problems,
        "problems": problems,
        "checkpoint": "sharded" if sharded else "full",
        "max_abs_weight_diff": max_diff,
        "bit_identical": bool(torch.equal(a, b)),
        "resumed_steps": len(recorder.steps),
        "schedule": schedule_full,
    }


def fabric_strategy(args: argparse.Namespace, sharded: bool) -> Any:
    """Fabric's own strategy classes (no LISA subclass: ``lisa.save`` and ``lisa.load`` handle the state)."""
    if args.strategy == "fsdp1":
        from lightning.fabric.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="sharded" if sharded else "full")
    from lightning.fabric.strategies import ModelParallelStrategy

    from lightning_lisa import fully_shard_blocks

    def parallelize(module: LM, mesh: Any) -> LM:
        fully_shard_blocks(module.model, mesh=mesh["data_parallel"])
        return module

    return ModelParallelStrategy(
        parallelize_fn=parallelize, data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=sharded
    )


def check_fabric(args: argparse.Namespace, sharded: bool) -> dict[str, Any]:
    """LISA in a Fabric loop (``Fabric(callbacks=[lisa])``): what changes per step, and an exact resume.

    12 uninterrupted steps against 7 steps + ``lisa.save`` + a fresh Fabric, model, optimizer and LISA +
    ``lisa.load`` + 5 steps; the same batch at every step (as :func:`loader`).
    """
    from lightning.fabric import Fabric

    from lightning_lisa.testing.fabric_loop import fabric_fit

    path = str(Path(os.environ[SCRATCH]) / ("fabric-ckpt" if sharded else "fabric.ckpt"))
    batch = next(iter(loader()))
    problems: list[str] = []

    def run(until: int, save: bool = False, load: bool = False) -> tuple[LISA, torch.Tensor]:
        lisa = LISA(n_layers=N_LAYERS, interval=INTERVAL, seed=3)
        fabric = Fabric(
            accelerator=args.accelerator, devices=1, strategy=fabric_strategy(args, sharded), callbacks=[lisa]
        )
        module = LM(False)
        fabric.launch()  # one device: starts nothing, but a parallel strategy wants it called
        model = fabric.setup(module)
        optimizer = fabric.setup_optimizers(module.configure_optimizers())
        state = {"model": model, "optimizer": optimizer, "lisa": lisa}
        start = 0
        if load:
            lisa.load(fabric, path, state)
            start = lisa._step
        before: dict[str, torch.Tensor] = {}

        def check(step: int) -> None:
            params = dict(module.named_parameters())
            changed = {n for n, p in params.items() if not torch.equal(local(p.detach()), before[n])}
            blocks = {block_of(n) for n in changed} - {None}
            if not blocks <= set(lisa.active_layers):
                problems.append(f"step {step}: blocks {sorted(blocks)} changed, active {lisa.active_layers}")
            before.update({n: local(p.detach()).clone() for n, p in params.items()})

        before.update({n: local(p.detach()).clone() for n, p in module.named_parameters()})
        fabric_fit(fabric, model, optimizer, [batch] * STEPS, until, start_step=start, after_step=check)
        if save:
            lisa.save(fabric, path, state)
        return lisa, flat_weights(module)

    lisa_full, full = run(STEPS)
    run(SAVE_AT, save=True)
    lisa_resumed, resumed = run(STEPS, load=True)
    schedule_full = [list(s.active_layers) for s in lisa_full.history]
    if schedule_full != [list(s.active_layers) for s in lisa_resumed.history]:
        problems.append(f"schedules differ: {schedule_full} vs {[list(s.active_layers) for s in lisa_resumed.history]}")
    max_diff = float((full - resumed).abs().max())
    if max_diff > 1e-5:
        problems.append(f"weights differ by up to {max_diff:.3g}")
    left = sorted(p.name for p in Path(path).parent.iterdir() if p.name.endswith(".incomplete"))
    if left:
        problems.append(f"partial checkpoint writes left beside the checkpoint: {left}")
    return {
        "passed": not problems,
        "problems": problems,
        "checkpoint": "sharded" if sharded else "full",
        "max_abs_weight_diff": max_diff,
        "bit_identical": bool(torch.equal(full, resumed)),
        "schedule": schedule_full,
    }


#: Every check, in the order they run (the Fabric ones with ``--devices 1`` only).
CHECKS = ("train_fp32", "train_bf16", "resume_full", "resume_sharded", "fabric_resume_full", "fabric_resume_sharded")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for fsdp1_check_<strategy>.json")
    parser.add_argument("--strategy", choices=("fsdp1", "fsdp2"), default="fsdp1")
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--devices", type=int, default=1, help="processes (GPUs); each writes its own results")
    parser.add_argument("--checks", help=f"comma-separated, from {','.join(CHECKS)} (default: all that apply)")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices={args.devices}: give 1 or more")
    if args.strategy == "fsdp1" and args.accelerator != "cuda":
        parser.error("--strategy fsdp1 needs --accelerator cuda: FSDP1 runs on an accelerator only")
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        parser.error("--accelerator cuda, but torch sees no CUDA device")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    first = SCRATCH not in os.environ  # Lightning starts ranks 1.. as copies of this process, with its environment
    if first:
        os.environ[SCRATCH] = tempfile.mkdtemp(prefix="lisa_fsdp_check_")
    warnings.filterwarnings("ignore")
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "train_fp32": lambda: check_training(args, bf16=False),
        "train_bf16": lambda: check_training(args, bf16=True),
        "resume_full": lambda: check_resume(args, sharded=False),
        "resume_sharded": lambda: check_resume(args, sharded=True),
    }
    if args.devices == 1:  # Fabric's launch would start the ranks again; the Trainer checks cover several GPUs
        checks["fabric_resume_full"] = lambda: check_fabric(args, sharded=False)
        checks["fabric_resume_sharded"] = lambda: check_fabric(args, sharded=True)
    if args.checks is not None:
        chosen = [c for c in args.checks.split(",") if c]
        unknown = [c for c in chosen if c not in checks]
        if not chosen or unknown:
            parser.error(f"--checks={args.checks!r}: allowed are {', '.join(checks)} (comma-separated)")
        checks = {name: checks[name] for name in chosen}
    device = torch.cuda.get_device_name(0) if args.accelerator == "cuda" else f"CPU ({platform.machine()})"
    report: dict[str, Any] = {
        "strategy": args.strategy,
        "device": device,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "checks": {},
    }
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            result = check()
        except Exception as err:  # one failing check must not hide the others
            result = {"passed": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["checks"][name] = result
        summary = {k: v for k, v in result.items() if k not in ("traceback", "schedule", "switches")}
        rank_of = f"[rank {os.environ.get('LOCAL_RANK', '0')}] " if args.devices > 1 else ""
        print(f"{rank_of}{name}: {'PASSED' if result['passed'] else 'FAILED'} {json.dumps(summary)[:1500]}", flush=True)
        if "traceback" in result:
            print(result["traceback"][-3000:], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    suffix = f"_rank{rank}" if args.devices > 1 else ""
    report["rank"] = rank
    (out / f"fsdp1_check_{args.strategy}{suffix}.json").write_text(json.dumps(report, indent=1))
    if first:
        shutil.rmtree(os.environ[SCRATCH], ignore_errors=True)
    return 0 if all(c["passed"] for c in report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
