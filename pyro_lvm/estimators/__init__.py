"""Per-data-point estimates of log p(x), chosen by name.

:func:`estimate_log_marginal` returns one estimate per data point and their mean and standard
error. The estimators (see :data:`ESTIMATORS`):

- ``elbo``: (1/K) sum_k log w_k, the K-sample average of the log importance weights; a lower bound
  in expectation, with gap KL(q(z|x) || p(z|x)).
- ``iwae``: log (1/K) sum_k w_k, the K-sample importance-weighted bound (Burda et al., 2015).
- ``is``: the same statistic used as an estimate of log p(x), for large K (thousands), streamed in
  memory-bounded chunks, with the effective sample size and PSIS k-hat of the weights
  (:mod:`pyro_lvm.estimators.importance_sampling`).
- ``exact``: the model's ``log_marginal``, or enumeration when every latent is enumerated
  (:mod:`pyro_lvm.estimators.exact`).
- ``ais``: annealed importance sampling (:mod:`pyro_lvm.estimators.ais`), ``num_samples`` chains.

The weights w_k = p(x, z_k) / q(z_k | x), z_k ~ q, come from
:mod:`pyro_lvm.estimators.importance_weights`; enumerated discrete sites are summed out exactly.
Everything runs on ``x``'s device under ``torch.no_grad()``, with ``seed`` fixing the draws without
touching the caller's RNG (``torch.random.fork_rng``). Models run unscaled and in whatever
train/eval mode the caller left them.
"""

import dataclasses
import difflib
import math
import time

import torch

from ..errors import UserError

ESTIMATORS = {
    "elbo": "evidence lower bound: mean of K log importance weights per point",
    "iwae": "importance-weighted bound: log of the mean of K importance weights per point",
    "is": "importance sampling with the guide as proposal, K particles, with ESS and Pareto k-hat",
    "exact": "exact log p(x): the model's log_marginal, or enumeration of its discrete latents",
    "ais": "annealed importance sampling from the prior to the posterior, K chains",
}


@dataclasses.dataclass
class LogMarginalEstimate:
    """log p(x) per data point, with its mean and the standard error of that mean (nats)."""

    per_point: torch.Tensor
    log_px: float
    stderr: float
    estimator: str
    num_samples: int
    seconds: float
    extras: dict = dataclasses.field(default_factory=dict)


def _check_estimator(name):
    key = str(name).strip().lower()
    if key not in ESTIMATORS:
        close = difflib.get_close_matches(key, list(ESTIMATORS), n=2, cutoff=0.4)
        hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(ESTIMATORS)}"
        raise UserError(f"unknown estimator {name!r}; {hint}")
    return key


def _program(lvm, x):
    """The :class:`~pyro_lvm.protocol.Program` of ``lvm`` and its info, refusing what has no per-point
    estimate on these points (a guide that keeps one parameter per training point, on other points)."""
    from ..protocol import as_program
    from .importance_weights import ensure_info

    program = as_program(lvm)
    info = ensure_info(program, x)
    check_per_point_guide(program, x)
    check_factorizing_guide(program)
    return program, info


def check_factorizing_guide(program):
    """A guide whose local latents are transforms of one draw outside the data plate (AutoDiagonalNormal
    or AutoMultivariateNormal over local and global sites together) has no density per data point."""
    info = program.info
    local_in_guide = [s.name for s in info.local_latents if s.in_guide and s.guide_fn == "Delta"]
    if info.global_auxiliary_sites and local_in_guide:
        raise UserError(f"the guide of {program.program_name} draws the local latents {', '.join(local_in_guide[:3])} "
                        f"from a draw outside the data plate ({', '.join(info.global_auxiliary_sites)}: an "
                        f"AutoDiagonalNormal or AutoMultivariateNormal over all sites), so it has no density per "
                        f"data point; estimate log p(x) with a guide that factorizes over the points (AutoNormal, "
                        f"or an amortized encoder)")


def check_per_point_guide(program, x):
    """A guide with one parameter per training point (an ``AutoNormal`` over local latents) has nothing
    to say about other points: refuse them, with the fix."""
    info = program.info
    if not program.has_posterior_for(x):
        raise UserError(f"the guide of {program.program_name} keeps one parameter per training point "
                        f"({', '.join(info.per_point_parameters[:3])}), so it has no posterior for other points; "
                        f"use an amortized guide (an encoder of x) to estimate log p(x) on new data, or "
                        f"evaluate --split train")


def predictive_extras(info):
    """JSON keys that say what a per-point estimate means when the model has global latents."""
    names = [s.name for s in info.global_latents if s.in_guide]
    if not names:
        return {}
    return {"quantity": "predictive log p(x_n | training data) = log E_q(theta) p(x_n | theta)",
            "global_latents": names}


def _annealed_importance_sampling(lvm, x, num_samples, seed, opts):
    try:
        from .ais import annealed_importance_log_marginal
    except ImportError as err:
        raise UserError(f"the ais estimator is not available ({err}); use --estimator is") from None
    torch.manual_seed(seed)  # inside estimate_log_marginal's fork_rng
    return annealed_importance_log_marginal(lvm, x, num_chains=num_samples, **opts)


def estimate_log_marginal(lvm, x, estimator="is", num_samples=1000, batch_size=100, max_memory_mb=512,
                          seed=0, **opts):
    """Estimate log p(x_n) for every row of ``x`` with ``lvm`` (a model following the protocol).

    :param x: tensor [N, *data_shape] on the model's device.
    :param estimator: a key of :data:`ESTIMATORS`.
    :param num_samples: K, particles per point (chains for ``ais``; unused by ``exact``).
    :param batch_size: data points per pass.
    :param max_memory_mb: memory for one chunk of particles (``elbo``, ``iwae``, ``is``).
    :param seed: fixes the draws; the estimate does not depend on ``max_memory_mb``.
    :param opts: estimator options (``ais``: ``num_steps`` and others, passed through).
    :raises UserError: unknown estimator, bad sizes, global latents, no exact marginal.
    """
    key = _check_estimator(estimator)
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] == 0:
        raise UserError("no data points to evaluate; check the split and --limit")
    for label, value in (("--samples", num_samples), ("batch_size", batch_size)):
        if int(value) < 1:
            raise UserError(f"{label} must be at least 1, got {value}")
    if not max_memory_mb > 0:
        raise UserError(f"max_memory_mb must be positive, got {max_memory_mb}")
    if opts and key != "ais":
        raise UserError(f"estimator {key!r} takes no options {sorted(opts)}")
    num_samples, batch_size = int(num_samples), int(batch_size)

    start = time.perf_counter()
    # fork_rng: the estimators' own draws (and the traces that inspect the model) leave the
    # caller's torch RNG stream where it was.
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        program, info = _program(lvm, x)
        if key == "exact":
            from .exact import exact_log_marginal
            per_point, extras = exact_log_marginal(program, x, batch_size)
        elif key == "ais":
            per_point, extras = _annealed_importance_sampling(program, x, num_samples, seed, opts)
        else:
            from .importance_sampling import importance_sampling_log_marginal
            from .importance_weights import vectorizes

            # A guide of point masses (AutoDelta) draws the same values for every particle: one is exact.
            particles = 1 if info.point_mass_guide or not info.guide_latents else num_samples
            per_point, extras = importance_sampling_log_marginal(
                program.model, program.guide, x, particles, batch_size, max_memory_mb, seed,
                info.max_plate_nesting, statistic=key, batches=list(program.batches(x, batch_size)),
                data_plate=info.data_plate.name, vectorize=particles > 1 and vectorizes(program, x))
            if particles != num_samples:
                extras["particles_used"] = particles
        extras = {**predictive_extras(info), **extras}
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - start

    per_point = per_point.detach().reshape(-1).to(x.device)
    n = per_point.numel()
    log_px = float(per_point.double().mean())
    stderr = float(per_point.double().std() / math.sqrt(n)) if n > 1 else 0.0
    return LogMarginalEstimate(per_point, log_px, stderr, key, num_samples, seconds, dict(extras or {}))


__all__ = ["ESTIMATORS", "LogMarginalEstimate", "estimate_log_marginal"]
