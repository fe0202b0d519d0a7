import os

import pytest
import torch

# Never reach a W&B server from tests, never read the user's credentials.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.pop("WANDB_API_KEY", None)
torch.set_num_threads(1)  # CI has 2 cores, and multi-process tests share them


@pytest.fixture
def seed(request):
    """A fresh seed per test (reported on failure), so tests run on new random inputs each time."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value
