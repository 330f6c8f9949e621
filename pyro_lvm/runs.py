"""The run directory: everything a fit leaves behind, written so that it is never left corrupt.

``RUN/config.json``
    the fully resolved configuration (model, hyperparameters, data and its fingerprint, objective,
    seed, versions); ``pyro-lvm fit --config RUN/config.json`` repeats the run.
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
    one JSON object per ``evaluate`` (standard JSON: a non-finite number is ``null``, with a reason).
``RUN/events.out.tfevents.*``
    TensorBoard scalars.
``RUN/.lock``
    held (``fcntl.flock``) by the ``fit`` that is writing the run, so a second one is refused.

A run directory may come from someone else, so nothing inside it is trusted (:mod:`pyro_lvm.files`):
no file is opened through a symbolic link or unless it is a regular file; ``config.json`` is checked
key by key against :func:`pyro_lvm.schema.validate_config` and a checkpoint against
:func:`pyro_lvm.schema.validate_checkpoint` on every read; ``--resume`` refuses options that differ
from the stored ones (:func:`check_resume_options`) and data whose fingerprint changed
(:func:`check_data_fingerprint`). A new run's directory is created and locked in one step
(:func:`create_run_directory`), so of two fits started at once on one ``--out`` exactly one proceeds.
"""

import dataclasses
import errno
import fcntl
import io
import json
import os
from pathlib import Path

import torch

from . import files, resources, schema
from .errors import UserError

CHECKPOINT_FORMAT = "pyro-lvm-checkpoint-v1"
LAST_CHECKPOINT, BEST_CHECKPOINT = "checkpoint.pt", "best.pt"
CHECKPOINT_CHOICES = ("auto", "best", "last")
LOCK_NAME = ".lock"
MAX_JSONL_BYTES = 1 << 30
_RUN_FIX = "remove it: pyro-lvm writes that file itself"


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one
    (never through a link: see :func:`pyro_lvm.files.atomic_write_bytes`)."""
    files.atomic_write_bytes(path, data, fix=_RUN_FIX)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_jsonl(path, obj):
    """Append one JSON line with a single ``write`` call (see :func:`pyro_lvm.files.append_line`)."""
    files.append_line(path, (json.dumps(obj, sort_keys=True) + "\n").encode())


def read_jsonl(path, validate=None):
    """The JSON objects of ``path``, skipping torn lines (a crash mid-append leaves a line that is
    not JSON, or not UTF-8 when cut inside a character). ``validate(record, path, line)`` checks
    each record; a missing file is no records, anything but a regular file is refused."""
    path = Path(path)
    what = files.kind(path)
    if what is None:
        return []
    if what != "a regular file":
        raise UserError(f"{path} is {what}, not a regular file; {_RUN_FIX} (one JSON line per record)")
    data = files.read_bytes(path, MAX_JSONL_BYTES, fix=_RUN_FIX, what="JSON-lines file")
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue
        records.append(validate(record, path, number) if validate else record)
    return records


def _object_record(record, path, line):
    if not isinstance(record, dict):
        raise UserError(f"{path} line {line} holds {type(record).__name__}, not a JSON object; delete that line")
    return record


def save_checkpoint(path, state):
    """Atomically save ``state`` (tensors, numbers, strings, lists and dicts only)."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path, map_location="cpu", for_resume=False):
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything else.

    ``weights_only=True`` means unpickling can only build tensors and plain containers, so a file
    crafted to run code on load is refused instead of executed. The contents are then checked
    (:func:`pyro_lvm.schema.validate_checkpoint`; with ``for_resume``, everything training needs).
    """
    path = Path(path)
    what = files.kind(path)
    if what is None:
        raise UserError(f"no checkpoint at {path}; fit the model first (pyro-lvm fit ... --out {path.parent})")
    fix = "restore it from a backup or refit without --resume into a new --out"
    resources.check_file_memory(path, 1, f"loading {path}", "load it on a machine with more memory")
    try:
        with files.open_file(path, fix=fix) as f:
            resources.check_zip_memory(f, f"loading {path}", factor=1, fix="load it on a machine with more memory")
            state = torch.load(f, map_location=map_location, weights_only=True)
    except UserError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UserError(f"{path} is not a plain pyro-lvm checkpoint (it asks to unpickle code: "
                            f"{first[:120]}); refusing to load it, nothing was run") from None
        raise UserError(f"{path} is truncated or not a checkpoint ({type(err).__name__}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        shown = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is not a pyro-lvm checkpoint (format {shown!r}); point to a run directory "
                        f"written by pyro-lvm fit")
    return schema.validate_checkpoint(state, path, for_resume=for_resume)


# ----------------------------------------------------------------------------------------------
# The lock, and creating a new run directory
# ----------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive, non-blocking lock on ``RUN/.lock``, released when the process ends.

    The lock file is created with ``O_CREAT | O_EXCL`` or opened with ``O_NOFOLLOW`` (a planted
    link is refused, never truncated), and must be a regular file of one name. After ``flock`` the
    locked file must still be the one at ``RUN/.lock`` (a refused fit unlinks its lock file; a
    process that opened it just before must not believe it holds the run).
    """

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd = None
        self.created = False  # whether this process created the lock file

    def acquire(self):
        fix = f"remove {self.path} (pyro-lvm creates its lock file itself)"
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                created = True
            except FileExistsError:
                fd, created = files.open_regular(self.path, os.O_RDWR, fix=fix, single_link=True), False
            except OSError as err:
                raise files._os_error(err, self.path, fix) from None  # noqa: SLF001 -- one message for all
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise UserError(f"another pyro-lvm fit is writing {self.path.parent}; wait for it to "
                                    f"finish or choose another --out") from None
                raise
            try:
                current = os.lstat(self.path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
                break
            os.close(fd)  # the file was unlinked (or replaced) between open and flock: try again
        else:
            raise UserError(f"could not take the lock {self.path}: another process keeps replacing it; "
                            f"choose another --out")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd, self.created = fd, created
        return self

    @property
    def held(self):
        return self._fd is not None

    def release(self):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class _NoRun:
    """What a rank other than the main one holds of a new run: nothing to lock or remove."""

    def begin(self):
        pass

    def release(self):
        pass

    def abandon(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class NewRun:
    """A new run directory, created and locked by this process (see :func:`create_run_directory`).

    Until :meth:`begin` (when ``config.json`` is about to be written) the fit may still be refused;
    :meth:`abandon` then removes exactly what this process created (its lock file, the directory and
    the parents it made), so a refused fit leaves nothing behind. After ``begin`` the directory is
    kept whatever happens, for ``--resume``.
    """

    def __init__(self, path, lock, created_dirs):
        self.path, self.lock, self.created_dirs, self.begun = path, lock, created_dirs, False

    def begin(self):
        self.begun = True

    def release(self):
        self.lock.release()

    def abandon(self):
        if self.begun or not self.lock.held:
            self.release()
            return
        if self.lock.created:
            try:
                os.unlink(self.lock.path)
            except OSError:
                pass
        self.release()
        for folder in reversed(self.created_dirs):
            try:
                os.rmdir(folder)
            except OSError:
                break

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            self.abandon()
        else:
            self.release()


def _make_folders(out):
    """Create ``out`` and its missing parents; returns those this process created, outermost first."""
    missing = []
    folder = out
    while not os.path.lexists(folder):
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    existing = folder
    if os.path.lexists(existing) and files.kind(existing, follow=True) != "a directory":
        what = files.kind(existing, follow=True)
        raise UserError(f"--out {out}: {existing} is {what}, not a folder; choose another --out")
    created = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
            created.append(folder)
        except FileExistsError:  # another process made it first: not ours
            continue
        except OSError as err:
            for made in reversed(created):
                try:
                    os.rmdir(made)
                except OSError:
                    break
            if err.errno == errno.ENAMETOOLONG:
                raise UserError(f"--out {str(out)[:80]}...: a name in that path is longer than the file system "
                                f"allows (255 bytes); choose a shorter --out") from None
            raise UserError(f"cannot create {folder}: {err.strerror or err}; choose an --out where you may "
                            f"write") from None
    return created


def create_run_directory(out, main=True):
    """Create the directory of a new run and take its lock, before anything else is done.

    ``out`` may not exist yet (it and its parents are created), or be an empty directory (or one
    holding only an unlocked ``.lock`` left by a fit that was stopped before it began). Anything
    else is refused: a run (or any file) already there, a file, a dangling link, a path under a
    regular file, a name over 255 bytes. Creation and locking are one step: ``mkdir`` and the
    lock file's ``O_EXCL`` creation or ``flock`` decide between fits started at the same moment, so
    exactly one of them proceeds. Returns a :class:`NewRun` (on ranks other than the main one,
    which write nothing, an object that does nothing).
    """
    if not main:
        return _NoRun()
    out = Path(out)
    what = files.kind(out)
    if what == "a symbolic link":
        target = files.kind(out, follow=True)
        if target != "a directory":
            raise UserError(f"--out {out} is a symbolic link to {os.readlink(out)!r}, which is "
                            f"{'missing' if target == 'a dangling symbolic link' else target}; remove the link "
                            f"or choose another --out")
    elif what not in (None, "a directory"):
        raise UserError(f"--out {out} is {what}, not a run directory; choose another --out")
    created = _make_folders(out)
    lock = None
    try:
        _check_empty(out)
        lock = RunLock(out).acquire()
        _check_empty(out)  # what another process may have written before we held the lock
    except BaseException:
        if lock is not None:
            lock.release()
        for folder in reversed(created):
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
    return NewRun(out, lock, created)


def _check_empty(out):
    try:
        entries = set(os.listdir(out)) - {LOCK_NAME}
    except OSError as err:
        raise files._os_error(err, out, "choose another --out") from None  # noqa: SLF001
    if entries:
        raise UserError(f"run directory {out} already exists; pass --resume to continue it or choose another --out")


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------

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
        """Append ``record`` as standard JSON (non-finite numbers become ``null`` with a reason)."""
        line = json.dumps(schema.json_compatible(record), sort_keys=True, allow_nan=False) + "\n"
        files.append_line(self.path / "evaluations.jsonl", line.encode())

    @property
    def evaluations(self):
        return read_jsonl(self.path / "evaluations.jsonl", validate=_object_record)


def check_run_directory(run_dir):
    """Refuse a RUN that is not a directory, saying what it is."""
    what = files.kind(run_dir, follow=True)
    if what is None:
        raise UserError(f"run directory {str(run_dir)!r} does not exist; give the --out of a finished pyro-lvm fit")
    if what == "a dangling symbolic link":
        raise UserError(f"run directory {str(run_dir)!r} is a symbolic link to {os.readlink(run_dir)!r}, which does "
                        f"not exist; give the --out of a pyro-lvm fit")
    if what != "a directory":
        raise UserError(f"{str(run_dir)!r} is {what}, not a run directory; give the --out folder of a pyro-lvm fit")


def read_config(run_dir, for_resume=False):
    """``RUN/config.json``, checked key by key (:func:`pyro_lvm.schema.validate_config`)."""
    check_run_directory(run_dir)
    path = Path(run_dir) / "config.json"
    what = files.kind(path)
    if what is None:
        raise UserError(f"{run_dir} has no config.json, so it is not a pyro-lvm run directory (or its fit was "
                        f"stopped before writing one); give the --out of a pyro-lvm fit")
    fix = "restore it, or refit into a new --out"
    config = files.read_json(path, fix=fix)
    if for_resume:  # a resume writes into the directory: no link anywhere in it, whatever its name
        _refuse_links(run_dir)
    return schema.validate_config(config, path, for_resume=for_resume)


def _refuse_links(run_dir):
    for entry in os.scandir(run_dir):
        if entry.is_symlink():
            raise UserError(f"{Path(run_dir) / entry.name} is a symbolic link; a fit never writes in a run directory "
                            f"that holds links (one could make it write elsewhere): remove it")


def read_metrics(run_dir):
    """The records of ``RUN/metrics.jsonl``, each checked (:func:`pyro_lvm.schema.validate_record`)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl", validate=schema.validate_record)


def check_data_fingerprint(config, data, run_dir):
    """Refuse data that differ from those the run was fitted on: by the fingerprint stored in
    ``config.json`` (sizes and a SHA-256 of the values), or by the sizes alone for older runs."""
    stored = config["data"].get("fingerprint")
    current = getattr(data, "fingerprint", None) or {}
    name = config["data"]["name"]
    then = stored["sizes"] if stored else config["data"].get("sizes")
    now = data.sizes()

    def sizes(s):
        return "/".join(str(s[k]) for k in schema.SPLITS)

    if then and then != now:
        detail = f"train/valid/test had {sizes(then)} points then, {sizes(now)} now"
    elif stored and current and stored["sha256"] != current.get("sha256"):
        detail = "same sizes, other values"
    else:
        return
    raise UserError(f"the data {name} changed since {run_dir} was fitted ({detail}); its numbers would no longer "
                    f"match config.json: restore the data it was fitted on, or fit a new run on these")


#: What ``fit --resume`` may change: train longer, or on another device. Every other option must be
#: left out or equal the stored one.
RESUME_MAY_CHANGE = ("epochs", "device")


def check_resume_options(config, requested, run_dir, defaults=None, may_change=RESUME_MAY_CHANGE):
    """Refuse a ``--resume`` that asks for options other than those the run was fitted with.

    ``requested`` maps a configuration key (``"lr"``, ``"data.name"``, ``"hyperparameters.latent_dim"``,
    ``"model"``) to ``(flag as typed, value normalized like the stored one)``; keys in ``may_change``
    are skipped. A key the stored configuration lacks (written before the option existed) has its
    value in ``defaults``. One line names the flag, both values and the fix.
    """
    for key, (flag, value) in requested.items():
        if key in may_change:
            continue
        stored = config
        for part in key.split("."):
            stored = stored.get(part) if isinstance(stored, dict) else None
        if stored is None and defaults and key in defaults:
            stored = defaults[key]
        if _normalize(value) != _normalize(stored):
            allowed = " and ".join("--" + k.replace("_", "-") for k in may_change)
            raise UserError(f"--resume continues {run_dir} with the options it was fitted with, but {flag} "
                            f"{_show(value)} differs from its {_show(stored)}; a resume may change only {allowed}: "
                            f"drop {flag.split()[0]}, or fit a new run into another --out")


def _normalize(value):
    if isinstance(value, tuple):
        return [_normalize(v) for v in value]
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def _show(value):
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)


def check_resume_state(state, config, run_dir, lvm, num_batches):
    """What training continues from must fit the run: the optimizer state the model's parameters,
    the position an epoch of ``num_batches`` steps, and the metrics the checkpoint's epoch (a
    checkpoint older than ``metrics.jsonl`` by more than the epoch being written is another run's,
    and resuming from it would delete real metrics lines)."""
    path = Path(run_dir) / "checkpoint.pt"
    schema.check_optimizer_state(state["optimizer"], lvm.parameters(), path)
    if state["step_in_epoch"] >= max(num_batches, 1) and state["step_in_epoch"] > 0:
        raise UserError(f"{path}: step_in_epoch {state['step_in_epoch']} is past the end of an epoch of "
                        f"{num_batches} steps; restore it from a backup, or refit into a new --out")
    later = sorted({r["epoch"] for r in read_metrics(run_dir) if r["epoch"] > state["epoch"]})
    if len(later) > 1:
        raise UserError(f"{path} is at epoch {state['epoch']} but {Path(run_dir) / 'metrics.jsonl'} records epochs up "
                        f"to {later[-1]}: the checkpoint is older than the run's metrics (restored from elsewhere?); "
                        f"restore the run's own checkpoint, or refit into a new --out")


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
    present = files.kind(best) is not None  # whatever is there: load_checkpoint refuses what is not a file
    if which == "auto":
        which = "best" if int(config.get("patience") or 0) > 0 and present else "last"
    if which == "best" and not present:
        raise UserError(f"{run_dir} has no best checkpoint ({BEST_CHECKPOINT}): its fit had no validation split "
                        f"or no finished epoch; use --checkpoint last")
    return which, best if which == "best" else run_dir / LAST_CHECKPOINT


def load_run(run_dir, device=None, checkpoint="auto"):
    """Load a run directory: rebuild the model from its config and load a checkpoint.

    ``checkpoint``: ``last`` (``checkpoint.pt``), ``best`` (``best.pt``, the best validation bound) or
    ``auto`` (see :func:`choose_checkpoint`); ``Run.checkpoint`` says which was loaded.
    """
    from .data import load_dataset
    from .protocol import build_model, hyperparameters, inspect_model, load_model_class
    from .device import resolve_device

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    device = resolve_device(device or config.get("device", "auto"), fallback_to_cpu=device is None)
    data_cfg = config["data"]
    data = load_dataset(data_cfg["name"], data_cfg.get("data_dir"), data_cfg.get("binarize", "none"))
    check_data_fingerprint(config, data, run_dir)
    cls = load_model_class(config["model"])
    schema.check_hyperparameters(cls, config["hyperparameters"], hyperparameters(cls), run_dir / "config.json")
    lvm = build_model(cls, data.data_shape, config.get("hyperparameters"), device)
    # The program's traces on the training data create its pyro.param s (and an AutoGuide's
    # parameters), which the checkpoint then fills in.
    inspect_model(lvm, data.train.to(device), check_data=False)
    which, path = choose_checkpoint(run_dir, config, checkpoint)
    state = load_checkpoint(path, map_location=device)
    try:
        lvm.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise UserError(f"{path} does not match the model in config.json "
                        f"({str(err).splitlines()[0][:160]}); the checkpoint belongs to another model") from None
    lvm.eval()
    return Run(run_dir, config, lvm, data.to(device), read_metrics(run_dir), device,
               checkpoint=which, checkpoint_epoch=int(state.get("epoch", 0)))
