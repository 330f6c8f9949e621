"""Decoder power: one encoder, the decoder swept from factorized through gated PixelCNNs of increasing depth.

The claim (Chen et al. 2017, "Variational Lossy Autoencoder"; Gulrajani et al. 2017, "PixelVAE"): the
more of the data's structure the decoder can model alone, the less the ELBO pays for z, and a decoder
powerful enough makes ignoring z (KL = 0) the optimum. Here the power is the depth of a gated PixelCNN
(``pixelcnn-vae -p decoder=gated``: no blind spot, so each layer widens what a pixel sees), against the
factorized ``vae`` with the same encoder (an MLP with one hidden layer of 200 ReLUs). Per setting:
``is`` log p(x), ELBO, KL, active units, I(x;z), the fuzziness of the codes (``pyro_lvm.diagnose``),
and a figure of KL and log p(x) against depth with a grid of samples for each decoder.

    python benchmarks/experiments/decoder_power.py                 # small: 8x8 digits, 100 epochs (CPU, ~1 h)
    python benchmarks/experiments/decoder_power.py --mnist-subset  # binarized MNIST 5000/200/200, 5 epochs
    python benchmarks/experiments/decoder_power.py --full          # binarized MNIST 50k/10k/10k, 100 epochs, K=5000

Options to size a run: ``--depths 1,2,4``, ``--epochs N``, ``--is-samples K``, ``--test-limit N``,
``--channels C``. The ``--full`` setting prints the deepest gated decoder's test NLL beside the
published ones on the same data (PixelCNN 81.30, VLAE 79.03 nats).
"""
import torch

import pyro_lvm
from _common import finish, fresh_run_dir, latent_usage, log, mnist_subset, parse_args

ENCODER = {"hidden": [200], "activation": "relu", "architecture": "mlp"}
PUBLISHED_NLL = {"PixelCNN (van den Oord et al. 2016)": 81.30, "VLAE (Chen et al. 2017)": 79.03}
SMALL = {"data": "digits", "latent_dim": 16, "channels": 32, "first_kernel_size": 3, "kernel_size": 3,
         "epochs": 100, "is_samples": 200, "test_limit": None, "grid": 36, "diagnose_batch": 500}
# The seeded subset of factorized_vs_autoregressive.py's small setting (same file, same seed).
MNIST_SUBSET = {"data": "binarized_mnist_subset.npz", "latent_dim": 32, "channels": 16, "first_kernel_size": 7,
                "kernel_size": 3, "epochs": 5, "is_samples": 200, "test_limit": None, "grid": 36, "diagnose_batch": 500}
FULL = {"data": "binarized-mnist", "latent_dim": 32, "channels": 64, "first_kernel_size": 7, "kernel_size": 3,
        "epochs": 100, "is_samples": 5000, "test_limit": None, "grid": 64, "diagnose_batch": 100}
DEPTHS = (1, 2, 4, 8, 12)
COLLAPSE_KL = 1.0  # nats: "KL falls below 1 nat"
EVAL_BATCH = 10  # points per importance-sampling chunk: keeps a PixelCNN's activations small on a CPU
# diagnose traces 16 particles of "diagnose_batch" points at once; a 12-layer, 64-channel gated PixelCNN's
# pass without autograd holds about 3 MB per image (measured on the CPU), so the full setting's default
# 500 x 16 images would take some 25 GB; 100 x 16 take about 5.


def _options(parser):
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)),
                        help="gated PixelCNN depths to sweep, comma-separated (default 1,2,4,8,12)")
    parser.add_argument("--epochs", type=int, help="override the setting's epochs")
    parser.add_argument("--is-samples", type=int, help="override the setting's K of the is estimate")
    parser.add_argument("--test-limit", type=int, help="estimate log p(x) on the first N test points only")
    parser.add_argument("--channels", type=int, help="override the gated PixelCNN's channels")
    parser.add_argument("--mnist-subset", action="store_true",
                        help="a second small setting: the seeded 5000/200/200 subset of binarized MNIST")


def decoders(setting, depths):
    """(label, depth, zoo model, hyperparameters) per decoder: the factorized one first."""
    common = {**ENCODER, "latent_dim": setting["latent_dim"]}
    rows = [("factorized", 0, "vae", common)]
    for depth in depths:
        rows.append((f"gated {depth}", depth, "pixelcnn-vae", {
            **common, "decoder": "gated", "pixelcnn_layers": depth, "pixelcnn_channels": setting["channels"],
            "first_kernel_size": setting["first_kernel_size"], "kernel_size": setting["kernel_size"]}))
    return rows


def main():
    args = parse_args(__doc__.splitlines()[0], extra=_options)
    setting = dict(FULL if args.full else MNIST_SUBSET if args.mnist_subset else SMALL)
    if args.mnist_subset and not args.full:
        setting["data"] = str(mnist_subset(args, (5000, 200, 200)))
    for key in ("epochs", "is_samples", "test_limit", "channels"):
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    binary = args.full or args.mnist_subset
    setting.update({"budget": "full" if args.full else "mnist-subset" if args.mnist_subset else "small",
                    "depths": depths, "encoder": ENCODER, "objective": "elbo", "lr": 1e-3, "batch_size": 100,
                    "seed": args.seed,
                    "binarize": "static (Larochelle & Murray)" if binary else "dynamic (train), static draw (test)"})
    rows, grids = [], {}
    for label, depth, model, hparams in decoders(setting, depths):
        out = fresh_run_dir(args, "decoder-power-" + label.replace(" ", "-"))
        log(f"fitting {label}: {model} {hparams}")
        run = pyro_lvm.fit(model, setting["data"], out=out, data_dir=args.data_dir, hyperparameters=hparams,
                           epochs=setting["epochs"], batch_size=100, lr=1e-3, seed=args.seed, device=args.device,
                           progress=False, log=log)
        usage = latent_usage(run, setting["is_samples"], limit=setting["test_limit"], seed=args.seed,
                             batch_size=EVAL_BATCH, diagnose_batch_size=setting["diagnose_batch"])
        usage.pop("kl_per_dim")
        rows.append({"decoder": label, "depth": depth, **usage, "train_minutes": run.metrics[-1]["seconds"] / 60})
        fuzziness = usage["fuzziness"]
        log(f"{label}: {usage['verdict']} fuzziness {'undefined' if fuzziness is None else f'{fuzziness:.3f}'}")
        grids[label] = pyro_lvm.sample(run, n=setting["grid"], out=args.out / f"decoder-power-samples-{depth}.png",
                                       seed=args.seed)
    figure_path = args.out / "decoder_power.png"
    figure(rows, grids, figure_path)
    finish(args, "decoder_power", setting, rows,
           ["decoder", "is_log_px", "is_stderr", "elbo", "kl", "active_units", "latent_dims", "mi", "fuzziness",
            "fuzziness_ratio", "collapsed", "khat_max", "train_minutes"],
           extra={"figure": str(figure_path), "kl_below_1_nat_at_depth": first_collapsed_depth(rows),
                  **({"published_nll": PUBLISHED_NLL} if args.full else {})},
           notes=notes(rows, args.full))


def first_collapsed_depth(rows):
    """The smallest gated depth whose KL is below 1 nat, or None."""
    return next((row["depth"] for row in rows if row["depth"] > 0 and row["kl"] < COLLAPSE_KL), None)


def notes(rows, full):
    depth = first_collapsed_depth(rows)
    gated = [row for row in rows if row["depth"] > 0]
    if depth is not None:
        lines = [f"KL falls below {COLLAPSE_KL:g} nat at depth {depth}."]
    elif gated:
        lowest = min(gated, key=lambda row: row["kl"])
        lines = [f"KL stays above {COLLAPSE_KL:g} nat at every depth "
                 f"(lowest {lowest['kl']:.2f} nats, {lowest['decoder']})."]
    else:
        lines = []
    if full and gated:
        deepest = max(gated, key=lambda row: row["depth"])
        published = ", ".join(f"{name} {value:.2f}" for name, value in PUBLISHED_NLL.items())
        lines.append(f"Test NLL of {deepest['decoder']}: {-deepest['is_log_px']:.2f} nats (is, K={deepest['is_K']}, "
                     f"{deepest['is_points']} points); published on this binarization: {published}.")
    return lines + [f"{row['decoder']}: {row['verdict']}" for row in rows]


def figure(rows, grids, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    positions = list(range(len(rows)))
    labels = ["fact." if row["depth"] == 0 else str(row["depth"]) for row in rows]
    fig = plt.figure(figsize=(max(12, 2.2 * len(rows)), 3.4 + 2.6 * 6 / max(6, len(rows))), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.25, 1])
    kl_ax, px_ax, fuzzy_ax = top.subplots(1, 3)
    kl_ax.plot(positions, [row["kl"] for row in rows], "o-", label="KL(q(z|x) || p(z))")
    kl_ax.plot(positions, [row["mi"] for row in rows], "s--", label="I(x;z)")
    kl_ax.axhline(COLLAPSE_KL, color="tab:red", linewidth=0.8, linestyle=":", label=f"{COLLAPSE_KL:g} nat")
    kl_ax.set_ylim(bottom=0)
    kl_ax.set_ylabel("nats (test)")
    kl_ax.set_title("latent usage")
    px_ax.errorbar(positions, [row["is_log_px"] for row in rows], yerr=[row["is_stderr"] for row in rows],
                   fmt="o-", capsize=3, label="is log p(x)")
    px_ax.plot(positions, [row["elbo"] for row in rows], "s--", label="ELBO")
    px_ax.set_ylabel("nats per image (test)")
    px_ax.set_title("fit")
    fuzzy_ax.plot(positions, [row["fuzziness_ratio"] for row in rows], "o-")
    fuzzy_ax.set_ylim(0, 1.05)
    fuzzy_ax.set_ylabel("fuzziness / total variance")
    fuzzy_ax.set_title("fuzziness of the codes")
    for ax in (kl_ax, px_ax, fuzzy_ax):
        ax.set_xticks(positions, labels)
        ax.set_xlabel("decoder: factorized, then gated PixelCNN depth")
        ax.grid(alpha=0.3)
    kl_ax.legend(fontsize=8)
    px_ax.legend(fontsize=8)
    for ax, row in zip(bottom.subplots(1, len(rows), squeeze=False)[0], rows):
        ax.imshow(mpimg.imread(grids[row["decoder"]]), cmap="gray", interpolation="nearest")
        ax.set_title(f"samples: {row['decoder']}", fontsize=9)
        ax.axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
