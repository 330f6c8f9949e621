"""``write_report``: one self-contained HTML page about a fitted run, with its figures beside it.

The page answers, in order: did training converge (the bound per epoch), what does the model
generate (samples), what does it keep of a data point (reconstructions through the posterior mean),
what does the code look like (posterior means in 2-D, coloured by label; traversals of the most used
dimensions for images), which dimensions are used (KL and activity per dimension), how fuzzy the codes
are (the sharpest and the fuzziest codes' decoded means beside the means of q(x|z), for images), can
the guide be trusted as an importance-sampling proposal (Pareto k-hat per point), and the diagnostics
table of :func:`pyro_lvm.diagnostics.diagnose_run`, led by its posterior-collapse verdict.
"""

import json
import math
import pathlib

import numpy as np
import torch

from ..diagnostics import code_fuzziness, diagnose_run, model_device
from ..diagnostics.fuzziness import FuzzinessUndefined
from ..diagnostics.traces import seeded
from ..errors import UserError
from ..estimators import check_per_point_guide
from ..protocol import as_program
from ..outputs import ReportFolder
from . import figures
from .decoding import decoder_means, draw_samples, flatten_codes, guide_latent_sites, posterior_means
from .html import Section, render_page

NUM_RECONSTRUCTIONS = 32  # images: four rows of eight, each under its data row
TRAVERSAL_DIMS = 8
TRAVERSAL_STEPS = 9
TRAVERSAL_RANGE = 3.0  # prior standard deviations either side
FUZZINESS_CODES = 8  # the sharpest and the fuzziest codes shown, each

#: Every file a report may write (``ReportFolder.check`` refuses to replace one it did not write).
REPORT_FILES = ("index.html", "diagnostics.json", "curves.png", "samples.png", "reconstructions.png", "embedding.png",
                "traversals.png", "kl_per_dim.png", "fuzziness.png", "khat.png")

DIAGNOSTIC_ROWS = (
    ("num_points", "data points"),
    ("latent_dims", "latent dimensions"),
    ("active_units", "active units (Var_x E[z_d|x] > threshold)"),
    ("kl_total", "KL(q(z|x) || p(z)) = rate R (nats)"),
    ("mutual_information", "I_q(x; z) (nats)"),
    ("mutual_information_ceiling", "ceiling of the I_q estimate, log N (nats)"),
    ("marginal_kl", "KL(q(z) || p(z)) = R - I_q (nats)"),
    ("distortion", "distortion D = -E log p(x|z) (nats)"),
    ("elbo", "ELBO = -(D + R) (nats)"),
    ("is_log_px", "log p(x), importance sampling (nats)"),
    ("elbo_gap", "log p(x) - ELBO = KL(q || p(z|x)) (nats)"),
    ("fuzziness", "fuzziness E_q(z) sum_d Var_q(x|z)[x_d] (squared units of x)"),
    ("fuzziness_ratio", "fuzziness / total variance of the split"),
    ("label_probe_accuracy", "label from E[z|x], logistic regression accuracy"),
    ("label_chance_accuracy", "majority-class accuracy"),
    ("collapsed", "posterior collapse"),
)


def write_report(run, out_dir=None, split="test", num_samples=64, khat_points=200, khat_particles=200, seed=0):
    """Write ``index.html``, its PNG figures and ``diagnostics.json`` to ``out_dir`` (default
    ``run.path / "report"``) for the run's ``split``; returns the path of ``index.html``.

    ``khat_points`` data points of the split get ``khat_particles`` importance weights each for the
    Pareto k-hat figure. Everything random is seeded by ``seed``.
    """
    final_dir = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(run.path) / "report"
    run_path = pathlib.Path(run.path).resolve()
    where = final_dir.parent.resolve() / final_dir.name  # links above the folder resolved, not the folder
    inside_run = where == run_path or run_path in where.parents
    # Written into a temporary folder, then moved into place whole; never over files it did not write.
    with ReportFolder(final_dir, inside_run=inside_run, owned=out_dir is None) as folder:
        folder.check(REPORT_FILES)
        _write_report(run, folder.staging, split, num_samples, khat_points, khat_particles, seed)
        folder.commit()
    return final_dir / "index.html"


def _write_report(run, out_dir, split, num_samples, khat_points, khat_particles, seed):
    lvm, data = run.model, run.data
    device = model_device(lvm)
    x = getattr(data, split, None)
    if x is None or len(x) == 0:
        raise UserError(f"the run's data have no {split} split; choose another with --split")
    x = x.to(device)
    labels = getattr(data, f"{split}_labels", None)
    sites = guide_latent_sites(lvm, x)

    try:
        diagnostics = diagnose_run(run, split=split, seed=seed)
    except UserError as err:
        diagnostics = {"error": str(err)}
    (out_dir / "diagnostics.json").write_text(json.dumps(diagnostics, indent=2) + "\n")

    codes, no_codes = _posterior_codes(lvm, x, sites)
    sections = [
        _curves(run.metrics, out_dir),
        _samples(lvm, x, data.is_image, num_samples, out_dir, seed),
        _reconstructions(lvm, x, data.is_image, codes, no_codes, out_dir),
        _embedding(labels, codes, no_codes, out_dir),
    ]
    if data.is_image and codes is not None:
        sections.append(_traversals(lvm, x, sites, codes, diagnostics, out_dir))
    sections += [
        _kl_per_dimension(diagnostics, out_dir),
        _fuzziness(lvm, x, data.is_image, diagnostics, out_dir, seed),
        _khat(lvm, x[:khat_points], khat_particles, out_dir, seed),
        _diagnostics_table(diagnostics),
        _configuration(run.config, split),
    ]

    model_name = run.config.get("model", type(lvm).__name__)
    title = f"pyro-lvm report: {model_name} on {getattr(data, 'name', '?')}"
    subtitle = f"run {run.path}, {split} split, {x.shape[0]} points of shape {tuple(x.shape[1:])}"
    if "verdict" in diagnostics:
        verdict, kind = diagnostics["verdict"], "collapsed" if diagnostics["collapsed"] else "used"
    else:
        verdict, kind = f"No latent-usage diagnostics: {diagnostics['error']}.", "unknown"
    (out_dir / "index.html").write_text(render_page(title, subtitle, verdict, kind, [s for s in sections if s is not None]))


def _curves(metrics, out_dir):
    section = Section("Training", caption="The per-point bound on log p(x) after each epoch, on the "
                      "training data (as optimized) and on the validation split.")
    if not metrics:
        section.note = "No metrics recorded: the run has no completed epoch."
        return section
    section.image = figures.bound_curves(metrics, out_dir / "curves.png").name
    section.alt = "training and validation bound per epoch"
    last = metrics[-1]
    section.rows = [(key, last[key]) for key in ("epoch", "step", "train_elbo", "valid_elbo", "seconds")
                    if last.get(key) is not None]
    return section


def _samples(lvm, x, is_image, num_samples, out_dir, seed):
    with seeded(seed, x.device):
        samples = draw_samples(lvm, num_samples, like=x)
    path = out_dir / "samples.png"
    if is_image:
        figures.image_grid(samples, path)
        caption = f"{num_samples} draws x ~ p(x): z ~ p(z), then x ~ p(x|z)."
    else:
        figures.vector_samples(x, samples, path)
        caption = f"{num_samples} draws x ~ p(x) over the {x.shape[0]} data points of the split."
    return Section("Samples", image=path.name, alt="samples from the model", pixels=is_image, caption=caption)


def _posterior_codes(lvm, x, sites):
    """E_q[z|x] for every point of the split, computed once for the sections that show codes, or
    (None, why not): the guide samples no local latent, or it keeps one parameter per training point
    and has no posterior for these points (the codes of the training split are computed all together,
    as the guide's parameters are laid out, and only then sliced)."""
    if not sites:
        return None, "The guide samples no local latent: there is no code to show."
    try:
        check_per_point_guide(as_program(lvm), x)
    except UserError as err:
        return None, str(err)
    return posterior_means(lvm, x), None


def _reconstructions(lvm, x, is_image, codes, no_codes, out_dir):
    section = Section("Reconstructions")
    if codes is None:
        section.note = no_codes
        return section
    shown = x[:NUM_RECONSTRUCTIONS] if is_image else x[: figures.MAX_SCATTER_POINTS]
    reconstructions = decoder_means(lvm, {name: code[:len(shown)] for name, code in codes.items()}, like=shown)
    path = out_dir / "reconstructions.png"
    if is_image:
        figures.data_and_reconstructions(shown, reconstructions, path)
        section.caption = ("Odd rows: data x. Even rows: the decoder's mean E[x|z] at the posterior mean "
                           "z = E_q[z|x] of the data point above.")
    else:
        figures.vector_reconstructions(shown, reconstructions, path)
        section.caption = ("Data x and the decoder's mean E[x|z] at z = E_q[z|x], joined by a line for "
                           "the first points.")
    section.image, section.alt, section.pixels = path.name, "data and reconstructions", is_image
    return section


def _embedding(labels, codes, no_codes, out_dir):
    section = Section("Posterior means")
    if codes is None:
        section.note = no_codes
        return section
    codes = flatten_codes(codes)
    path = figures.posterior_embedding(codes, labels, out_dir / "embedding.png")
    view = "the code itself" if codes.shape[1] <= 2 else f"its first two principal components (of {codes.shape[1]})"
    coloured = ", coloured by label" if labels is not None else ""
    section.image, section.alt = path.name, "posterior means in two dimensions"
    section.caption = f"E_q[z|x] for every point of the split, shown by {view}{coloured}."
    return section


def _traversals(lvm, x, sites, means, diagnostics, out_dir):
    """Decode codes that move one dimension from -3 to 3, the others at their average posterior mean."""
    base = flatten_codes(means).mean(0)
    kl = diagnostics.get("kl_per_dim") or [None] * base.numel()
    order = sorted(range(base.numel()), key=lambda d: -(kl[d] if kl[d] is not None else -math.inf))
    dims = order[:TRAVERSAL_DIMS]
    steps = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, TRAVERSAL_STEPS, device=base.device)
    flat = base.repeat(len(dims), TRAVERSAL_STEPS, 1)
    for row, dim in enumerate(dims):
        flat[row, :, dim] = steps
    flat = flat.reshape(-1, base.numel())
    codes, start = {}, 0
    for name, shape in sites.items():
        size = math.prod(shape)
        codes[name] = flat[:, start : start + size].reshape(-1, *shape)
        start += size
    images = decoder_means(lvm, codes, like=x)
    path = figures.latent_traversals(images.reshape(len(dims), TRAVERSAL_STEPS, *images.shape[1:]),
                                     out_dir / "traversals.png")
    caption = (f"Each row moves one latent dimension from {-TRAVERSAL_RANGE:g} to {TRAVERSAL_RANGE:g} "
               "with the others at their average posterior mean, and shows E[x|z]. Rows: dimensions "
               f"{', '.join(map(str, dims))}, by decreasing KL.")
    return Section("Latent traversals", image=path.name, alt="latent traversals", pixels=True, caption=caption)


def _kl_per_dimension(diagnostics, out_dir):
    section = Section("KL per dimension")
    if "kl_per_dim" not in diagnostics:
        section.note = diagnostics.get("error", "No diagnostics.")
        return section
    if all(value is None for value in diagnostics["kl_per_dim"]):
        section.note = "The guide does not factorise over dimensions: only the total KL is defined."
        return section
    path = figures.kl_per_dimension(diagnostics["kl_per_dim"], diagnostics["active_unit_variances"],
                                    diagnostics["active_threshold"], out_dir / "kl_per_dim.png")
    section.image, section.alt = path.name, "KL and activity per latent dimension"
    section.caption = ("Top: E_x KL(q(z_d|x) || p(z_d)) per dimension. Bottom: Var_x E[z_d|x] (log scale) "
                       "against the active-unit threshold (Burda et al., 2015).")
    return section


def _fuzziness(lvm, x, is_image, diagnostics, out_dir, seed):
    section = Section("Fuzziness of codes")
    if "fuzziness" not in diagnostics:
        section.note = diagnostics.get("error", "No fuzziness diagnostic.")
        return section
    if diagnostics["fuzziness"] is None:
        reason = (diagnostics.get("null_reason") or {}).get("fuzziness", "undefined for this program")
        section.note = f"The fuzziness of codes is undefined here: {reason}."
        return section
    section.rows = [
        ("fuzziness F = E_q(z) sum_d Var_q(x|z)[x_d]", diagnostics["fuzziness"]),
        ("its Monte Carlo standard error", diagnostics["fuzziness_mc_stderr"]),
        ("per coordinate of x", diagnostics["fuzziness_per_dim"]),
        ("total variance of the split (F of codes that say nothing)", diagnostics["fuzziness_data_variance"]),
        ("F / total variance", diagnostics["fuzziness_ratio"]),
        ("data points a code mixes (mean ESS of q(x|z))", diagnostics["fuzziness_ess_mean"]),
    ]
    text = ("q(x|z) = p_data(x) q(z|x) / q(z) is the set of data points a code z stands for, weighted; a "
            "factorized decoder's best fit to it is their average, so a broad q(x|z) means fuzzy samples "
            "(Zhao, Song &amp; Ermon, 2017). F is its variance, summed over the coordinates of x and averaged "
            "over codes z ~ q(z), on this split's points.")
    if not is_image:
        section.caption = text
        return section
    try:
        with torch.no_grad():
            with seeded(seed, x.device):  # the codes of diagnose_run, which uses the same seed
                result = code_fuzziness(lvm, x)
            blocks = []
            for indices in result.extremes(FUZZINESS_CODES):
                codes = {name: code[indices] for name, code in result.codes.items()}
                decoded = decoder_means(lvm, codes, like=x)
                blocks.append((decoded, result.data_means(indices), result.per_code[indices].tolist()))
    except (FuzzinessUndefined, UserError) as err:
        section.caption = text
        section.note = f"No figure of the sharpest and fuzziest codes: {err}."
        return section
    path = figures.fuzziness_extremes(blocks[0], blocks[1], out_dir / "fuzziness.png")
    section.image, section.alt, section.pixels = path.name, "the sharpest and the fuzziest codes", True
    section.caption = (text + f" Left, the {len(blocks[0][2])} sharpest codes (smallest F(z)); right, the fuzziest. "
                       "Top row: the decoder's mean E[x|z] (a sample of p(x|z) where the likelihood has no "
                       "closed-form mean, as for a PixelCNN); bottom row: the mean of q(x|z), the average of "
                       "the data points the code mixes.")
    return section


def _khat(lvm, x, num_particles, out_dir, seed):
    section = Section("Importance sampling: Pareto k-hat")
    try:
        from ..estimators import estimate_log_marginal
    except ImportError as err:
        section.note = f"The estimators are not available ({err})."
        return section
    try:
        # The estimator's own chunking keeps the particles of a large decoder within its memory budget.
        estimate = estimate_log_marginal(lvm, x, "is", num_samples=num_particles, batch_size=50, seed=seed)
    except UserError as err:
        section.note = str(err)
        return section
    if estimate.per_point_khat is None:
        section.note = "Every latent is summed out exactly: there are no importance weights."
        return section
    khat = estimate.per_point_khat.numpy()
    path = figures.pareto_khat(khat, out_dir / "khat.png")
    section.image, section.alt = path.name, "Pareto k-hat per data point"
    section.caption = (f"PSIS k-hat of {num_particles} importance weights p(x,z)/q(z|x), z ~ q(z|x), for each "
                       f"of the first {x.shape[0]} points. Below 0.5 the guide is a good proposal, above 0.7 "
                       "importance-sampling estimates of log p(x) for that point are unreliable "
                       "(Vehtari et al., 2024).")
    finite = khat[np.isfinite(khat)]
    section.rows = [
        (f"k-hat {label} ({low:g} < k <= {high:g})", f"{int(((finite > low) & (finite <= high)).sum())} points")
        for low, high, label in figures.KHAT_BANDS
    ]
    if finite.size:
        section.rows.append(("k-hat max", float(finite.max())))
    return section


def _diagnostics_table(diagnostics):
    section = Section("Diagnostics")
    if "error" in diagnostics:
        section.note = diagnostics["error"]
        return section
    reasons = diagnostics.get("null_reason") or {}
    section.rows = [(label, diagnostics[key] if diagnostics[key] is not None else f"undefined: {reasons.get(key, 'no value')}")
                    for key, label in DIAGNOSTIC_ROWS if key in diagnostics]
    sites = ", ".join(f"{site['name']} {tuple(site['event_shape'])}" for site in diagnostics["latent_sites"])
    section.rows.insert(2, ("latent sites", sites))
    section.caption = ("Averages over the split. Collapse rule: at most 10% of the units active and "
                       "I_q(x; z) below 0.1 nats. The estimate of I_q is a lower bound that cannot exceed log N.")
    return section


def _configuration(config, split):
    rows = [("model", config.get("model", "?"))]
    rows += [(f"hyperparameter {key}", value) for key, value in sorted((config.get("hyperparameters") or {}).items())]
    for key, value in sorted((config.get("data") or {}).items()):
        rows.append((f"data {key}", value))
    for key in ("objective", "particles", "epochs", "batch_size", "lr", "seed"):
        if key in config:
            rows.append((key, config[key]))
    rows.append(("split", split))
    return Section("Configuration", rows=rows)
