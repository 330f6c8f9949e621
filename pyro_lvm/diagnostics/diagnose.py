"""Latent usage of a fitted model over a whole data split: rate, distortion, active units, mutual
information, and the posterior-collapse verdict.

For the guide q(z|x), the prior p(z) and the decoder p(x|z), averaged over the N points of a split:

- rate R = E_x KL(q(z|x) || p(z)), per latent dimension where q and p factorise (:mod:`.kl`). The
  closed-form KL of each site is used only where the sum of them is the KL of the guide actually
  used (:func:`.traces.analytic_kl_is_exact`: nothing enumerated, no auxiliary guide sites, no prior
  that depends on a latent the guide draws later); otherwise R is estimated by Monte Carlo,
  E_q[log q(z|x) - log p(z)], with p(z) the prior of all local latents (discrete ones the model
  enumerates summed out, the guide's enumerated ones weighted by q);
- distortion D = -E_x E_q(z|x) log p(x|z), by Monte Carlo with ``num_kl_samples`` draws per point;
- ELBO = -(D + R), the bound the model was trained on (Alemi et al., 2018, "Fixing a Broken ELBO"),
  which agrees with ``evaluate --estimator elbo`` within Monte Carlo error;
- active units (:mod:`.active_units`), the mutual information I_q(x; z) (:mod:`.mutual_information`)
  and the verdict (:mod:`.collapse`);
- the fuzziness of the codes, E_q(z) of the spread of q(x|z) (:mod:`.fuzziness`), the ``fuzziness*`` keys
  (null, with the reason under ``null_reason``, for a program where it is undefined);
- optionally an importance-sampling estimate of log p(x) and the gap log p(x) - ELBO
  = E_x KL(q(z|x) || p(z|x)), how far the guide is from the true posterior.

Global latents are drawn from the guide with each particle (the terms of a data point given them);
only local latent sites the guide samples are diagnosed (:func:`.traces.diagnosed_sites`); with
several sites, the latent dimensions are those of all sites, flattened and concatenated in the
guide's order.
"""

import math

import numpy as np
import torch

from ..errors import UserError
from ..protocol.plates import plate_frame
from .active_units import ACTIVE_UNIT_THRESHOLD, active_unit_variances, count_active_units
from .collapse import is_collapsed, verdict
from .fuzziness import FuzzinessUndefined, check_fixed_posterior, code_fuzziness, undefined_summary
from .kl import site_kl
from .mutual_information import aggregate_posterior_mutual_information
from .traces import analytic_kl_is_exact, diagnosed_sites, posterior_mean, seeded

SPLITS = ("train", "valid", "test")


def _event_view(tensor, event_dims, data_dim, max_plate_nesting):
    """A site tensor ``[*batch, *event]`` as ``[..., K, n, D]`` (event flattened, data plate last in batch)."""
    from ..estimators.importance_weights import point_view

    batch = tensor.shape[:tensor.dim() - event_dims]
    flat = tensor.reshape(tuple(batch) + (-1,)).movedim(-1, 0)
    return point_view(flat, data_dim, max_plate_nesting).movedim(0, -1)


def _reduce(tensor, weighted, num_particles, num_points, event):
    """``[..., K, n, *event]`` summed over the leading (enumerated) dims and averaged over K: ``[n, *event]``."""
    tail = (num_particles, num_points) + tuple(event)
    shape = torch.broadcast_shapes(tensor.shape, tail)
    tensor = tensor.expand(shape).reshape((-1,) + tail)
    total = tensor.sum(0) if weighted else tensor[0] if tensor.shape[0] == 1 else tensor.mean(0)
    return total.mean(0)


class _Batch:
    """The per-point terms of one batch, from one guide trace and the model replayed against it."""

    def __init__(self, program, batch, num_particles, vectorize):
        from ..estimators.importance_weights import (guide_log_density, model_log_density, trace_guide,
                                                     trace_model)

        info = program.info
        self.mpn, self.plate, self.K = info.max_plate_nesting, info.data_plate.name, num_particles
        if vectorize:
            runs = [self._run(program, batch, num_particles, True, trace_guide, trace_model)]
        else:
            runs = [self._run(program, batch, 1, False, trace_guide, trace_model) for _ in range(num_particles)]
        self.runs = runs
        self.terms = []
        for guide_trace, model_trace, k in runs:
            guide_terms = guide_log_density(guide_trace, self.mpn, k, data_plate=self.plate, allow_global=True)
            names = set(guide_trace.nodes)
            full, _, _ = model_log_density(model_trace, names, self.mpn, k, data_plate=self.plate, allow_global=True,
                                           guide_enumerated_dims=guide_terms.enumerated_dims)
            latent_trace = model_trace.copy()
            for name in info.observed_names:
                latent_trace.remove_node(name)
            try:
                latent, _, _ = model_log_density(latent_trace, names, self.mpn, k, data_plate=self.plate,
                                                 allow_global=True, guide_enumerated_dims=guide_terms.enumerated_dims)
            except UserError:  # no latent in the data plate besides those summed out
                latent = 0.0
            self.terms.append((guide_terms, full, latent))

    def _run(self, program, batch, k, vectorize, trace_guide, trace_model):
        guide_run = trace_guide(program.guide, (batch,), {}, k, self.mpn, vectorize=vectorize)
        model_trace = trace_model(program.model, guide_run.trace, (batch,), {}, k, self.mpn, guide_run.enum_state,
                                  vectorize=vectorize)
        return guide_run.trace, model_trace, k


def _weights(guide_terms):
    if guide_terms.log_q_enumerated is None:
        return None
    return guide_terms.log_q_enumerated.exp()


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
    from ..estimators import check_per_point_guide
    from ..estimators.importance_weights import ensure_info, vectorizes
    from ..protocol import as_program

    num_points = x.shape[0]
    if num_points == 0:
        raise UserError("diagnose needs at least one data point; the split is empty")
    program = as_program(lvm)
    with torch.no_grad(), seeded(seed, x.device):
        info = ensure_info(program, x)
        check_per_point_guide(program, x)
        sites = diagnosed_sites(info)
        if not sites:
            raise UserError(
                "diagnose needs a guide that samples local latents inside the data plate; this "
                "model's guide samples none (enumerated latents are summed out, global ones are not per point)"
            )
        vectorize = vectorizes(program, x)
        analytic = analytic_kl_is_exact(program, program.probe(x), sites)
        # Per-dimension terms are KL contributions only where each site has a prior of its own.
        per_dim_defined = not info.enumerated and not info.guide_only_sites
        kl_dims, rates, distortions, means = [], [], [], []
        all_analytic = analytic
        for batch, valid in program.batches(x, batch_size):
            terms = _Batch(program, batch, num_kl_samples, vectorize)
            point_dims, point_means, site_rates = [], [], []
            batch_rate, batch_distortion = 0.0, 0.0
            for (guide_trace, model_trace, k), (guide_terms, full, latent) in zip(terms.runs, terms.terms):
                points = _points(full, guide_terms)
                weights = _weights(guide_terms)
                weighted = weights is not None
                log_q = guide_terms.log_q + (guide_terms.log_q_enumerated if weighted else 0.0)
                scale = (weights if weighted else 1.0)
                mc_rate = _reduce((log_q - latent) * scale, weighted, k, points, ())
                distortion = -_reduce((full - latent) * scale, weighted, k, points, ())
                run_dims, run_means, run_kl = [], [], 0.0
                for site in sites:
                    q, value = guide_trace.nodes[site.name]["fn"], guide_trace.nodes[site.name]["value"]
                    frame = plate_frame(guide_trace.nodes[site.name], terms.plate)
                    kl = site_kl(q, model_trace.nodes[site.name]["fn"], value, analytic=analytic)
                    all_analytic = all_analytic and kl.analytic
                    total = _event_view(kl.total.unsqueeze(-1), 1, frame.dim, terms.mpn)
                    w = weights.unsqueeze(-1) if weighted else 1.0
                    run_kl = run_kl + _reduce(total * w, weighted, k, points, (1,))[..., 0]
                    if kl.per_dim is None or not per_dim_defined:
                        run_dims.append(torch.full((points, site.dims), math.nan, device=x.device))
                    else:
                        dims = _event_view(kl.per_dim, 1, frame.dim, terms.mpn)
                        run_dims.append(_reduce(dims * w, weighted, k, points, (site.dims,)))
                    mean = _event_view(posterior_mean(q, value), len(site.event_shape), frame.dim, terms.mpn)
                    run_means.append(_reduce(mean * w, weighted, k, points, (site.dims,)))
                batch_rate = batch_rate + (run_kl if analytic else mc_rate)
                batch_distortion = batch_distortion + distortion
                point_dims.append(torch.cat(run_dims, -1))
                point_means.append(torch.cat(run_means, -1))
            runs = len(terms.runs)
            rates.append((batch_rate / runs)[:valid])
            distortions.append((batch_distortion / runs)[:valid])
            kl_dims.append((sum(point_dims) / runs)[:valid])
            means.append((sum(point_means) / runs)[:valid])
        kl_per_dim = torch.cat(kl_dims).mean(0)
        kl_total = torch.cat(rates).mean().item()
        distortion = torch.cat(distortions).mean().item()
        posterior_means = torch.cat(means)
        variances = active_unit_variances(posterior_means)

    # The mutual information draws its own codes from a fresh seed, in chunks that do not depend on
    # batch_size, so that it is the same number whatever the memory budget.
    # Both need q(z|x_m) as one fixed distribution per point; a hierarchical or enumerating guide gets
    # null with the reason rather than the number of its sites taken as independent.
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            check_fixed_posterior(program, info, x, sites)
        posterior_problem = None
    except FuzzinessUndefined as err:
        posterior_problem = str(err)
    mutual_information = None
    if posterior_problem is None:
        with torch.no_grad(), seeded(seed, x.device):
            mutual_information = aggregate_posterior_mutual_information(program, x, sites, num_samples=num_mi_samples)
    fuzziness, fuzziness_reasons = {}, None
    if num_fuzziness_samples > 0:
        with torch.no_grad(), seeded(seed, x.device):
            try:
                fuzziness = code_fuzziness(program, x, num_samples=num_fuzziness_samples, sites=sites).summary()
            except FuzzinessUndefined as err:
                fuzziness = undefined_summary(str(err))
        fuzziness_reasons = fuzziness.pop("null_reason", None)

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
        "kl_analytic": bool(all_analytic),
        "rate_method": "analytic per site" if analytic else "Monte Carlo (the guide's own KL)",
        "active_units": active_units,
        "active_unit_variances": variances.tolist(),
        "active_threshold": active_threshold,
        "mutual_information": mutual_information,
        "mutual_information_ceiling": math.log(num_points),
        # ELBO surgery: rate = I_q(x;z) + KL(q(z) || p(z)); inherits the downward bias of the MI.
        "marginal_kl": None if mutual_information is None else kl_total - mutual_information,
        "rate": kl_total,
        "distortion": distortion,
        "elbo": elbo,
        "collapsed": is_collapsed(active_units, latent_dims, mutual_information, kl_total),
        "verdict": verdict(active_units, latent_dims, mutual_information, kl_total, num_points, inactive_kl),
        **fuzziness,
    }
    if mutual_information is None:
        fuzziness_reasons = {**(fuzziness_reasons or {}), "mutual_information": posterior_problem,
                             "marginal_kl": posterior_problem}
    if fuzziness_reasons:
        result["null_reason"] = fuzziness_reasons
    if info.global_latents:
        result["global_latents"] = [s.name for s in info.global_latents]
    if labels is not None:
        result.update(_label_probe(posterior_means, labels, seed))
    if is_samples > 0:
        from ..estimators import estimate_log_marginal  # imported on use: the estimators are optional here

        estimate = estimate_log_marginal(program, x, estimator="is", num_samples=is_samples, seed=seed)
        result["is_samples"] = is_samples
        result["is_log_px"] = float(estimate.log_px)
        result["is_stderr"] = float(estimate.stderr)
        result["elbo_gap"] = float(estimate.log_px) - elbo
    return result


def _points(full, guide_terms):
    for tensor in (full, guide_terms.log_q, guide_terms.log_q_enumerated):
        if torch.is_tensor(tensor) and tensor.dim() >= 1:
            return tensor.shape[-1]
    return 1


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
