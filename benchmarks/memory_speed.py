"""Peak memory, step time and throughput of full fine-tuning, LoRA and LISA at real model shapes.

Every arm trains the same model (a shape with the published dimensions of a real model, random
weights, random tokens) as a :class:`~lightning_lisa.recipes.module.CausalLMModule` (AdamW over all
parameters, constant learning rate) through a Lightning Trainer for ``--warmup`` + ``--steps``
optimizer steps:

* full fine-tuning (AdamW over all parameters);
* LoRA r=16 and r=128 on every linear layer but the head (PEFT, ``target_modules="all-linear"``);
* LISA (gamma = ``--n-layers``, K = ``--interval``) with ``optimizer_state`` drop, offload and keep;
* LISA with bitsandbytes ``AdamW8bit``;
* LISA with the embeddings and the head frozen (``always_active=[]``);
* LISA with the optimizer step in the backward pass (``step_in_backward=True``), with the compact
  always-active state (``CausalLMModule(compact_always_active=...)``, 8-bit or factored moments for
  the embeddings and the head, exact AdamW for the blocks), and with both.

Reported per arm, each also as a ratio to full fine-tuning: trainable parameters; optimizer-state and
training-state bytes (parameters + gradients + optimizer state, counted from tensors, peak over the
steps; gradients counted whenever one becomes final in the backward pass, so the step in backward's
one-at-a-time gradients are counted too); activation bytes (tensors saved for backward, counted in
the first step); peak memory; median step time after the warm-up steps; tokens/s; and LISA's switch
overhead: the time of the callback's ``on_train_batch_start`` at a switch, as a share of the ``K`` steps
of its period (a share of 20 steps is shown too, the usual K). Next to the measured figures:
:func:`lightning_lisa.estimate.estimate_memory`.

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` (reset before each arm), steps are timed
between ``torch.cuda.synchronize()`` calls. On CPU it is the peak resident set size (RSS): with
``--isolate`` (the default on CPU for shapes other than ``tiny``) each arm runs in its own process and
its peak RSS is the process's ``ru_maxrss``; otherwise RSS is sampled every 5 ms during the arm, which
can miss short peaks, and memory the allocator keeps from an earlier arm can show up in a later one.
The training-state bytes are exact in both cases.

Examples::

    python benchmarks/memory_speed.py --shape tiny --steps 4                   # smoke run, seconds
    python benchmarks/memory_speed.py --shape gpt2-small --steps 6 --seq-len 256 --interval 3
    python benchmarks/memory_speed.py --shape llama-2-7b --device cuda --seq-len 1024 --steps 20

Shapes larger than the free memory (by the estimate) are refused on CPU; ``--force`` overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import common
import lightning.pytorch as pl
import torch

from lightning_lisa import LISA, optimizer_state_bytes
from lightning_lisa.estimate import SHAPES, ArmEstimate, build_meta_model, estimate_memory, load_config
from lightning_lisa.estimate import saved_activation_bytes as count_saved_bytes
from lightning_lisa.recipes.module import CausalLMModule
from lightning_lisa.testing import quiet_trainer, token_loader

GIB = 2**30
MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION = {"fp32": "32-true", "bf16": "bf16-true", "fp16": "16-true"}


@dataclass(frozen=True)
class ArmSpec:
    """How one arm trains."""

    name: str
    kind: str  # "full", "lora" or "lisa"
    lora_rank: int = 0
    optimizer_state: str = "drop"
    optimizer: str = "adamw"
    frozen_eh: bool = False  # ``always_active=[]``: the embeddings and the head frozen too
    step_in_backward: bool = False
    compact: str | None = None  # "8bit" or "factored": compact_adamw's moments for the always-active set


ARMS: dict[str, ArmSpec] = {
    "full": ArmSpec("full fine-tuning", "full"),
    "lora16": ArmSpec("LoRA r=16", "lora", lora_rank=16),
    "lora128": ArmSpec("LoRA r=128", "lora", lora_rank=128),
    "lisa-drop": ArmSpec("LISA drop", "lisa", optimizer_state="drop"),
    "lisa-offload": ArmSpec("LISA offload", "lisa", optimizer_state="offload"),
    "lisa-keep": ArmSpec("LISA keep", "lisa", optimizer_state="keep"),
    "lisa-8bit": ArmSpec("LISA AdamW8bit", "lisa", optimizer="adamw8bit"),
    "lisa-frozen-eh": ArmSpec("LISA frozen E+H", "lisa", frozen_eh=True),
    "lisa-sib": ArmSpec("LISA step in bw", "lisa", step_in_backward=True),
    "lisa-compact": ArmSpec("LISA compact 8bit", "lisa", compact="8bit"),
    "lisa-factored": ArmSpec("LISA compact fact.", "lisa", compact="factored"),
    "lisa-sib-compact": ArmSpec("LISA sib+compact", "lisa", step_in_backward=True, compact="8bit"),
}


@dataclass
class ArmResult:
    """What one arm measured (bytes, seconds)."""

    key: str
    name: str
    status: str = "ok"
    trainable_params: int = 0
    optimizer_state_bytes: int = 0
    optimizer_state_on_device_bytes: int = 0
    training_state_bytes: int = 0
    activation_bytes: int = 0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    baseline_memory_bytes: int = 0
    arm_peak_bytes: int = 0
    timing: str = ""
    step_seconds: list[float] = field(default_factory=list)
    median_step_seconds: float = 0.0
    wall_step_seconds: list[float] = field(default_factory=list)
    median_wall_step_seconds: float = 0.0
    tokens_per_second: float = 0.0
    switch_seconds: list[float] = field(default_factory=list)
    first_active_layers: list[int] = field(default_factory=list)
    switch_overhead_pct: float | None = None
    switch_overhead_pct_k20: float | None = None
    estimate: dict[str, int] | None = None


class MeasuredLM(CausalLMModule):
    """:class:`CausalLMModule` that counts the activation bytes saved for backward in its first training step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.activation_bytes: int | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.activation_bytes is not None:
            return super().training_step(batch, batch_idx)
        losses: list[torch.Tensor] = []
        step = CausalLMModule.training_step
        self.activation_bytes = count_saved_bytes(self.model, lambda: losses.append(step(self, batch, batch_idx)))
        return losses[0]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """The clock of the timings: wall time on CUDA; on CPU, this process's CPU time.

    On a CPU shared with other work, wall time mostly measures the other work; with one torch thread
    the process's CPU time is the time its computation takes.
    """
    return time.perf_counter() if device == "cuda" else time.process_time()


class Meter(pl.Callback):
    """Step times (first callback: its ``on_train_batch_start`` runs before LISA's) and byte counts."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.start = 0.0
        self.wall_start = 0.0
        self.step_seconds: list[float] = []
        self.wall_step_seconds: list[float] = []
        self.optimizer_state = 0
        self.optimizer_state_on_device = 0
        self.training_state = 0
        self.trainable = 0
        self.gradient_peak = 0  # gradient bytes resident at once, seen whenever one becomes final
        self._params: list[torch.nn.Parameter] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # registered before the step in backward's hooks (``on_fit_start``): each sees its gradient first
        self._params = list(dict.fromkeys(pl_module.parameters()))
        for p in self._params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._count_gradients)

    def _count_gradients(self, _: torch.Tensor) -> None:
        resident = sum(p.grad.nbytes for p in self._params if p.grad is not None)
        self.gradient_peak = max(self.gradient_peak, resident)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        synchronize(self.device)
        self.start, self.wall_start = clock(self.device), time.perf_counter()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._count(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        synchronize(self.device)
        self.step_seconds.append(clock(self.device) - self.start)
        self.wall_step_seconds.append(time.perf_counter() - self.wall_start)
        self._count(trainer, pl_module)

    def _count(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = list(dict.fromkeys(pl_module.parameters()))  # tied weights once
        state = optimizer_state_bytes(trainer.optimizers)
        on_device = optimizer_state_bytes(trainer.optimizers, device=trainer.strategy.root_device)
        grads = max(self.gradient_peak, sum(p.grad.nbytes for p in params if p.grad is not None))
        self.optimizer_state = max(self.optimizer_state, state)
        self.optimizer_state_on_device = max(self.optimizer_state_on_device, on_device)
        self.training_state = max(self.training_state, sum(p.nbytes for p in params) + grads + on_device)
        self.trainable = max(self.trainable, sum(p.numel() for p in params if p.requires_grad))


class TimedLISA(LISA):
    """LISA whose ``on_train_batch_start`` is timed; the calls that switched blocks are kept."""

    def __init__(self, device: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.device = device
        self.switch_seconds: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        switches = len(self.history)
        synchronize(self.device)
        start = clock(self.device)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        synchronize(self.device)
        if len(self.history) != switches:
            self.switch_seconds.append(clock(self.device) - start)


class RssSampler:
    """Samples the resident set size of this process every 5 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.peak = current_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, current_rss())


def current_rss() -> int:
    """Resident set size of this process in bytes (psutil if installed, else /proc; 0 if neither)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def max_rss() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def available_memory() -> int:
    """Memory available to a new process, in bytes (psutil, else /proc/meminfo; 0 if unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def build_module(args: argparse.Namespace, spec: ArmSpec) -> MeasuredLM:
    """The arm's :class:`CausalLMModule`: random weights of ``--shape``, AdamW over all parameters, constant LR."""
    torch.manual_seed(0)
    with torch.device(args.device):
        module = MeasuredLM(
            config=dict(SHAPES[args.shape]),
            model_kwargs={"dtype": DTYPES[args.dtype]},
            optimizer=spec.optimizer,
            learning_rate=args.lr,
            weight_decay=0.01,  # torch's AdamW default, as before
            lr_schedule="constant",
            gradient_checkpointing=args.gradient_checkpointing,  # non-reentrant: frozen blocks still get gradients
            compact_always_active=spec.compact,
        )
    if spec.kind == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=spec.lora_rank, lora_alpha=2 * spec.lora_rank, lora_dropout=0.0, target_modules="all-linear"
        )
        module.model = get_peft_model(module.model, lora, autocast_adapter_dtype=False)
    return module


def run_arm(key: str, args: argparse.Namespace) -> ArmResult:
    """Train one arm in this process and measure it."""
    spec = ARMS[key]
    device = args.device
    result = ArmResult(key=key, name=spec.name)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result.baseline_memory_bytes = torch.cuda.memory_allocated()
    else:
        result.baseline_memory_bytes = current_rss()
    meter = Meter(device)
    lisa: TimedLISA | None = None
    callbacks: list[pl.Callback] = [meter]
    if spec.kind == "lisa":
        lisa = TimedLISA(
            device,
            n_layers=args.n_layers,
            interval=args.interval,
            optimizer_state=spec.optimizer_state,
            always_active=[] if spec.frozen_eh else None,
            seed=args.seed,
            step_in_backward=spec.step_in_backward,
        )
        callbacks.append(lisa)
    sampler = RssSampler() if device == "cpu" else contextlib.nullcontext()
    try:
        with sampler:
            module = build_module(args, spec)
            trainer = quiet_trainer(
                callbacks,
                accelerator="gpu" if device == "cuda" else "cpu",
                precision=PRECISION[args.dtype],
                max_steps=args.warmup + args.steps,
            )
            vocab = int(SHAPES[args.shape]["vocab_size"])
            data = token_loader(args.warmup + args.steps, args.batch_size, args.seed, vocab, args.seq_len, labels=True)
            trainer.fit(module, data)
            synchronize(device)
    except torch.cuda.OutOfMemoryError as err:
        result.status = f"out of memory: {str(err).splitlines()[0][:200]}"
    if device == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated()
        result.peak_memory_kind = "cuda max_memory_allocated"
    elif args.child_out:
        result.peak_memory_bytes = max_rss()
        result.peak_memory_kind = "process peak RSS (ru_maxrss)"
    else:
        assert isinstance(sampler, RssSampler)
        result.peak_memory_bytes = sampler.peak
        result.peak_memory_kind = "sampled RSS"
    result.arm_peak_bytes = max(0, result.peak_memory_bytes - result.baseline_memory_bytes)
    if result.status != "ok":
        return result
    result.trainable_params = meter.trainable
    result.optimizer_state_bytes = meter.optimizer_state
    result.optimizer_state_on_device_bytes = meter.optimizer_state_on_device
    result.training_state_bytes = meter.training_state
    result.activation_bytes = module.activation_bytes or 0
    result.timing = "wall time" if device == "cuda" else "process CPU time"
    result.step_seconds = meter.step_seconds
    result.median_step_seconds = statistics.median(meter.step_seconds[args.warmup :])
    result.wall_step_seconds = meter.wall_step_seconds
    result.median_wall_step_seconds = statistics.median(meter.wall_step_seconds[args.warmup :])
    result.tokens_per_second = args.batch_size * args.seq_len / result.median_step_seconds
    if lisa is not None:
        result.switch_seconds = lisa.switch_seconds
        result.first_active_layers = list(lisa.history[0].active_layers) if lisa.history else []
        if lisa.switch_seconds:
            mean_switch = statistics.mean(lisa.switch_seconds)
            result.switch_overhead_pct = 100 * mean_switch / (args.interval * result.median_step_seconds)
            result.switch_overhead_pct_k20 = 100 * mean_switch / (20 * result.median_step_seconds)
    del trainer, module, callbacks, lisa
    return result


def run_isolated(key: str, args: argparse.Namespace) -> ArmResult:
    """Run one arm in a child process (its own peak RSS and CUDA context); failures become a status."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "arm.json"
        command = [sys.executable, __file__, *cli_args(args), "--arms", key, "--child-out", str(out)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode == 0 and out.is_file():
            return ArmResult(**json.loads(out.read_text()))
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return ArmResult(key=key, name=ARMS[key].name, status=f"failed (exit {proc.returncode}): {' | '.join(tail)}")


def cli_args(args: argparse.Namespace) -> list[str]:
    names = [
        "shape",
        "device",
        "dtype",
        "steps",
        "warmup",
        "interval",
        "n_layers",
        "seq_len",
        "batch_size",
        "lr",
        "seed",
    ]
    flags = ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    return [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in names] + flags + ["--force"]


def estimates(args: argparse.Namespace, keys: list[str]) -> dict[str, ArmEstimate | None]:
    """The estimate of every arm (``None`` for offload/keep, which the estimate does not model)."""
    common = dict(
        n_layers=args.n_layers,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        device=args.device,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    base = estimate_memory(args.shape, **common)  # type: ignore[arg-type]
    found: dict[str, ArmEstimate | None] = {}
    for key in keys:
        spec = ARMS[key]
        if spec.kind == "full":
            found[key] = base.full
        elif spec.kind == "lora":
            found[key] = estimate_memory(args.shape, lora_rank=spec.lora_rank, **common).lora  # type: ignore[arg-type]
        elif spec.optimizer == "adamw8bit":
            found[key] = estimate_memory(args.shape, optimizer="adamw8bit", **common).lisa  # type: ignore[arg-type]
        elif spec.compact == "factored":  # the estimate models 8-bit moments only
            found[key] = None
        elif spec.step_in_backward or spec.compact is not None:
            found[key] = estimate_memory(
                args.shape,
                step_in_backward=spec.step_in_backward,
                compact_always_active=spec.compact is not None,
                **common,
            ).lisa  # type: ignore[arg-type]
        elif spec.frozen_eh:
            found[key] = estimate_memory(args.shape, train_embeddings=False, train_head=False, **common).lisa  # type: ignore[arg-type]
        elif spec.optimizer_state == "drop" or (spec.optimizer_state == "offload" and args.device == "cuda"):
            found[key] = base.lisa
        else:
            found[key] = None
    return found


def versions() -> dict[str, str]:
    return common.versions("torch", "lightning", "transformers", "peft", "bitsandbytes")


def machine(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / GIB:.0f} GiB; {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    return f"CPU only, no GPU: {os.cpu_count()} cores ({cpu}), {available_memory() / GIB:.0f} GiB available"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference else "-"


def report(results: list[ArmResult], args: argparse.Namespace) -> dict[str, Any]:
    """Print the tables and goals; return the goals."""
    by_key = {r.key: r for r in results}
    full = by_key.get("full")
    ok = [r for r in results if r.status == "ok"]
    ref = full if full is not None and full.status == "ok" else None
    peak_unit = "GiB" if any(r.arm_peak_bytes >= GIB for r in results) else "MiB"
    scale = GIB if peak_unit == "GiB" else MIB
    print(
        f"\nshape={args.shape} device={args.device} dtype={args.dtype} batch={args.batch_size} seq={args.seq_len} "
        f"steps={args.steps} (+{args.warmup} warm-up) gamma={args.n_layers} K={args.interval}"
        + (" gradient checkpointing" if getattr(args, "gradient_checkpointing", False) else "")
    )
    kind = ok[0].peak_memory_kind if ok else "-"
    print(f"peak: {kind}, minus the memory in use before the arm started; sizes in {peak_unit}; x: ratio to full")
    print(
        f"{'arm':<17}{'trainable':>14}{'x':>6}{'opt. state':>12}{'x':>6}{'train. state':>13}{'x':>6}"
        f"{'activations':>12}{'peak':>9}{'x':>6}"
    )
    for r in results:
        if r.status != "ok":
            print(f"{r.name:<17}  {r.status}")
            continue
        f = ref if ref is not None else r
        print(
            f"{r.name:<17}{r.trainable_params:>14,}{ratio(r.trainable_params, f.trainable_params):>6}"
            f"{r.optimizer_state_on_device_bytes / scale:>12.3f}"
            f"{ratio(r.optimizer_state_on_device_bytes, f.optimizer_state_on_device_bytes):>6}"
            f"{r.training_state_bytes / scale:>13.3f}{ratio(r.training_state_bytes, f.training_state_bytes):>6}"
            f"{r.activation_bytes / scale:>12.3f}{r.arm_peak_bytes / scale:>9.3f}"
            f"{ratio(r.arm_peak_bytes, f.arm_peak_bytes):>6}"
        )
    if args.device == "cpu":
        print(
            "opt.state/train.state: on the training device (with offload on CPU the state stays in the same memory); "
            "RSS before the arms: " + ", ".join(sorted({f"{r.baseline_memory_bytes / MIB:.0f}" for r in ok})) + " MiB"
        )

    timing = ok[0].timing if ok else "-"
    print(
        f"\nstep time: median over the {args.steps} steps after the warm-up, {timing}"
        + (" (wall time shown too; it depends on the other work on the machine)" if args.device == "cpu" else "")
    )
    print(
        f"{'arm':<17}{'step ms':>10}{'x':>6}{'wall ms':>10}{'x':>6}{'tokens/s':>10}{'switch ms':>11}"
        f"{'% of K=' + str(args.interval):>10}{'% of K=20':>11}"
    )
    for r in ok:
        f = ref if ref is not None else r
        switch = f"{1000 * statistics.mean(r.switch_seconds):.1f}" if r.switch_seconds else "-"
        ovh = f"{r.switch_overhead_pct:.3f}" if r.switch_overhead_pct is not None else "-"
        k20 = f"{r.switch_overhead_pct_k20:.3f}" if r.switch_overhead_pct_k20 is not None else "-"
        print(
            f"{r.name:<17}{1000 * r.median_step_seconds:>10.1f}{ratio(r.median_step_seconds, f.median_step_seconds):>6}"
            f"{1000 * r.median_wall_step_seconds:>10.1f}"
            f"{ratio(r.median_wall_step_seconds, f.median_wall_step_seconds):>6}"
            f"{r.tokens_per_second:>10.0f}{switch:>11}{ovh:>10}{k20:>11}"
        )
    print(f"\nestimate (lightning_lisa.estimate) vs measured, {peak_unit}:")
    print(
        f"{'arm':<17}{'train.state':>12}{'estimate':>10}{'err%':>7}{'activ.':>9}{'estimate':>10}{'err%':>7}{'peak':>9}{'est.total':>10}"
    )
    for r in ok:
        if r.estimate is None:
            continue
        e = r.estimate

        def err(measured: int, estimated: int) -> str:
            return f"{100 * (estimated - measured) / measured:+.1f}" if measured else "-"

        print(
            f"{r.name:<17}{r.training_state_bytes / scale:>12.3f}{e['training_state'] / scale:>10.3f}"
            f"{err(r.training_state_bytes, e['training_state']):>7}{r.activation_bytes / scale:>9.3f}"
            f"{e['activations'] / scale:>10.3f}{err(r.activation_bytes, e['activations']):>7}"
            f"{r.arm_peak_bytes / scale:>9.3f}{e['total'] / scale:>10.3f}"
        )

    frozen = by_key.get("lisa-frozen-eh")
    if frozen is not None and frozen.status == "ok" and frozen.estimate is not None:
        print(
            f"(LISA frozen E+H: the estimate assumes the lowest blocks train, the worst case; the measured step "
            f"trained blocks {frozen.first_active_layers}, and nothing below them keeps activations)"
        )

    goals: dict[str, Any] = {}
    drop, lora = by_key.get("lisa-drop"), by_key.get("lora16")
    if ref is not None and drop is not None and drop.status == "ok":
        goals["lisa_drop_training_state_vs_full"] = drop.training_state_bytes / ref.training_state_bytes
        goals["lisa_drop_step_time_vs_full"] = drop.median_step_seconds / ref.median_step_seconds
    if drop is not None and drop.status == "ok" and lora is not None and lora.status == "ok":
        goals["lisa_drop_step_time_vs_lora16"] = drop.median_step_seconds / lora.median_step_seconds
        if args.device == "cuda":  # a peak over the whole process: comparable on CUDA, where it excludes the RSS
            goals["lisa_drop_peak_vs_lora16"] = drop.arm_peak_bytes / lora.arm_peak_bytes
    overheads = [r.switch_overhead_pct for r in ok if r.switch_overhead_pct is not None]
    if overheads:
        goals["max_switch_overhead_pct"] = max(overheads)
        goals["max_switch_overhead_pct_k20"] = max(r.switch_overhead_pct_k20 or 0.0 for r in ok)
    limits = {
        "lisa_drop_training_state_vs_full": 0.6,
        "lisa_drop_step_time_vs_full": 0.8,
        "lisa_drop_step_time_vs_lora16": 1.05,
        "lisa_drop_peak_vs_lora16": 1.1,
        "max_switch_overhead_pct": 1.0,
        "max_switch_overhead_pct_k20": 1.0,
    }
    print("\ngoals:")
    for name, value in goals.items():
        verdict = "met" if value <= limits[name] else "missed"
        print(f"  {name:<36} {value:8.3f}  (goal <= {limits[name]}) {verdict}")
    return goals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    parser.add_argument("--interval", type=int, default=5, help="LISA's K (optimizer steps between switches)")
    parser.add_argument("--n-layers", type=int, default=2, help="LISA's gamma (blocks trained at once)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="Hugging Face gradient checkpointing of every block"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 avoids stalls on busy CPUs)"
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    isolate = parser.add_mutually_exclusive_group()
    isolate.add_argument("--isolate", dest="isolate", action="store_true", default=None, help="one process per arm")
    isolate.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument("--force", action="store_true", help="run even if the estimate exceeds the free memory")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="measure nothing: print the tables of earlier runs' --json files (arms merged, the last run of an "
        "arm wins; e.g. the arms of a run cut short plus those of a second run)",
    )
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        return args
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    for name in ("steps", "interval", "n_layers", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; it must be >= 1")
    if args.warmup < 1:
        parser.error(f"--warmup={args.warmup} is not allowed; it must be >= 1 (the first step allocates state)")
    keys = [k.strip() for k in args.arms.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ARMS]
    if unknown or not keys:
        parser.error(f"--arms={args.arms!r}: unknown {unknown}; allowed: {', '.join(ARMS)}")
    args.arm_keys = keys
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda, but no CUDA device is available; use --device=cpu")
    if args.isolate is None:
        args.isolate = args.device == "cpu" and args.shape != "tiny"
    return args


def check_fits(args: argparse.Namespace) -> str | None:
    """A reason to refuse the run on CPU, or ``None``."""
    if args.device != "cpu" or args.force:
        return None
    needed = estimate_memory(
        args.shape,
        n_layers=args.n_layers,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        device="cpu",
        activations="formula",  # quick; the training state dominates
    ).full.total
    free = available_memory()
    if free and 1.5 * needed > free:
        return (
            f"--shape={args.shape} on CPU needs about {needed / GIB:.1f} GiB for full fine-tuning in {args.dtype} "
            f"(estimate; 1.5x margin), but {free / GIB:.1f} GiB are available. Run it with --device=cuda, pick a "
            f"smaller shape ({', '.join(k for k in SHAPES if k in ('tiny', 'gpt2-small'))}), or pass --force."
        )
    return None


def report_saved(paths: list[str], out: str | None) -> int:
    """Print the report of saved runs (same shape and settings), merging their arms in the usual order."""
    settings = ("shape", "device", "dtype", "steps", "warmup", "interval", "n_layers", "seq_len", "batch_size")
    runs = common.load_runs(paths, (*settings, "gradient_checkpointing"), "--report")
    arms: dict[str, ArmResult] = {}
    for run in runs:
        for arm in run["arms"]:
            arms[arm["key"]] = ArmResult(**arm)
    results = [arms[k] for k in ARMS if k in arms]
    args = argparse.Namespace(**runs[0]["args"])
    print(f"runs: {', '.join(paths)} ({', '.join(run['date'] for run in runs)}); machine: {runs[0]['machine']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in runs[0]["versions"].items()))
    goals = report(results, args)
    if out:
        common.save_json(out, {**runs[0], "arms": [asdict(r) for r in results], "goals": goals, "merged_from": paths})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report_saved(args.report, args.json)
    common.prepare(args.threads, "bitsandbytes", ignore=(".*fan_in_fan_out.*", ".*is_gradient_checkpointing.*"))
    if args.child_out:  # one arm, in a child process
        result = run_arm(args.arm_keys[0], args)
        Path(args.child_out).write_text(json.dumps(asdict(result)))
        return 0
    reason = check_fits(args)
    if reason is not None:
        print(f"refused: {reason}", file=sys.stderr)
        return 2
    started = common.print_header(f"{machine(args.device)}; torch threads: {torch.get_num_threads()}", versions())
    meta = build_meta_model(load_config(args.shape)[1])
    print(f"model: {args.shape}, {sum(p.numel() for p in meta.parameters()):,} parameters (random weights)")
    del meta
    found = estimates(args, args.arm_keys)
    results: list[ArmResult] = []
    for key in args.arm_keys:
        began = time.perf_counter()
        result = run_isolated(key, args) if args.isolate else run_arm(key, args)
        estimate = found[key]
        if estimate is not None:
            result.estimate = {
                **{k: v for k, v in asdict(estimate).items() if isinstance(v, int)},
                "training_state": estimate.training_state,
                "total": estimate.total,
            }
        results.append(result)
        print(f"  {result.name}: {result.status} ({time.perf_counter() - began:.0f} s)", flush=True)
        save(args, started, results, {})  # after every arm: a run cut short keeps what it measured
    goals = report(results, args)
    save(args, started, results, goals)
    return 0


def save(args: argparse.Namespace, started: datetime, results: list[ArmResult], goals: dict[str, Any]) -> None:
    if not args.json:
        return
    payload = {
        "args": {k: v for k, v in vars(args).items() if k != "child_out"},
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "versions": versions(),
        "arms": [asdict(r) for r in results],
        "goals": goals,
    }
    common.save_json(args.json, payload)


if __name__ == "__main__":
    raise SystemExit(main())
