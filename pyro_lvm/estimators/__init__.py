"""Per-data-point estimates of log p(x), chosen by name, with their Monte Carlo error.

:func:`estimate_log_marginal` returns one estimate per data point, their mean and the standard
error of that mean over points, and the estimator's own Monte Carlo standard error, per point and
of the mean. The estimators (see :data:`ESTIMATORS`):

- ``elbo``: (1/K) sum_k log w_k, the K-sample average of the log importance weights; a lower bound
  in expectation, with gap KL(q(z|x) || p(z|x)).
- ``iwae``: log (1/K) sum_k w_k, the K-sample importance-weighted bound (Burda et al., 2015).
- ``is``: the same statistic used as an estimate of log p(x), for large K (thousands), streamed in
  memory-bounded chunks, with the effective sample size and PSIS k-hat of the weights
  (:mod:`pyro_lvm.estimators.importance_sampling`).
- ``exact``: the model's ``log_marginal``, or enumeration when every latent is enumerated
  (:mod:`pyro_lvm.estimators.exact`).
- ``ais``: annealed importance sampling (:mod:`pyro_lvm.estimators.ais`), ``num_samples`` chains,
  ``ais_steps`` annealing steps.

The weights w_k = p(x, z_k) / q(z_k | x), z_k ~ q, come from
:mod:`pyro_lvm.estimators.importance_weights`; enumerated discrete sites are summed out exactly, and
a model whose latents are all enumerated (the guide draws nothing) gets its exact log p(x) from
every estimator, at the cost of one particle. The Monte Carlo standard errors come from the weights
(the chains' weights for AIS), by the delta method for a log of a mean
(:mod:`pyro_lvm.estimators.monte_carlo`); ``target_mc_error`` doubles K for the points above it
(:mod:`pyro_lvm.estimators.refinement`).

Everything runs on ``x``'s device under ``torch.no_grad()``, with ``seed`` fixing the draws without
touching the caller's RNG (``torch.random.fork_rng``). Models run unscaled and in whatever
train/eval mode the caller left them; per-point values come back in the model's dtype.
"""

import dataclasses
import difflib
import math
import time

import torch

from ..errors import UserError
from .monte_carlo import stderr_of_mean
from .progress import Progress, as_progress

ESTIMATORS = {
    "elbo": "evidence lower bound: mean of K log importance weights per point",
    "iwae": "importance-weighted bound: log of the mean of K importance weights per point",
    "is": "importance sampling with the guide as proposal, K particles, with ESS and Pareto k-hat",
    "exact": "exact log p(x): the model's log_marginal, or enumeration of its discrete latents",
    "ais": "annealed importance sampling from the prior to the posterior, K chains",
}

#: The statistic of the weights each sampling estimator reports.
STATISTIC = {"elbo": "mean_log", "iwae": "log_mean_exp", "is": "log_mean_exp", "ais": "log_mean_exp"}


@dataclasses.dataclass
class LogMarginalEstimate:
    """log p(x) per data point, with its mean, the standard error of that mean over points, and the
    estimator's own Monte Carlo standard error (nats).

    ``per_point_mc_stderr`` ``[N]``: each point's Monte Carlo standard error (0 for exact values,
    NaN where undefined, as with one particle); ``mc_stderr``: that of ``log_px``;
    ``samples_per_point`` ``[N]``: the particles (AIS: chains) each point took, or ``None`` for ``exact``;
    ``per_point_khat`` ``[N]``: each point's PSIS k-hat of its importance weights (``is`` only, else ``None``).
    """

    per_point: torch.Tensor
    log_px: float
    stderr: float
    estimator: str
    num_samples: int
    seconds: float
    extras: dict = dataclasses.field(default_factory=dict)
    per_point_mc_stderr: torch.Tensor = None
    mc_stderr: float = math.nan
    samples_per_point: torch.Tensor = None
    per_point_khat: torch.Tensor = None


def summarize(per_point, per_point_mc_stderr, samples_per_point, estimator, num_samples, seconds, extras,
              per_point_khat=None):
    """A :class:`LogMarginalEstimate` from per-point values: means and standard errors."""
    per_point = per_point.detach().reshape(-1)
    n = per_point.numel()
    log_px = float(per_point.double().mean())
    stderr = float(per_point.double().std() / math.sqrt(n)) if n > 1 else 0.0
    mc_stderr = stderr_of_mean(per_point_mc_stderr.double().pow(2))
    return LogMarginalEstimate(per_point, log_px, stderr, estimator, num_samples, seconds, dict(extras or {}),
                               per_point_mc_stderr, mc_stderr, samples_per_point, per_point_khat)


def _check_estimator(name):
    key = str(name).strip().lower()
    if key not in ESTIMATORS:
        close = difflib.get_close_matches(key, list(ESTIMATORS), n=2, cutoff=0.4)
        hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(ESTIMATORS)}"
        raise UserError(f"unknown estimator {name!r}; {hint}")
    return key


def _check_target(key, target_mc_error, max_samples, num_samples):
    if target_mc_error is None:
        if max_samples is not None:
            raise UserError("--max-samples caps --target-mc-error; give --target-mc-error EPS as well")
        return
    if isinstance(target_mc_error, bool) or not isinstance(target_mc_error, (int, float)) \
            or not math.isfinite(target_mc_error) or target_mc_error <= 0:
        raise UserError(f"--target-mc-error must be a positive number of nats, got {target_mc_error!r}")
    if key == "iwae":
        raise UserError("the iwae bound changes with K, so --target-mc-error cannot add particles to it; use "
                        "--estimator is (the same statistic, as an estimate of log p(x)) or elbo")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < num_samples):
        raise UserError(f"--max-samples must be an integer >= --samples ({num_samples}), got {max_samples!r}")


def _program(lvm, x):
    """The :class:`~pyro_lvm.protocol.Program` of ``lvm`` and its info, refusing what has no per-point
    estimate on these points (a guide that keeps one parameter per training point, on other points;
    a guide that draws local latents from one draw over all points)."""
    from ..protocol import as_program
    from .importance_weights import ensure_info

    program = as_program(lvm)
    info = ensure_info(program, x)
    if info.coverage_problem:
        raise UserError(info.coverage_problem)
    check_per_point_guide(program, x)
    check_factorizing_guide(program)
    return program, info


def check_per_point_guide(program, x):
    """A guide with one parameter per training point (an ``AutoNormal`` over local latents) has nothing
    to say about other points: refuse them, with the fix."""
    info = program.info
    if not program.has_posterior_for(x):
        raise UserError(f"the guide of {program.program_name} keeps one parameter per training point "
                        f"({', '.join(info.per_point_parameters[:3])}), so it has no posterior for other points; "
                        f"use an amortized guide (an encoder of x) to estimate log p(x) on new data, or "
                        f"evaluate --split train")


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


def predictive_extras(info):
    """JSON keys that say what a per-point estimate means when the model has global latents."""
    names = [s.name for s in info.global_latents if s.in_guide]
    if not names:
        return {}
    return {"quantity": "predictive log p(x_n | training data) = log E_q(theta) p(x_n | theta)",
            "global_latents": names}


def _importance_sampler(program, x, key, batch_size, max_memory_mb, progress):
    """``sample(batches, K, seed)`` for ``elbo``, ``iwae`` and ``is``; its chunk planner; and whether
    the guide draws nothing (then every particle's weight is the exact log p(x)). A guide of point
    masses (``AutoDelta``) draws the same values for every particle: one particle is computed, as for
    a guide that draws nothing."""
    from .importance_sampling import ChunkPlanner, enumerated_statistics, importance_sampling_statistics
    from .importance_weights import vectorizes

    info = program.info
    max_plate_nesting, plate = info.max_plate_nesting, info.data_plate.name
    planner = ChunkPlanner(max_memory_mb, x.device)
    drawn = [s for s in info.guide_latents if not s.enumerated] or info.guide_only_sites
    enumerated = not drawn
    constant = enumerated or info.point_mass_guide
    vectorize = constant or vectorizes(program, x)

    def sample(batches, num_samples, seed):
        if constant:
            stats = enumerated_statistics(program.model, program.guide, batches, num_samples, max_plate_nesting,
                                          progress, data_plate=plate)
            return stats, ({"exact_enumeration": True} if enumerated else {"point_mass_guide": True}), None, None
        stats, khat, kept = importance_sampling_statistics(program.model, program.guide, batches, num_samples, seed,
                                                           max_plate_nesting, planner, khat=key == "is",
                                                           progress=progress, data_plate=plate, vectorize=vectorize)
        return stats, {}, khat, kept

    return sample, planner, enumerated


def _sampling_estimate(lvm, x, key, num_samples, batch_size, max_memory_mb, seed, opts, target, max_samples,
                       progress):
    """Per-point estimates, Monte Carlo errors and extras of a sampling estimator (all but exact)."""
    from .refinement import DEFAULT_CAP_FACTOR, sample_with_target

    statistic = STATISTIC[key]
    # The program's own batches: for a self-subsampling plate its subsample size (the last padded),
    # for a guide with one parameter per point all the points at once.
    batches = [(index, batch) for index, (batch, _) in enumerate(lvm.batches(x, batch_size))]
    if target is not None and (lvm.subsampling or lvm.info.per_point_guide):
        raise UserError("--target-mc-error adds particles to some points of a batch, which a self-subsampling "
                        "plate or a guide with one parameter per point cannot take; leave it out and raise --samples")
    if target is not None and max_samples is None:
        max_samples = DEFAULT_CAP_FACTOR * num_samples
    if key == "ais":
        try:
            from .ais import ais_statistics, check_ais_options
        except ImportError as err:
            raise UserError(f"the ais estimator is not available ({err}); use --estimator is") from None
        options = check_ais_options(opts)

        def sample(batches, chains, seed_):
            stats, extras = ais_statistics(lvm, batches, chains, seed_, options, progress)
            return stats, extras, None, None

        steps = int(options["ais_steps"]) if isinstance(options["schedule"], str) else len(options["schedule"]) - 1
        cost = lambda points, chains: points * chains * max(steps, 1)  # noqa: E731
        result = sample_with_target(sample, x, batch_size, num_samples, statistic, seed, target, max_samples,
                                    cost, progress, batches=batches)
        extras = _ais_extras(result)
        khat = None
    else:
        sample, planner, enumerated = _importance_sampler(lvm, x, key, batch_size, max_memory_mb, progress)
        result = sample_with_target(sample, x, batch_size, num_samples, statistic, seed, target, max_samples,
                                    None, progress, batches=batches)
        from .importance_sampling import sampling_extras

        khat = result.khat
        khat_samples = int(result.khat_samples.min()) if result.khat is not None else None
        extras = sampling_extras(result.stats, planner, result.khat, khat_samples)
        if key == "is" and result.khat is None:
            extras.update({"khat_max": None, "khat_frac_above_0.7": None, "khat_samples": 0})
        if enumerated:
            extras["exact_enumeration"] = True
    stats = result.stats
    per_point = stats.estimate(statistic).to(stats.dtype)
    per_point_mc = stats.mc_stderr(statistic).to(stats.dtype)
    mc = per_point_mc.double()
    extras["mc_stderr_max"] = float(mc.max()) if bool(torch.isfinite(mc).all()) else math.nan
    if target is not None:
        samples = result.samples_per_point
        extras.update({"target_mc_error": float(target), "max_samples": int(max_samples),
                       "rounds": result.rounds, "samples_total": int(samples.sum()), "samples_max": int(samples.max()),
                       "points_refined": int((samples > num_samples).sum()),
                       "points_above_target": result.above_target})
    khat = None if khat is None else torch.as_tensor(khat, dtype=torch.float64)
    return per_point, per_point_mc, result.samples_per_point.to(x.device), extras, khat


def _ais_extras(result):
    """AIS's extras over all rounds: the acceptance rate and step size averaged over every annealed
    point and chain."""
    first = result.extras[0]
    extras = {"num_chains": first["num_chains"], "ais_steps": first["ais_steps"]}
    weights = [e["num_chains"] * e["annealed_points"] for e in result.extras]
    for key in ("acceptance_rate", "step_size_mean"):
        extras[key] = (sum(e[key] * w for e, w in zip(result.extras, weights)) / sum(weights) if sum(weights)
                       else first[key])
    extras["log_weight_ess"] = float(result.stats.effective_sample_size().mean())
    if any(e.get("exact_enumeration") for e in result.extras):
        extras["exact_enumeration"] = True
    return extras


def estimate_log_marginal(lvm, x, estimator="is", num_samples=1000, batch_size=100, max_memory_mb=512,
                          seed=0, target_mc_error=None, max_samples=None, progress=False, **opts):
    """Estimate log p(x_n) for every row of ``x`` with ``lvm`` (a model following the protocol).

    :param x: tensor [N, *data_shape] on the model's device.
    :param estimator: a key of :data:`ESTIMATORS`.
    :param num_samples: K, particles per point (chains for ``ais``; unused by ``exact``).
    :param batch_size: data points per pass.
    :param max_memory_mb: memory for one chunk of particles (``elbo``, ``iwae``, ``is``).
    :param seed: fixes the draws; the estimate does not depend on ``max_memory_mb``.
    :param target_mc_error: EPS in nats: double K for the points whose Monte Carlo standard error
        exceeds it, up to ``max_samples`` (default 64 K) particles per point
        (:mod:`pyro_lvm.estimators.refinement`; not for ``iwae``, whose value depends on K).
    :param progress: a bar on stderr when it is a terminal (``True``, or a :class:`Progress`).
    :param opts: AIS's options (:data:`pyro_lvm.estimators.ais.AIS_OPTIONS`: ``ais_steps``,
        ``proposal``, ``schedule``, ``hmc_step_size``, ``leapfrog_steps``, ``adapt_step_size``).
    :raises UserError: unknown estimator or option, bad sizes, global latents, no exact marginal.
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
        raise UserError(f"estimator {key!r} takes no options {sorted(opts)} (they are AIS's)")
    num_samples, batch_size = int(num_samples), int(batch_size)
    _check_target(key, target_mc_error, max_samples, num_samples)

    start = time.perf_counter()
    # fork_rng: the estimators' own draws (and the traces that inspect the model) leave the
    # caller's torch RNG stream where it was.
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), as_progress(progress) as bar:
        torch.manual_seed(seed)
        program, info = _program(lvm, x)
        if key == "exact":
            from .exact import exact_log_marginal
            per_point, extras = exact_log_marginal(program, x, batch_size)
            per_point = per_point.detach().reshape(-1).to(x.device)
            per_point_mc, samples, khat = torch.zeros_like(per_point), None, None
        else:
            per_point, per_point_mc, samples, extras, khat = _sampling_estimate(
                program, x, key, num_samples, batch_size, max_memory_mb, seed, opts, target_mc_error, max_samples,
                bar)
        extras = {**predictive_extras(info), **extras}
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - start
    return summarize(per_point.to(x.device), per_point_mc.to(x.device), samples, key, num_samples, seconds, extras,
                     per_point_khat=khat)


__all__ = ["ESTIMATORS", "LogMarginalEstimate", "Progress", "check_factorizing_guide", "check_per_point_guide",
           "estimate_log_marginal", "predictive_extras", "summarize"]
