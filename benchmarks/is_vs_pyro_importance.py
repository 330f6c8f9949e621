"""Vectorized importance sampling of log p(x) (pyro-lvm ``is``) against ``pyro.infer.Importance``.

The model is the zoo ``vae`` with its default (IWAE, 784-200-200-50 tanh) hyperparameters, fitted
inline for ``--steps`` Adam steps of the ELBO on fixed binarized MNIST (Larochelle & Murray), so that
the estimates mean something; the same trained model is used throughout.

Part 1: log p(x) of ``--pyro-points`` MNIST test digits with ``--particles`` particles, by our
estimator (particles vectorized, chunked) and by Pyro's ``Importance`` run point by point with the
same K. Same estimator, so the means agree up to Monte-Carlo error; the ratio of wall-clock times,
measured in the same run, is the point.
Part 2: our ``is`` with K = ``--big-k`` (5000) on ``--points`` (1000) MNIST test digits, timed for
real; the time for the full 10,000-point test set is extrapolated linearly from it (stated as such),
or measured with ``--full``.

    python benchmarks/is_vs_pyro_importance.py [--threads 2] [--particles 100] [--pyro-points 40]
        [--points 1000] [--big-k 5000] [--steps 1000] [--full] [--device cpu|cuda] [--json]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import arviz_stats  # noqa: F401  (imported up front: its first import is not estimator time)
import torch

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pyro_lvm.data import load_dataset  # noqa: E402
from pyro_lvm.estimators import estimate_log_marginal  # noqa: E402
from pyro_lvm.protocol import build_model, load_model_class  # noqa: E402

pyro.settings.set(module_local_params=True)


def train_vae(x_train, steps, seed=0, batch=100, lr=1e-3):
    """The zoo VAE (default hyperparameters), ``steps`` Adam steps of the ELBO; returns (lvm, -elbo)."""
    pyro.set_rng_seed(seed)
    lvm = build_model(load_model_class("vae"), tuple(x_train.shape[1:]), {}, x_train.device)
    lvm.initialize(x_train)
    optim = torch.optim.Adam(lvm.parameters(), lr=lr)
    elbo = pyro.infer.Trace_ELBO()
    losses = []
    for _ in range(steps):
        optim.zero_grad()
        index = torch.randint(len(x_train), (batch,), device=x_train.device)
        loss = elbo.differentiable_loss(lvm.model, lvm.guide, x_train[index])
        loss.backward()
        optim.step()
        losses.append(loss.item() / batch)
    lvm.eval()
    return lvm, sum(losses[-100:]) / len(losses[-100:])


def pyro_importance_per_point(lvm, x, particles):
    values = []
    for xn in x:
        importance = pyro.infer.Importance(lvm.model, lvm.guide, num_samples=particles)
        importance.run(xn[None])
        values.append(float(importance.get_log_normalizer()))
    return torch.tensor(values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--particles", type=int, default=100, help="K for the comparison with Importance")
    parser.add_argument("--pyro-points", type=int, default=40, help="test points for the comparison")
    parser.add_argument("--points", type=int, default=1000, help="MNIST test points for K = --big-k")
    parser.add_argument("--big-k", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of the VAE")
    parser.add_argument("--full", action="store_true", help="also time the whole 10,000-point test set")
    parser.add_argument("--data-dir", default=os.environ.get(
        "PYRO_LVM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--max-memory-mb", type=float, default=512, help="chunk budget of our estimator")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the model, the data and both estimators run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    data = load_dataset("binarized-mnist", args.data_dir).to(device)
    start = time.perf_counter()
    lvm, train_loss = train_vae(data.train, args.steps)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "train_steps": args.steps,
              "train_neg_elbo_last100": train_loss, "max_memory_mb": args.max_memory_mb, "train_seconds": time.perf_counter() - start,
              "load_average_1min_at_start": os.getloadavg()[0]}

    # Part 1: the same K, the same points, ours vectorized against Importance per point.
    K, test = args.particles, data.test[: args.pyro_points]
    # One call first: the first estimate in a process pays one-off costs (arviz-stats' import, CUDA's
    # kernel selection) that Importance's per-point loop spreads over its many calls.
    cold = estimate_log_marginal(lvm, test, "is", num_samples=K, batch_size=args.batch_size, seed=1,
                                 max_memory_mb=args.max_memory_mb)
    ours = estimate_log_marginal(lvm, test, "is", num_samples=K, batch_size=args.batch_size, seed=0,
                                 max_memory_mb=args.max_memory_mb)
    start = time.perf_counter()
    with torch.no_grad():
        theirs = pyro_importance_per_point(lvm, test, K)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    pyro_seconds = time.perf_counter() - start
    result.update({
        "cmp_points": len(test), "cmp_particles": K,
        "ours_log_px": ours.log_px, "ours_stderr": ours.stderr, "ours_seconds": ours.seconds, "ours_seconds_first_call": cold.seconds,
        "pyro_importance_log_px": float(theirs.mean()),
        "pyro_importance_stderr": float(theirs.std() / len(theirs) ** 0.5),
        "pyro_importance_seconds": pyro_seconds,
        "speedup": pyro_seconds / ours.seconds,
        "mean_diff_per_point": float((ours.per_point.cpu() - theirs).mean()),
    })

    # Part 2: K = 5000 on --points test digits, timed; the full test set extrapolated (or measured).
    xm = data.test[: args.points]
    est = estimate_log_marginal(lvm, xm, "is", num_samples=args.big_k, batch_size=args.batch_size, seed=0,
                                 max_memory_mb=args.max_memory_mb)
    result.update({
        "big_points": len(xm), "big_K": args.big_k, "big_seconds": est.seconds,
        "big_seconds_per_point": est.seconds / len(xm),
        "big_log_px": est.log_px, "big_stderr": est.stderr, "big_ess_mean": est.extras["ess_mean"],
        "big_khat_max": est.extras["khat_max"], "big_khat_frac_above_0.7": est.extras["khat_frac_above_0.7"],
        "big_max_chunk_particles": est.extras["max_chunk_particles"],
        "extrapolated_10000_points_minutes": est.seconds / len(xm) * 10000 / 60,
    })
    if args.full:
        full = estimate_log_marginal(lvm, data.test, "is", num_samples=args.big_k,
                                     batch_size=args.batch_size, seed=0,
                                 max_memory_mb=args.max_memory_mb)
        result.update({"full_points": len(data.test), "full_seconds": full.seconds,
                       "full_minutes": full.seconds / 60, "full_log_px": full.log_px})
    result["load_average_1min_at_end"] = os.getloadavg()[0]

    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
