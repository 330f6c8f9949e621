"""The report's figures, one function per figure, each writing a PNG and returning its path.

matplotlib draws with the Agg backend (no display needed); image grids go through
``torchvision.utils.save_image``. Vector data are shown in the plane of their first two
coordinates when they have two, else in the plane of their first two principal components
(fitted on the data and applied to samples and reconstructions alike).
"""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

TILE_PIXELS = 48  # small images (8x8 digits) are enlarged to at least this many pixels a side
MAX_SCATTER_POINTS = 2000
DPI = 100


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _displayable(images):
    """[n, C, H, W] in [0, 1] with 1 or 3 channels, enlarged with nearest neighbours if small."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] not in (1, 3):
        images = images[:, :1]
    factor = max(1, math.ceil(TILE_PIXELS / images.shape[-1]))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def image_grid(images, path, nrow=8):
    """A grid of images [n, C, H, W]."""
    save_image(_displayable(images), path, nrow=nrow, padding=2, pad_value=1.0)
    return path


def data_and_reconstructions(data, reconstructions, path, per_row=8):
    """Rows of data, each followed by the row of its reconstructions."""
    rows = []
    for start in range(0, data.shape[0], per_row):
        rows += [data[start : start + per_row], reconstructions[start : start + per_row]]
    return image_grid(torch.cat(rows), path, nrow=per_row)


class Plane:
    """The 2-D view of vector data: the coordinates themselves (D <= 2) or the first two principal
    components of the reference data."""

    def __init__(self, reference):
        reference = _numpy(reference)
        self.dims = reference.shape[1]
        self.pca = None
        if self.dims > 2:
            from sklearn.decomposition import PCA

            self.pca = PCA(n_components=2).fit(reference)

    def __call__(self, points):
        points = _numpy(points)
        if self.pca is not None:
            return self.pca.transform(points)
        if self.dims == 1:  # one coordinate: spread the points vertically at random, for legibility
            return np.stack([points[:, 0], np.random.default_rng(0).uniform(-1, 1, len(points))], 1)
        return points

    def labels(self, prefix):
        if self.pca is not None:
            ratio = self.pca.explained_variance_ratio_
            return [f"PC{i + 1} of {prefix} ({100 * r:.0f}% of variance)" for i, r in enumerate(ratio)]
        if self.dims == 1:
            return [f"{prefix}", "(jitter)"]
        return [f"{prefix}[0]", f"{prefix}[1]"]


def _numpy(tensor):
    return tensor.detach().float().cpu().reshape(tensor.shape[0], -1).numpy()[:MAX_SCATTER_POINTS]


def vector_samples(data, samples, path):
    plane = Plane(data)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(*plane(data).T, s=6, alpha=0.5, label="data")
    ax.scatter(*plane(samples).T, s=6, alpha=0.5, label="samples x ~ p(x)")
    ax.set_xlabel(plane.labels("x")[0])
    ax.set_ylabel(plane.labels("x")[1])
    ax.legend()
    return _save(fig, path)


def vector_reconstructions(data, reconstructions, path, lines=200):
    plane = Plane(data)
    original, decoded = plane(data), plane(reconstructions)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for (x0, y0), (x1, y1) in zip(original[:lines], decoded[:lines]):
        ax.plot([x0, x1], [y0, y1], color="0.75", linewidth=0.5, zorder=0)
    ax.scatter(*original.T, s=6, alpha=0.6, label="data x")
    ax.scatter(*decoded.T, s=6, alpha=0.6, label="E[x | z = E_q[z|x]]")
    ax.set_xlabel(plane.labels("x")[0])
    ax.set_ylabel(plane.labels("x")[1])
    ax.legend()
    return _save(fig, path)


def bound_curves(metrics, path):
    """Training and validation ELBO per epoch (nats per data point)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label in (("train_elbo", "train ELBO"), ("valid_elbo", "validation ELBO")):
        points = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None and math.isfinite(m[key])]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("bound on log p(x) (nats per point)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def posterior_embedding(codes, labels, path):
    """Posterior means E_q[z|x] in 2-D, coloured by label when there are labels."""
    plane = Plane(codes)
    points = plane(codes)
    fig, ax = plt.subplots(figsize=(6, 5))
    if labels is None:
        ax.scatter(*points.T, s=6, alpha=0.6)
    else:
        values = labels.detach().cpu().numpy()[:MAX_SCATTER_POINTS]
        scatter = ax.scatter(*points.T, s=6, alpha=0.8, c=values, cmap="tab10", vmin=-0.5, vmax=9.5)
        if values.max() < 10:
            fig.colorbar(scatter, ax=ax, ticks=np.unique(values), label="label")
        else:
            fig.colorbar(scatter, ax=ax, label="label")
    ax.set_xlabel(plane.labels("E[z|x]")[0])
    ax.set_ylabel(plane.labels("E[z|x]")[1])
    return _save(fig, path)


def latent_traversals(rows, path):
    """One row of decoded images per traversed dimension; ``rows`` is [dims, steps, C, H, W]."""
    return image_grid(rows.reshape(-1, *rows.shape[2:]), path, nrow=rows.shape[1])


def kl_per_dimension(kl_per_dim, variances, threshold, path):
    """KL(q(z_d|x) || p(z_d)) per dimension, and the activity Var_x E[z_d|x] against its threshold."""
    dims = np.arange(len(kl_per_dim))
    active = np.asarray(variances) > threshold
    colours = np.where(active, "tab:blue", "0.7")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.5, 0.22 * len(dims)), 5.5), sharex=True)
    kl = np.array([np.nan if value is None else value for value in kl_per_dim], dtype=float)
    top.bar(dims, np.nan_to_num(kl), color=colours)
    top.set_ylabel("KL per dim (nats)")
    top.set_title("blue: active units, grey: inactive")
    bottom.bar(dims, np.maximum(np.asarray(variances, dtype=float), 1e-8), color=colours)
    bottom.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    bottom.set_yscale("log")
    bottom.set_ylabel("Var_x E[z_d | x]")
    bottom.set_xlabel("latent dimension")
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.legend(loc="lower right", framealpha=0.9)
    return _save(fig, path)


KHAT_BANDS = ((-math.inf, 0.5, "good"), (0.5, 0.7, "ok"), (0.7, 1.0, "bad"), (1.0, math.inf, "very bad"))


def pareto_khat(khat, path):
    """Per-point k-hat against the point's index, with the 0.5 / 0.7 / 1 bands of arviz's plot_khat."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    index = np.arange(len(khat))
    colours = np.select([khat <= 0.5, khat <= 0.7, khat <= 1.0], ["tab:blue", "tab:orange", "tab:red"], "darkred")
    ax.scatter(index, khat, s=10, c=colours, marker="+")
    for level, style in ((0.5, ":"), (0.7, "--"), (1.0, "-")):
        ax.axhline(level, color="tab:red", linestyle=style, linewidth=0.8)
    ax.set_xlabel("data point")
    ax.set_ylabel("Pareto k-hat")
    return _save(fig, path)


def fuzziness_extremes(sharpest, fuzziest, path):
    """The sharpest and the fuzziest codes side by side (Zhao, Song & Ermon, 2017, figure 1): for each
    code a column with the decoder's mean E[x|z] above the mean of q(x|z), titled by F(z).

    ``sharpest`` and ``fuzziest`` are ``(decoded [n, C, H, W], q_means [n, C, H, W], values [n])``.
    """
    columns = max(len(sharpest[2]), len(fuzziest[2]))
    fig = plt.figure(figsize=(2 * 0.95 * columns + 1.0, 2.9), layout="constrained")
    for panel, ((decoded, means, values), title) in zip(
            fig.subfigures(1, 2, wspace=0.04), ((sharpest, "sharpest codes"), (fuzziest, "fuzziest codes"))):
        panel.suptitle(f"{title}: F(z) above each", fontsize=10)
        axes = panel.subplots(2, columns, squeeze=False)
        for column in range(columns):
            for row, images in enumerate((decoded, means)):
                ax = axes[row, column]
                ax.set_xticks([])
                ax.set_yticks([])
                if column >= len(values):
                    ax.axis("off")
                    continue
                image = _displayable(images[column : column + 1])[0]
                ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
            if column < len(values):
                axes[0, column].set_title(f"{values[column]:.3g}", fontsize=8)
        axes[0, 0].set_ylabel("E[x|z]", fontsize=8)
        axes[1, 0].set_ylabel("E_q(x|z)[x]", fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
