"""Latent usage of a fitted model over a whole data split: rate, distortion, active units, mutual
information, and the posterior-collapse verdict.

For the guide q(z|x), the prior p(z) and the decoder p(x|z), averaged over the N points of a split:

- rate R = E_x KL(q(z|x) || p(z)), per latent dimension where q and p factorise (:mod:`.kl`);
- distortion D = -E_x E_q(z|x) log p(x|z), by Monte Carlo with ``num_kl_samples`` draws per point;
- ELBO = -(D + R), the bound the model was trained on (Alemi et al., 2018, "Fixing a Broken ELBO");
- active units (:mod:`.active_units`), the mutual information I_q(x; z) (:mod:`.mutual_information`)
  and the verdict (:mod:`.collapse`);
- the fuzziness of the codes, E_q(z) of the spread of q(x|z) (:mod:`.fuzziness`), the ``fuzziness*`` keys;
- optionally an importance-sampling estimate of log p(x) and the gap log p(x) - ELBO
  = E_x KL(q(z|x) || p(z|x)), how far the guide is from the true posterior.

Only local latent sites the guide samples are diagnosed (see :mod:`.traces`); with several sites, the
latent dimensions are those of all sites, flattened and concatenated in the guide's order.
"""

import math

import numpy as np
import torch

from ..errors import UserError
from .active_units import ACTIVE_UNIT_THRESHOLD, active_unit_variances, count_active_units
from .collapse import is_collapsed, verdict
from .fuzziness import code_fuzziness
from .kl import site_kl
from .mutual_information import aggregate_posterior_mutual_information
from .traces import (
    OBSERVED_SITE,
    chunks,
    local_latent_sites,
    max_plate_nesting,
    particles_by_points,
    posterior_mean,
    seeded,
    trace_guide_and_model,
)

SPLITS = ("train", "valid", "test")


def diagnose_model(
    lvm,
    x,
    labels=None,
    batch_size=500,
    num_kl_samples=16,
    is_samples=0,
    seed=0,
    active_threshold=ACTIVE_UNIT_THRESHOLD,
    num_mi_samples=1,
    num_fuzziness_samples=1,
):
    """Diagnose the latent usage of ``lvm`` on the data ``x`` (a tensor [N, *data_shape] on the
    model's device). Returns a JSON-able dict; see the module docstring for the quantities.

    ``batch_size`` bounds memory only: ``num_kl_samples`` particles of ``batch_size`` points are traced
    at once. The mutual information uses its own fixed chunks, so it does not depend on it.
    ``num_fuzziness_samples`` codes per point are drawn for the fuzziness (0 skips it).
    ``labels`` (optional, [N]) adds a linear probe: how well a logistic regression predicts the
    label from the posterior means (3-fold cross-validated accuracy), against the majority class.
    """
    num_points = x.shape[0]
    if num_points == 0:
        raise UserError("diagnose needs at least one data point; the split is empty")
    with torch.no_grad(), seeded(seed, x.device):
        guide_trace, model_trace = trace_guide_and_model(lvm, x[:1])
        sites = local_latent_sites(guide_trace, model_trace)
        if not sites:
            raise UserError(
                "diagnose needs a guide that samples local latents inside pyro.plate('data'); this "
                "model's guide samples none (enumerated latents are summed out, not diagnosed)"
            )
        particle_dim = -(max_plate_nesting(guide_trace, model_trace) + 1)
        kl_dims, kl_totals, log_likelihoods, means = [], [], [], []
        analytic = True
        for part in chunks(num_points, batch_size):
            x_batch = x[part]
            batch = x_batch.shape[0]
            guide_trace, model_trace = trace_guide_and_model(lvm, x_batch, num_kl_samples, particle_dim)
            point_dims, point_totals, point_means = [], [], []
            for site in sites:
                q, value = guide_trace.nodes[site.name]["fn"], guide_trace.nodes[site.name]["value"]
                kl = site_kl(q, model_trace.nodes[site.name]["fn"], value)
                analytic = analytic and kl.analytic
                total = particles_by_points(kl.total, num_kl_samples, batch).mean(0)
                point_totals.append(total)
                if kl.per_dim is None:
                    point_dims.append(torch.full((batch, site.dims), math.nan, device=x.device))
                else:
                    point_dims.append(particles_by_points(kl.per_dim, num_kl_samples, batch, (site.dims,)).mean(0))
                mean = posterior_mean(q, value, particle_dims=0)
                mean = particles_by_points(mean, num_kl_samples, batch, site.event_shape).mean(0)
                point_means.append(mean.reshape(batch, -1))
            kl_dims.append(torch.cat(point_dims, -1))
            kl_totals.append(sum(point_totals))
            means.append(torch.cat(point_means, -1))
            observed = model_trace.nodes[OBSERVED_SITE]
            log_likelihood = observed["fn"].log_prob(observed["value"])
            log_likelihoods.append(particles_by_points(log_likelihood, num_kl_samples, batch).mean(0))
        kl_per_dim = torch.cat(kl_dims).mean(0)
        kl_total = torch.cat(kl_totals).mean().item()
        distortion = -torch.cat(log_likelihoods).mean().item()
        posterior_means = torch.cat(means)
        variances = active_unit_variances(posterior_means)

    # The mutual information draws its own codes from a fresh seed, in chunks that do not depend on
    # batch_size, so that it is the same number whatever the memory budget.
    with torch.no_grad(), seeded(seed, x.device):
        mutual_information = aggregate_posterior_mutual_information(lvm, x, sites, num_samples=num_mi_samples)
    fuzziness = {}
    if num_fuzziness_samples > 0:
        with torch.no_grad(), seeded(seed, x.device):
            fuzziness = code_fuzziness(lvm, x, sites, num_samples=num_fuzziness_samples).summary()

    latent_dims = sum(site.dims for site in sites)
    active = variances > active_threshold
    active_units = count_active_units(variances, active_threshold)
    inactive_kl = float(torch.nan_to_num(kl_per_dim[~active]).sum())
    elbo = -(distortion + kl_total)
    result = {
        "num_points": num_points,
        "latent_sites": [
            {"name": site.name, "event_shape": list(site.event_shape), "dims": site.dims} for site in sites
        ],
        "latent_dims": latent_dims,
        "kl_per_dim": [None if math.isnan(value) else value for value in kl_per_dim.tolist()],
        "kl_total": kl_total,
        "kl_analytic": analytic,
        "active_units": active_units,
        "active_unit_variances": variances.tolist(),
        "active_threshold": active_threshold,
        "mutual_information": mutual_information,
        "mutual_information_ceiling": math.log(num_points),
        # ELBO surgery: rate = I_q(x;z) + KL(q(z) || p(z)); inherits the downward bias of the MI.
        "marginal_kl": kl_total - mutual_information,
        "rate": kl_total,
        "distortion": distortion,
        "elbo": elbo,
        "collapsed": is_collapsed(active_units, latent_dims, mutual_information),
        "verdict": verdict(active_units, latent_dims, mutual_information, kl_total, num_points, inactive_kl),
        **fuzziness,
    }
    if labels is not None:
        result.update(_label_probe(posterior_means, labels, seed))
    if is_samples > 0:
        from ..estimators import estimate_log_marginal  # imported on use: the estimators are optional here

        estimate = estimate_log_marginal(lvm, x, estimator="is", num_samples=is_samples, seed=seed)
        result["is_samples"] = is_samples
        result["is_log_px"] = float(estimate.log_px)
        result["is_stderr"] = float(estimate.stderr)
        result["elbo_gap"] = float(estimate.log_px) - elbo
    return result


def _label_probe(posterior_means, labels, seed):
    """Cross-validated accuracy of a logistic regression from E_q[z|x] to the label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    features = posterior_means.detach().cpu().double().numpy()
    targets = torch.as_tensor(labels).detach().cpu().numpy()
    counts = np.bincount(targets - targets.min())
    probe = {"label_chance_accuracy": float(counts.max() / counts.sum())}
    folds = min(3, int(counts[counts > 0].min()))
    if folds >= 2 and (counts > 0).sum() >= 2:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        scores = cross_val_score(LogisticRegression(max_iter=1000), features, targets, cv=splitter)
        probe["label_probe_accuracy"] = float(scores.mean())
    return probe


def diagnose_run(run, split="test", **kwargs):
    """:func:`diagnose_model` for a fitted run on one of its splits (``train``, ``valid``, ``test``)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    x = getattr(run.data, split)
    if x is None or len(x) == 0:
        raise UserError(f"the run's data have no {split} split; choose another with --split")
    labels = getattr(run.data, f"{split}_labels", None)
    return diagnose_model(run.model, x.to(model_device(run.model)), labels=labels, **kwargs)


def model_device(lvm):
    """The device of the model's parameters and buffers (the CPU for a model without any)."""
    for tensor in list(lvm.parameters()) + list(lvm.buffers()):
        return tensor.device
    return torch.device("cpu")
