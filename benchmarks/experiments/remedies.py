"""Seed experiment 4: KL warm-up and free bits on the model that collapses (``pixelcnn-vae``).

The PixelCNN decoder can model binarized MNIST without z, and the ELBO then prefers q(z|x) = p(z)
(see ``factorized_vs_autoregressive.py``). Two remedies, both ``pyro_lvm.fit`` options
(``--kl-warmup STEPS``, ``--free-bits LAMBDA``; ``pyro_lvm/objectives/regularized.py``):

- KL warm-up: the KL term weighted by beta rising linearly from 0 to 1 over the first STEPS steps;
- free bits: per latent dimension, the minibatch-mean KL_d replaced by max(lambda, KL_d).

Same data, seed and budget for every row; reported: KL, active units, I(x;z), the true ELBO and
``is`` log p(x) (the remedies change the training surrogate, never the bound that is reported).

    python benchmarks/experiments/remedies.py          # small budget: 2000-point subset, 6 epochs, K=100
    python benchmarks/experiments/remedies.py --full   # 50k/10k/10k, 100 epochs, warm-up 10 epochs, K=5000
"""
import torch

import pyro_lvm
from _common import finish, fresh_run_dir, latent_usage, log, mnist_subset, parse_args, save_figure

MODEL, HPARAMS = "pixelcnn-vae", {"latent_dim": 32}


def main():
    args = parse_args(__doc__.splitlines()[0],
                      extra=lambda p: p.add_argument("--free-bits", type=float, default=0.5,
                                                     help="lambda, nats per latent dimension (default 0.5)"))
    if args.full:
        sizes, epochs, samples, train_points = (None, None, None), 100, 5000, 50_000
    else:
        sizes, epochs, samples, train_points = (2000, 100, 100), 6, 100, 2000
    batch_size = 100
    steps = epochs * -(-train_points // batch_size)
    warmup = steps // 2 if not args.full else 10 * (train_points // batch_size)
    data = mnist_subset(args, sizes, name="binarized_mnist_remedies.npz") if not args.full else "binarized-mnist"
    variants = {
        "none": {},
        f"kl-warmup {warmup}": {"kl_warmup": warmup},
        f"free-bits {args.free_bits}": {"free_bits": args.free_bits},
    }
    setting = {"model": MODEL, "hyperparameters": HPARAMS,
               "data": "binarized-mnist" + ("" if args.full else f" subset {sizes[0]}/{sizes[1]}/{sizes[2]}"),
               "epochs": epochs, "steps": steps, "is_K": samples, "objective": "elbo", "lr": 1e-3,
               "batch_size": batch_size, "seed": args.seed, "variants": variants}
    rows, kl_dims = [], {}
    for label, remedy in variants.items():
        out = fresh_run_dir(args, "remedies-" + label.replace(" ", "-"))
        log(f"fitting {MODEL} with remedy {label or 'none'}")
        run = pyro_lvm.fit(MODEL, str(data), out=out, data_dir=args.data_dir, hyperparameters=HPARAMS,
                           epochs=epochs, batch_size=batch_size, seed=args.seed, device=args.device,
                           progress=False, log=log, **remedy)
        usage = latent_usage(run, samples, seed=args.seed)
        kl_dims[label] = usage.pop("kl_per_dim")
        rows.append({"remedy": label, **usage, "train_minutes": run.metrics[-1]["seconds"] / 60})
        log(f"{label}: {usage['verdict']}")
    figure(kl_dims, args.out / "remedies.png")
    finish(args, "remedies", setting, rows,
           ["remedy", "is_log_px", "is_stderr", "elbo", "kl", "active_units", "latent_dims", "mi", "collapsed",
            "train_minutes"],
           extra={"kl_per_dim": kl_dims, "figure": str(args.out / "remedies.png")},
           notes=[f"{row['remedy']}: {row['verdict']}" for row in rows])


def figure(kl_dims, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(kl_dims)
    for i, (label, values) in enumerate(kl_dims.items()):
        ax.bar(np.arange(len(values)) + i * width, values, width, label=label)
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL(q(z_d|x) || p(z_d)), nats (test)")
    ax.set_title(f"{MODEL}: KL per latent dimension with and without the remedies")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
