import os
import warnings

import pytest
import torch

from lightning_lisa.testing.processes import DISTRIBUTED_VARIABLES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

# What an in-process distributed run leaves behind: a process group holding MASTER_PORT, and the
# variables Lightning sets (DISTRIBUTED_VARIABLES). Multi-process tests started later would inherit the
# port and fail to bind.


@pytest.fixture(autouse=True)
def _no_distributed_leftovers():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name in DISTRIBUTED_VARIABLES:
        os.environ.pop(name, None)
