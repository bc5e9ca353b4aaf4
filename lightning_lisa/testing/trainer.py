"""A Trainer that runs on the CPU and prints, logs and saves nothing unless asked."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A CPU ``Trainer`` with no logger, checkpoints, progress bar, summary or sanity check; ``kwargs`` override."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)
