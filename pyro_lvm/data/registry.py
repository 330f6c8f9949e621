"""Data sets by name or by file path, read into float tensors with fixed train/valid/test splits.

| name | what | splits (train/valid/test) | read from |
| --- | --- | --- | --- |
| ``digits`` | scikit-learn's bundled 8x8 handwritten digits, pixels / 16, shape (1, 8, 8) | 1297 / 200 / 300, a fixed permutation | inside scikit-learn, no download |
| ``faithful`` | Old Faithful eruptions (minutes) and waiting time (minutes), shape (2,) | 192 / 40 / 40, a fixed permutation | shipped in this package |
| ``mnist`` | MNIST, pixels / 255, shape (1, 28, 28) | 50000 / 10000 / 10000: train[:50k], train[50k:], test | ``torchvision.datasets.MNIST`` under the data dir |
| ``fashion-mnist`` | Fashion-MNIST, as MNIST | 50000 / 10000 / 10000 | ``torchvision.datasets.FashionMNIST`` under the data dir |
| ``binarized-mnist`` | the fixed binarization of Larochelle & Murray (2011) | 50000 / 10000 / 10000 | ``DATA_DIR/binarized_mnist/binarized_mnist.npz`` |
| a file path | ``.npy``, ``.npz``, ``.csv``, ``.pt``: a table of vectors (N, D) or a stack of images (N, H, W) / (N, C, H, W) | the file's own ``train``/``valid``/``test`` arrays, else 80/10/10 of a fixed permutation | the path |

The data dir is ``--data-dir``, else ``$PYRO_LVM_DATA``, else ``./data``. Where the torchvision
data sets are missing and the machine is online, torchvision downloads them there.

Binarization (``none``, ``static``, ``dynamic``) maps intensities in [0, 1] to {0, 1}: ``static``
draws x ~ Bernoulli(intensity) once for every split with a fixed seed; ``dynamic`` draws the
training set afresh for every minibatch (the IWAE protocol) and uses the static draw for the
validation and test splits, so that evaluations are comparable.
"""

import dataclasses
import difflib
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

_PACKAGE_DATA = Path(__file__).resolve().parent
_STATIC_BINARIZATION_SEED = 0
_SPLIT_SEED = 0
BINARIZATIONS = ("none", "static", "dynamic")


@dataclasses.dataclass
class DataSplits:
    """Train, validation and test tensors ``[N, *data_shape]`` (float32) with optional labels."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor = None
    valid_labels: torch.Tensor = None
    test_labels: torch.Tensor = None
    is_image: bool = False
    binarize: str = "none"
    source: str = ""

    @property
    def data_shape(self):
        return tuple(self.train.shape[1:])

    def split(self, name):
        """``(x, labels)`` of the split ``train``, ``valid`` or ``test``."""
        if name not in ("train", "valid", "test"):
            raise UserError(f"unknown split {name!r}; use train, valid or test")
        return getattr(self, name), getattr(self, name + "_labels")

    def to(self, device):
        """Move every split to ``device`` once; minibatches are then sliced there."""
        moved = {f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        return DataSplits(**moved)

    def sizes(self):
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}

    def dataset(self, split="train"):
        """The split as a ``torch.utils.data.TensorDataset`` (with labels where there are any)."""
        x, labels = self.split(split)
        tensors = (x,) if labels is None else (x, labels)
        return torch.utils.data.TensorDataset(*tensors)


def _digits(data_dir):
    # Read scikit-learn's bundled file directly: importing sklearn would add over a second to every
    # command. The table is 1797 rows of 64 pixels (0..16) and the label, as load_digits reads it.
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    bundled = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if bundled is not None and bundled.is_file():
        table = np.loadtxt(bundled, delimiter=",", dtype=np.float32)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, target = bunch.images, bunch.target
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _split_by_permutation(x, torch.tensor(target), (1297, 200, 300)), True, "scikit-learn (bundled)"


def _faithful(data_dir):
    path = _PACKAGE_DATA / "faithful.csv"
    table = np.genfromtxt(path, delimiter=",", names=True)
    x = torch.tensor(np.stack([table["eruptions"], table["waiting"]], axis=1), dtype=torch.float32)
    return _split_by_permutation(x, None, (192, 40, 40)), False, str(path)


def _torchvision(cls_name, folder):
    def load(data_dir):
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        root = Path(data_dir)
        try:
            train, test = cls(root, train=True, download=False), cls(root, train=False, download=False)
        except RuntimeError:
            try:
                train, test = cls(root, train=True, download=True), cls(root, train=False, download=True)
            except Exception as err:
                raise UserError(
                    f"{cls_name} was not found in {root / folder / 'raw'} and could not be downloaded "
                    f"({type(err).__name__}); put the idx files there or pass --data-dir DIR "
                    f"(or set PYRO_LVM_DATA) to a folder that holds {folder}/raw") from None
        # torchvision keeps the whole set as a uint8 tensor; stacking it once beats a DataLoader pass.
        x_train = train.data.float().div_(255).unsqueeze(1)
        x_test = test.data.float().div_(255).unsqueeze(1)
        splits = (x_train[:50000], x_train[50000:], x_test,
                  train.targets[:50000], train.targets[50000:], test.targets)
        return splits, True, str(root / folder)
    return load


def _binarized_mnist(data_dir):
    path = Path(data_dir) / "binarized_mnist" / "binarized_mnist.npz"
    if not path.is_file():
        raise UserError(f"binarized MNIST was not found at {path}; download the Larochelle & Murray "
                        f"binarization into that file (keys train, valid, test) or pass --data-dir DIR")
    arrays = np.load(path)
    x = [torch.tensor(arrays[k], dtype=torch.float32).reshape(-1, 1, 28, 28) for k in ("train", "valid", "test")]
    return (*x, None, None, None), True, str(path)


DATASETS = {
    "digits": (_digits, "scikit-learn's bundled 8x8 handwritten digits (embedded, no download)"),
    "faithful": (_faithful, "Old Faithful eruptions, 272 x 2 (shipped in the package)"),
    "mnist": (_torchvision("MNIST", "MNIST"), "MNIST 28x28 via torchvision, from the data dir"),
    "fashion-mnist": (_torchvision("FashionMNIST", "FashionMNIST"), "Fashion-MNIST 28x28 via torchvision, from the data dir"),
    "binarized-mnist": (_binarized_mnist, "fixed binarized MNIST (Larochelle & Murray), from the data dir"),
}


def default_data_dir():
    return Path(os.environ.get("PYRO_LVM_DATA", "data"))


def describe_datasets(data_dir=None):
    """``[(name, description, where it is read from)]`` for ``pyro-lvm datasets``."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    where = {
        "digits": "inside scikit-learn",
        "faithful": str(_PACKAGE_DATA / "faithful.csv"),
        "mnist": str(data_dir / "MNIST" / "raw"),
        "fashion-mnist": str(data_dir / "FashionMNIST" / "raw"),
        "binarized-mnist": str(data_dir / "binarized_mnist" / "binarized_mnist.npz"),
    }
    rows = [(name, desc, where[name]) for name, (_, desc) in DATASETS.items()]
    rows.append(("PATH.{npy,npz,csv,pt}", "a table of vectors or a stack of images", "the file"))
    return rows


def _split_by_permutation(x, labels, sizes):
    n = len(x)
    if sizes is None:
        n_valid = n_test = max(1, n // 10) if n >= 10 else 0
        sizes = (n - n_valid - n_test, n_valid, n_test)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    a, b = sizes[0], sizes[0] + sizes[1]
    parts = [perm[:a], perm[a:b], perm[b:b + sizes[2]]]
    xs = [x[p] for p in parts]
    ls = [labels[p] if labels is not None else None for p in parts]
    return (*xs, *ls)


def _as_float_tensor(array, path):
    array = np.asarray(array)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise UserError(f"{path} holds non-numeric values (dtype {array.dtype}); give a numeric table or image stack")
    if np.iscomplexobj(array):
        raise UserError(f"{path} holds complex numbers (dtype {array.dtype}); give real-valued data")
    if array.dtype.kind == "f" and array.size:
        finite = array[np.isfinite(array)]
        if finite.size and float(np.abs(finite).max()) > float(np.finfo(np.float32).max):
            raise UserError(f"{path} holds values beyond the float32 range (|x| up to "
                            f"{float(np.abs(finite).max()):.3g}); rescale the data")
    # uint8 images are intensities 0..255, unless they are already binary (0/1), as binarized MNIST is.
    is_binary = array.size > 0 and array.max() <= 1
    scale = 255.0 if array.dtype == np.uint8 and array.ndim >= 3 and not is_binary else 1.0
    return torch.tensor(array.astype(np.float32) / scale)


def _shape_points(x, path):
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() not in (2, 4):
        raise UserError(f"{path} has shape {tuple(x.shape)}; expected (N, D) vectors or (N, H, W) / "
                        f"(N, C, H, W) images")
    return x


def _read_file(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist; give an existing .npy/.npz/.csv/.pt file or a data set name")
    suffix = path.suffix.lower()
    splits = None
    try:
        if suffix == ".npy":
            arrays = {"x": np.load(path, allow_pickle=False)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        elif suffix == ".csv":
            arrays = {"x": _read_csv(path)}
        elif suffix == ".pt":
            import warnings

            with warnings.catch_warnings():  # torch's note on validating sparse tensors is not for users
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                arrays = {"x": _tensor_to_numpy(obj)}
            elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
                arrays = {k: _tensor_to_numpy(v) for k, v in obj.items()}
            else:
                raise UserError(f"{path} must hold a tensor or a dict of tensors (train, valid, test)")
        else:
            raise UserError(f"unsupported data file type {suffix!r}; use .npy, .npz, .csv or .pt")
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}; "
                        f"check that the file is complete and of the type its name says") from None
    if not arrays:
        raise UserError(f"{path} holds no arrays; give a file with data")
    if {"train", "valid", "test"} <= set(arrays):
        splits = [_shape_points(_as_float_tensor(arrays[k], path), path) for k in ("train", "valid", "test")]
        shapes = {tuple(s.shape[1:]) for s in splits}
        if len(shapes) != 1:
            raise UserError(f"{path}: train, valid and test have different point shapes {sorted(shapes)}")
        return (*splits, None, None, None)
    key = "x" if "x" in arrays else ("train" if "train" in arrays else sorted(arrays)[0])
    x = _shape_points(_as_float_tensor(arrays[key], path), path)
    if len(x) < 3:
        raise UserError(f"{path} has {len(x)} data points; at least 3 are needed for train, valid and test splits")
    return _split_by_permutation(x, None, None)


def _tensor_to_numpy(tensor):
    """A saved tensor as numpy: sparse tensors densified, bfloat16 (which numpy lacks) as float32."""
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _read_csv(path):
    with open(path, newline="") as f:
        first = f.readline()
    if not first.strip():
        raise UserError(f"{path} is empty; give a CSV with one data point per row")
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header row
    import warnings

    with warnings.catch_warnings():  # an empty body is reported below, in one line, not as a warning
        warnings.simplefilter("ignore", UserWarning)
        table = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
    if table.size == 0:
        raise UserError(f"{path} has no data rows{' under its header' if skip else ''}; give a CSV with one "
                        f"data point per row")
    return table


def _check_values(splits, source):
    for x, split in zip(splits[:3], ("train", "valid", "test")):
        if x.numel() == 0 and split == "train":
            raise UserError(f"{source}: the training split is empty; give more data points")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=tuple(range(1, x.dim()))).sum()) if x.dim() > 1 else int((~torch.isfinite(x)).sum())
            raise UserError(f"{source}: {bad} {split} point(s) contain NaN or infinite values; "
                            f"remove or impute them before fitting")


def _static_binarize(x):
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise UserError("binarization needs intensities in [0, 1]; rescale the data or use --binarize none")
    generator = torch.Generator().manual_seed(_STATIC_BINARIZATION_SEED)
    return torch.bernoulli(x, generator=generator)


def load_dataset(name, data_dir=None, binarize="none"):
    """Read a data set by name or path into a :class:`DataSplits` on the CPU.

    ``binarize`` is ``none``, ``static`` or ``dynamic`` (see the module docstring); with
    ``dynamic`` the training split keeps its intensities and the loader draws binary minibatches.
    """
    if binarize not in BINARIZATIONS:
        raise UserError(f"unknown binarization {binarize!r}; use one of {', '.join(BINARIZATIONS)}")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    key = str(name).lower()
    if key in DATASETS:
        splits, is_image, source = DATASETS[key][0](data_dir)
    elif Path(name).suffix.lower() in (".npy", ".npz", ".csv", ".pt") or Path(name).exists():
        splits = _read_file(name)
        is_image, source = splits[0].dim() == 4, str(Path(name).resolve())
    else:
        close = difflib.get_close_matches(key, list(DATASETS), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known data sets: {', '.join(DATASETS)}"
        raise UserError(f"unknown data set {name!r}; {hint} (or give a .npy/.npz/.csv/.pt path)")
    _check_values(splits, source)
    x_train, x_valid, x_test, *labels = splits
    if binarize != "none":
        x_valid, x_test = _static_binarize(x_valid), _static_binarize(x_test)
        x_train = _static_binarize(x_train) if binarize == "static" else x_train
        if binarize == "dynamic" and (x_train.min() < 0 or x_train.max() > 1):
            raise UserError("dynamic binarization needs intensities in [0, 1]; rescale the data or use --binarize none")
    return DataSplits(str(name), x_train.contiguous(), x_valid.contiguous(), x_test.contiguous(), *labels,
                      is_image=is_image, binarize=binarize, source=source)
