"""Data sets, files, splits and binarization."""
import numpy as np
import pytest
import torch

from pyro_lvm.data import load_dataset
from pyro_lvm.errors import UserError


def test_embedded_data_sets_have_documented_splits():
    digits = load_dataset("digits")
    assert digits.sizes() == {"train": 1297, "valid": 200, "test": 300} and digits.data_shape == (1, 8, 8)
    assert digits.is_image and 0 <= digits.train.min() and digits.train.max() <= 1
    assert digits.test_labels is not None and len(digits.test_labels) == 300
    faithful = load_dataset("faithful")
    assert faithful.sizes() == {"train": 192, "valid": 40, "test": 40} and faithful.data_shape == (2,)
    # The splits are a partition of the 272 eruptions.
    everything = torch.cat([faithful.train, faithful.valid, faithful.test])
    assert len(torch.unique(everything, dim=0)) == len(torch.unique(torch.cat([faithful.train, faithful.valid,
                                                                               faithful.test]), dim=0))
    assert len(everything) == 272


def test_binarization_static_and_dynamic():
    static = load_dataset("digits", binarize="static")
    again = load_dataset("digits", binarize="static")
    assert torch.equal(static.train, again.train) and set(static.train.unique().tolist()) <= {0.0, 1.0}
    dynamic = load_dataset("digits", binarize="dynamic")
    assert torch.equal(dynamic.test, static.test)  # evaluations see the fixed draw
    assert not set(dynamic.train.unique().tolist()) <= {0.0, 1.0}  # intensities, drawn per batch


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv", ".pt"])
def test_files_of_vectors(tmp_path, suffix):
    values = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    path = tmp_path / f"data{suffix}"
    if suffix == ".npy":
        np.save(path, values)
    elif suffix == ".npz":
        np.savez(path, train=values[:30], valid=values[30:40], test=values[40:])
    elif suffix == ".csv":
        np.savetxt(path, values, delimiter=",", header="a,b,c", comments="")
    else:
        torch.save(torch.tensor(values), path)
    data = load_dataset(str(path))
    assert data.data_shape == (3,) and sum(data.sizes().values()) == 50 and not data.is_image
    assert torch.allclose(torch.cat([data.train, data.valid, data.test]).sort(0).values,
                          torch.tensor(values).sort(0).values, atol=1e-5)


def test_image_stacks_from_files(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, size=(20, 6, 6), dtype=np.uint8))
    data = load_dataset(str(path))
    assert data.is_image and data.data_shape == (1, 6, 6) and data.train.max() <= 1


@pytest.mark.parametrize("content", [b"", b"1,2\n3\n", b"\x00\x01garbage"])
def test_broken_files_are_user_errors(tmp_path, content):
    path = tmp_path / "broken.csv"
    path.write_bytes(content)
    with pytest.raises(UserError):
        load_dataset(str(path))


def test_mnist_and_binarized_mnist_from_the_shared_data(shared_data):
    mnist = load_dataset("mnist", shared_data)
    assert mnist.sizes() == {"train": 50000, "valid": 10000, "test": 10000} and mnist.data_shape == (1, 28, 28)
    fashion = load_dataset("fashion-mnist", shared_data)
    assert fashion.sizes() == mnist.sizes()
    binarized = load_dataset("binarized-mnist", shared_data)
    assert binarized.sizes() == mnist.sizes() and set(binarized.test.unique().tolist()) == {0.0, 1.0}


def test_binary_uint8_images_stay_binary(tmp_path):
    path = tmp_path / "binary.npz"
    images = np.random.default_rng(0).integers(0, 2, size=(30, 4, 4), dtype=np.uint8)
    np.savez(path, train=images[:20], valid=images[20:25], test=images[25:])
    data = load_dataset(str(path))
    assert set(data.train.unique().tolist()) == {0.0, 1.0}
