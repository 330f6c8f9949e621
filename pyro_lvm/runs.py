"""The run directory: everything a fit leaves behind, written so that it is never left corrupt.

``RUN/config.json``
    the fully resolved configuration (model, hyperparameters, data, objective, seed, versions);
    ``pyro-lvm fit --config RUN/config.json`` repeats the run.
``RUN/checkpoint.pt``
    model and optimizer state dicts, RNG states, epoch and step; plain tensors and containers, so
    it loads with ``torch.load(weights_only=True)``. Written to a temporary file, flushed, fsynced
    and renamed over the old one, so a crash mid-write leaves the previous checkpoint intact.
``RUN/best.pt``
    the model at the epoch with the best validation bound so far (``epoch``, ``valid_elbo``),
    written atomically like ``checkpoint.pt``; absent without a validation split.
``RUN/metrics.jsonl``
    one JSON object per completed epoch.
``RUN/evaluations.jsonl``
    one JSON object per ``evaluate``.
``RUN/events.out.tfevents.*``
    TensorBoard scalars.
``RUN/.lock``
    held (``fcntl.flock``) by the ``fit`` that is writing the run, so a second one is refused.
"""

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import UserError

CHECKPOINT_FORMAT = "pyro-lvm-checkpoint-v1"
LAST_CHECKPOINT, BEST_CHECKPOINT = "checkpoint.pt", "best.pt"
CHECKPOINT_CHOICES = ("auto", "best", "last")


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_jsonl(path, obj):
    """Append one JSON line with a single ``write`` call. A torn last line (a crash mid-append, or
    a full disk) is closed with a newline first, so the new record stays readable on its own."""
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path):
    """The JSON objects of ``path``, skipping a torn last line (a crash mid-append)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def save_checkpoint(path, state):
    """Atomically save ``state`` (tensors, numbers, strings, lists and dicts only)."""
    import io

    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything else.

    ``weights_only=True`` means unpickling can only build tensors and plain containers, so a file
    crafted to run code on load is refused instead of executed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; fit the model first (pyro-lvm fit ... --out {path.parent})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UserError(f"{path} is not a plain pyro-lvm checkpoint (it asks to unpickle code: "
                            f"{first[:120]}); refusing to load it, nothing was run") from None
        raise UserError(f"{path} is truncated or not a checkpoint ({type(err).__name__}); restore it "
                        f"from a backup or refit without --resume into a new --out") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a pyro-lvm checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r}); "
                        f"point to a run directory written by pyro-lvm fit")
    return state


class RunLock:
    """An exclusive, non-blocking lock on ``RUN/.lock``, released when the process ends."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self):
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._file.close()
            self._file = None
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"another pyro-lvm fit is writing {self.path.parent}; wait for it to "
                                f"finish or choose another --out") from None
            raise
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def release(self):
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@dataclasses.dataclass
class Run:
    """A fitted run: its directory, configuration, model (weights loaded), data and metrics."""

    path: Path
    config: dict
    model: torch.nn.Module
    data: object
    metrics: list
    device: torch.device
    checkpoint: str = "last"  # which checkpoint the model was loaded from: "last" or "best"
    checkpoint_epoch: int = 0  # the epochs that checkpoint had completed

    @property
    def checkpoint_path(self):
        return self.path / "checkpoint.pt"

    def record_evaluation(self, record):
        append_jsonl(self.path / "evaluations.jsonl", record)

    @property
    def evaluations(self):
        return read_jsonl(self.path / "evaluations.jsonl")


def read_config(run_dir):
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist; give the --out of a finished pyro-lvm fit")
    if not path.is_file():
        raise UserError(f"{run_dir} has no config.json, so it is not a pyro-lvm run directory; "
                        f"give the --out of a pyro-lvm fit")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; restore it or refit") from None
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise UserError(f"{path} is not a pyro-lvm run configuration (no model or data); refit")
    return config


def choose_checkpoint(run_dir, config, which="auto"):
    """``(name, path)`` of the checkpoint that ``which`` selects: ``best``, ``last``, or ``auto``.

    ``auto`` (the commands' default) is ``best`` for a run fit with early stopping (``patience`` > 0:
    the stop was decided by the validation bound, and the best checkpoint is the model it selected)
    and ``last`` otherwise (the model after the epochs that were asked for). Neither looks at the test split.
    """
    if which not in CHECKPOINT_CHOICES:
        raise UserError(f"--checkpoint must be one of {', '.join(CHECKPOINT_CHOICES)}; got {which!r}")
    run_dir = Path(run_dir)
    best = run_dir / BEST_CHECKPOINT
    if which == "auto":
        which = "best" if int(config.get("patience") or 0) > 0 and best.is_file() else "last"
    if which == "best" and not best.is_file():
        raise UserError(f"{run_dir} has no best checkpoint ({BEST_CHECKPOINT}): its fit had no validation split "
                        f"or no finished epoch; use --checkpoint last")
    return which, best if which == "best" else run_dir / LAST_CHECKPOINT


def load_run(run_dir, device=None, checkpoint="auto"):
    """Load a run directory: rebuild the model from its config and load a checkpoint.

    ``checkpoint``: ``last`` (``checkpoint.pt``), ``best`` (``best.pt``, the best validation bound) or
    ``auto`` (see :func:`choose_checkpoint`); ``Run.checkpoint`` says which was loaded.
    """
    from .data import load_dataset
    from .protocol import build_model, load_model_class
    from .device import resolve_device

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    device = resolve_device(device or config.get("device", "auto"), fallback_to_cpu=device is None)
    data_cfg = config["data"]
    data = load_dataset(data_cfg["name"], data_cfg.get("data_dir"), data_cfg.get("binarize", "none"))
    cls = load_model_class(config["model"])
    lvm = build_model(cls, data.data_shape, config.get("hyperparameters"), device)
    which, path = choose_checkpoint(run_dir, config, checkpoint)
    state = load_checkpoint(path, map_location=device)
    try:
        lvm.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise UserError(f"{path} does not match the model in config.json "
                        f"({str(err).splitlines()[0][:160]}); the checkpoint belongs to another model") from None
    lvm.eval()
    return Run(run_dir, config, lvm, data.to(device), read_jsonl(run_dir / "metrics.jsonl"), device,
               checkpoint=which, checkpoint_epoch=int(state.get("epoch", 0)))
