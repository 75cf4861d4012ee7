import os

import pytest
import torch
from helpers import ROOT, LinearField, tiny_overrides

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

__all__ = ["ROOT", "LinearField", "tiny_overrides"]  # shared helpers live in helpers.py; kept importable from here


@pytest.fixture
def linear_field() -> LinearField:
    g = torch.Generator().manual_seed(0)
    return LinearField(0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64))
