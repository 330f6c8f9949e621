"""Annealed importance sampling (AIS) of log p(x), and bidirectional Monte Carlo (BDMC) bounds.

**AIS** (Neal, 2001) estimates the normalising constant of the posterior, ``p(x) = int p(z) p(x|z) dz``,
by moving samples from a tractable proposal ``p0(z)`` to the posterior through a sequence of
intermediate densities indexed by ``0 = beta_0 < beta_1 < ... < beta_T = 1``::

    f_t(z) = p0(z)^(1 - beta_t) * p(x, z)^beta_t

With the prior as proposal, ``p0(z) = p(z)``, this is ``f_t(z) = p(z) p(x|z)^beta_t``; with
``proposal="guide"`` it is ``p0(z) = q(z|x)``. A chain starts at ``z_0 ~ p0`` and, for
``t = 1 .. T``, accumulates the log weight and then moves with a Markov kernel ``T_t`` that leaves
``f_t`` invariant::

    log w += (beta_t - beta_{t-1}) * (log p(x, z_{t-1}) - log p0(z_{t-1})),     z_t ~ T_t(z_{t-1}, .)

Then ``E[w] = p(x)`` exactly, whatever the kernels' mixing, so ``log p(x)`` is estimated per data
point by ``logsumexp_c log w_c - log C`` over ``C`` independent chains: a stochastic lower bound
(Jensen), which tightens as ``T`` grows. ``T = 1`` is plain importance sampling from ``p0``.

The kernels are Hamiltonian Monte Carlo (Neal, 2011): ``leapfrog_steps`` leapfrog steps with a
Metropolis correction, vectorized over chains and data points (states are tensors
``[chains, points, dim]``). Continuous latent sites of any support with a bijection to the reals
(``torch.distributions.biject_to``) are flattened into one unconstrained vector per data point; the
log-determinant of the Jacobian enters every ``f_t`` (it cancels in the weights). Discrete latent
sites marked ``infer={"enumerate": "parallel"}`` are summed out exactly inside ``p(z)`` and
``p(x, z)``, so AIS runs over the continuous latents only; a model with no continuous latents gets
its exact log p(x) by enumeration.

**Schedule.** The default is the sigmoidal schedule of Grosse et al. (2015), also used by Wu et
al. (2017): with ``s(t) = sigmoid(delta * (2 t / T - 1))`` and ``delta = 4``,
``beta_t = (s(t) - s(0)) / (s(T) - s(0))``. It spends more steps near ``beta = 0`` and
``beta = 1``, where the intermediate densities change fastest in the usual models.

**Step-size adaptation.** With ``adapt_step_size=True`` each data point has its own step size,
multiplied by 1.02 after a transition whose acceptance rate (averaged over that point's chains)
exceeded 0.65 and by 0.98 otherwise, within ``[1e-4, 0.5]`` (the rule of Wu et al., 2017). Kernels
chosen from the chains' past make the estimator very slightly biased in principle; the effect is
negligible in practice, and ``adapt_step_size=False`` keeps AIS exactly unbiased.

**BDMC** (Grosse et al., 2015): on data simulated from the model, ``(z*, x) ~ p(z) p(x|z)``, the
latent ``z*`` is an exact posterior sample. Running AIS in reverse, from ``z*`` at ``beta = 1``
down to ``beta = 0``, gives weights with ``E[w_rev] = 1 / p(x)``, so ``-log mean_c w_rev`` is a
stochastic upper bound on ``log p(x)``; together with forward AIS this sandwiches the true value,
and the gap bounds the error of AIS with the same schedule on data like the simulated data. The
reverse chains replay the forward run's step sizes in reverse order, so their kernels are fixed.

References:

[1] Radford M. Neal, "Annealed importance sampling", Statistics and Computing 11 (2001).
[2] Radford M. Neal, "MCMC using Hamiltonian dynamics", Handbook of Markov Chain Monte Carlo (2011).
[3] Roger B. Grosse, Zoubin Ghahramani, Ryan P. Adams, "Sandwiching the marginal likelihood
    using bidirectional Monte Carlo", arXiv:1511.02543 (2015).
[4] Yuhuai Wu, Yuri Burda, Ruslan Salakhutdinov, Roger Grosse, "On the quantitative analysis of
    decoder-based generative models", ICLR (2017).
"""

import contextlib
import math

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch
from torch.distributions import biject_to

from pyro_lvm.errors import UserError
from pyro_lvm.protocol.plates import plate_frame

__all__ = ["annealed_importance_log_marginal", "annealing_schedule", "bdmc"]

CHAIN_PLATE = "chains"

SIGMOID_SCHEDULE_RADIUS = 4.0
TARGET_ACCEPTANCE_RATE = 0.65
STEP_SIZE_FACTOR = 1.02
MIN_STEP_SIZE, MAX_STEP_SIZE = 1e-4, 0.5

_AIS_OPTIONS = ("proposal", "schedule", "hmc_step_size", "leapfrog_steps", "adapt_step_size")


def annealing_schedule(num_steps, schedule="sigmoid"):
    """The inverse temperatures ``beta_0 = 0 <= ... <= beta_T = 1``, a float64 tensor of length T+1.

    :param int num_steps: the number of annealing steps ``T``.
    :param schedule: ``"sigmoid"`` (Grosse et al. 2015), ``"linear"``, or an explicit non-decreasing
        sequence from 0 to 1 (then ``num_steps`` is ignored).
    """
    if not isinstance(schedule, str):
        betas = torch.as_tensor(schedule, dtype=torch.float64).flatten()
        if (
            betas.numel() < 2
            or betas[0].item() != 0.0
            or betas[-1].item() != 1.0
            or bool((betas.diff() < 0).any())
        ):
            raise UserError(
                "an explicit AIS schedule must be a non-decreasing sequence from 0 to 1 "
                "with at least two entries"
            )
        return betas
    if int(num_steps) < 1:
        raise UserError(f"AIS needs num_steps >= 1, got {num_steps}")
    fraction = torch.linspace(0.0, 1.0, int(num_steps) + 1, dtype=torch.float64)
    if schedule == "linear":
        return fraction
    if schedule == "sigmoid":
        s = torch.sigmoid(SIGMOID_SCHEDULE_RADIUS * (2.0 * fraction - 1.0))
        betas = (s - s[0]) / (s[-1] - s[0])
        betas[0], betas[-1] = 0.0, 1.0  # exact end points despite rounding
        return betas
    raise UserError(f"unknown AIS schedule {schedule!r}; use 'sigmoid', 'linear' or a sequence of betas")


class _ContinuousSite:
    """One continuous local latent site, and where it sits in the flat unconstrained vector.

    ``batch_shape`` is the site's batch shape over the program's plates (``max_plate_nesting`` dims,
    the data plate at ``data_dim``); in the state, a point's part of the site (the data plate's dim
    taken out, the other plate dims and the unconstrained event flattened) is ``size`` numbers.
    """

    def __init__(self, name, event_shape, transform, batch_shape, unconstrained_event_shape, data_dim, offset):
        self.name = name
        self.event_shape = event_shape
        self.transform = transform
        self.batch_shape = batch_shape
        self.unconstrained_event_shape = unconstrained_event_shape
        self.data_axis = len(batch_shape) + data_dim  # index of the data plate in batch_shape
        self.rest_shape = tuple(s for i, s in enumerate(batch_shape) if i != self.data_axis)
        self.size = math.prod(self.rest_shape + unconstrained_event_shape)
        self.offset = offset


class _AnnealingTarget:
    """The densities AIS needs for one batch of data, per chain and data point, from Pyro traces.

    For an unconstrained state ``u`` of shape ``[chains, points, dim]`` it computes
    ``a0 = log p0(z(u)) + log|dz/du|`` and ``a1 = log p(x, z(u)) + log|dz/du|``, so that
    ``log f_beta(u) = (1 - beta) a0 + beta a1``, and the gradient of ``log f_beta`` in ``u``.
    The chains run in ``pyro.plate("chains", C, dim=-(max_plate_nesting + 1))``, left of every plate
    of the program (``vectorized=False``: one chain, no chain plate, for a program that does not
    broadcast over a dim on the left); enumerated sites go further left and are summed out by the
    variable elimination of :mod:`.importance_weights` (plates and ``pyro.markov`` chains included).
    """

    def __init__(self, lvm, x, num_chains, proposal, vectorized=True):
        if proposal not in ("prior", "guide"):
            raise UserError(f"unknown AIS proposal {proposal!r}; use 'prior' or 'guide'")
        program, info = _program(lvm, x)
        self.lvm = program
        self.data_plate = info.data_plate.name
        self.data_dim = info.data_plate.dim
        self.max_plate_nesting = info.max_plate_nesting
        self.chain_dim = -(info.max_plate_nesting + 1)
        self.first_enum_dim = -(info.max_plate_nesting + 2)
        self.observed_names = set(info.observed_names)
        # Discrete sites that the guide enumerates are summed out of p(z) and p(x, z) here, as the model's own.
        guide_enumerated = {s.name for s in info.guide_enumerated}
        self.model = program.model if not guide_enumerated else poutine.infer_config(
            program.model, lambda msg: {"enumerate": "parallel"} if msg["name"] in guide_enumerated else {})
        self.x = x
        self.vectorized = vectorized
        self.num_chains = num_chains if vectorized else 1
        self.num_points = len(x)
        self.proposal = proposal
        self._inspect_model()
        if proposal == "guide" and self.sites:
            self._inspect_guide()

    def _chains(self):
        if not self.vectorized:
            return contextlib.nullcontext()
        return pyro.plate(CHAIN_PLATE, self.num_chains, dim=self.chain_dim)

    # ----- what the model is, from a trace -----

    def _check_plates(self, site, owner):
        if plate_frame(site, self.data_plate) is None:
            raise UserError(
                f"site {site['name']!r} of the {owner} is outside pyro.plate({self.data_plate!r}) (a global "
                "site); AIS anneals the latents of each data point and cannot anneal a global latent: use "
                "--estimator is, which estimates the predictive log p(x_n | training data)"
            )

    def _inspect_model(self):
        with torch.no_grad():
            trace = poutine.trace(self.model).get_trace(self.x)
        self.sites, self.enumerated_names = [], []
        offset = 0
        mpn = self.max_plate_nesting
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                continue
            self._check_plates(site, "model")
            enumerate_ = site["infer"].get("enumerate")
            if enumerate_ == "parallel":
                self.enumerated_names.append(name)
                continue
            if enumerate_ is not None:
                raise UserError(
                    f"latent site {name!r} is marked enumerate={enumerate_!r}; AIS sums out "
                    "discrete latents with parallel enumeration only: mark it infer={'enumerate': 'parallel'}"
                )
            fn, value = site["fn"], site["value"]
            if fn.support.is_discrete:
                raise UserError(
                    f"latent site {name!r} is discrete and not enumerated; HMC cannot move it: mark it "
                    "infer={'enumerate': 'parallel'} so that it is summed out exactly"
                )
            batch = tuple(fn.batch_shape)
            batch = (1,) * (mpn - len(batch)) + batch
            if batch[len(batch) + self.data_dim] != self.num_points:
                raise UserError(
                    f"latent site {name!r} has batch shape {tuple(fn.batch_shape)}, which does not follow the "
                    f"{self.num_points} points of pyro.plate({self.data_plate!r}); use --estimator is"
                )
            try:
                transform = biject_to(fn.support)
            except NotImplementedError:
                raise UserError(
                    f"latent site {name!r} has support {fn.support}, which has no bijection to the "
                    "reals; AIS runs HMC on unconstrained continuous latents only"
                ) from None
            full = value.expand(batch + tuple(fn.event_shape))
            unconstrained_event_shape = tuple(transform.inv(full).shape[len(batch):])
            site_info = _ContinuousSite(name, tuple(fn.event_shape), transform, batch, unconstrained_event_shape,
                                        self.data_dim, offset)
            self.sites.append(site_info)
            offset += site_info.size
        for name in self.observed_names:
            if name in trace.nodes:
                self._check_plates(trace.nodes[name], "model")
        self.latent_dim = offset
        self.latent_names = {site.name for site in self.sites} | set(self.enumerated_names)

    def _inspect_guide(self):
        with torch.no_grad():
            trace = poutine.trace(self.lvm.guide).get_trace(self.x)
        guide_sites = [
            site for site in trace.nodes.values() if site["type"] == "sample" and not site_is_subsample(site)
        ]
        guide_names = {site["name"] for site in guide_sites}
        continuous_names = {site.name for site in self.sites}
        if guide_names != continuous_names:
            raise UserError(
                f"proposal='guide' needs a guide that samples exactly the model's continuous latents "
                f"{sorted(continuous_names)}; this guide samples {sorted(guide_names)}"
            )
        for site in guide_sites:
            self._check_plates(site, "guide")

    # ----- states -----

    def _with_chain_dim(self, value, site, event_dims):
        """A site's value as ``[C, *batch_shape, *event]`` (the chain dim added where there is none)."""
        batch_dims = len(site.batch_shape) + (1 if self.vectorized else 0)
        while value.dim() - event_dims < batch_dims:
            value = value.unsqueeze(0)
        if not self.vectorized:
            value = value.unsqueeze(0)
        return value.expand((self.num_chains,) + site.batch_shape + tuple(value.shape[value.dim() - event_dims:]))

    def pack(self, values):
        """Constrained values ``{name: [C, *batch, *event]}`` to the unconstrained state ``[C, n, dim]``."""
        parts = []
        for site in self.sites:
            u = site.transform.inv(values[site.name])
            u = self._with_chain_dim(u, site, len(site.unconstrained_event_shape))
            u = u.movedim(1 + site.data_axis, 1)
            parts.append(u.reshape(self.num_chains, self.num_points, site.size))
        return torch.cat(parts, dim=-1)

    def unpack(self, u):
        """The unconstrained state to constrained values ``{name: [C, *batch, *event]}`` (without the
        chain dim for a single chain run without a chain plate) and ``log|dz/du|`` of shape ``[C, n]``."""
        from .importance_weights import point_view

        values, log_det = {}, 0.0
        for site in self.sites:
            u_site = u[..., site.offset : site.offset + site.size].reshape(
                u.shape[:2] + site.rest_shape + site.unconstrained_event_shape
            )
            u_site = u_site.movedim(1, 1 + site.data_axis)
            z_site = site.transform(u_site)
            ladj = site.transform.log_abs_det_jacobian(u_site, z_site)
            extra = ladj.dim() - (1 + len(site.batch_shape))
            if extra > 0:
                ladj = ladj.sum(tuple(range(-extra, 0)))
            log_det = log_det + point_view(ladj, self.data_dim, self.max_plate_nesting)
            values[site.name] = z_site if self.vectorized else z_site[0]
        return values, log_det

    def sample_proposal(self):
        """``[C, n, dim]`` unconstrained draws from ``p0``: the prior by ancestral sampling, or the guide."""
        program = self.model if self.proposal == "prior" else self.lvm.guide
        with torch.no_grad(), self._chains():
            trace = poutine.trace(program).get_trace(self.x)
        values = {site.name: trace.nodes[site.name]["value"] for site in self.sites}
        return self.pack(values)

    # ----- densities -----

    def _per_chain(self, log_prob):
        from .importance_weights import point_view

        return point_view(log_prob, self.data_dim, self.max_plate_nesting).reshape(self.num_chains, self.num_points)

    def _model_log_densities(self, values):
        """``log p(z)`` and ``log p(x, z)`` at continuous latents ``values``, discrete ones summed out."""
        from .importance_weights import model_log_density

        model = poutine.enum(poutine.condition(self.model, data=values), first_available_dim=self.first_enum_dim)
        with self._chains():
            trace = poutine.trace(model).get_trace(self.x)
        mpn, chains = self.max_plate_nesting, self.num_chains
        plate = CHAIN_PLATE if self.vectorized else None
        log_joint, _, _ = model_log_density(trace, set(), mpn, chains, data_plate=self.data_plate,
                                            particle_plate=plate)
        latent_trace = trace.copy()
        for name in self.observed_names:
            if name in latent_trace.nodes:
                latent_trace.remove_node(name)
        log_latent, _, _ = model_log_density(latent_trace, set(), mpn, chains, data_plate=self.data_plate,
                                             particle_plate=plate)
        expand = torch.zeros(chains, self.num_points, dtype=self.x.dtype, device=self.x.device)
        return log_latent + expand, log_joint + expand

    def _guide_log_density(self, values):
        with self._chains():
            trace = poutine.trace(poutine.condition(self.lvm.guide, data=values)).get_trace(self.x)
        trace.compute_log_prob()
        return sum(self._per_chain(trace.nodes[site.name]["log_prob"]) for site in self.sites)

    def log_densities(self, u, beta, with_grad=True):
        """``(a0, a1, grad_u log f_beta)`` at the unconstrained state ``u``; grad is None unless asked.

        Chains whose state is not finite (a diverging leapfrog trajectory) get ``a0 = a1 = -inf`` and
        a zero gradient, so that the Metropolis step rejects them.
        """
        finite = torch.isfinite(u).all(-1)
        u = torch.where(finite.unsqueeze(-1), u, torch.zeros_like(u)).detach()
        # Validation is off inside the trajectories: a far-out leapfrog state may give a distribution
        # parameters outside their support, and the Metropolis step, not an exception, should reject it.
        # The model was traced with validation on when the target was built.
        with torch.enable_grad(), pyro.validation_enabled(False):
            u.requires_grad_(with_grad)
            values, log_det = self.unpack(u)
            log_latent, log_joint = self._model_log_densities(values)
            log_p0 = self._guide_log_density(values) if self.proposal == "guide" else log_latent
            a0, a1 = log_p0 + log_det, log_joint + log_det
            grad = None
            if with_grad:
                log_f = (1.0 - beta) * a0 + beta * a1
                (grad,) = torch.autograd.grad(log_f.sum(), u, allow_unused=True)
                grad = torch.zeros_like(u) if grad is None else grad
                grad = torch.where(finite.unsqueeze(-1), grad, torch.zeros_like(grad))
        minus_inf = torch.full_like(a0, -math.inf)
        a0 = torch.where(finite, a0.detach(), minus_inf)
        a1 = torch.where(finite, a1.detach(), minus_inf)
        return a0, a1, grad

    def exact_log_marginal(self):
        """log p(x) per point by enumeration, for a model whose latents are all enumerated."""
        with torch.no_grad():
            _, log_joint = self._model_log_densities({})
        return log_joint[0]


def _hmc_transition(target, u, a0, a1, grad, beta, step_size, num_leapfrog):
    """One HMC move per chain and point, leaving ``f_beta`` invariant. Returns the new state and
    its ``a0, a1``, and the Metropolis acceptance probabilities ``[C, n]``."""
    eps = step_size.unsqueeze(-1)  # [n, 1], broadcasts against [C, n, dim]
    momentum = torch.randn_like(u)
    energy = -((1.0 - beta) * a0 + beta * a1) + 0.5 * momentum.pow(2).sum(-1)
    u_new = u
    p = momentum + 0.5 * eps * grad
    for step in range(num_leapfrog):
        u_new = u_new + eps * p
        a0_new, a1_new, grad_new = target.log_densities(u_new, beta)
        p = p + (eps if step < num_leapfrog - 1 else 0.5 * eps) * grad_new
    energy_new = -((1.0 - beta) * a0_new + beta * a1_new) + 0.5 * p.pow(2).sum(-1)
    log_accept = (energy - energy_new).nan_to_num(nan=-math.inf).clamp(max=0.0)
    accept_prob = log_accept.exp()
    accept = torch.rand_like(accept_prob) < accept_prob
    u = torch.where(accept.unsqueeze(-1), u_new, u)
    a0 = torch.where(accept, a0_new, a0)
    a1 = torch.where(accept, a1_new, a1)
    return u, a0, a1, accept_prob


def _anneal(target, u, betas, step_size, num_leapfrog, adapt_step_size, step_size_plan=None):
    """One AIS pass along ``betas`` from ``u ~ f_{betas[0]}``; returns log weights ``[C, n]`` and stats.

    ``step_size_plan`` (``[T-1, n]``) fixes the step size of every transition; otherwise they start
    at ``step_size`` and adapt if asked. The step sizes used are returned as ``"step_size_plan"``.
    """
    num_chains, num_points = u.shape[:2]
    log_weight = torch.zeros(num_chains, num_points, dtype=u.dtype, device=u.device)
    eps = torch.full((num_points,), float(step_size), dtype=u.dtype, device=u.device)
    used_step_sizes, acceptance_rates = [], []
    num_transitions = len(betas) - 2  # the move after the last weight update would be wasted
    for t in range(1, len(betas)):
        beta_prev, beta = float(betas[t - 1]), float(betas[t])
        needs_move = t <= num_transitions
        a0, a1, grad = target.log_densities(u, beta, with_grad=needs_move)
        if beta != beta_prev:
            increment = (beta - beta_prev) * (a1 - a0)
            # A chain whose state has no density under either end (-inf - -inf) carries no weight.
            log_weight = log_weight + torch.where(increment.isnan(), -math.inf, increment)
        if not needs_move:
            continue
        if step_size_plan is not None:
            eps = step_size_plan[t - 1]
        used_step_sizes.append(eps)
        u, a0, a1, accept_prob = _hmc_transition(target, u, a0, a1, grad, beta, eps, num_leapfrog)
        acceptance_rate = accept_prob.mean(0)
        acceptance_rates.append(acceptance_rate)
        if adapt_step_size and step_size_plan is None:
            factor = torch.where(acceptance_rate > TARGET_ACCEPTANCE_RATE, STEP_SIZE_FACTOR, 1.0 / STEP_SIZE_FACTOR)
            eps = (eps * factor).clamp(MIN_STEP_SIZE, MAX_STEP_SIZE)
    stats = {
        "acceptance_rate": float(torch.stack(acceptance_rates).mean()) if acceptance_rates else 1.0,
        "step_size_mean": float(torch.stack(used_step_sizes).mean()) if used_step_sizes else 0.0,
        "step_size_plan": torch.stack(used_step_sizes) if used_step_sizes else None,
    }
    return log_weight, stats


def _log_mean_exp(log_weight):
    return log_weight.logsumexp(0) - math.log(log_weight.shape[0])


def _effective_sample_size(log_weight):
    """Mean over points of the Kish effective sample size of the chains' weights."""
    ess = torch.exp(2.0 * log_weight.logsumexp(0) - (2.0 * log_weight).logsumexp(0))
    return float(ess.nan_to_num(nan=0.0).mean())


@contextlib.contextmanager
def _seeded(device, seed):
    """Runs under ``torch`` RNG state seeded with ``seed``, restoring the caller's state afterwards."""
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        torch.random.default_generator.manual_seed(int(seed))
        for index in cuda_devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        yield


def _check_options(num_chains, leapfrog_steps, hmc_step_size):
    if int(num_chains) < 1:
        raise UserError(f"AIS needs num_chains >= 1, got {num_chains}")
    if int(leapfrog_steps) < 1:
        raise UserError(f"AIS needs leapfrog_steps >= 1, got {leapfrog_steps}")
    if not float(hmc_step_size) > 0:
        raise UserError(f"AIS needs hmc_step_size > 0, got {hmc_step_size}")


def annealed_importance_log_marginal(
    lvm,
    x,
    num_chains=16,
    num_steps=200,
    proposal="prior",
    schedule="sigmoid",
    hmc_step_size=0.05,
    leapfrog_steps=10,
    adapt_step_size=True,
    seed=0,
):
    """Per-data-point AIS estimates of log p(x), a stochastic lower bound (see the module docstring).

    :param lvm: a model following the pyro-lvm protocol (``lvm.model(x)``, ``lvm.guide(x)``).
    :param torch.Tensor x: data ``[N, *data_shape]`` on the model's device; AIS runs on that device.
    :param int num_chains: independent AIS chains per data point.
    :param int num_steps: annealing steps ``T`` (``T = 1`` is importance sampling from the proposal).
    :param str proposal: ``"prior"`` (``p0 = p(z)``) or ``"guide"`` (``p0 = q(z|x)``).
    :param schedule: ``"sigmoid"``, ``"linear"`` or an explicit sequence of betas from 0 to 1.
    :param float hmc_step_size: the initial leapfrog step size, in the unconstrained space.
    :param int leapfrog_steps: leapfrog steps per HMC transition.
    :param bool adapt_step_size: adapt each point's step size toward an acceptance rate of 0.65.
    :param int seed: seeds a private RNG stream; the caller's RNG state is left untouched.
    :returns: ``(per_point, extras)``: a tensor ``[N]`` on the device of ``x``, and a JSON-able dict
        with ``num_chains, num_steps, acceptance_rate, step_size_mean, log_weight_ess``.
    """
    _check_options(num_chains, leapfrog_steps, hmc_step_size)
    betas = annealing_schedule(num_steps, schedule)
    num_chains = int(num_chains)
    program, info = _program(lvm, x)
    drawn_globals = [s.name for s in info.global_latents if s.in_guide and not s.point_mass]
    if drawn_globals:
        raise UserError(f"{', '.join(map(repr, drawn_globals))} are global latents (outside the data plate); AIS "
                        f"anneals the latents of each data point and cannot anneal a global one: use --estimator "
                        f"is, which estimates the predictive log p(x_n | training data)")
    if not [s for s in info.latent_sites if s.local and not s.enumerated and not s.discrete]:
        # Nothing continuous to anneal (a mixture, an HMM): log p(x) is exact by enumeration.
        from .exact import exact_log_marginal

        per_point, _ = exact_log_marginal(program, x, 100)
        return per_point, _exact_extras(num_chains)
    from .importance_weights import vectorizes

    # Chains run vectorized in a plate left of the program's; a program that does not broadcast over
    # such a dim runs them one at a time, each from its own seed. A self-subsampling data plate is
    # annealed batch by batch (its subsample size); any other, all points at once.
    vectorized = vectorizes(program, x)
    runs = [(c, 1) for c in range(num_chains)] if not vectorized else [(0, num_chains)]
    batches = list(program.batches(x, len(x))) if info.data_plate.kind == "subsampling" else [(x, len(x))]
    per_point, weights, all_stats = [], [], []
    for batch, valid in batches:
        batch_weights = []
        for offset, chains in runs:
            with _seeded(x.device, seed + offset), torch.no_grad():
                target = _AnnealingTarget(program, batch, chains, proposal, vectorized=vectorized)
                log_weight, stats = _anneal(
                    target, target.sample_proposal(), betas, hmc_step_size, int(leapfrog_steps), adapt_step_size
                )
            batch_weights.append(log_weight[:, :valid])
            all_stats.append(stats)
        log_weight = torch.cat(batch_weights, dim=0)
        weights.append(log_weight)
        per_point.append(_log_mean_exp(log_weight))
    log_weight = torch.cat(weights, dim=-1)
    # Monte Carlo error of log mean_c w_c per point, by the delta method, on the mean over points.
    relative = ((2 * log_weight).logsumexp(0) - 2 * log_weight.logsumexp(0) + math.log(log_weight.shape[0])).exp() - 1
    variance = relative.clamp_min(0.0).nan_to_num(0.0) / max(log_weight.shape[0] - 1, 1)
    extras = {
        "mc_stderr": float(variance.double().sum().sqrt() / log_weight.shape[1]),
        "num_chains": num_chains,
        "num_steps": len(betas) - 1,
        "acceptance_rate": sum(s["acceptance_rate"] for s in all_stats) / len(all_stats),
        "step_size_mean": sum(s["step_size_mean"] for s in all_stats) / len(all_stats),
        "log_weight_ess": _effective_sample_size(log_weight),
    }
    if not vectorized:
        extras["chains_one_at_a_time"] = True
    return torch.cat(per_point), extras


def _exact_extras(num_chains):
    # With every latent enumerated there is nothing to anneal: log p(x) is exact and every
    # "chain" would carry the same weight.
    return {
        "mc_stderr": 0.0,
        "num_chains": num_chains,
        "num_steps": 0,
        "acceptance_rate": 1.0,
        "step_size_mean": 0.0,
        "log_weight_ess": float(num_chains),
        "exact_enumeration": True,
    }


def _program(lvm, x):
    """The program of ``lvm`` and its info (inspected on ``x`` the first time)."""
    from ..protocol import as_program
    from .importance_weights import ensure_info

    program = as_program(lvm)
    info = ensure_info(program, x) if x is not None and program.info is None else program.info
    return program, info


def _model_device(lvm):
    for tensor in list(lvm.parameters()) + list(lvm.buffers()):
        return tensor.device
    return torch.device("cpu")


def bdmc(lvm, num_points=50, num_chains=4, num_steps=200, seed=0, **ais_options):
    """Bidirectional Monte Carlo bounds on log p(x) for data simulated from the model.

    Draws ``(z*, x)`` from ``p(z) p(x|z)`` by ancestral sampling, then runs forward AIS on ``x``
    (a stochastic lower bound) and reverse AIS from ``z*`` (a stochastic upper bound), with the same
    schedule and the forward run's step sizes replayed in reverse.

    :param int num_points: simulated data points.
    :param ais_options: ``proposal, schedule, hmc_step_size, leapfrog_steps, adapt_step_size`` as in
        :func:`annealed_importance_log_marginal`.
    :returns: a JSON-able dict ``{"lower", "upper", "gap", "per_point_lower", "per_point_upper",
        "num_points", "num_chains", "num_steps"}`` (means over points, in nats), plus ``"exact"`` and
        ``"per_point_exact"``, the exact log p(x) of the simulated points, when the model has
        ``log_marginal`` (a check of the estimator on a model where the answer is known).
    """
    unknown = sorted(set(ais_options) - set(_AIS_OPTIONS))
    if unknown:
        raise UserError(f"unknown BDMC options {unknown}; known: {list(_AIS_OPTIONS)}")
    proposal = ais_options.get("proposal", "prior")
    schedule = ais_options.get("schedule", "sigmoid")
    hmc_step_size = ais_options.get("hmc_step_size", 0.05)
    leapfrog_steps = int(ais_options.get("leapfrog_steps", 10))
    adapt_step_size = ais_options.get("adapt_step_size", True)
    _check_options(num_chains, leapfrog_steps, hmc_step_size)
    if int(num_points) < 1:
        raise UserError(f"BDMC needs num_points >= 1, got {num_points}")
    num_chains, num_points = int(num_chains), int(num_points)
    betas = annealing_schedule(num_steps, schedule)

    with _seeded(_model_device(lvm), seed), torch.no_grad():
        from ..protocol import as_program
        from ..protocol.inspection import inspect_by_simulation

        program = as_program(lvm)
        inspect_by_simulation(program)
        _program(program, None)
        x, simulations = program.simulate(num_points)
        x = x.detach()
        simulation = simulations[0]
        target = _AnnealingTarget(program, x, num_chains, proposal)
        if target.sites:
            log_weight_forward, stats = _anneal(
                target, target.sample_proposal(), betas, hmc_step_size, leapfrog_steps, adapt_step_size
            )
            lower = _log_mean_exp(log_weight_forward)
            posterior_sample = {site.name: simulation.nodes[site.name]["value"].detach() for site in target.sites}
            plan = stats["step_size_plan"]
            log_weight_reverse, _ = _anneal(
                target,
                target.pack(posterior_sample),
                betas.flip(0),
                hmc_step_size,
                leapfrog_steps,
                adapt_step_size=False,
                step_size_plan=None if plan is None else plan.flip(0),
            )
            upper = -_log_mean_exp(log_weight_reverse)
        else:
            lower = upper = target.exact_log_marginal()
        exact = program.log_marginal(x) if callable(getattr(program, "log_marginal", None)) else None

    lower_mean, upper_mean = float(lower.double().mean()), float(upper.double().mean())
    result = {
        "lower": lower_mean,
        "upper": upper_mean,
        "gap": upper_mean - lower_mean,
        "per_point_lower": lower.tolist(),
        "per_point_upper": upper.tolist(),
        "num_points": num_points,
        "num_chains": num_chains,
        "num_steps": len(betas) - 1,
    }
    if exact is not None:
        result["exact"] = float(exact.mean())
        result["per_point_exact"] = exact.tolist()
    return result
