import os

import pytest
import torch

os.environ.setdefault("QSDCOMPRESS_QUIET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    """A randomly initialised qsd_tiny in eval mode (fast; no bundled weights needed)."""
    import qsdcompress as q

    m = q.create_model("qsd_tiny")
    m.eval()
    return m
