"""Seed experiment 1: on Gaussian data a Gaussian decoder needs no z, and the ELBO's optimum ignores it.

x ~ N(mu, diag(sigma^2)) in D = 16. The ``vae`` with ``-p likelihood=gaussian`` learns a
per-dimension output bias and scale, so p(x|z) = N(mu, diag(sigma^2)) for every z is in the model:
the best ELBO sets q(z|x) = p(z) (KL = 0) and p(x|z) to the data's distribution, and then
log p(x) equals the data's true log-likelihood, known in closed form. The script writes the data to
a .npy, fits with :func:`pyro_lvm.fit`, and measures log p(x) with :func:`pyro_lvm.evaluate`
(``is``), KL, active units and I(x;z) with :func:`pyro_lvm.diagnose`.

    python benchmarks/experiments/gaussian_collapse.py            # small budget, a few CPU minutes
    python benchmarks/experiments/gaussian_collapse.py --full     # 100k points, 100 epochs, K=5000
"""
import math

import numpy as np
import torch

import pyro_lvm
from _common import finish, fresh_run_dir, latent_usage, log, parse_args, plot_kl_per_dim, save_figure

D = 16


def gaussian_data(num_points, seed):
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 2.0, size=D)
    sigma = rng.uniform(0.3, 2.0, size=D)
    x = mu + sigma * rng.standard_normal((num_points, D))
    return x.astype(np.float32), mu, sigma


def true_log_likelihood(x, mu, sigma):
    """Mean over points of log N(x; mu, diag(sigma^2)), in nats (float64)."""
    x = np.asarray(x, dtype=np.float64)
    z = (x - mu) / sigma
    return float((-0.5 * z ** 2 - np.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(1).mean())


def main():
    args = parse_args(__doc__.splitlines()[0])
    num_points, epochs, samples = (100_000, 100, 5000) if args.full else (10_000, 40, 1000)
    x, mu, sigma = gaussian_data(num_points, args.seed)
    data_path = args.out / "gaussian_d16.npy"
    np.save(data_path, x)
    hparams = {"likelihood": "gaussian", "latent_dim": 8, "hidden": (64, 64)}
    setting = {"points": num_points, "epochs": epochs, "is_K": samples, "hyperparameters": hparams,
               "objective": "elbo", "lr": 1e-3, "batch_size": 100, "seed": args.seed}
    out = fresh_run_dir(args, "gaussian_collapse")
    log(f"fitting vae on {data_path} ({setting})")
    run = pyro_lvm.fit("vae", str(data_path), out=out, hyperparameters=hparams, epochs=epochs, seed=args.seed,
                       device=args.device, progress=False, log=log)
    test = run.data.test.cpu().numpy()
    truth = true_log_likelihood(test, mu, sigma)
    truth_valid = true_log_likelihood(run.data.valid.cpu().numpy(), mu, sigma)
    usage = latent_usage(run, samples, seed=args.seed)
    row = {"data": "Gaussian D=16", "true_log_px": truth, **{k: v for k, v in usage.items() if k != "kl_per_dim"}}
    row["is_minus_true"] = usage["is_log_px"] - truth
    first = run.metrics[0]["valid_elbo"]
    figure(run, truth, truth_valid, usage, args.out / "gaussian_collapse.png")
    finish(args, "gaussian_collapse", setting, [row],
           ["data", "true_log_px", "is_log_px", "is_stderr", "is_minus_true", "elbo", "kl", "active_units", "mi",
            "collapsed"],
           extra={"kl_per_dim": usage["kl_per_dim"], "valid_elbo_per_epoch": [m["valid_elbo"] for m in run.metrics],
                  "figure": str(args.out / "gaussian_collapse.png")},
           notes=[f"verdict: {usage['verdict']}", f"valid ELBO epoch 1: {first:.3f}, last: {run.metrics[-1]['valid_elbo']:.3f}"])


def figure(run, truth, truth_valid, usage, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [m["epoch"] for m in run.metrics]
    left.plot(epochs, [m["valid_elbo"] for m in run.metrics], "o-", label="valid ELBO")
    left.axhline(truth_valid, color="C0", ls="--", label="true log p(x) (closed form, valid)")
    left.axhline(truth, color="k", ls="--", label="true log p(x) (closed form, test)")
    left.axhline(usage["is_log_px"], color="C3", ls=":", label=f"IS log p(x), K={usage['is_K']} (test)")
    left.set_xlabel("epoch")
    left.set_ylabel("nats per point")
    left.legend(fontsize=8)
    left.set_title("Gaussian data: bound vs. true log-likelihood")
    plot_kl_per_dim(right, usage["kl_per_dim"], f"KL per dimension (total {usage['kl']:.3f}), MI {usage['mi']:.3f}")
    save_figure(fig, path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
