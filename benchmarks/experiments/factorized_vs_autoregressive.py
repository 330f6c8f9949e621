"""Seed experiment 3: a factorized decoder (``vae``) against an autoregressive one (``pixelcnn-vae``).

On binarized MNIST (the fixed binarization of Larochelle & Murray), a Bernoulli decoder that
factorizes over pixels given z must put everything that correlates pixels into z; a PixelCNN decoder
can model those correlations itself, so the ELBO's KL cost pushes it to use far less of z (Chen et
al. 2017, "Variational Lossy Autoencoder"). Reported per model: ``is`` log p(x), ELBO, KL, active
units, I(x;z), the collapse verdict, and sample grids side by side (one PNG).

    python benchmarks/experiments/factorized_vs_autoregressive.py          # small budget (subset, few epochs)
    python benchmarks/experiments/factorized_vs_autoregressive.py --full   # 50k/10k/10k, 100 epochs, K=5000
"""
import torch

import pyro_lvm
from _common import finish, fresh_run_dir, latent_usage, log, mnist_subset, parse_args, save_figure

MODELS = {
    "vae": {"latent_dim": 32},
    "pixelcnn-vae": {"latent_dim": 32},
}


def _medium(parser):
    parser.add_argument("--medium", action="store_true",
                        help="between the two, for a short GPU session: all 50k/10k training and validation "
                             "images, 1000 seeded test images, 10 epochs, K=1000")


def main():
    args = parse_args(__doc__.splitlines()[0], extra=_medium)
    if args.full:
        sizes, epochs, samples, grid = (None, None, None), 100, 5000, 64
    elif args.medium:
        sizes, epochs, samples, grid = (None, None, 1000), 10, 1000, 64
    else:
        sizes, epochs, samples, grid = (5000, 200, 200), 5, 200, 36
    data = mnist_subset(args, sizes) if not args.full else "binarized-mnist"
    setting = {"data": "binarized-mnist" + ("" if args.full else f" subset {sizes[0]}/{sizes[1]}/{sizes[2]}"),
               "budget": "full" if args.full else "medium" if args.medium else "small",
               "epochs": epochs, "is_K": samples, "objective": "elbo", "lr": 1e-3, "batch_size": 100,
               "seed": args.seed, "hyperparameters": MODELS}
    rows, grids, kl_dims = [], {}, {}
    for model, hparams in MODELS.items():
        out = fresh_run_dir(args, f"fva-{model}")
        log(f"fitting {model} ({setting})")
        run = pyro_lvm.fit(model, str(data), out=out, data_dir=args.data_dir, hyperparameters=hparams,
                           epochs=epochs, seed=args.seed, device=args.device, progress=False, log=log)
        usage = latent_usage(run, samples, seed=args.seed)
        kl_dims[model] = usage.pop("kl_per_dim")
        rows.append({"model": model, **usage, "train_minutes": run.metrics[-1]["seconds"] / 60})
        log(f"{model}: {usage['verdict']}")
        grids[model] = pyro_lvm.sample(run, n=grid, out=args.out / f"fva-samples-{model}.png", seed=args.seed)
    figure(grids, args.out / "factorized_vs_autoregressive.png")
    finish(args, "factorized_vs_autoregressive", setting, rows,
           ["model", "is_log_px", "is_stderr", "is_points", "elbo", "kl", "active_units", "latent_dims", "mi",
            "collapsed", "khat_max", "train_minutes"],
           extra={"kl_per_dim": kl_dims, "figure": str(args.out / "factorized_vs_autoregressive.png")},
           notes=[f"{row['model']}: {row['verdict']}" for row in rows])


def figure(grids, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 5.2))
    for ax, (model, grid) in zip(axes, grids.items()):
        ax.imshow(mpimg.imread(grid), cmap="gray")
        ax.set_title(f"samples: {model}")
        ax.axis("off")
    save_figure(fig, path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
