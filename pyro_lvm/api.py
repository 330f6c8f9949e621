"""The Python API: one function per command of the ``pyro-lvm`` command line, same arguments.

::

    import pyro_lvm
    run = pyro_lvm.fit("vae", data="digits", epochs=50, out="runs/vae")
    pyro_lvm.evaluate(run, estimator="is", samples=1000)["log_px"]
    pyro_lvm.sample(run, n=64, out="samples.png")
"""

import math
import platform
import shutil
import sys
import time
from pathlib import Path

import pyro
import torch

from . import __version__, files, outputs, resources, schema
from .data import BINARIZATIONS, load_dataset
from .errors import UserError
from .protocol import build_model, check_support, hyperparameters as model_hyperparameters, inspect_model, \
    load_model_class, resolve_hyperparameters
from .protocol.checks import check_fit, preflight, remove_failed_run
from .runs import (atomic_write_json, check_data_fingerprint, check_resume_options, check_resume_state,
                   create_run_directory, load_checkpoint, load_run, read_config)
from .device import resolve_device
from .training import ON_NAN, train
from .training.schedules import DEPENDS_ON_LENGTH, resolve_schedule_options

FIT_DEFAULTS = {
    "data": None,  # the model's default data set (see default_data_for)
    "data_dir": None,
    "binarize": "auto",
    "hyperparameters": {},
    "objective": "elbo",
    "particles": 1,
    "epochs": 20,
    "batch_size": 100,
    "lr": 1e-3,
    # the learning-rate schedule (pyro_lvm/training/schedules.py) and its options; None = the schedule's default
    "schedule": "constant",
    "lr_decay": None,
    "lr_step": None,
    "lr_min": None,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "clip_grad_norm": 0.0,  # 0 = off
    # early stopping on the validation bound (pyro_lvm/training/checkpoints.py); 0 = off
    "patience": 0,
    "min_delta": 0.0,
    "restarts": 1,  # initialisations, the best by validation bound kept (pyro_lvm/training/restarts.py)
    "seed": 0,
    "device": "auto",
    "checkpoint_every": 0,
    "checkpoint_minutes": 0,
    "on_nan": "stop",
    "cuda_graph": False,  # replay each step as a CUDA graph (pyro_lvm/training/cuda_graph.py); GPU only
    # remedies for posterior collapse (pyro_lvm/objectives/regularized.py); 0 = off
    "kl_warmup": 0,
    "kl_warmup_start": 0.0,
    "free_bits": 0.0,
}

# Counts larger than this (particles, epochs, samples, -n) cannot be meant: refused up front, before
# they overflow a tensor size or ask for petabytes.
MAX_COUNT = 2 ** 40
MAX_SEED = 2 ** 32 - 1  # numpy's seed range, which pyro.set_rng_seed uses too


def check_count(name, value, minimum=1, maximum=MAX_COUNT):
    """``value`` as an int in ``[minimum, maximum]``, else a :class:`UserError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise UserError(f"{name} must be an integer between {minimum} and {maximum}, got {value!r}")
    return value


def check_seed(seed, name="--seed"):
    return check_count(name, seed, 0, MAX_SEED)


# Default number of samples (particles, or chains for AIS) per estimator.
DEFAULT_SAMPLES = {"elbo": 10, "iwae": 50, "is": 1000, "exact": 1, "ais": 16}


def default_data_for(model_spec):
    """The embedded default data: ``faithful`` for the mixture, ``digits`` for everything else."""
    return "faithful" if str(model_spec).replace("_", "-").lower() == "mog" else "digits"


def _versions():
    return {"pyro_lvm": __version__, "pyro": pyro.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def _resolve_model_spec(spec):
    """Zoo names stay names; file paths become absolute so ``--config`` works from anywhere."""
    from .protocol import split_model_spec

    target, cls = split_model_spec(spec)
    if target.endswith(".py") or "/" in target:
        return str(Path(target).resolve()) + (":" + cls if cls else "")
    return str(spec)


def _resolve_data_name(name):
    path = Path(str(name))
    if path.suffix.lower() in (".npy", ".npz", ".csv", ".pt") or path.exists():
        return str(path.resolve())
    return str(name)


def _is_binary(x):
    return bool(((x == 0) | (x == 1)).all())


def _choose_binarization(requested, info, data):
    """``auto``: binarize images dynamically when an observed site's support is {0, 1}."""
    if requested != "auto":
        return requested
    if not data.is_image or _is_binary(data.train):
        return "none"
    boolean = any("boolean" in str(site.support).lower() for site in info.observed_sites)
    in_unit_interval = bool(data.train.min() >= 0) and bool(data.train.max() <= 1)
    return "dynamic" if boolean and in_unit_interval else "none"


def _check_options(cfg):
    from .objectives import OBJECTIVES

    if cfg["objective"] not in OBJECTIVES:
        import difflib

        close = difflib.get_close_matches(cfg["objective"], list(OBJECTIVES), n=2)
        raise UserError(f"unknown objective {cfg['objective']!r}; "
                        + (f"did you mean {', '.join(close)}? " if close else "")
                        + f"choose from {', '.join(OBJECTIVES)}")
    for key, minimum in (("particles", 1), ("epochs", 1), ("batch_size", 1), ("checkpoint_every", 0),
                         ("patience", 0), ("restarts", 1)):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < minimum:
            raise UserError(f"--{key.replace('_', '-')} must be an integer >= {minimum}, got {cfg[key]!r}")
    check_count("--particles", cfg["particles"])
    check_count("--epochs", cfg["epochs"])
    check_count("--restarts", cfg["restarts"], maximum=10_000)
    for key in ("lr", "checkpoint_minutes"):
        value = cfg[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
            raise UserError(f"--{key.replace('_', '-')} must be a positive finite number, got {value!r}")
    check_seed(cfg["seed"])
    if cfg["binarize"] not in BINARIZATIONS + ("auto",):
        raise UserError(f"--binarize must be one of auto, {', '.join(BINARIZATIONS)}; got {cfg['binarize']!r}")
    if not isinstance(cfg["cuda_graph"], bool):
        raise UserError(f"cuda_graph must be True or False, got {cfg['cuda_graph']!r}")
    if cfg["on_nan"] not in ON_NAN:
        raise UserError(f"--on-nan must be one of {', '.join(ON_NAN)}; got {cfg['on_nan']!r}")
    _check_training_options(cfg)
    # remedies (KL warm-up, free bits): values, then the objective they need
    from .objectives.regularized import check_remedies

    check_remedies(cfg["kl_warmup"], cfg["free_bits"], cfg["kl_warmup_start"])
    if (cfg["kl_warmup"] or cfg["free_bits"]) and cfg["objective"] not in ("elbo", "meanfield"):
        raise UserError(f"--kl-warmup and --free-bits apply to --objective elbo or meanfield, not "
                        f"{cfg['objective']!r} (the importance-weighted bound has no separate KL term)")


def _check_training_options(cfg):
    """Adam's settings, clipping, early stopping and the schedule (whose defaults are filled in, in place)."""
    betas = cfg["adam_betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise UserError(f"--adam-betas must be two numbers in [0, 1) like 0.9,0.999; got {betas!r}")
    cfg["adam_betas"] = [float(b) for b in betas]
    for key, positive in (("adam_eps", True), ("clip_grad_norm", False), ("min_delta", False)):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (positive and value == 0):
            raise UserError(f"--{key.replace('_', '-')} must be a {'positive' if positive else 'non-negative'} "
                            f"finite number, got {value!r}")
        cfg[key] = float(value)
    cfg.update(resolve_schedule_options(cfg))


def read_fit_config(path):
    """The options stored in a run's ``config.json`` (or any JSON file of fit options)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if files.kind(path, follow=True) is None:
        raise UserError(f"config file {str(path)!r} does not exist; give RUN/config.json of an earlier fit")
    stored = files.read_json(path, follow=True, fix="give RUN/config.json of an earlier fit")
    schema.validate_config(stored, path, partial=True)
    options = {k: stored[k] for k in FIT_DEFAULTS if k in stored and k not in ("data", "data_dir", "binarize")}
    data = stored.get("data")
    if isinstance(data, dict):
        options["data"] = data.get("name")
        options["data_dir"] = data.get("data_dir")
        options["binarize"] = data.get("binarize", "auto")
    elif isinstance(data, str):
        options["data"] = data
    if "model" in stored:
        options["model"] = stored["model"]
    unknown = set(stored) - set(FIT_DEFAULTS) - {"model", "data", "versions", "model_class", "data_shape"}
    if unknown:
        raise UserError(f"{path} has unknown option(s) {', '.join(sorted(unknown))}; remove them")
    return options


def fit(model, data=None, *, out, resume=False, hyperparameters=None, progress=True, log=None, distributed=False,
        **options):
    """Fit ``model`` (a zoo name, ``file.py:Class`` or ``pkg.mod:Class``) and return the :class:`Run`.

    ``options`` are those of ``pyro-lvm fit``: ``data_dir``, ``binarize`` (auto, none, static,
    dynamic), ``objective``, ``particles``, ``epochs``, ``batch_size``, ``lr``, ``seed``,
    ``device``, ``checkpoint_every``, ``checkpoint_minutes``, ``on_nan``, ``cuda_graph``, and the posterior-collapse
    remedies ``kl_warmup`` (steps), ``kl_warmup_start`` and ``free_bits`` (nats per dimension); the training
    options ``schedule`` (:mod:`pyro_lvm.training.schedules`) with ``lr_decay``, ``lr_step``, ``lr_min``,
    ``adam_betas``, ``adam_eps``, ``clip_grad_norm``, early stopping ``patience`` and ``min_delta``
    (:mod:`pyro_lvm.training.checkpoints`) and ``restarts`` (:mod:`pyro_lvm.training.restarts`). A model
    class's ``fit_defaults`` replace the defaults of those it names. Everything is checked
    before the run directory is created; with ``resume=True`` the run continues from its checkpoint
    and the stored configuration (``epochs`` may be raised to train longer). ``distributed=True``:
    this process is one of ``torchrun``'s ranks, training data-parallel (:mod:`pyro_lvm.training.distributed`).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    from .training.distributed import context_for

    ctx = context_for(distributed, options.get("device"))
    log = ctx.main_only(log) if ctx is not None else log
    unknown = set(options) - set(FIT_DEFAULTS)
    if unknown:
        raise UserError(f"unknown fit option(s) {', '.join(sorted(unknown))}; see pyro-lvm fit --help")
    out = Path(out)
    if resume:
        return _resume(out, options, progress, log, ctx, model=model, data=data, hyperparameters=hyperparameters)
    # The run directory is created and locked before anything else, so that of two fits on one --out
    # exactly one proceeds; a fit refused before it begins removes what it created.
    with create_run_directory(out, main=ctx is None or ctx.is_main) as run_dir:
        return _fit_new_run(model, data, out, run_dir, hyperparameters, options, progress, log, ctx)


def _fit_new_run(model, data, out, run_dir, hyperparameters, options, progress, log, ctx):
    """The body of :func:`fit` for a new run, inside its created and locked ``run_dir``."""
    explicit = {k: v for k, v in options.items() if v is not None}
    cfg = {**FIT_DEFAULTS, **explicit, "data": data or default_data_for(model)}
    _check_options(cfg)  # the user's own options first, before the model file is imported
    device = ctx.device if ctx is not None else resolve_device(cfg["device"])
    cls = load_model_class(model)
    model_defaults = _model_fit_defaults(cls)
    if model_defaults:
        cfg = {**FIT_DEFAULTS, **model_defaults, **explicit, "data": cfg["data"]}
        _check_options(cfg)
    if ctx is not None and (cfg["restarts"] > 1 or cfg["patience"] > 0):
        raise UserError("--restarts and --patience are not available with --distributed (rank 0 alone validates); "
                        "fit without --distributed, or without them")
    hparams = resolve_hyperparameters(cls, hyperparameters)
    lvm, splits, objective, binarize = _prepare(cls, hparams, cfg, cfg["seed"], device, distributed=ctx is not None)
    if cfg["patience"] > 0 and not len(splits.valid):
        raise UserError(f"--patience stops on the validation bound, and {cfg['data']} has no validation split; "
                        f"give data with one, or leave --patience out")

    config = {
        "model": _resolve_model_spec(model), "model_class": cls.__name__, "hyperparameters": hparams,
        "data": {"name": _resolve_data_name(cfg["data"]),
                 "data_dir": str(Path(cfg["data_dir"]).resolve()) if cfg["data_dir"] else None,
                 "binarize": binarize, "shape": list(splits.data_shape), "sizes": splits.sizes(),
                 "source": splits.source, "fingerprint": splits.fingerprint},
        **{k: cfg[k] for k in FIT_DEFAULTS if k not in ("data", "data_dir", "binarize", "hyperparameters")},
        "versions": _versions(),
    }
    # The run begins only now that every input has been checked (by every rank).
    if ctx is not None:
        ctx.barrier()
    run_dir.begin()
    try:
        if ctx is None or ctx.is_main:
            atomic_write_json(out / "config.json", config)
        log(f"fitting {cls.__name__} on {cfg['data']} ({splits.sizes()['train']} points, {device}) -> {out}")
        if config["restarts"] > 1:
            _fit_restarts(out, config, cls, device, (lvm, splits, objective), {}, progress, log)
        else:
            train(lvm, splits, objective, config, out, progress=progress, log=log, distributed=ctx)
    except Exception as err:
        # The user's program stopped the fit before its first checkpoint: nothing to resume, so the
        # run is taken back as a refused one.
        if (ctx is None or ctx.is_main) and remove_failed_run(out, err):
            run_dir.begun = False
        raise
    return load_run(out, device=str(device))


def _model_fit_defaults(cls):
    """The model class's own ``fit_defaults`` (a dict of fit options), checked; ``{}`` if it has none."""
    defaults = getattr(cls, "fit_defaults", None)
    if defaults is None:
        return {}
    if not isinstance(defaults, dict):
        raise UserError(f"{cls.__name__}.fit_defaults must be a dict of fit options, got {type(defaults).__name__}")
    unknown = set(defaults) - (set(FIT_DEFAULTS) - {"data", "data_dir", "hyperparameters", "device"})
    if unknown:
        raise UserError(f"{cls.__name__}.fit_defaults has unknown option(s) {', '.join(sorted(unknown))}; "
                        f"use the names of pyro_lvm.fit's options")
    return dict(defaults)


def _prepare(cls, hparams, cfg, seed, device, distributed=False):
    """The model (seeded by ``seed``, data-initialized), its data splits on ``device`` and its objective.

    Returns ``(lvm, splits, objective, binarize)``; everything a fit needs is checked here, before
    any file is written.
    """
    raw = load_dataset(cfg["data"], cfg["data_dir"], "none")
    pyro.set_rng_seed(seed)
    lvm = build_model(cls, raw.data_shape, hparams, device)
    # What the program is (observed sites, data plate, latents) is read from traces on the training
    # data; that also creates and registers its pyro.param s.
    info = inspect_model(lvm, raw.train.to(device), check_data=False)
    binarize = _choose_binarization(cfg["binarize"], info, raw)
    splits = raw if binarize == "none" else load_dataset(cfg["data"], cfg["data_dir"], binarize)
    splits = splits.to(device)
    resources.check_latent_sizes(info, cls.__name__)
    resources.check_training_memory(info, splits.data_shape, cfg["batch_size"], cfg["particles"], device,
                                    len(splits.train))
    for split_name in ("train", "valid", "test"):
        if not (split_name == "train" and binarize == "dynamic"):
            check_support(info, getattr(splits, split_name), split_name)
    train_points = splits.train if binarize != "dynamic" else torch.bernoulli(splits.train)
    check_fit(lvm, cfg, train_points, distributed=distributed)
    if cfg["particles"] > 1 or cfg["objective"].startswith("iwae"):
        from .estimators.importance_weights import vectorizes

        vectorizes(lvm, train_points)  # a program that does not broadcast runs its particles one by one

    from .objectives import get_objective

    objective = get_objective(cfg["objective"], particles=cfg["particles"], model_info=info,
                              **_remedy_options(cfg))
    probe = lvm.probe(train_points)
    if hasattr(objective, "check_model"):  # remedies: refuse a model they do not apply to, before any file
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            objective.check_model(lvm.model, lvm.guide, probe)
    # One step's loss before the run begins: whatever the program or the objective refuses at the
    # first step is refused now, with nothing written.
    preflight(objective, lvm, probe, len(splits.train), device)
    if hasattr(lvm, "initialize"):
        with torch.no_grad():
            lvm.initialize(train_points)
    return lvm, splits, objective, binarize


def _fit_restarts(out, config, cls, device, first, resume_options, progress, log):
    """``config["restarts"]`` fits of the run, each in ``RUN/restarts/R`` with seed ``seed + R``; the best
    by validation bound becomes the run's checkpoint (:mod:`pyro_lvm.training.restarts`).

    ``first``: the prepared ``(lvm, splits, objective)`` of restart 0, or None. A restart that was
    started already is resumed (``resume_options``: ``epochs``, ``device``), one that is finished is kept.
    """
    from .training.restarts import restart_config, restart_dir, select_restart

    for r in range(config["restarts"]):
        sub = restart_dir(out, r)
        sub_config = restart_config(config, r)
        if (sub / "checkpoint.pt").is_file():
            _resume(sub, resume_options, progress, log)
            continue
        if sub.exists():  # stopped before its first checkpoint: nothing in it to keep
            shutil.rmtree(sub)
        if r == 0 and first is not None:
            lvm, splits, objective = first
        else:
            data = {**config["data"]}
            cfg = {**config, "data": data["name"], "data_dir": data["data_dir"], "binarize": data["binarize"]}
            lvm, splits, objective, _ = _prepare(cls, config["hyperparameters"], cfg, sub_config["seed"], device)
        sub.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sub / "config.json", sub_config)
        log(f"restart {r + 1}/{config['restarts']} (seed {sub_config['seed']}) -> {sub}")
        train(lvm, splits, objective, sub_config, sub, progress=progress, log=log)
    chosen = select_restart(out, config)
    log(f"restart {chosen['restart'] + 1} of {config['restarts']} kept (seed {chosen['seed']}, "
        f"{chosen['selected_by']} {chosen['score']:.4f})")


def _remedy_options(config):
    """KL warm-up / free bits options of a config (absent in configs written before they existed)."""
    return {key: config.get(key, FIT_DEFAULTS[key]) for key in ("kl_warmup", "free_bits", "kl_warmup_start")}


def _resume_request(config, cls, model, data, hyperparameters, options):
    """What a ``--resume`` asks for, keyed like ``config.json``: ``{key: (flag, value)}``, values
    normalized as the stored ones are (for :func:`pyro_lvm.runs.check_resume_options`)."""
    def same_name(given, stored):  # zoo and data set names are case- and dash-insensitive
        key = str(given).replace("_", "-").lower()
        return stored if isinstance(stored, str) and key == stored.replace("_", "-").lower() else given

    requested = {}
    if model not in (None, "-"):
        requested["model"] = ("MODEL", same_name(_resolve_model_spec(model), config["model"]))
    if data is not None:
        requested["data.name"] = ("--data", same_name(_resolve_data_name(data), config["data"]["name"]))
    for key, value in options.items():
        if value is None:
            continue
        if key == "data_dir":
            requested["data.data_dir"] = ("--data-dir", str(Path(value).resolve()))
        elif key == "binarize":
            if value != "auto":  # auto picks from the model and data, which are checked themselves
                requested["data.binarize"] = ("--binarize", value)
        else:
            requested[key] = ("--" + key.replace("_", "-"), value)
    given = resolve_hyperparameters(cls, hyperparameters, complete=False) if hyperparameters else {}
    for key in (hyperparameters or {}):
        requested[f"hyperparameters.{key}"] = (f"-p {key}", given[key])
    return requested


def _resumed_epochs(out, config, options):
    """The epochs of a resumed run: its own, or a new ``--epochs`` where its schedule allows one."""
    if options.get("epochs") is None:
        return config["epochs"]
    epochs = check_count("--epochs", int(options["epochs"]))
    if epochs != config["epochs"] and config.get("schedule", "constant") in DEPENDS_ON_LENGTH:
        raise UserError(f"{out} uses the {config['schedule']} schedule, laid out over its {config['epochs']} "
                        f"epochs; resuming with --epochs {epochs} would change the learning rates already "
                        f"used. Resume without --epochs, or fit a new run with --epochs {epochs}")
    return epochs


def _resume_restarts(out, config, options, progress, log, model, data, hyperparameters):
    """``--resume`` of a run with restarts: each restart resumed or begun, then the selection again."""
    from .training.distributed import run_lock

    lock = run_lock(None, out)
    try:
        cls = load_model_class(config["model"])
        schema.check_hyperparameters(cls, config["hyperparameters"], model_hyperparameters(cls), out / "config.json")
        check_resume_options(config, _resume_request(config, cls, model, data, hyperparameters, options), out,
                             defaults=FIT_DEFAULTS)
        config["epochs"] = _resumed_epochs(out, config, options)
        device = resolve_device(options.get("device") or config["device"])
        atomic_write_json(out / "config.json", config)
        resume_options = {key: options[key] for key in ("epochs", "device") if options.get(key) is not None}
        _fit_restarts(out, config, cls, device, None, resume_options, progress, log)
    finally:
        lock.release()
    return load_run(out, device=str(device))


def _resume(out, options, progress, log, ctx=None, model=None, data=None, hyperparameters=None):
    from .training.distributed import run_lock

    config = read_config(out, for_resume=True)
    if int(config.get("restarts") or 1) > 1:
        if ctx is not None:
            raise UserError("--restarts is not available with --distributed; resume without --distributed")
        return _resume_restarts(out, config, options, progress, log, model, data, hyperparameters)
    lock = run_lock(ctx, out)
    try:
        if files.kind(out / "checkpoint.pt") is None:
            raise UserError(f"{out} has no checkpoint yet: its fit stopped before writing the first one, so "
                            f"there is nothing to resume; delete {out} and fit again")
        state = load_checkpoint(out / "checkpoint.pt", for_resume=True)
        cls = load_model_class(config["model"])
        schema.check_hyperparameters(cls, config["hyperparameters"], model_hyperparameters(cls), out / "config.json")
        check_resume_options(config, _resume_request(config, cls, model, data, hyperparameters, options), out,
                             defaults=FIT_DEFAULTS)
        config["epochs"] = _resumed_epochs(out, config, options)
        device = ctx.device if ctx is not None else resolve_device(options.get("device") or config["device"])
        data_cfg = config["data"]
        splits = load_dataset(data_cfg["name"], data_cfg.get("data_dir"), data_cfg.get("binarize", "none")).to(device)
        check_data_fingerprint(config, splits, out)
        lvm = build_model(cls, splits.data_shape, config["hyperparameters"], device)
        # The traces create the program's pyro.param s (and an AutoGuide's parameters) that the
        # checkpoint then fills in.
        info = inspect_model(lvm, splits.train, check_data=False)
        try:
            lvm.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as err:
            raise UserError(f"{out / 'checkpoint.pt'} does not match the model in config.json "
                            f"({str(err).splitlines()[0][:160]})") from None
        check_resume_state(state, config, out, lvm, len(lvm.training_batches(splits.train, config["batch_size"])))
        from .objectives import get_objective

        if config["particles"] > 1 or config["objective"].startswith("iwae"):
            from .estimators.importance_weights import vectorizes

            vectorizes(lvm, splits.train)
        objective = get_objective(config["objective"], particles=config["particles"], model_info=info,
                                  **_remedy_options(config))
        if (state.get("validation") or {}).get("stopped"):
            log(f"{out} stopped early after epoch {state['epoch']} (no better validation bound for "
                f"{config.get('patience')} epochs); there is nothing to resume")
        elif state["epoch"] >= config["epochs"]:
            log(f"{out} has finished all {config['epochs']} epochs; pass a larger --epochs to train longer")
        else:
            if ctx is None or ctx.is_main:
                atomic_write_json(out / "config.json", config)
            log(f"resuming {out} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")
            train(lvm, splits, objective, config, out, resume_state=state, progress=progress, log=log,
                  distributed=ctx)
    finally:
        lock.release()
    return load_run(out, device=str(device))


def _as_run(run, device=None, checkpoint="auto"):
    """``run`` itself (a loaded :class:`Run`, whatever checkpoint it holds), or the run directory loaded."""
    from .runs import Run

    if isinstance(run, Run):
        if checkpoint in ("auto", run.checkpoint):
            return run
        return load_run(run.path, device=device or str(run.device), checkpoint=checkpoint)
    return load_run(run, device=device, checkpoint=checkpoint)


def evaluate(run, split="test", estimator="is", samples=None, limit=None, batch_size=100,
             max_memory_mb=1024, seed=0, device=None, record=True, distributed=False, target_mc_error=None,
             max_samples=None, progress=True, checkpoint="auto", **estimator_options):
    """Estimate log p(x) per data point on a split; returns the JSON record of ``evaluate --json``.

    ``checkpoint`` (for a run directory): ``best``, ``last`` or ``auto`` (:func:`pyro_lvm.runs.choose_checkpoint`:
    best for a run fit with early stopping, else last); the record names the one used and its epoch.

    ``estimator_options`` are AIS's (``ais_steps``, ``proposal``, ``bdmc_points``, and the others of
    :data:`pyro_lvm.estimators.ais.AIS_OPTIONS`). ``target_mc_error=EPS`` doubles the particles of
    the points whose Monte Carlo standard error exceeds EPS, up to ``max_samples`` per point
    (default 64 times ``samples``); the record then lists ``samples_per_point``. ``progress``: a bar
    on stderr when it is a terminal. ``distributed=True``: this process is one of ``torchrun``'s
    ranks; the points are sharded over the ranks and the per-point estimates gathered (the same
    values as one process computes).
    """
    from .training.distributed import context_for, estimate_sharded
    from .estimators import ESTIMATORS, estimate_log_marginal

    ctx = context_for(distributed, device)
    run = _as_run(run, str(ctx.device) if ctx is not None else device, checkpoint)
    if estimator not in ESTIMATORS:
        import difflib

        close = difflib.get_close_matches(estimator, list(ESTIMATORS), n=2)
        raise UserError(f"unknown estimator {estimator!r}; " + (f"did you mean {', '.join(close)}? " if close else "")
                        + f"choose from {', '.join(ESTIMATORS)}")
    samples = DEFAULT_SAMPLES.get(estimator, 1) if samples is None else int(samples)
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    check_count("--samples", samples)
    check_count("--batch-size", batch_size)
    if max_samples is not None:
        check_count("--max-samples", max_samples)
    check_seed(seed)
    x, _ = run.data.split(split)
    if limit is not None:
        if int(limit) < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        x = x[:int(limit)]
    if len(x) == 0:
        raise UserError(f"the {split} split of {run.config['data']['name']} is empty; choose another --split")
    bdmc_points = estimator_options.pop("bdmc_points", None)
    bdmc_points = 0 if bdmc_points is None else check_count("--bdmc-points", bdmc_points, minimum=0)
    if "ais_steps" in estimator_options:
        check_count("--ais-steps", estimator_options["ais_steps"])
    if isinstance(max_memory_mb, bool) or not isinstance(max_memory_mb, (int, float)) or not max_memory_mb > 0:
        raise UserError(f"--max-memory-mb must be a positive number of MiB, got {max_memory_mb!r}")
    max_memory_mb = resources.memory_budget_mb(max_memory_mb, run.device)
    if estimator != "ais" and (estimator_options or bdmc_points):
        raise UserError(f"--ais-steps, --proposal and --bdmc-points apply to --estimator ais only (got {estimator})")
    if estimator == "ais":  # every chain of every point of a batch at once
        at_once = min(len(x), batch_size)
        resources.check_memory(samples * at_once * resources.bytes_per_point(x.shape[1:]),
                               f"ais with {samples} chains on {at_once} points at once",
                               "lower --samples or --batch-size", x.device)
    started = time.perf_counter()
    estimate = estimate_log_marginal if ctx is None else (lambda *a, **k: estimate_sharded(ctx, *a, **k))
    result = estimate(run.model, x, estimator=estimator, num_samples=samples, batch_size=batch_size,
                      max_memory_mb=max_memory_mb, seed=seed, target_mc_error=target_mc_error,
                      max_samples=max_samples, progress=progress and (ctx is None or ctx.is_main),
                      **estimator_options)
    extras = dict(result.extras)
    if bdmc_points > 0:
        # The sandwich of Grosse et al. (2015): on data simulated from the model, forward AIS is a
        # stochastic lower bound and reverse AIS from the true latents a stochastic upper bound;
        # their gap bounds the AIS error on data like these.
        from .estimators.ais import bdmc

        sandwich = bdmc(run.model, num_points=bdmc_points, num_chains=samples, seed=seed, **estimator_options)
        extras.update({"bdmc_lower": sandwich["lower"], "bdmc_upper": sandwich["upper"],
                       "bdmc_gap": sandwich["gap"], "bdmc_points": bdmc_points})
    seconds = time.perf_counter() - started
    if target_mc_error is not None and result.samples_per_point is not None:
        extras["samples_per_point"] = result.samples_per_point.tolist()
    record_ = {"model": run.config["model"], "run": str(run.path), "split": split, "estimator": estimator,
               "samples": samples, "num_points": len(x), "log_px": result.log_px, "stderr": result.stderr,
               "nll": -result.log_px, "seconds": round(seconds, 4), "mc_stderr": result.mc_stderr,
               "checkpoint": run.checkpoint, "checkpoint_epoch": run.checkpoint_epoch, **extras}
    # An undefined Monte Carlo error is None (JSON null), with its own reason, like an undefined k-hat.
    for key in ("mc_stderr", "mc_stderr_max"):
        value = record_.get(key)
        if value is not None and not math.isfinite(value):
            record_[key] = None
            record_.setdefault("null_reason", {})[key] = (
                "the Monte Carlo error is undefined: it needs at least two samples per point (--samples 2 or "
                "more) and finite weights")
    if record and (ctx is None or ctx.is_main):
        run.record_evaluation(record_)
    return record_


def sample(run, n=64, out=None, seed=0, device=None, checkpoint="auto"):
    """Draw ``n`` data points from the fitted model; an image grid (PNG) or a CSV. Returns the path."""
    run = _as_run(run, device, checkpoint)
    if int(n) < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    check_count("-n", int(n))
    check_seed(seed)
    image = run.data.is_image
    out = Path(out) if out else run.path / ("samples.png" if image else "samples.csv")
    suffix = out.suffix.lower()
    if image and suffix not in (".png", ".jpg", ".jpeg", ".csv"):
        raise UserError(f"image samples are written as a picture (or a CSV of flattened points); give --out "
                        f"FILE.png or FILE.csv (got {out.name!r})")
    if not image and suffix != ".csv":
        raise UserError(f"vector samples are written as CSV; give --out FILE.csv (got {out.name!r})")
    from .protocol import as_program

    outputs.check_sample_target(out, inside_run=out.parent.resolve() == Path(run.path).resolve())
    resources.check_sampling_memory(run.data.data_shape, int(n), run.device)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        x = as_program(run.model).sample(int(n), like=run.data.train).detach()
    outputs.write_samples(out, x, image and suffix != ".csv", nrow=max(1, int(math.sqrt(int(n)))))
    return out


def diagnose(run, split="test", device=None, checkpoint="auto", **options):
    """KL per latent dimension, active units, mutual information and a collapse verdict (a dict)."""
    from .diagnostics import diagnose_run

    if options.get("is_samples") is not None:  # 0 (or less) skips the importance-sampling gap
        check_count("--is-samples", int(options["is_samples"]), minimum=-MAX_COUNT)
    return diagnose_run(_as_run(run, device, checkpoint), split=split, **options)


def report(run, out=None, split="test", device=None, checkpoint="auto"):
    """Write the HTML report of a run (figures beside it); returns the path of ``index.html``."""
    from .reporting import write_report

    run = _as_run(run, device, checkpoint)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the report")
    return write_report(run, Path(out) if out else None, split=split)

