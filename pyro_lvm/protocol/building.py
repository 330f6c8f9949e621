"""Building a program: its hyperparameters and its constructor.

Every constructor parameter with a default is a hyperparameter, set with ``-p KEY=VALUE`` and typed
by its default. The one exception is a parameter named ``data_shape``: it receives one data point's
shape (``(D,)``, ``(C, H, W)``) and is never a hyperparameter. A parameter without a default (as in
the Bayesian regression tutorial's ``BayesianRegression(in_features, out_features)``) is a required
hyperparameter: it must be given with ``-p`` (its value read as an integer, a number, a
comma-separated tuple, true/false or a string), else the fit is refused with the fix in the message.
"""

import difflib
import inspect

import pyro

from ..errors import UserError
from .loading import ProgramFunctions, describe_exception, user_frame

DATA_SHAPE = "data_shape"


class _Required:
    """The "default" of a constructor parameter that has none: it must be given with ``-p``."""

    def __repr__(self):
        return "required"


REQUIRED = _Required()


def _constructor_parameters(cls):
    if issubclass(cls, ProgramFunctions):
        return []
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return []
    params = list(signature.parameters.values())[1:]  # drop self
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def takes_data_shape(cls):
    return any(p.name == DATA_SHAPE for p in _constructor_parameters(cls))


def hyperparameters(cls):
    """``{name: default}`` for every constructor parameter of ``cls`` except ``data_shape``."""
    result = {}
    for p in _constructor_parameters(cls):
        if p.name == DATA_SHAPE:
            continue
        result[p.name] = REQUIRED if p.default is inspect.Parameter.empty else p.default
    return result


def _number_or_text(text):
    """An int, a float, None (for "none"), or the text itself: a ``-p`` value with no type to follow."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return None if text.lower() == "none" else text


def _parse_untyped(text):
    """A ``-p`` value for a parameter without a default: true/false, int, float, a comma-separated tuple
    of those, None, or the string itself."""
    def scalar(t):
        if t.lower() in ("true", "false"):
            return t.lower() == "true"
        return _number_or_text(t)

    if "," in text:
        return tuple(scalar(item) for item in text.replace(" ", "").split(",") if item)
    return scalar(text)


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
            return _number_or_text(t)
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


def resolve_hyperparameters(cls, overrides, complete=True):
    """Merge ``overrides`` (``{key: str or value}``) into the class defaults, checking keys and types;
    ``complete``: every parameter without a default must be among them (a fit; not a resume's check)."""
    defaults = hyperparameters(cls)
    resolved = dict(defaults)
    for key, value in (overrides or {}).items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"{cls.__name__} takes: {', '.join(defaults) or 'none'}"
            raise UserError(f"unknown hyperparameter {key!r} for {cls.__name__}; {hint}")
        if not isinstance(value, str):
            resolved[key] = value
        elif defaults[key] is REQUIRED:
            resolved[key] = _parse_untyped(value)
        else:
            resolved[key] = _parse_value(key, value, defaults[key])
    missing = [key for key, value in resolved.items() if value is REQUIRED]
    if missing and complete:
        given = " ".join(f"-p {key}=VALUE" for key in missing)
        raise UserError(f"{cls.__name__}.__init__ takes {', '.join(map(repr, missing))} without a default: give "
                        f"{'it' if len(missing) == 1 else 'them'} with {given} (pyro-lvm fills in only "
                        f"{DATA_SHAPE}, one data point's shape), or give {cls.__name__}.__init__ defaults")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}


def _constructor_kwargs(cls, data_shape, hparams):
    kwargs = dict(hparams)
    if takes_data_shape(cls):
        kwargs[DATA_SHAPE] = tuple(data_shape)
    return kwargs


def _described(cls, data_shape, hparams):
    shape = f" for data of shape {tuple(data_shape)}" if data_shape is not None else ""
    return f"{cls.__name__}{shape} with {hparams or 'default hyperparameters'}"


def _check_model_size(cls, data_shape, hparams, device):
    """Refuse a model that is empty (a size hyperparameter of 0) or too large for the machine, before
    allocating it (:func:`pyro_lvm.resources.check_model_size`: built once on the ``meta`` device,
    against the memory the container's limit leaves)."""
    from ..resources import check_model_size

    if issubclass(cls, ProgramFunctions):
        return
    try:
        defaults = {k: tuple(v) if isinstance(v, list) else v for k, v in hyperparameters(cls).items()}
    except UserError:
        defaults = None
    if defaults is not None and any(v is REQUIRED for v in defaults.values()):
        defaults = None  # no default build to compare an empty model with

    def build(values):
        with _user_settings(cls):
            return cls(**_constructor_kwargs(cls, data_shape, values))

    check_model_size(cls, data_shape, hparams, device, defaults=defaults, build=build)


def _user_settings(cls):
    """The Pyro settings a program runs under: Pyro's defaults, unless its file changed them."""
    return pyro.settings.context(module_local_params=bool(getattr(cls, "__pyro_lvm_module_local_params__", False)))


def construct(cls, data_shape, hparams=None):
    """``cls(**hyperparameters)`` (plus ``data_shape=`` where it takes one), exceptions as user errors."""
    hparams = {k: tuple(v) if isinstance(v, list) else v for k, v in (hparams or {}).items()}
    try:
        with _user_settings(cls):
            return cls(**_constructor_kwargs(cls, data_shape, hparams))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- the constructor is the user's code
        frame = user_frame(err.__traceback__)
        if frame is None and not isinstance(err, (TypeError, ValueError, AssertionError, RuntimeError, OverflowError)):
            raise
        detail = describe_exception(err, frame) if frame is not None else f"{type(err).__name__}: {str(err).strip()[:300]}"
        raise UserError(f"{_described(cls, data_shape, hparams)} could not be built: {detail}; check the -p "
                        f"values and the data's shape") from err


def build_model(cls, data_shape, hparams=None, device="cpu"):
    """Instantiate a program for data points of shape ``data_shape`` and wrap it in a
    :class:`~pyro_lvm.protocol.program.Program` on ``device`` (not yet inspected)."""
    from .program import Program

    hparams = {k: tuple(v) if isinstance(v, list) else v for k, v in (hparams or {}).items()}
    _check_model_size(cls, data_shape, hparams, device)
    instance = construct(cls, data_shape, hparams)
    for role in ("model", "guide"):
        if not callable(getattr(instance, role, None)):
            raise UserError(f"{cls.__name__} has no {role}; a program needs model(x) and guide(x) "
                            f"(see the README's 'Your own model')")
    program = Program(instance, data_shape=data_shape,
                      module_local_params=getattr(cls, "__pyro_lvm_module_local_params__", False),
                      factory=lambda: construct(cls, data_shape, hparams))
    return program.to(device)
