"""The model protocol: how pyro-lvm finds, builds and inspects a user's latent variable model.

A model is a :class:`~pyro.nn.PyroModule` class with two Pyro programs, ``model(x=None,
num_samples=1)`` and ``guide(x)``, and a constructor ``__init__(data_shape, **hyperparameters)``
whose hyperparameters all have defaults. Nothing is registered: everything else the toolkit needs
(which sites are latent, their shapes, whether they are discrete, enumerated or global) is read
from Pyro traces by :func:`inspect_model`. See ``docs/ARCHITECTURE.md`` for the full contract.

A model is named on the command line in one of three ways:

- a zoo name (``vae``, ``pixelcnn-vae``): a file in the zoo folder (``models/`` in a checkout,
  ``pyro_lvm/zoo/`` once installed), loaded by path exactly like a user's file;
- ``path/to/file.py:ClassName``;
- ``package.module:ClassName`` (importable from ``sys.path``).
"""

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch

from .errors import DEVICE_MISMATCH, UserError, mixed_devices_message

_PACKAGE_DIR = Path(__file__).resolve().parent


def zoo_dir():
    """The folder holding the zoo's model files: installed copy first, then the source checkout."""
    for candidate in (_PACKAGE_DIR / "zoo", _PACKAGE_DIR.parent / "models"):
        if candidate.is_dir() and any(candidate.glob("*.py")):
            return candidate
    raise UserError("the model zoo was not found; reinstall pyro-lvm with `pip install .`")


def _zoo_files():
    return {p.stem.replace("_", "-"): p for p in sorted(zoo_dir().glob("*.py")) if not p.name.startswith("_")}


def zoo_models():
    """``{zoo name: one-line summary}`` read from each zoo file's docstring, without importing it."""
    summaries = {}
    for name, path in _zoo_files().items():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        summaries[name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return summaries


def _module_from_file(path, qualname_hint):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {str(path)!r} does not exist; check the path in MODEL (path/to/file.py:ClassName)")
    module_name = f"pyro_lvm_user_models.{qualname_hint}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"model file {str(path)!r} is not a Python file; give path/to/file.py:ClassName")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise UserError(f"model file {str(path)!r} failed to import: {type(err).__name__}: {err}; "
                        f"fix the file, or run `python {path}` to see the full error") from err
    return module


def _model_classes(module):
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and obj.__module__ == module.__name__
            and callable(getattr(obj, "model", None)) and callable(getattr(obj, "guide", None))]


def split_model_spec(spec):
    """``(file or module, class name or "")`` of ``path/file.py:Class``, ``pkg.mod:Class`` or a path;
    a colon inside a folder name (``runs/a:b/model.py``) is part of the path, not a separator."""
    spec = str(spec)
    target, sep, class_name = spec.rpartition(":")
    if not sep or "/" in class_name or "\\" in class_name or class_name.endswith(".py"):
        return spec, ""
    return target, class_name


def load_model_class(spec):
    """Resolve a model name (zoo name, ``file.py:Class`` or ``pkg.mod:Class``) to its class."""
    spec = str(spec)
    zoo = _zoo_files()
    if ":" not in spec and not spec.endswith(".py"):
        key = spec.replace("_", "-").lower()
        if key not in zoo:
            close = difflib.get_close_matches(key, list(zoo), n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(zoo)}"
            raise UserError(f"unknown model {spec!r}; {hint} (or give path/to/file.py:ClassName)")
        module = _module_from_file(zoo[key], "zoo_" + key.replace("-", "_"))
        classes = _model_classes(module)
        if len(classes) != 1:
            raise UserError(f"zoo file {zoo[key]} must define exactly one model class, found {len(classes)}")
        return classes[0]

    target, class_name = split_model_spec(spec)
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _module_from_file(target, Path(target).stem)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise UserError(f"cannot import module {target!r} ({err}); give path/to/file.py:ClassName "
                            f"or make sure the package is on PYTHONPATH") from err
    if not class_name:
        classes = _model_classes(module)
        if len(classes) != 1:
            raise UserError(f"{target!r} defines {len(classes)} model classes; name one as {target}:ClassName")
        return classes[0]
    cls = getattr(module, class_name, None)
    if cls is None or not inspect.isclass(cls):
        names = [c.__name__ for c in _model_classes(module)]
        close = difflib.get_close_matches(class_name, names, n=3)
        raise UserError(f"{target!r} has no class {class_name!r}; "
                        + (f"did you mean {', '.join(close)}?" if close else f"model classes there: {', '.join(names) or 'none'}"))
    missing = [m for m in ("model", "guide") if not callable(getattr(cls, m, None))]
    if missing:
        raise UserError(f"class {class_name!r} lacks the method(s) {', '.join(missing)}; a pyro-lvm model "
                        f"needs model(x=None, num_samples=1) and guide(x) (see the README)")
    return cls


def hyperparameters(cls):
    """``{name: default}`` for every keyword hyperparameter of ``cls.__init__`` (after ``data_shape``)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    if not params:
        raise UserError(f"{cls.__name__}.__init__ must take data_shape as its first argument")
    result = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise UserError(f"hyperparameter {p.name!r} of {cls.__name__} has no default; give every "
                            f"hyperparameter a default value")
        result[p.name] = p.default
    return result


def _parse_value(key, text, default):
    """Parse ``text`` to the type of ``default`` (bool, int, float, str, or a tuple of those)."""
    def scalar(t, like):
        if isinstance(like, bool):
            if t.lower() in ("1", "true", "yes", "on"):
                return True
            if t.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(like, int):
            return int(t)
        if isinstance(like, float):
            return float(t)
        if like is None:
            for conv in (int, float):
                try:
                    return conv(t)
                except ValueError:
                    pass
            return None if t.lower() == "none" else t
        return t

    try:
        if isinstance(default, (tuple, list)):
            like = default[0] if default else 0
            items = [s for s in text.replace(" ", "").split(",") if s]
            return tuple(scalar(s, like) for s in items)
        return scalar(text, default)
    except ValueError as err:
        kind = type(default).__name__ if default is not None else "value"
        example = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        raise UserError(f"-p {key}={text}: {err or 'bad value'}; expected a {kind} like {key}={example}") from None


def resolve_hyperparameters(cls, overrides):
    """Merge ``overrides`` (``{key: str or value}``) into the class defaults, checking keys and types."""
    defaults = hyperparameters(cls)
    resolved = dict(defaults)
    for key, value in (overrides or {}).items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"{cls.__name__} takes: {', '.join(defaults) or 'none'}"
            raise UserError(f"unknown hyperparameter {key!r} for {cls.__name__}; {hint}")
        resolved[key] = _parse_value(key, value, defaults[key]) if isinstance(value, str) else value
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}


def _check_model_size(cls, data_shape, hparams, device):
    """Refuse a model that is empty (a size hyperparameter of 0) or too large for the machine,
    before allocating it (:func:`pyro_lvm.resources.check_model_size`: built once on the ``meta``
    device, against the memory the container's limit leaves)."""
    from .resources import check_model_size

    try:
        defaults = {k: tuple(v) if isinstance(v, list) else v for k, v in hyperparameters(cls).items()}
    except UserError:
        defaults = None
    check_model_size(cls, data_shape, hparams, device, defaults=defaults)


def build_model(cls, data_shape, hparams=None, device="cpu"):
    """Instantiate a model class for data of shape ``data_shape`` and move it to ``device``."""
    hparams = {k: tuple(v) if isinstance(v, list) else v for k, v in (hparams or {}).items()}
    _check_model_size(cls, data_shape, hparams, device)
    try:
        lvm = cls(tuple(data_shape), **hparams)
    except UserError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError, OverflowError) as err:  # e.g. a negative size
        raise UserError(f"{cls.__name__}{tuple(data_shape)} with {hparams or 'default hyperparameters'} "
                        f"could not be built: {err}; check the -p values and the data's shape") from err
    if not isinstance(lvm, torch.nn.Module):
        raise UserError(f"{cls.__name__} must be a pyro.nn.PyroModule (or torch.nn.Module)")
    return lvm.to(device)


@dataclasses.dataclass
class SiteInfo:
    name: str
    event_shape: tuple
    batch_shape: tuple
    discrete: bool
    enumerated: bool
    local: bool  # inside the data plate


@dataclasses.dataclass
class ModelInfo:
    """What the toolkit learns from one trace of the model and the guide on a data batch."""

    latent_sites: list
    observed: SiteInfo
    max_plate_nesting: int
    observed_support: object = None
    likelihood: str = ""

    @property
    def enumerated(self):
        return [s for s in self.latent_sites if s.enumerated]

    @property
    def global_latents(self):
        return [s for s in self.latent_sites if not s.local]

    @property
    def continuous_latents(self):
        return [s for s in self.latent_sites if not s.discrete]


def _likelihood_name(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


def check_support(info, x, split="data"):
    """Refuse data outside the support of the observed site's distribution (e.g. non-binary
    data under a Bernoulli likelihood), with the fix in the message."""
    if info.observed_support is None or len(x) == 0:
        return
    ok = info.observed_support.check(x)
    if bool(torch.as_tensor(ok).all()):
        return
    bad = int((~torch.as_tensor(ok)).sum())
    binary = "boolean" in str(info.observed_support).lower() or "Bernoulli" in info.likelihood
    hint = ("binarize the data (--binarize dynamic or static) or use a Gaussian likelihood "
            "(-p likelihood=gaussian)" if binary else "transform the data or change the model's likelihood")
    raise UserError(f"{bad} {split} point(s) lie outside the support of the likelihood {info.likelihood} "
                    f"({info.observed_support}); {hint}")


def _in_data_plate(site):
    return any(frame.name == "data" for frame in site["cond_indep_stack"])


def inspect_model(lvm, x):
    """Trace ``lvm.guide(x)`` and ``lvm.model(x)`` once and describe their sites.

    Raises :class:`UserError` when the data do not fit the model (shape, support) or the
    program breaks the protocol (no observed site ``x``, no ``data`` plate).
    """
    with torch.no_grad(), poutine.block():
        try:
            guide_trace = poutine.trace(lvm.guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(lvm.model, trace=guide_trace)).get_trace(x)
        except UserError:
            raise
        except (RuntimeError, ValueError, IndexError) as err:
            if DEVICE_MISMATCH in str(err):
                raise UserError(mixed_devices_message(str(err).splitlines()[0], type(lvm).__name__)) from err
            raise UserError(f"the data (shape {tuple(x.shape[1:])} per point) do not fit "
                            f"{type(lvm).__name__}: {str(err).splitlines()[0]}; check the data set "
                            f"and the model's hyperparameters") from err

    obs = model_trace.nodes.get("x")
    if obs is None or obs["type"] != "sample" or not obs["is_observed"]:
        raise UserError(f"{type(lvm).__name__}.model must observe the data at a site named 'x' "
                        f"(pyro.sample('x', ..., obs=x))")
    if not _in_data_plate(obs):
        raise UserError(f"{type(lvm).__name__}.model must put the site 'x' inside pyro.plate('data', n)")
    fn = obs["fn"]
    if tuple(fn.event_shape) != tuple(x.shape[1:]):
        raise UserError(f"the data have shape {tuple(x.shape[1:])} per point but {type(lvm).__name__} "
                        f"models x with event shape {tuple(fn.event_shape)}; use .to_event() in the "
                        f"model or give data of the right shape")
    observed = SiteInfo("x", tuple(fn.event_shape), tuple(fn.batch_shape), False, False, True)
    info_support = fn.support

    latents = []
    plate_depth = 0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        plate_depth = max(plate_depth, sum(1 for f in site["cond_indep_stack"] if f.vectorized))
        if site["is_observed"]:
            continue
        site_fn = site["fn"]
        discrete = bool(getattr(site_fn, "has_enumerate_support", False)) and not site_fn.has_rsample
        enumerated = site["infer"].get("enumerate") == "parallel" and name not in guide_trace.nodes
        latents.append(SiteInfo(name, tuple(site_fn.event_shape), tuple(site_fn.batch_shape),
                                discrete, enumerated, _in_data_plate(site)))
    info = ModelInfo(latents, observed, max(plate_depth, 1), info_support, _likelihood_name(fn))
    check_support(info, x)
    return info


class DataPlateScale(pyro.poutine.messenger.Messenger):
    """Scale every site inside the ``data`` plate by ``num_data / batch_size``.

    Running a model written with ``pyro.plate("data", x.shape[0])`` under this handler gives the
    same trace as ``pyro.plate("data", num_data, subsample_size=x.shape[0])``: local sites are
    weighted so that a minibatch estimates the full-data objective, global sites are not.
    """

    def __init__(self, num_data):
        super().__init__()
        self.num_data = num_data

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == "data" and frame.size < self.num_data:
                msg["scale"] = msg["scale"] * (self.num_data / frame.size)
                # Pyro's subsampled plates mark the full size the same way; objectives that
                # apply the scale outside a logsumexp (IWAE) read it from msg["scale"].
                break
