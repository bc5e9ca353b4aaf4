"""Run by tests/test_fsdp2.py: LISA under FSDP2 (ModelParallelStrategy + fully_shard), 2 CPU processes over gloo.

Usage: ``python fsdp2_run.py OUT train PRECISION SAMPLING LAZY`` or ``python fsdp2_run.py OUT resume MODE AC``.
Each rank writes ``OUT/<scenario>-rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecisionPolicy

import lightning_lisa
import lightning_lisa.strategies.checkpoints as checkpoints
import lightning_lisa.strategies.fsdp2 as fsdp
from lightning_lisa import LISA, LISAModelParallelStrategy
from lightning_lisa.testing import CausalLM, end_process_group, token_loader

ALWAYS = ("model.model.embed_tokens.weight", "model.lm_head.weight")


class ShardedLM(CausalLM):
    """The tiny Llama of the tests, one FSDP2 unit per block plus the root; optionally activation checkpointing."""

    def __init__(self, bf16: bool = False, checkpointing: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bf16 = bf16
        self.checkpointing = checkpointing

    def configure_model(self) -> None:
        if self.checkpointing:
            checkpoint_blocks(self)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else None
        extra = {"mp_policy": policy} if policy is not None else {}
        fsdp.fully_shard_blocks(self.model, mesh=self.device_mesh["data_parallel"], **extra)


def checkpoint_blocks(module: CausalLM) -> CausalLM:
    """Activation checkpointing per block: parameter names get a `_checkpoint_wrapped_module` checkpoints lack."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = module.model.model.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block)
    return module


class ReduceScatterCounter:
    """Counts FSDP2's reduce-scatter calls and their input elements (the gradients sent)."""

    def __init__(self) -> None:
        self.calls = 0
        self.elements = 0
        self.dtypes: set[str] = set()
        for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, collective: Any) -> Any:
        def counted(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.elements += input.numel()
            self.dtypes.add(str(input.dtype))
            return collective(output, input, *args, **kwargs)

        return counted


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ShardRecorder(pl.Callback):
    """Per optimizer step: what changed on this rank's shards, what holds state, bytes, reduce-scatters.

    The reduce-scatters are those since the previous optimizer step (all micro-batches of this step).
    """

    def __init__(self, lisa: LISA, counter: ReduceScatterCounter) -> None:
        self.lisa = lisa
        self.counter = counter
        self.steps: list[dict[str, Any]] = []
        self._before: dict[str, torch.Tensor] = {}
        self._seen = (0, 0)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = {n: local(p.detach()).clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._before:  # a micro-batch without an optimizer step
            return
        params = dict(pl_module.named_parameters())
        opt = trainer.optimizers[0]
        state = [t for entry in opt.state.values() for t in entry.values() if isinstance(t, torch.Tensor)]
        self.steps.append(
            {
                "active": list(self.lisa.active_layers),
                "changed": sorted(n for n, p in params.items() if not torch.equal(local(p.detach()), self._before[n])),
                "with_state": sorted(n for n, p in params.items() if opt.state.get(p)),
                "trainable": sorted(n for n, p in params.items() if p.requires_grad),
                "trainable_numel": sum(p.numel() for p in params.values() if p.requires_grad),
                "state_bytes": lightning_lisa_bytes(trainer),
                "state_local_bytes": sum(local(t).numel() * t.element_size() for t in state),
                "state_global_bytes": sum(t.numel() * t.element_size() for t in state),
                "dtensor_state": sum(hasattr(t, "to_local") for t in state),
                "rs_calls": self.counter.calls - self._seen[0],
                "rs_elements": self.counter.elements - self._seen[1],
            }
        )
        self._before = {}
        self._seen = (self.counter.calls, self.counter.elements)


def lightning_lisa_bytes(trainer: pl.Trainer) -> int:
    return lightning_lisa.optimizer_state_bytes(trainer.optimizers)


def make_trainer(callbacks: list[pl.Callback], plain: bool = False, **kwargs: Any) -> pl.Trainer:
    strategy_cls = PlainLoading if plain else LISAModelParallelStrategy
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy_cls(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered (a collective: every rank calls it, in the same order)."""
    gathered = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in module.named_parameters()}
    return {n: p.detach().clone() for n, p in gathered.items()}


def train(out: Path, precision: str, sampling: str, lazy: bool) -> None:
    if not lazy:  # what happens without the forced lazy initialization
        lightning_lisa.strategies.fsdp2.lazy_init = lambda module: 0
    counter = ReduceScatterCounter()
    lisa = LISA(n_layers=2, interval=3, seed=9, sampling=sampling, verify_ranks=True)
    recorder = ShardRecorder(lisa, counter)
    module = ShardedLM(bf16=precision == "bf16")
    start = {n: p.detach().clone() for n, p in module.named_parameters()}  # not sharded yet
    trainer = make_trainer([lisa, recorder], max_steps=9)
    result: dict[str, Any] = {}
    try:
        trainer.fit(module, token_loader(n_batches=18))
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        result["steps"] = recorder.steps
        (out / f"train-rank{dist.get_rank()}.json").write_text(json.dumps(result))
        raise
    weights = full_weights(module)
    first = module.model.model.layers[0].self_attn.q_proj.weight
    result.update(
        {
            "history": [list(s.active_layers) for s in lisa.history],
            "switch_bytes": [s.optimizer_state_bytes for s in lisa.history],
            "steps": recorder.steps,
            "weights": {n: w.double().sum().item() for n, w in weights.items()},
            "unchanged": sorted(n for n, w in weights.items() if torch.equal(w, start[n])),
            "sizes": {n: w.numel() for n, w in weights.items()},
            "param_type": type(first).__name__,
            "local_shape": list(local(first).shape),
            "global_shape": list(first.shape),
            "all_trainable_after_fit": all(p.requires_grad for p in module.parameters()),
            "reduce_dtypes": sorted(counter.dtypes),
        }
    )
    (out / f"train-rank{trainer.global_rank}.json").write_text(json.dumps(result))


def resume(out: Path, mode: str, checkpointing: bool) -> None:
    """Uninterrupted 4 epochs vs 2 epochs + save + resume, from a distributed and from a full checkpoint.

    With activation checkpointing only the distributed checkpoint is tried: Lightning itself cannot load
    such a model from a full checkpoint (the saved names lack ``_checkpoint_wrapped_module``).
    """
    options = {"n_layers": 2, "interval": 4, "seed": 11, "optimizer_state": mode}
    data = {"n_batches": 6}  # 3 batches per rank and epoch
    files = {"sharded": "sharded"} if checkpointing else {"sharded": "sharded", "full": "full.ckpt"}

    def fit(epochs: int, ckpt: Path | None = None, save: Path | None = None, plain: bool = False) -> dict[str, Any]:
        lisa = LISA(**options)
        module = ShardedLM(checkpointing=checkpointing)
        # plain: the strategy loads as ModelParallelStrategy does, to show the failure LISA's strategy avoids
        trainer = make_trainer([lisa], max_epochs=epochs, plain=plain)
        trainer.fit(module, token_loader(**data), ckpt_path=str(ckpt) if ckpt else None)
        if save is not None:
            trainer.save_checkpoint(save / files["sharded"])
            if "full" in files:
                trainer.strategy._save_distributed_checkpoint = False
                trainer.save_checkpoint(save / files["full"])
        return {
            "history": [[s.step, *s.active_layers] for s in lisa.history],
            "global_step": trainer.global_step,
            "weights": full_weights(module),
            "state_names": sorted(
                n.replace("._checkpoint_wrapped_module", "")
                for n, p in module.named_parameters()
                if trainer.optimizers[0].state.get(p)
            ),
        }

    save = out / "checkpoints"
    reference = fit(4)
    first = fit(2, save=save)
    resumed = {kind: fit(4, ckpt=save / name) for kind, name in files.items()}
    rank = dist.get_rank()
    structure = checkpoint_blocks(ShardedLM()) if checkpointing else ShardedLM()  # not sharded: names only

    def compare(run: dict[str, Any]) -> dict[str, Any]:
        return {
            "history": run["history"],
            "global_step": run["global_step"],
            "state_names": run["state_names"],
            "max_abs_diff": max((run["weights"][n] - w).abs().max().item() for n, w in reference["weights"].items()),
            "identical": all(torch.equal(run["weights"][n], w) for n, w in reference["weights"].items()),
        }

    result = {
        "reference": compare(reference),
        "first": compare(first),
        "first_state_names": first["state_names"],
        "resumed": {kind: compare(run) for kind, run in resumed.items()},
        "saved": {
            kind: sorted(checkpoints.params_with_saved_state(save / name, structure, 1)) for kind, name in files.items()
        },
    }
    (out / f"resume-{mode}-rank{rank}.json").write_text(json.dumps(result))
    # last, as a failed fit ends the other process: the same load without LISA's change (both ranks fail alike)
    for kind, name in files.items():
        try:
            fit(4, ckpt=save / name, plain=True)
        except BaseException as error:  # torch's CheckpointException is a BaseException
            message = f"{type(error).__name__}: {error}"[-600:]
            (out / f"plain-{kind}-rank{rank}.txt").write_text(message + "\n" + traceback.format_exc()[-3000:])


class PlainLoading(LISAModelParallelStrategy):
    """``LISAModelParallelStrategy`` that loads checkpoints as ``ModelParallelStrategy`` ships it."""

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        return ModelParallelStrategy.load_checkpoint(self, checkpoint_path, weights_only=weights_only)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    out, scenario = Path(sys.argv[1]), sys.argv[2]
    if scenario == "train":
        train(out, sys.argv[3], sys.argv[4], sys.argv[5] == "lazy")
    else:
        resume(out, sys.argv[3], sys.argv[4] == "ac")
    end_process_group()  # not left to interpreter finalization, where gloo may abort the process
