"""Skip markers of the Gluon kernel tests: Triton with Gluon (>= 3.6) to compile, a Hopper GPU to run."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def has_gluon() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return importlib.util.find_spec("triton.experimental.gluon") is not None


needs_gluon = pytest.mark.skipif(not has_gluon(), reason="needs triton >= 3.6 (Gluon)")
hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                            reason="needs a Hopper GPU")
