import os
from pathlib import Path

import pytest
import torch

# Two pytest-xdist workers share two cores: one thread each keeps them from fighting.
torch.set_num_threads(1)

if os.environ.get("PYRO_LVM_TEST_INSTALLED"):
    # .ci/test-installed: the suite must exercise the installed package, never the checkout's source.
    import pyro_lvm

    _where = Path(pyro_lvm.__file__).resolve()
    assert Path(__file__).resolve().parent.parent / "pyro_lvm" not in _where.parents, \
        f"pyro_lvm imported from the checkout's source: {_where}"
    assert "site-packages" in _where.parts, f"pyro_lvm is not an installed copy: {_where}"

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PYRO_LVM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data():
    """The shared data folder (MNIST, binarized MNIST, ...); tests that need it skip without it."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set PYRO_LVM_DATA to a folder with MNIST/raw)")
    return SHARED_DATA
