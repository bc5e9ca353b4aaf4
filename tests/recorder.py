"""The shared per-step recorder (see :mod:`lightning_lisa.testing`)."""

from lightning_lisa.testing import Recorder, StepRecord, block_of

__all__ = ["Recorder", "StepRecord", "block_of"]
