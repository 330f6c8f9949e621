"""Shared plumbing of the seed experiments: arguments, run folders, tables, JSON, figures."""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"
SHARED_DATA = HERE.parent.parent.parent / "shared" / "data"


def parse_args(description, extra=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--full", action="store_true", help="the paper-scale setting (full data, more epochs, K=5000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for runs, data files and figures")
    parser.add_argument("--data-dir", default=str(SHARED_DATA), help="folder holding binarized_mnist/ (MNIST experiments)")
    parser.add_argument("--device", default="auto")
    if extra:
        extra(parser)
    args = parser.parse_args()
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def fresh_run_dir(args, name):
    """``OUT/runs/NAME``, emptied first (the experiments are re-runnable)."""
    path = args.out / "runs" / name
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt(value):
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def table(rows, columns):
    """A Markdown table of ``rows`` (dicts) with ``columns`` (keys)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def finish(args, name, setting, rows, columns, extra=None, notes=()):
    """Print the table (or JSON) and write OUT/NAME.json."""
    record = {"experiment": name, "setting": setting, "rows": rows, **(extra or {})}
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    if args.json:
        print(json.dumps(record, default=str))
        return
    print(f"## {name} ({'full' if args.full else 'small budget'}): {json.dumps(setting)}")
    print(table(rows, columns))
    for note in notes:
        print(note)


def latent_usage(run, is_samples, limit=None, split="test", seed=0, batch_size=100, diagnose_batch_size=None):
    """The numbers every experiment reports, through the public API. ``diagnose_batch_size`` (points
    per diagnose pass, 16 particles each; default diagnose's own 500) bounds diagnose's memory only."""
    import pyro_lvm

    evaluation = pyro_lvm.evaluate(run, split=split, estimator="is", samples=is_samples, limit=limit, seed=seed,
                                   batch_size=batch_size)
    options = {"batch_size": diagnose_batch_size} if diagnose_batch_size is not None else {}
    diagnosis = pyro_lvm.diagnose(run, split=split, **options)
    return {
        "is_log_px": evaluation["log_px"], "is_stderr": evaluation["stderr"], "is_points": evaluation["num_points"],
        "is_K": is_samples, "elbo": diagnosis["elbo"], "kl": diagnosis["kl_total"],
        "active_units": diagnosis["active_units"], "latent_dims": diagnosis["latent_dims"],
        "mi": diagnosis["mutual_information"], "collapsed": diagnosis["collapsed"], "verdict": diagnosis["verdict"],
        "kl_per_dim": diagnosis["kl_per_dim"], "khat_max": evaluation.get("khat_max"),
        "fuzziness": diagnosis.get("fuzziness"), "fuzziness_ratio": diagnosis.get("fuzziness_ratio"),
    }


def mnist_subset(args, sizes, name="binarized_mnist_subset.npz"):
    """A .npz of the first/permuted points of binarized MNIST (float32 0./1. images, 1x28x28).

    ``sizes = (train, valid, test)``; ``None`` keeps the full split. The train and test points are a
    seeded random subset (the test split of the file is sorted by class).
    """
    import numpy as np

    source = Path(args.data_dir) / "binarized_mnist" / "binarized_mnist.npz"
    if not source.is_file():
        raise SystemExit(f"{source} not found; pass --data-dir with binarized_mnist/binarized_mnist.npz")
    arrays = np.load(source)
    rng = np.random.default_rng(args.seed)
    out = {}
    for split, size in zip(("train", "valid", "test"), sizes):
        data = arrays[split]
        pick = rng.permutation(len(data))[:size] if size else np.arange(len(data))
        # float32 0./1.: uint8 image stacks are read as intensities in [0, 255]
        out[split] = data[pick].reshape(-1, 1, 28, 28).astype(np.float32)
    path = args.out / name
    np.savez(path, **out)
    return path


def plot_kl_per_dim(ax, kl_per_dim, title, ylabel="KL(q(z_d|x) || p(z_d)), nats"):
    """A bar per latent dimension: the KL each one carries."""
    ax.bar(range(len(kl_per_dim)), kl_per_dim)
    ax.set_xlabel("latent dimension")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
