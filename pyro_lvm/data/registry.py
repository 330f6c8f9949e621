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

A data file is checked before it is read: it must be a regular file (a directory, a FIFO or a
device is named as such), and the arrays of a ``.npy``/``.npz`` (from their headers) and the
storages of a ``.pt`` (from its zip directory) must fit in memory (:mod:`pyro_lvm.resources`), so a
small compressed file that inflates to gigabytes is refused instead of killing the process. A CSV is
read as UTF-8 with an optional byte-order mark; its first row is a header exactly when it does not
parse as numbers. Values must be finite, and small enough that their squares (which Gaussian
densities, covariances and PCA compute) stay finite in float32.

Every :class:`DataSplits` carries a ``fingerprint``: the SHA-256 of the splits' float32 values
before binarization, with their sizes and shape. ``fit`` stores it in ``config.json``, and
``--resume``, ``evaluate`` and the other commands refuse a data file that changed since.

Binarization (``none``, ``static``, ``dynamic``) maps intensities in [0, 1] to {0, 1}: ``static``
draws x ~ Bernoulli(intensity) once for every split with a fixed seed; ``dynamic`` draws the
training set afresh for every minibatch (the IWAE protocol) and uses the static draw for the
validation and test splits, so that evaluations are comparable.
"""

import dataclasses
import difflib
import hashlib
import io
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .. import files, resources
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
    fingerprint: dict = None  # {"sha256", "sizes", "shape"} of the values before binarization

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


def data_fingerprint(x_train, x_valid, x_test):
    """``{"sha256", "sizes", "shape"}`` of three splits: a hash of their shapes and float32 bytes."""
    digest = hashlib.sha256()
    for x in (x_train, x_valid, x_test):
        values = x.detach().to("cpu", torch.float32).contiguous()
        digest.update(repr(tuple(values.shape)).encode())
        if values.numel():
            digest.update(memoryview(values.numpy()).cast("B"))
    return {"sha256": digest.hexdigest(),
            "sizes": {"train": len(x_train), "valid": len(x_valid), "test": len(x_test)},
            "shape": list(x_train.shape[1:])}


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


DATA_FIX = "give a .npy/.npz/.csv/.pt file or a data set name (pyro-lvm datasets)"


def _npy_header(f):
    """``(shape, dtype)`` from the header of the ``.npy`` stream ``f``, without reading the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        shape, _, dtype = np.lib.format._read_array_header(f, version)  # noqa: SLF001 -- version 3.0
    return shape, dtype


def _npy_bytes(f, path, member=None):
    """``(shape, itemsize)`` from an array header (read before the data), or ``None`` if unreadable."""
    try:
        shape, dtype = _npy_header(f)
    except Exception:  # noqa: BLE001 -- a broken header is reported by np.load below
        return None
    return shape, dtype.itemsize


def _read_file(path):
    path = Path(path)
    what = files.kind(path, follow=True)
    if what is None:
        raise UserError(f"data file {str(path)!r} does not exist; {DATA_FIX}")
    if what != "a regular file":
        raise UserError(f"--data {str(path)!r} is {what}, not a data file; {DATA_FIX}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".csv", ".pt"):
        raise UserError(f"unsupported data file type {suffix or '(no suffix)'!r} of {path}; use .npy, .npz, .csv or .pt")
    try:
        with files.open_file(path, follow=True, fix=DATA_FIX) as f:
            arrays = _read_arrays(f, path, suffix)
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


def _read_arrays(f, path, suffix):
    """``{name: array}`` from the open data file ``f``, after checking that its arrays fit in memory."""
    if suffix == ".npy":
        header = _npy_bytes(f, path)
        if header is not None:
            resources.check_array_memory(*header, f"reading the array in {path}")
        f.seek(0)
        return {"x": np.load(f, allow_pickle=False)}
    if suffix == ".npz":  # every array is read: their sizes together, from their headers
        if zipfile.is_zipfile(f):
            f.seek(0)
            headers = []
            with zipfile.ZipFile(f) as archive:
                for info in archive.infolist():
                    if info.filename.endswith(".npy"):
                        with archive.open(info) as member:
                            headers.append(_npy_bytes(member, path))
            headers = [h for h in headers if h is not None]
            if len(headers) == 1:
                resources.check_array_memory(*headers[0], f"reading the array in {path}")
            elif headers:
                count = sum(math.prod(int(s) for s in shape) for shape, _ in headers)
                itemsize = max(size for _, size in headers)
                resources.check_array_memory((count,), itemsize, f"reading the {len(headers)} arrays of {path} "
                                             f"(values in all)")
        f.seek(0)
        with np.load(f, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    if suffix == ".csv":
        resources.check_file_memory(path, 8, f"reading the CSV {path}")
        return {"x": _read_csv(f, path)}
    import warnings

    resources.check_zip_memory(f, f"reading {path}")
    if not zipfile.is_zipfile(f):  # the legacy format: the file holds its storages as they are
        resources.check_file_memory(path, 3, f"reading {path}")
    f.seek(0)
    with warnings.catch_warnings():  # torch's note on validating sparse tensors is not for users
        warnings.simplefilter("ignore", UserWarning)
        obj = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {"x": _tensor_to_numpy(obj)}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): _tensor_to_numpy(v) for k, v in obj.items()}
    raise UserError(f"{path} must hold a tensor or a dict of tensors (train, valid, test)")


def _tensor_to_numpy(tensor):
    """A saved tensor as numpy: sparse tensors densified, bfloat16 (which numpy lacks) as float32."""
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _parses_as_numbers(row):
    """Whether one CSV row is numbers, by the parser that reads the body (numpy's)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.loadtxt(io.StringIO(row), delimiter=",", quotechar='"', ndmin=2, dtype=np.float64)
        return True
    except ValueError:
        return False


def _read_csv(f, path):
    """A CSV table of numbers: UTF-8 (a byte-order mark is dropped, not taken for part of the first
    cell), with a header row exactly when the first non-blank row does not parse as numbers."""
    try:
        text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); save the CSV as UTF-8") from None
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise UserError(f"{path} is empty; give a CSV with one data point per row")
    header = not _parses_as_numbers(lines[first])
    body = lines[first + 1:] if header else lines[first:]
    import warnings

    with warnings.catch_warnings():  # an empty body is reported below, in one line, not as a warning
        warnings.simplefilter("ignore", UserWarning)
        table = np.loadtxt(io.StringIO("\n".join(body)), delimiter=",", quotechar='"', ndmin=2, dtype=np.float64)
    if table.size == 0:
        raise UserError(f"{path} has no data rows{' under its header' if header else ''}; give a CSV with one "
                        f"data point per row")
    return table


#: Largest |x| accepted: (x - m)^2 for m up to |x| must stay below float32's maximum.
MAX_ABS_VALUE = float(np.sqrt(np.finfo(np.float32).max)) / 2


def _check_values(splits, source):
    for x, split in zip(splits[:3], ("train", "valid", "test")):
        if x.numel() == 0 and split == "train":
            raise UserError(f"{source}: the training split is empty; give more data points")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=tuple(range(1, x.dim()))).sum()) if x.dim() > 1 else int((~torch.isfinite(x)).sum())
            raise UserError(f"{source}: {bad} {split} point(s) contain NaN or infinite values; "
                            f"remove or impute them before fitting")
        largest = max(-float(x.min()), float(x.max())) if x.numel() else 0.0
        if largest > MAX_ABS_VALUE:
            raise UserError(f"{source}: {split} values reach {largest:.3g}, so their squares (in Gaussian densities, "
                            f"covariances, PCA) overflow float32; rescale the data to |x| below {MAX_ABS_VALUE:.2g} "
                            f"(divide by a constant)")


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
    elif Path(name).suffix.lower() in (".npy", ".npz", ".csv", ".pt") or os.path.lexists(name):
        splits = _read_file(name)
        is_image, source = splits[0].dim() == 4, str(Path(name).resolve())
    else:
        close = difflib.get_close_matches(key, list(DATASETS), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known data sets: {', '.join(DATASETS)}"
        raise UserError(f"unknown data set {name!r}; {hint} (or give a .npy/.npz/.csv/.pt path)")
    _check_values(splits, source)
    x_train, x_valid, x_test, *labels = splits
    fingerprint = data_fingerprint(x_train, x_valid, x_test)
    if binarize != "none":
        x_valid, x_test = _static_binarize(x_valid), _static_binarize(x_test)
        x_train = _static_binarize(x_train) if binarize == "static" else x_train
        if binarize == "dynamic" and (x_train.min() < 0 or x_train.max() > 1):
            raise UserError("dynamic binarization needs intensities in [0, 1]; rescale the data or use --binarize none")
    return DataSplits(str(name), x_train.contiguous(), x_valid.contiguous(), x_test.contiguous(), *labels,
                      is_image=is_image, binarize=binarize, source=source, fingerprint=fingerprint)
