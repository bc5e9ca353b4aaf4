"""The harness shared by the tests, the benchmarks and the docs' figures.

Tiny models with random weights, a quiet Trainer, a per-step recorder of what changed and what holds
optimizer state, a runner for multi-process scripts, and a kill-and-resume harness
(:mod:`lightning_lisa.testing.killresume`: kill a training process at a fixed point, resume it, and
compare its weights, optimizer state and batches with an uninterrupted run). It is a layer of its own: it may use every
other layer, and nothing in the library imports it. Hugging Face ``transformers`` is imported only by
the functions that build Hugging Face models.

Examples:
    >>> from lightning_lisa import LISA
    >>> from lightning_lisa.testing import CausalLM, Recorder, quiet_trainer, token_loader
    >>> lisa = LISA(n_layers=1, interval=2)
    >>> recorder = Recorder(lisa)
    >>> quiet_trainer([lisa, recorder], max_steps=2).fit(CausalLM(num_layers=3), token_loader(n_batches=2))
    >>> [len(r.active_layers) for r in recorder.steps]
    [1, 1]
"""

from lightning_lisa.testing.killresume import (
    BATCH_LOG_ENV,
    KILL_ENV,
    KILL_MARKER_ENV,
    BatchLog,
    KillPoint,
    KillResume,
    KillSwitch,
    Run,
    TrainingState,
    assert_same_training_state,
    checkpoint_bytes,
    digest,
    kill_and_resume,
    load_training_state,
    read_batch_log,
    run_command,
    training_state_differences,
)
from lightning_lisa.testing.models import (
    SEQ,
    SEQ2SEQ,
    VOCAB,
    CausalLM,
    ResidualBlock,
    ResidualLM,
    tiny_llama,
    token_loader,
)
from lightning_lisa.testing.processes import end_process_group, free_port, run_script, subprocess_env
from lightning_lisa.testing.recorder import Recorder, StepRecord, block_of
from lightning_lisa.testing.trainer import quiet_trainer

__all__ = [
    "BATCH_LOG_ENV",
    "KILL_ENV",
    "KILL_MARKER_ENV",
    "SEQ",
    "SEQ2SEQ",
    "VOCAB",
    "BatchLog",
    "CausalLM",
    "KillPoint",
    "KillResume",
    "KillSwitch",
    "Recorder",
    "ResidualBlock",
    "ResidualLM",
    "Run",
    "StepRecord",
    "TrainingState",
    "assert_same_training_state",
    "block_of",
    "checkpoint_bytes",
    "digest",
    "end_process_group",
    "free_port",
    "kill_and_resume",
    "load_training_state",
    "quiet_trainer",
    "read_batch_log",
    "run_command",
    "run_script",
    "subprocess_env",
    "tiny_llama",
    "token_loader",
    "training_state_differences",
]
