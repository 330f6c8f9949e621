import os
from pathlib import Path

import pytest
import torch

# Two pytest-xdist workers share two cores: one thread each keeps them from fighting.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PYRO_LVM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data():
    """The shared data folder (MNIST, binarized MNIST, ...); tests that need it skip without it."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set PYRO_LVM_DATA to a folder with MNIST/raw)")
    return SHARED_DATA
