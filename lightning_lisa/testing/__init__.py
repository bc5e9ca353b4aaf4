"""The harness shared by the tests, the benchmarks and the docs' figures.

Tiny models with random weights, a quiet Trainer, a per-step recorder of what changed and what holds
optimizer state, and a runner for multi-process scripts. It is a layer of its own: it may use every
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

from lightning_lisa.testing.models import SEQ, SEQ2SEQ, VOCAB, CausalLM, tiny_llama, token_loader
from lightning_lisa.testing.processes import free_port, run_script, subprocess_env
from lightning_lisa.testing.recorder import Recorder, StepRecord, block_of
from lightning_lisa.testing.trainer import quiet_trainer

__all__ = [
    "SEQ",
    "SEQ2SEQ",
    "VOCAB",
    "CausalLM",
    "Recorder",
    "StepRecord",
    "block_of",
    "free_port",
    "quiet_trainer",
    "run_script",
    "subprocess_env",
    "tiny_llama",
    "token_loader",
]
