"""The ``pyro-lvm`` command line: a thin layer over :mod:`pyro_lvm.api`.

Exit status: 0 done; 2 bad input (one line on stderr naming the problem and the fix, no
traceback); 1 an internal error (set ``PYRO_LVM_DEBUG=1`` for its traceback).
"""

import argparse
import json
import os
import sys
import traceback

from .errors import DEVICE_MISMATCH, UserError, mixed_devices_message

DESCRIPTION = "Latent variable models as Pyro programs: fit with SVI, estimate log p(x), diagnose."


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a :class:`UserError` (one line, exit status 2)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


def _hyperparameter(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"-p takes KEY=VALUE (like -p latent_dim=10), got {text!r}")
    return key.strip(), value.strip()


def _floats(text):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (like 0.9,0.999), got {text!r}") from None


CHECKPOINT_HELP = ("which checkpoint to read: best (best validation bound), last, or auto (default: best for a run "
                   "fit with --patience, last otherwise)")


def _build_parser():
    parser = _Parser(prog="pyro-lvm", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.add_parser("models", help="list the model zoo")
    datasets = commands.add_parser("datasets", help="list the data sets and where each is read from")
    datasets.add_argument("--data-dir", help="data folder (default: $PYRO_LVM_DATA or ./data)")

    fit = commands.add_parser("fit", help="fit a model with SVI into a run directory",
                              description="Fit MODEL (a zoo name, path/to/file.py:ClassName or "
                                          "package.module:ClassName) with stochastic variational inference.")
    fit.add_argument("model", metavar="MODEL")
    fit.add_argument("--data", help="data set name or .npy/.npz/.csv/.pt path (default: digits; faithful for mog)")
    fit.add_argument("--data-dir", help="folder of downloaded data sets (default: $PYRO_LVM_DATA or ./data)")
    fit.add_argument("--binarize", choices=["auto", "none", "static", "dynamic"],
                     help="binarize intensities (default auto: dynamic for a Bernoulli likelihood on images)")
    fit.add_argument("-p", dest="hyperparameters", action="append", type=_hyperparameter, default=[],
                     metavar="KEY=VALUE", help="set a model hyperparameter (repeatable)")
    fit.add_argument("--objective", help="elbo (default), meanfield, iwae, iwae-dreg")
    fit.add_argument("--particles", type=int, help="particles K per data point (default 1)")
    fit.add_argument("--epochs", type=int, help="epochs (default 20)")
    fit.add_argument("--batch-size", type=int, help="minibatch size (default 100)")
    fit.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    fit.add_argument("--schedule", help="learning-rate schedule: constant (default), step, exponential, cosine, "
                                        "iwae (3^i passes at lr*10^(-i/7), i=0..7, over --epochs)")
    fit.add_argument("--lr-decay", type=float, metavar="GAMMA",
                     help="step: times GAMMA every --lr-step epochs (default 0.1); exponential: per epoch (default 0.95)")
    fit.add_argument("--lr-step", type=int, metavar="EPOCHS", help="step: epochs between decays (default 10)")
    fit.add_argument("--lr-min", type=float, help="cosine: the final learning rate (default 0)")
    fit.add_argument("--adam-betas", type=_floats, metavar="B1,B2", help="Adam's betas (default 0.9,0.999)")
    fit.add_argument("--adam-eps", type=float, metavar="EPS",
                     help="Adam's epsilon (default 1e-8), for the gradient of the loss scaled to all N training points")
    fit.add_argument("--clip-grad-norm", type=float, metavar="MAX",
                     help="clip the gradient to total norm MAX before each step (default 0: off)")
    fit.add_argument("--patience", type=int, metavar="EPOCHS",
                     help="early stopping: stop after EPOCHS epochs without a better validation bound (default 0: off)")
    fit.add_argument("--min-delta", type=float, metavar="NATS",
                     help="early stopping and the best checkpoint: the improvement per point that counts (default 0)")
    fit.add_argument("--restarts", type=int, metavar="N",
                     help="fit N initialisations (seeds SEED..SEED+N-1) and keep the best by validation bound (default 1)")
    fit.add_argument("--seed", type=int, help="random seed (default 0); a CPU run repeats exactly")
    fit.add_argument("--device", help="auto (default), cpu or cuda")
    fit.add_argument("--out", help="run directory (default: runs/MODEL-DATA)")
    fit.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    fit.add_argument("--config", help="take the options of an earlier run's config.json (flags override)")
    fit.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (default: each epoch)")
    fit.add_argument("--checkpoint-minutes", type=float, help="also checkpoint every M minutes")
    fit.add_argument("--on-nan", choices=["stop", "skip"], help="on a NaN loss: stop (default) or skip the step")
    fit.add_argument("--cuda-graph", action="store_true", default=None,
                     help="on a GPU, capture each training step once as a CUDA graph and replay it (several "
                          "times faster for small models; the model's Python must not change from step to step)")
    fit.add_argument("--kl-warmup", type=int, metavar="STEPS",
                     help="KL warm-up: weight the KL term by beta rising linearly to 1 over STEPS steps (default 0: off)")
    fit.add_argument("--kl-warmup-start", type=float, metavar="BETA", help="beta at step 0 of the warm-up (default 0)")
    fit.add_argument("--free-bits", type=float, metavar="LAMBDA",
                     help="free bits: per latent dimension, KL_d -> max(LAMBDA, KL_d) (minibatch mean; default 0: off)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    fit.add_argument("--distributed", action="store_true",
                     help="data-parallel over torchrun's processes: torchrun --nproc_per_node N -m pyro_lvm.cli fit ...")

    evaluate = commands.add_parser("evaluate", help="estimate log p(x) per data point on a split")
    evaluate.add_argument("run", metavar="RUN")
    evaluate.add_argument("--split", default="test", choices=["test", "valid", "train"])
    evaluate.add_argument("--estimator", default="is", help="elbo, iwae, is (default), exact, ais")
    evaluate.add_argument("--samples", type=int, help="samples K per point (default: elbo 10, iwae 50, is 1000; chains for ais 16)")
    evaluate.add_argument("--limit", type=int, help="only the first N points of the split")
    evaluate.add_argument("--distributed", action="store_true",
                          help="shard the points over torchrun's processes: torchrun --nproc_per_node N -m pyro_lvm.cli evaluate ...")
    evaluate.add_argument("--batch-size", type=int, default=100, help="data points per batch (default 100)")
    evaluate.add_argument("--max-memory-mb", type=float, default=1024, help="memory budget of one chunk of particles (default 1024)")
    evaluate.add_argument("--target-mc-error", type=float, metavar="EPS",
                          help="double K for the points whose Monte Carlo standard error exceeds EPS nats, up to "
                               "--max-samples (elbo, is, ais)")
    evaluate.add_argument("--max-samples", type=int, metavar="N",
                          help="with --target-mc-error: at most N samples per point (default 64 times --samples)")
    evaluate.add_argument("--ais-steps", type=int, help="ais: annealing steps (default 200, sigmoid schedule)")
    evaluate.add_argument("--proposal", choices=["prior", "guide"], help="ais: start from the prior (default) or the guide")
    evaluate.add_argument("--bdmc-points", type=int,
                          help="ais: also run BDMC on N points simulated from the model (lower and upper bound)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", help="override the run's device (auto, cpu, cuda)")
    evaluate.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"], help=CHECKPOINT_HELP)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    sample = commands.add_parser("sample", help="draw data from a fitted model: image grid or CSV")
    sample.add_argument("run", metavar="RUN")
    sample.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", help="output file (default RUN/samples.png or RUN/samples.csv)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device")
    sample.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"], help=CHECKPOINT_HELP)

    diagnose = commands.add_parser("diagnose", help="KL per dimension, active units, mutual information, collapse")
    diagnose.add_argument("run", metavar="RUN")
    diagnose.add_argument("--split", default="test", choices=["test", "valid", "train"])
    diagnose.add_argument("--is-samples", type=int, default=100,
                          help="importance samples for the ELBO-to-log p(x) gap (0 to skip; default 100)")
    diagnose.add_argument("--device")
    diagnose.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"], help=CHECKPOINT_HELP)
    diagnose.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    report = commands.add_parser("report", help="write an HTML report with figures")
    report.add_argument("run", metavar="RUN")
    report.add_argument("--out", help="folder (default RUN/report)")
    report.add_argument("--split", default="test", choices=["test", "valid", "train"])
    report.add_argument("--device")
    report.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"], help=CHECKPOINT_HELP)
    return parser


def _model_help(model_spec):
    """The hyperparameters of MODEL for ``pyro-lvm fit MODEL --help``."""
    from .protocol import hyperparameters, load_model_class

    cls = load_model_class(model_spec)
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"{cls.__name__}: {doc[0] if doc else ''}", "hyperparameters (-p KEY=VALUE):"]
    for key, default in hyperparameters(cls).items():
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        lines.append(f"  {key} (required)" if repr(default) == "required" else f"  {key} (default {shown})")
    return "\n".join(lines)


def _cmd_models(args):
    from .protocol import zoo_models

    for name, summary in zoo_models().items():
        print(f"{name:14s} {summary}")
    print("\nOr your own: pyro-lvm fit path/to/file.py:ClassName (see the README)")


def _cmd_datasets(args):
    from .data import describe_datasets

    for name, desc, where in describe_datasets(args.data_dir):
        print(f"{name:22s} {desc}\n{'':22s} read from: {where}")


def _cmd_fit(args):
    from . import api

    options = {}
    if args.config:
        options = api.read_fit_config(args.config)
    model = args.model if args.model != "-" else options.get("model")
    flags = {"data_dir": args.data_dir, "binarize": args.binarize, "objective": args.objective,
             "particles": args.particles, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed, "device": args.device, "checkpoint_every": args.checkpoint_every,
             "checkpoint_minutes": args.checkpoint_minutes, "on_nan": args.on_nan, "cuda_graph": args.cuda_graph,
             "kl_warmup": args.kl_warmup, "kl_warmup_start": args.kl_warmup_start, "free_bits": args.free_bits,
             "schedule": args.schedule, "lr_decay": args.lr_decay, "lr_step": args.lr_step, "lr_min": args.lr_min,
             "adam_betas": args.adam_betas, "adam_eps": args.adam_eps, "clip_grad_norm": args.clip_grad_norm,
             "patience": args.patience, "min_delta": args.min_delta, "restarts": args.restarts}
    options.pop("model", None)
    data = args.data or options.pop("data", None)
    options.pop("data", None)
    options.update({k: v for k, v in flags.items() if v is not None})
    hparams = dict(options.pop("hyperparameters", {}) or {})
    hparams.update(dict(args.hyperparameters))
    out = args.out or os.path.join("runs", f"{os.path.basename(str(model)).split(':')[-1].replace('.py', '')}-"
                                           f"{os.path.basename(str(data or api.default_data_for(model))).split('.')[0]}")
    args.run_dir = out  # for the messages of main(): what an interrupted fit left behind
    # With --resume every option given is compared with the run's own (runs.check_resume_options).
    api.fit(model, data, out=out, resume=args.resume, hyperparameters=hparams, progress=not args.quiet,
            log=(lambda m: None) if args.quiet else None, distributed=args.distributed, **options)
    print(f"run written to {out}", file=sys.stderr)


def _cmd_evaluate(args):
    from . import api
    from .schema import json_compatible

    if args.ais_steps is not None and args.ais_steps < 1:
        raise UserError(f"--ais-steps must be at least 1, got {args.ais_steps}")
    ais_options = {key: value for key, value in (("ais_steps", args.ais_steps), ("proposal", args.proposal),
                                                 ("bdmc_points", args.bdmc_points)) if value is not None}
    # The bar goes to stderr, and only when that is a terminal; none when --json output is piped.
    progress = not (args.json and not sys.stdout.isatty())
    record = api.evaluate(args.run, split=args.split, estimator=args.estimator, samples=args.samples,
                          limit=args.limit, batch_size=args.batch_size, max_memory_mb=args.max_memory_mb,
                          seed=args.seed, device=args.device, distributed=args.distributed,
                          target_mc_error=args.target_mc_error, max_samples=args.max_samples, progress=progress,
                          checkpoint=args.checkpoint,
                          **ais_options)
    if args.distributed and _rank() != 0:  # every rank holds the result; rank 0 prints it
        return
    if args.json:  # standard JSON: a non-finite number is null, with its reason in "null_reason"
        print(json.dumps(json_compatible(record), allow_nan=False))
    else:
        mc = record.get("mc_stderr")
        print(f"{record['estimator']} (K={record['samples']}) on {record['num_points']} {record['split']} points: "
              f"log p(x) = {record['log_px']:.4f} +- {record['stderr']:.4f} nats  ({record['seconds']:.2f} s; "
              f"{record['checkpoint']} checkpoint, epoch {record['checkpoint_epoch']})")
        print(f"  Monte Carlo standard error: {'undefined' if mc is None else f'{mc:.4f} nats'}")
        for key in sorted(set(record) - {"model", "run", "split", "estimator", "samples", "num_points",
                                         "log_px", "stderr", "nll", "seconds", "mc_stderr", "samples_per_point",
                                         "checkpoint", "checkpoint_epoch"}):
            print(f"  {key}: {record[key]}")


def _rank():
    import torch.distributed

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _cmd_sample(args):
    from . import api

    path = api.sample(args.run, n=args.n, out=args.out, seed=args.seed, device=args.device, checkpoint=args.checkpoint)
    print(f"samples written to {path}")


def _cmd_diagnose(args):
    from . import api
    from .schema import json_compatible

    result = api.diagnose(args.run, split=args.split, device=args.device, is_samples=args.is_samples,
                          checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps(json_compatible(result), allow_nan=False))
        return
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, list) and value and isinstance(value[0], float):
            value = "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
        print(f"{key}: {value}")


def _cmd_report(args):
    from . import api

    path = api.report(args.run, out=args.out, split=args.split, device=args.device, checkpoint=args.checkpoint)
    print(f"report written to {path}")


COMMANDS = {"models": _cmd_models, "datasets": _cmd_datasets, "fit": _cmd_fit, "evaluate": _cmd_evaluate,
            "sample": _cmd_sample, "diagnose": _cmd_diagnose, "report": _cmd_report}


def _left_behind(args):
    """A true sentence on what an interrupted or failed command left behind (a fit's checkpoint, or
    nothing: evaluate records and sample and report write only once done, atomically)."""
    command = getattr(args, "command", None)
    if command == "fit":
        run_dir = getattr(args, "run_dir", None)
        if run_dir is None:
            return "no run was written"
        checkpoint, config = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "config.json")
        if os.path.isfile(checkpoint) and not os.path.islink(checkpoint):
            return f"the run's last checkpoint is intact: continue with pyro-lvm fit - --out {run_dir} --resume"
        if os.path.isfile(config):
            return (f"no checkpoint was written yet, so there is nothing to resume: delete {run_dir} and fit again")
        return f"nothing was written to {run_dir}"
    if command == "evaluate":
        return "nothing was recorded in the run"
    if command in ("sample", "report"):
        return "no output was written (an earlier one is intact)"
    return "nothing was written"


def _environment_error(err, args=None):
    """A one-line message for an error of the machine rather than of pyro-lvm (out of memory, a full
    disk, no permission, a path the file system refuses), which the user fixes with smaller sizes or
    another place; else None."""
    import errno

    text = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    out_of_memory = isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in ("can't allocate memory", "out of memory",
                                                                    "not enough memory")))
    if out_of_memory:
        return (f"out of memory ({text}); lower --batch-size, --particles, --samples, -n or the model's "
                f"size (-p), or free memory; {_left_behind(args)}")
    if isinstance(err, RuntimeError) and DEVICE_MISMATCH in str(err):
        return mixed_devices_message(text)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                                                  errno.EROFS):
        where = f" {err.filename}" if err.filename else ""
        return (f"cannot write{where}: {err.strerror or text}; free disk space or fix the permissions; "
                f"{_left_behind(args)}")
    if isinstance(err, OSError) and err.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP) and err.filename:
        return f"cannot use the path {str(err.filename)[:120]}: {err.strerror}; choose another path"
    return None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        if len(argv) >= 2 and argv[0] == "fit" and any(a in ("-h", "--help") for a in argv[1:]) \
                and not argv[1].startswith("-"):
            parser = _build_parser()
            fit_parser = parser._subparsers._group_actions[0].choices["fit"]
            fit_parser.epilog = _model_help(argv[1])
            fit_parser.formatter_class = argparse.RawDescriptionHelpFormatter
        else:
            parser = _build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        COMMANDS[args.command](args)
        return 0
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except UserError as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print(f"interrupted; {_left_behind(args)}", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in pyro-lvm, not bad input -- unless the user's model code raised it
        from .protocol.loading import user_code_error

        blamed = user_code_error(err)
        if blamed is not None:
            if os.environ.get("PYRO_LVM_DEBUG"):
                traceback.print_exc()
            print(f"error: {' '.join(str(blamed).split())}", file=sys.stderr)
            return 2
        environment = _environment_error(err, args)
        if environment is not None:  # the machine's limits, not a bug: one line, status 2
            print(f"error: {environment}", file=sys.stderr)
            return 2
        if os.environ.get("PYRO_LVM_DEBUG"):
            traceback.print_exc()
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        print(f"internal error: {type(err).__name__}: {first} (set PYRO_LVM_DEBUG=1 for the traceback, "
              f"and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
