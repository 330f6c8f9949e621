"""Machine limits: the memory pyro-lvm may use, and what a request costs, checked before allocating.

Linux grants memory lazily and kills a process that uses more than its container allows, with no
message. So sizes are checked up front, against :func:`available_memory_bytes`:

- on CUDA, the device's free memory (``torch.cuda.mem_get_info``);
- on the CPU, the smallest of the host's ``MemAvailable`` (``/proc/meminfo``) and, for every memory
  cgroup from this process's own up to the root, its limit less its usage plus its reclaimable page
  cache: cgroup v2 ``memory.max - memory.current + inactive_file`` (``memory.stat``), cgroup v1
  ``memory.limit_in_bytes - memory.usage_in_bytes + total_inactive_file``. A container's limit is
  what the kernel enforces, not the host's free memory.

What is checked: a model's parameters (built once on PyTorch's ``meta`` device, which allocates
nothing), an array in a data file (from its header, before it is read), the tensors of a training
step (``--batch-size`` x ``--particles``) and of ``sample -n``, estimated from the shapes of the
data and the latent sites (never by running the model an extra time: a user's program may keep
state). The estimates leave out activations inside networks, so they are lower bounds: a refused
request cannot fit; an accepted one may still run short, and then fails with the out-of-memory
message.
"""

import math
import os
import warnings
from pathlib import Path

import torch

from .errors import UserError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
#: cgroup v1 writes "no limit" as a huge page-aligned number; anything above this is no limit.
_NO_LIMIT = 2 ** 62


def format_bytes(n):
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def _read_number(path):
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_field(path, *keys):
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in keys:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _meminfo_available():
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_cgroups():
    """``[(version, relative path)]`` of this process's memory cgroups (v2: ``0::/path``; v1: the
    hierarchy whose controllers include ``memory``)."""
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, relative = parts
        if hierarchy == "0" and controllers == "":
            found.append((2, relative))
        elif "memory" in controllers.split(","):
            found.append((1, relative))
    return found


def _ancestors(base, relative):
    """``base/relative`` and each folder above it up to ``base``, those that exist; in a container
    the process's path is the host's, so where it does not exist, ``base`` itself (the container's
    own cgroup is mounted there)."""
    parts = [p for p in relative.strip("/").split("/") if p]
    dirs = [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    existing = [d for d in dirs if d.is_dir()]
    return existing or ([base] if base.is_dir() else [])


def cgroup_available_bytes():
    """Memory this process's cgroups still allow (the tightest over the hierarchy), or ``None``
    where no limit is set or none can be read."""
    tightest = None
    for version, relative in _own_cgroups():
        if version == 2:
            base, limit_file, usage_file, cache_keys = CGROUP_ROOT, "memory.max", "memory.current", ("inactive_file",)
        else:
            base = CGROUP_ROOT / "memory"
            limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
            cache_keys = ("total_inactive_file", "inactive_file")
        for folder in _ancestors(base, relative):
            limit = _read_number(folder / limit_file)
            if limit is None or limit >= _NO_LIMIT:
                continue
            usage = _read_number(folder / usage_file) or 0
            reclaimable = _stat_field(folder / "memory.stat", *cache_keys)
            available = max(0, min(limit, limit - usage + reclaimable))
            tightest = available if tightest is None else min(tightest, available)
    return tightest


def available_memory_bytes(device="cpu"):
    """Memory a new allocation may take on ``device``: free GPU memory on CUDA; on the CPU the
    smaller of ``MemAvailable`` and what the cgroup limits allow. ``None`` where nothing can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    values = [v for v in (_meminfo_available(), cgroup_available_bytes()) if v is not None]
    return min(values) if values else None


def _where(device):
    device = torch.device(device)
    if device.type == "cuda":
        return f"free on {device}"
    limited = cgroup_available_bytes()
    host = _meminfo_available()
    if limited is not None and (host is None or limited <= host):
        return "left under this process's memory limit (cgroup)"
    return "of memory available"


def check_memory(nbytes, what, fix, device="cpu", also_cpu=False):
    """Refuse ``what`` (needing ``nbytes``) with one line if it cannot fit on ``device`` (and, with
    ``also_cpu``, on the CPU too: a model is built there, then moved)."""
    places = [torch.device(device)] + ([torch.device("cpu")] if also_cpu and torch.device(device).type != "cpu" else [])
    for where in places:
        available = available_memory_bytes(where)
        if available is not None and nbytes > available:
            raise UserError(f"{what} needs {format_bytes(nbytes)}, more than the {format_bytes(available)} "
                            f"{_where(where)}; {fix}")


def memory_budget_mb(requested_mb, device="cpu", share=0.5):
    """A chunk budget of at most ``share`` of the memory available on ``device`` (estimates that are
    chunked to a budget do not depend on it)."""
    available = available_memory_bytes(device)
    if available is None:
        return requested_mb
    return max(1.0, min(float(requested_mb), share * available / 2 ** 20))


# ----------------------------------------------------------------------------------------------
# What a model costs
# ----------------------------------------------------------------------------------------------

def _meta_build(cls, data_shape, hparams, build=None):
    """The model built on the ``meta`` device (shapes only, nothing allocated), or ``None``;
    ``build(hparams)`` builds it as the protocol does (``data_shape`` passed only by that name)."""
    try:
        with warnings.catch_warnings():  # torch warns on initialising empty tensors; refused below
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                return build(hparams) if build is not None else cls(tuple(data_shape), **hparams)
    except Exception:  # noqa: BLE001 -- a model meta cannot build is checked by the real build
        return None


def _empty_tensors(module):
    return [(name, tuple(t.shape)) for name, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.numel() == 0]


def check_model_size(cls, data_shape, hparams, device, defaults=None, build=None):
    """Refuse a model that is empty or too large for the machine, before allocating it.

    Empty: a hyperparameter of size 0 (``-p latent_dim=0``, ``-p hidden=0``) leaves a layer with no
    weights, which trains a degenerate model; refused where the class's defaults build no empty
    tensor. Too large: more parameter bytes than :func:`available_memory_bytes` on the CPU (where
    the model is built) or the device.
    """
    shell = _meta_build(cls, data_shape, hparams, build)
    if shell is None or not isinstance(shell, torch.nn.Module):
        return
    empty = _empty_tensors(shell)
    if empty and defaults is not None:
        plain = _meta_build(cls, data_shape, defaults, build)
        if isinstance(plain, torch.nn.Module) and not _empty_tensors(plain):
            changed = {k: v for k, v in hparams.items() if defaults.get(k) != v}
            name, shape = empty[0]
            raise UserError(f"{cls.__name__} with {changed or hparams} has an empty {name} of shape {shape}: a size "
                            f"is 0; give every size hyperparameter a value of at least 1")
    tensors = list(shell.parameters()) + list(shell.buffers())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    check_memory(nbytes, f"{cls.__name__}{tuple(data_shape)} with {hparams or 'default hyperparameters'}",
                 "choose smaller -p sizes", device, also_cpu=True)


def check_latent_sizes(info, model_name):
    """Refuse a model whose latent site has no elements (``latent_dim=0``): there is no code."""
    for site in info.latent_sites:
        if 0 in tuple(site.event_shape) or 0 in tuple(site.batch_shape):
            raise UserError(f"{model_name}'s latent site {site.name!r} has shape {tuple(site.event_shape)}, no "
                            f"elements; give it a size of at least 1 (-p latent_dim=...)")


def _numel(shape):
    return math.prod(int(s) for s in shape)


def bytes_per_point(data_shape, info=None, itemsize=4):
    """A lower bound on the bytes one data point (one particle) takes in a pass of model and guide,
    from shapes alone (the model is not run: a probe would change a stateful program): the point,
    its likelihood's parameters (as large as the point), and each latent site's value, location
    and scale."""
    latent = sum(_numel(site.event_shape) for site in info.latent_sites) if info is not None else 0
    return itemsize * (2 * _numel(data_shape) + 3 * latent)


def check_training_memory(info, data_shape, batch_size, particles, device, num_train):
    """Refuse ``--batch-size`` x ``--particles`` whose training step cannot fit in memory."""
    batch = min(int(batch_size), int(num_train))
    # the step keeps its forward tensors for the backward pass and holds their gradients: x2
    needed = 2 * bytes_per_point(data_shape, info) * batch * int(particles)
    check_memory(needed, f"a training step of {batch} points x {particles} particles",
                 "lower --particles or --batch-size", device)


def check_sampling_memory(data_shape, n, device):
    """Refuse ``sample -n N`` whose draws (made in one pass) and output cannot fit in memory: each
    draw, its likelihood's parameters, and its pixels or text in the output (at least as many bytes
    again)."""
    per_point = bytes_per_point(data_shape) + 4 * _numel(data_shape)
    check_memory(per_point * int(n), f"sample -n {n}", "draw fewer samples (-n)", device)


def check_array_memory(shape, itemsize, what, fix="use a smaller file"):
    """Refuse reading an array of ``shape`` (from a file header) that cannot fit in memory: the
    array itself and its float32 copy."""
    count = math.prod(int(s) for s in shape)
    needed = count * int(itemsize) + 2 * count * 4
    check_memory(needed, f"{what} (shape {tuple(int(s) for s in shape)})", fix, "cpu")


def check_zip_memory(f, what, factor=2, fix="use a smaller file"):
    """Refuse a zip archive (a ``.pt`` file, a checkpoint) whose members inflate beyond memory:
    their uncompressed sizes, from the archive's directory, times ``factor``. ``f`` is left at 0."""
    import zipfile

    try:
        with zipfile.ZipFile(f) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    finally:
        f.seek(0)
    check_memory(total * factor, f"{what} (its tensors unpack to {format_bytes(total)})", fix, "cpu")


def check_file_memory(path, factor, what, fix="use a smaller file"):
    """Refuse a file whose parsed contents (about ``factor`` x its size) cannot fit in memory."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return
    check_memory(size * factor, what, fix, "cpu")
