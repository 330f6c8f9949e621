"""The shapes of what a run directory holds, checked on every read.

- :func:`validate_config`: ``RUN/config.json`` (and the JSON file of ``fit --config``), key by key;
- :func:`validate_checkpoint`: ``RUN/checkpoint.pt``, its keys and their types (and no NaN weight);
- :func:`validate_record`: a line of ``metrics.jsonl``;
- :func:`check_hyperparameters`: stored hyperparameters against the model class's defaults;
- :func:`json_compatible`: a record as standard JSON (no ``NaN``/``Infinity``: ``null`` and a reason).

A file written by hand or damaged on disk is refused with one line that names the file, the key,
what it holds and what it must hold, instead of crashing later where the value is used.

``OPTION_RULES`` holds one rule per fit option (the keys of ``pyro_lvm.api.FIT_DEFAULTS``); a new fit
option adds its rule here (``tests/test_run_files.py`` checks that every option has one).
"""

import math
import re

import torch

from .errors import UserError

MAX_COUNT = 2 ** 40  # as pyro_lvm.api.MAX_COUNT
MAX_SEED = 2 ** 32 - 1
ON_NAN_CHOICES = ("stop", "skip")  # pyro_lvm.training.ON_NAN (the run directory may not import training)
SCHEDULE_CHOICES = ("constant", "step", "exponential", "cosine", "iwae")  # pyro_lvm.training.schedules.SCHEDULES
SPLITS = ("train", "valid", "test")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(minimum, maximum=MAX_COUNT):
    return (lambda v: _is_int(v) and minimum <= v <= maximum), f"an integer from {minimum} to {maximum}"


def _number(minimum=0.0, maximum=math.inf, positive=False):
    def check(v):
        return _is_number(v) and minimum <= v <= maximum and (v > 0 or not positive)

    bound = "a positive finite number" if positive else f"a finite number >= {minimum:g}"
    return check, bound + (f" and <= {maximum:g}" if math.isfinite(maximum) else "")


def _choice(choices):
    return (lambda v: isinstance(v, str) and v in choices), "one of " + ", ".join(choices)


def _objective_names():
    from .objectives import OBJECTIVES

    return tuple(OBJECTIVES)


OPTION_RULES = {
    "objective": (lambda v: isinstance(v, str) and v in _objective_names(), "one of elbo, meanfield, iwae, iwae-dreg"),
    "particles": _integer(1),
    "epochs": _integer(1),
    "batch_size": _integer(1),
    "lr": _number(positive=True),
    "seed": _integer(0, MAX_SEED),
    "device": ((lambda v: isinstance(v, str) and bool(v.strip())), "a device name (auto, cpu, cuda, cuda:N)"),
    "checkpoint_every": _integer(0),
    "checkpoint_minutes": _number(),
    "on_nan": _choice(ON_NAN_CHOICES),
    "cuda_graph": ((lambda v: isinstance(v, bool)), "true or false"),
    "kl_warmup": _integer(0),
    "kl_warmup_start": _number(0.0, 1.0),
    "free_bits": _number(),
    "schedule": _choice(SCHEDULE_CHOICES),
    "lr_decay": ((lambda v: v is None or (_is_number(v) and 0 < v <= 1)), "null or a number in (0, 1]"),
    "lr_step": ((lambda v: v is None or (_is_int(v) and 1 <= v <= MAX_COUNT)), "null or an integer >= 1"),
    "lr_min": ((lambda v: v is None or (_is_number(v) and v >= 0)), "null or a finite number >= 0"),
    "adam_betas": ((lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)),
                   "two numbers in [0, 1)"),
    "adam_eps": _number(positive=True),
    "clip_grad_norm": _number(),
    "patience": _integer(0),
    "min_delta": _number(),
    "restarts": _integer(1, 10_000),
}
_NAME = ((lambda v: isinstance(v, str) and bool(v.strip()) and "\x00" not in v), "a non-empty string")
_OPTIONAL_TEXT = ((lambda v: v is None or (isinstance(v, str) and "\x00" not in v)), "a string or null")
_SHAPE = ((lambda v: isinstance(v, list) and all(_is_int(s) and s >= 1 for s in v)), "a list of positive integers")
_SIZES = ((lambda v: isinstance(v, dict) and set(v) == set(SPLITS) and all(_is_int(s) and s >= 0 for s in v.values())),
          'an object {"train": N, "valid": N, "test": N} of counts')
_FINGERPRINT = ((lambda v: isinstance(v, dict) and isinstance(v.get("sha256"), str)
                 and re.fullmatch(r"[0-9a-f]{64}", v["sha256"]) is not None
                 and _SIZES[0](v.get("sizes")) and _SHAPE[0](v.get("shape"))),
                'an object {"sha256": 64 hex digits, "sizes": {...}, "shape": [...]}')


def _data_rules(partial):
    from .data import BINARIZATIONS

    return {
        "name": _NAME,
        "data_dir": _OPTIONAL_TEXT,
        "binarize": _choice(BINARIZATIONS + (("auto",) if partial else ())),
        "shape": _SHAPE,
        "sizes": _SIZES,
        "source": _OPTIONAL_TEXT,
        "fingerprint": _FINGERPRINT,
    }


def _show(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(path, key, value, must, fix):
    raise UserError(f"{path}: {key} is {_show(value)}, but must be {must}; {fix}")


def _json_value(value, depth=0):
    """A plain JSON value (what ``json`` reads), of bounded nesting."""
    if depth > 20:
        return False
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_json_value(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_value(v, depth + 1) for k, v in value.items())
    return False


#: What every run configuration holds, and what training needs besides (older runs may lack the
#: options added since; their defaults apply).
REQUIRED_KEYS = ("model", "data", "hyperparameters")
TRAINING_KEYS = ("objective", "particles", "epochs", "batch_size", "lr", "seed")


def validate_config(config, path, partial=False, for_resume=False, fix=None):
    """Check a run configuration (``partial``: a file of fit options, where every key is optional
    and ``data`` may be a name; ``for_resume``: also everything training needs) and return it;
    else a :class:`UserError` naming the file, the key and the fix.

    Keys this version does not know are accepted when they hold plain JSON (a newer pyro-lvm may
    add options); ``fit --config`` refuses unknown keys itself.
    """
    fix = fix or ("fix that key in the file" if partial else "restore the file, fix that key, or refit into a new --out")
    if not isinstance(config, dict):
        raise UserError(f"{path} holds {type(config).__name__ if config is not None else 'null'}, not a JSON object "
                        f"of run options; {fix}")
    required = () if partial else REQUIRED_KEYS + (TRAINING_KEYS if for_resume else ())
    for key in required:
        if key not in config:
            raise UserError(f"{path} has no key {key!r}, so it is not a complete pyro-lvm run configuration; {fix}")
    for key, value in config.items():
        if key == "model":
            if not _NAME[0](value):
                _refuse(path, "model", value, "a model name or path/to/file.py:Class", fix)
        elif key == "model_class":
            if not isinstance(value, str):
                _refuse(path, key, value, "the model class's name", fix)
        elif key == "hyperparameters":
            if not (isinstance(value, dict) and _json_value(value)):
                _refuse(path, key, value, 'an object {"name": value} of the model\'s hyperparameters', fix)
        elif key == "data":
            _validate_data(value, path, partial, fix)
        elif key in ("data_dir",) and partial:
            if not _OPTIONAL_TEXT[0](value):
                _refuse(path, key, value, _OPTIONAL_TEXT[1], fix)
        elif key == "binarize" and partial:
            check, must = _data_rules(True)["binarize"]
            if not check(value):
                _refuse(path, key, value, must, fix)
        elif key == "versions":
            if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
                _refuse(path, key, value, "an object of version strings", fix)
        elif key in OPTION_RULES:
            check, must = OPTION_RULES[key]
            if not check(value):
                _refuse(path, key, value, must, fix)
        elif not _json_value(value):
            _refuse(path, key, value, "a plain JSON value", fix)
    return config


def _validate_data(value, path, partial, fix):
    if partial and isinstance(value, str):
        if not _NAME[0](value):
            _refuse(path, "data", value, "a data set name or a file path", fix)
        return
    must = ('a data set name, a file path or an object {"name": ...}' if partial
            else 'an object {"name", "data_dir", "binarize", "shape", "sizes", ...}')
    if not isinstance(value, dict):
        _refuse(path, "data", value, must, fix)
    rules = _data_rules(partial)
    for key in (("name",) if partial else ("name", "binarize")):
        if key not in value:
            raise UserError(f"{path}: data has no {key!r}; {fix}")
    for key, item in value.items():
        if key in rules and not rules[key][0](item):
            _refuse(path, f"data.{key}", item, rules[key][1], fix)


def check_hyperparameters(cls, hparams, defaults, path, fix="restore the file or refit"):
    """Stored hyperparameters must be ones ``cls`` takes, of the type of each default (an int for
    an int, a number for a float, a list for a tuple)."""
    for key, value in hparams.items():
        if key not in defaults:
            raise UserError(f"{path}: hyperparameter {key!r} is not one that {cls.__name__} takes "
                            f"({', '.join(defaults) or 'none'}); {fix}")
        default = defaults[key]
        if default is None:
            continue
        if isinstance(default, bool):
            ok, must = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, must = _is_int(value), "an integer"
        elif isinstance(default, float):
            ok, must = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, str):
            ok, must = isinstance(value, str), "a string"
        elif isinstance(default, (tuple, list)):
            ok, must = isinstance(value, list), "a list"
        else:
            continue
        if not ok:
            _refuse(path, f"hyperparameter {key!r}", value, f"{must} (its default is {default!r})", fix)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def _rng_state_ok(state):
    if not isinstance(state, dict) or not torch.is_tensor(state.get("torch")):
        return False
    expected = torch.get_rng_state()
    tensors = [state["torch"]] + ([state["cuda"]] if "cuda" in state else [])
    return (all(torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1 for t in tensors)
            and state["torch"].numel() == expected.numel())


def _count(minimum=0):
    return (lambda v: _is_int(v) and v >= minimum), f"an integer >= {minimum}"


RESUME_KEYS = {
    "optimizer": ((lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                   and isinstance(v.get("param_groups"), list)
                   and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"])),
                  'an optimizer state dict {"state": {...}, "param_groups": [...]}'),
    "rng": (_rng_state_ok, "the random-number state of torch (uint8 tensors)"),
    "epoch": _count(0),
    "step_in_epoch": _count(0),
    "global_step": _count(0),
    "seconds": (lambda v: _is_number(v) and v >= 0, "a finite number of seconds >= 0"),
    "running_elbo_sum": ((lambda v: torch.is_tensor(v) and v.numel() == 1 and v.is_floating_point()
                          and bool(torch.isfinite(v).all())), "a finite one-element float tensor"),
    "running_points": _count(0),
}
def _validation_state_ok(v):
    """The early-stopping state of :class:`pyro_lvm.training.checkpoints.ValidationTracker`."""
    return (isinstance(v, dict) and isinstance(v.get("best"), float) and not math.isnan(v["best"])
            and _is_int(v.get("best_epoch")) and v["best_epoch"] >= 0 and _is_int(v.get("bad_epochs"))
            and v["bad_epochs"] >= 0 and isinstance(v.get("stopped"), bool))


OPTIONAL_RESUME_KEYS = {
    "skipped_steps": _count(0),
    "validation": (_validation_state_ok, 'an object {"best": number, "best_epoch": N, "bad_epochs": N, "stopped": bool}'),
    "scheduler": ((lambda v: v is None or (isinstance(v, dict) and _is_int(v.get("last_epoch")))),
                  "null or a learning-rate scheduler's state dict"),
    "rng_ranks": ((lambda v: isinstance(v, list) and all(_rng_state_ok(s) for s in v)), "a list of RNG states"),
}


def validate_checkpoint(state, path, for_resume=False):
    """Check a loaded checkpoint: model weights always (a dict of tensors, none NaN); with
    ``for_resume``, everything training continues from. Returns ``state``."""
    fix = "restore it from a backup, or refit into a new --out"
    if "model" not in state:
        raise UserError(f"{path} has no 'model' (the weights); {fix}")
    model = state.get("model")
    if not (isinstance(model, dict) and model and all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items())):
        _refuse(path, "'model'", type(model).__name__ if not isinstance(model, dict) else "an object without tensors",
                "the model's state dict (names to tensors)", fix)
    for name, tensor in model.items():
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            raise UserError(f"{path}: the weight {name!r} is a {tensor.layout} tensor on {tensor.device}, not a plain "
                            f"one; {fix}")
        if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
            raise UserError(f"{path}: the weight {name!r} holds NaN, so every number from this model would be NaN; "
                            f"resume from an earlier checkpoint, or refit (a lower --lr, --on-nan skip)")
    # Every command reports the epoch it read (`checkpoint_epoch`), resume or not.
    if "epoch" in state and not RESUME_KEYS["epoch"][0](state["epoch"]):
        _refuse(path, "'epoch'", state["epoch"] if not torch.is_tensor(state["epoch"]) else "a tensor",
                RESUME_KEYS["epoch"][1], fix)
    if not for_resume:
        return state
    for key, (check, must) in RESUME_KEYS.items():
        if key not in state:
            raise UserError(f"{path} has no {key!r}, so training cannot continue from it; {fix}")
        if not check(state[key]):
            _refuse(path, repr(key), state[key] if not torch.is_tensor(state[key]) else "a tensor", must, fix)
    for key, (check, must) in OPTIONAL_RESUME_KEYS.items():
        if key in state and not check(state[key]):
            _refuse(path, repr(key), state[key], must, fix)
    return state


_GROUP_NUMBERS = {"lr": (0.0, False), "eps": (0.0, True), "weight_decay": (0.0, True)}


def _check_group(group, path, fix):
    for key, value in group.items():
        if key == "params":
            if not all(_is_int(i) for i in value):
                raise UserError(f"{path}: an optimizer parameter group lists {_show(value)}, not parameter indices; {fix}")
        elif key in _GROUP_NUMBERS:
            minimum, zero_ok = _GROUP_NUMBERS[key]
            if not (_is_number(value) and (value > minimum or (zero_ok and value == minimum))):
                _refuse(path, f"the optimizer's {key}", value, "a finite positive number", fix)
        elif key == "betas":
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(b) and 0 <= b < 1 for b in value)):
                _refuse(path, "the optimizer's betas", value, "two numbers in [0, 1)", fix)
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            _refuse(path, f"the optimizer's {key}", value, "a plain value", fix)


def check_optimizer_state(state, parameters, path):
    """The optimizer state must fit the model: one entry per parameter index, each tensor of the
    parameter's shape, plain numbers in its groups (a checkpoint edited by hand or from another model
    would fail mid-step)."""
    fix = "restore it from a backup, or refit into a new --out"
    for group in state["param_groups"]:
        _check_group(group, path, fix)
    params = list(parameters)
    indices = [i for group in state["param_groups"] for i in group["params"]]
    if sorted(indices) != list(range(len(params))):
        raise UserError(f"{path}: the optimizer state covers parameters {sorted(indices)[:8]} but the model has "
                        f"{len(params)}; {fix}")
    for index, entry in state["state"].items():
        if not _is_int(index) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise UserError(f"{path}: the optimizer state has an entry for parameter {index!r} that the model lacks; {fix}")
        for name, value in entry.items():
            if not (torch.is_tensor(value) or _is_number(value)):
                _refuse(path, f"the optimizer's {name} for parameter {index}", value, "a tensor or a number", fix)
            if torch.is_tensor(value) and (value.layout != torch.strided or value.device.type == "meta"):
                raise UserError(f"{path}: the optimizer's {name} for parameter {index} is not a plain tensor; {fix}")
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(params[index].shape):
                raise UserError(f"{path}: the optimizer's {name} for parameter {index} has shape {tuple(value.shape)}, "
                                f"the parameter {tuple(params[index].shape)}; {fix}")
            if torch.is_tensor(value) and value.is_floating_point() and bool(torch.isnan(value).any()):
                raise UserError(f"{path}: the optimizer's {name} for parameter {index} holds NaN; {fix}")


# ----------------------------------------------------------------------------------------------
# metrics.jsonl records, and standard JSON out
# ----------------------------------------------------------------------------------------------

def validate_record(record, path, line):
    """A line of ``metrics.jsonl``: an object with a positive integer ``epoch`` and numbers."""
    fix = "delete that line or restore the file"
    if not isinstance(record, dict):
        raise UserError(f"{path} line {line} holds {type(record).__name__}, not an epoch record (a JSON object); {fix}")
    if not (_is_int(record.get("epoch")) and record["epoch"] >= 1):
        raise UserError(f"{path} line {line}: epoch is {_show(record.get('epoch'))}, but must be an integer >= 1; {fix}")
    for key in ("step", "train_loss", "train_elbo", "valid_elbo", "seconds"):
        value = record.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise UserError(f"{path} line {line}: {key} is {_show(value)}, but must be a number; {fix}")
    return record


def _reason(value):
    if math.isnan(value):
        return "NaN: the estimate is undefined (a NaN in the model's log-density or too few finite weights)"
    return (f"{'-' if value < 0 else '+'}infinity: "
            + ("some point has zero density under the model, or its estimate underflowed"
               if value < 0 else "the estimate overflowed"))


def json_compatible(record):
    """``record`` with every non-finite float (at any depth) replaced by ``None``, and a key
    ``"null_reason"`` mapping each such key (``"a.b"`` when nested) to why; standard JSON."""
    reasons = {}

    def clean(value, where):
        if isinstance(value, float) and not math.isfinite(value):
            reasons[where] = _reason(value)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(dict(record), "")
    if reasons:
        cleaned["null_reason"] = {**(record.get("null_reason") or {}), **reasons}
    return cleaned
