"""The shared harness, under the names the test files use (see :mod:`lightning_lisa.testing`)."""

from lightning_lisa.testing import SEQ, VOCAB, CausalLM, subprocess_env, tiny_llama, token_loader
from lightning_lisa.testing import quiet_trainer as trainer

__all__ = ["SEQ", "VOCAB", "CausalLM", "subprocess_env", "tiny_llama", "token_loader", "trainer"]
