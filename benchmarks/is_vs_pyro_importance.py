"""Vectorized importance sampling of log p(x) (pyro-lvm ``is``) against ``pyro.infer.Importance``.

Part 1: a small Bernoulli VAE fitted for a few hundred steps on scikit-learn's 8x8 digits; log p(x)
of ``--digits-points`` held-out digits with K particles, by our estimator (particles vectorized,
chunked) and by Pyro's ``Importance`` run point by point with the same K. Same estimator, so the
means agree up to Monte-Carlo error; the ratio of wall-clock times is the point.
Part 2: our ``is`` with K = 5000 on ``--points`` MNIST test digits (a 784-pixel VAE, untrained:
speed only), skipped with a message when the MNIST files are missing.

    python benchmarks/is_vs_pyro_importance.py [--particles 100] [--digits-points 50] [--points 1000] [--json]
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import arviz  # noqa: F401  (imported up front: its first import, ~1 s, is not estimator time)
import torch

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pyro_lvm.estimators import estimate_log_marginal  # noqa: E402

pyro.settings.set(module_local_params=True)


class SmallVAE(PyroModule):
    """z ~ N(0, I), x | z ~ Bernoulli(MLP(z)); q(z | x) = N(MLP(x)) diagonal."""

    def __init__(self, data_dim, latent_dim=4, hidden=64):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, data_dim))
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent_dim))

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            return pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def digits():
    from sklearn.datasets import load_digits
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    return (x > 0.5).float()


def fit(lvm, x, steps, seed=0):
    pyro.set_rng_seed(seed)
    svi = pyro.infer.SVI(lvm.model, lvm.guide, pyro.optim.Adam({"lr": 3e-3}), pyro.infer.Trace_ELBO())
    for step in range(steps):
        svi.step(x[torch.randint(len(x), (128,))])


def pyro_importance_per_point(lvm, x, particles):
    values = []
    for xn in x:
        importance = pyro.infer.Importance(lvm.model, lvm.guide, num_samples=particles)
        importance.run(xn[None])
        values.append(float(importance.get_log_normalizer()))
    return torch.tensor(values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=100)
    parser.add_argument("--digits-points", type=int, default=50)
    parser.add_argument("--points", type=int, default=1000, help="MNIST test points for K=5000")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_LVM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    x = digits()
    train, test = x[:-args.digits_points], x[-args.digits_points:]
    lvm = SmallVAE(64)
    fit(lvm, train, args.steps)
    K = args.particles
    ours = estimate_log_marginal(lvm, test, "is", num_samples=K, batch_size=100, seed=0)
    start = time.perf_counter()
    with torch.no_grad():
        theirs = pyro_importance_per_point(lvm, test, K)
    pyro_seconds = time.perf_counter() - start
    result = {
        "threads": torch.get_num_threads(), "digits_points": len(test), "particles": K,
        "ours_log_px": ours.log_px, "ours_seconds": ours.seconds,
        "pyro_importance_log_px": float(theirs.mean()), "pyro_importance_seconds": pyro_seconds,
        "speedup": pyro_seconds / ours.seconds,
        "mean_abs_diff_per_point": float((ours.per_point - theirs).abs().mean()),
    }

    mnist_root = Path(args.data_dir)
    if (mnist_root / "MNIST" / "raw").is_dir():
        from torchvision.datasets import MNIST
        images = MNIST(str(mnist_root), train=False, download=False).data[: args.points]
        xm = (images.reshape(len(images), -1).float() / 255.0 > 0.5).float()
        big = SmallVAE(784, latent_dim=16, hidden=200)
        est = estimate_log_marginal(big, xm, "is", num_samples=5000, batch_size=100, seed=0)
        result.update({"mnist_points": len(xm), "mnist_K": 5000, "mnist_seconds": est.seconds,
                       "mnist_log_px_untrained": est.log_px, "mnist_khat_max": est.extras["khat_max"],
                       "mnist_max_chunk_particles": est.extras["max_chunk_particles"]})
    else:
        print(f"MNIST not found under {mnist_root}; skipping the K=5000 timing", file=sys.stderr)

    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
