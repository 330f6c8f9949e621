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
(Jensen), which tightens as ``T`` grows. ``T = 1`` is plain importance sampling from ``p0``. ``T``
is ``ais_steps`` (``--ais-steps``); ``C`` is ``num_chains`` (``--samples``). The Monte Carlo
standard error of the estimate comes from the chains' weights, by the delta method
(:mod:`pyro_lvm.estimators.monte_carlo`).

The kernels are Hamiltonian Monte Carlo (Neal, 2011): ``leapfrog_steps`` leapfrog steps with a
Metropolis correction, vectorized over chains and data points (states are tensors
``[chains, points, dim]``). Continuous latent sites of any support with a bijection to the reals
(``torch.distributions.biject_to``) are flattened into one unconstrained vector per data point; the
log-determinant of the Jacobian enters every ``f_t`` (it cancels in the weights). Discrete latent
sites marked ``infer={"enumerate": "parallel"}`` are summed out exactly inside ``p(z)`` and
``p(x, z)``, so AIS runs over the continuous latents only; a model with no continuous latents gets
its exact log p(x) by enumeration.

**At the speed of hand-written code.** Each leapfrog step needs ``log p(x, z)``, ``log p0(z)`` and
the gradient of ``log f_beta`` at new values of the latents, so the model runs once per step.
Without enumerated sites it runs under one light messenger (:class:`_SiteRecorder`) that conditions
the latent sites on their values, as ``poutine.condition`` does, and keeps each site's message,
instead of under ``poutine.trace`` (which copies every message into a graph and sums each site's
log-density once more); the log densities are Pyro's own (``scale_and_mask(fn.log_prob(value))``,
summed in trace order), so values and gradients equal those through ``poutine.trace`` bit for bit
(``tests/test_ais.py``). Models that enumerate go through ``poutine.enum`` and traces. The last
leapfrog step of a transition returns the gradients of ``a0`` and ``a1`` separately; the next
temperature's gradient at the chain's state is ``(1 - beta) grad a0 + beta grad a1``, so a transition
needs no evaluation at its starting point (the model runs ``(T - 1) L + 1`` times, not
``T + (T - 1) L``). ``benchmarks/ais_vs_hand.py`` times this against a hand-written AIS.

**Schedule.** The default is the sigmoidal schedule of Grosse et al. (2015), also used by Wu et
al. (2017): with ``s(t) = sigmoid(delta * (2 t / T - 1))`` and ``delta = 4``,
``beta_t = (s(t) - s(0)) / (s(T) - s(0))``. It spends more steps near ``beta = 0`` and
``beta = 1``, where the intermediate densities change fastest in the usual models.

**Step-size adaptation.** With ``adapt_step_size=True`` each data point has its own step size,
multiplied by 1.02 after a transition whose acceptance rate (averaged over that point's chains)
exceeded 0.65 and by 0.98 otherwise, within ``[1e-4, 0.5]`` (the rule of Wu et al., 2017). Kernels
chosen from the chains' past make the estimator very slightly biased in principle; the effect is
negligible in practice, and ``adapt_step_size=False`` keeps AIS exactly unbiased.

**Batches and seeds.** Points are annealed ``batch_size`` at a time; batch ``i`` runs from its own
seed, a hash of ``(seed, i)`` (:func:`pyro_lvm.estimators.importance_sampling.block_seed`), so a
batch's chains do not depend on the other batches, and the caller's RNG is left as it was.

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
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform

from pyro_lvm.errors import UserError
from pyro_lvm.protocol.plates import plate_frame

from . import importance_sampling
from .monte_carlo import WeightStatistics, stderr_of_mean
from .progress import or_silent

__all__ = ["AIS_OPTIONS", "annealed_importance_log_marginal", "annealing_schedule", "ais_statistics", "bdmc"]

CHAIN_PLATE = "chains"

SIGMOID_SCHEDULE_RADIUS = 4.0
TARGET_ACCEPTANCE_RATE = 0.65
STEP_SIZE_FACTOR = 1.02
MIN_STEP_SIZE, MAX_STEP_SIZE = 1e-4, 0.5

#: AIS's options and their defaults; ``ais_steps`` is ``--ais-steps`` on the command line.
AIS_OPTIONS = {"ais_steps": 200, "proposal": "prior", "schedule": "sigmoid", "hmc_step_size": 0.05,
               "leapfrog_steps": 10, "adapt_step_size": True}


class _ProgramLayout(NamedTuple):
    """Where AIS finds things in the program: the data plate (name, dim), the observed sites, the
    plates' nesting, and the dims it adds (chains, then enumerated values further left)."""

    data_plate: str
    data_dim: int
    observed_sites: frozenset
    max_plate_nesting: int
    chain_dim: int
    first_enum_dim: int


def _program_layout(info):
    """The layout of the program AIS runs, from its :class:`~pyro_lvm.protocol.ModelInfo` (read from
    traces): the chains go left of every plate of the program, enumerated discrete latents left of
    the chains."""
    nesting = info.max_plate_nesting
    return _ProgramLayout(data_plate=info.data_plate.name, data_dim=info.data_plate.dim,
                          observed_sites=frozenset(info.observed_names), max_plate_nesting=nesting,
                          chain_dim=-(nesting + 1), first_enum_dim=-(nesting + 2))


def annealing_schedule(num_steps, schedule="sigmoid"):
    """The inverse temperatures ``beta_0 = 0 <= ... <= beta_T = 1``, a float64 tensor of length T+1.

    :param int num_steps: the number of annealing steps ``T`` (``ais_steps``).
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
    if isinstance(num_steps, bool) or int(num_steps) < 1:
        raise UserError(f"AIS needs ais_steps (--ais-steps) >= 1, got {num_steps}")
    fraction = torch.linspace(0.0, 1.0, int(num_steps) + 1, dtype=torch.float64)
    if schedule == "linear":
        return fraction
    if schedule == "sigmoid":
        s = torch.sigmoid(SIGMOID_SCHEDULE_RADIUS * (2.0 * fraction - 1.0))
        betas = (s - s[0]) / (s[-1] - s[0])
        betas[0], betas[-1] = 0.0, 1.0  # exact end points despite rounding
        return betas
    raise UserError(f"unknown AIS schedule {schedule!r}; use 'sigmoid', 'linear' or a sequence of betas")


def _is_identity(transform):
    """Whether ``transform`` is the identity (the bijection of an unconstrained real support)."""
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


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
        self.identity = _is_identity(transform)  # z = u and log|dz/du| = 0: nothing to compute
        self.batch_shape = batch_shape
        self.unconstrained_event_shape = unconstrained_event_shape
        self.data_axis = len(batch_shape) + data_dim  # index of the data plate in batch_shape
        self.rest_shape = tuple(s for i, s in enumerate(batch_shape) if i != self.data_axis)
        self.simple = not self.rest_shape and self.data_axis == 0  # [C, n, *event]: no moving of dims
        self.size = math.prod(self.rest_shape + unconstrained_event_shape)
        self.offset = offset


class _SiteRecorder(Messenger):
    """Conditions the sample sites named in ``values`` on those values (as ``poutine.condition``
    does) and keeps the message of every sample site, in program order, without a trace."""

    def __init__(self, values):
        super().__init__()
        self.values = values
        self.sites = []

    def _pyro_sample(self, msg):
        value = self.values.get(msg["name"])
        if value is not None:
            msg["value"] = value
            msg["is_observed"] = True

    def _pyro_post_sample(self, msg):
        if not site_is_subsample(msg):
            self.sites.append(msg)


def _validation_on():
    """Whether any of Pyro's validation checks is on (``pyro.validation_enabled`` sets all three)."""
    return (pyro.distributions.is_validation_enabled() or pyro.infer.is_validation_enabled()
            or poutine.util.is_validation_enabled())


def _site_log_prob(site):
    """A site's log density as ``Trace.compute_log_prob`` computes it, masked but unscaled: AIS
    estimates each point's log p(x), whatever scale a subsampling plate (or a minibatch handler) set."""
    return scale_and_mask(site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"]), 1.0, site["mask"])


class _AnnealingTarget:
    """The densities AIS needs for one batch of data, per chain and data point, from Pyro programs.

    For an unconstrained state ``u`` of shape ``[chains, points, dim]`` it computes
    ``a0 = log p0(z(u)) + log|dz/du|`` and ``a1 = log p(x, z(u)) + log|dz/du|``, so that
    ``log f_beta(u) = (1 - beta) a0 + beta a1``, and the gradient of ``log f_beta`` in ``u``.
    ``use_traces=True`` computes them through ``poutine.trace`` even where the light recorder
    would do (the reference the tests compare the recorder with).
    """

    def __init__(self, lvm, x, num_chains, proposal, use_traces=False, vectorized=True):
        if proposal not in ("prior", "guide"):
            raise UserError(f"unknown AIS proposal {proposal!r}; use 'prior' or 'guide'")
        program, info = _program(lvm, x)
        self.lvm = program
        self.layout = _program_layout(info)
        # Discrete sites that the guide enumerates are summed out of p(z) and p(x, z) here, as the model's own.
        guide_enumerated = {site.name for site in info.guide_enumerated}
        self.model = program.model if not guide_enumerated else poutine.infer_config(
            program.model, lambda msg: {"enumerate": "parallel"} if msg["name"] in guide_enumerated else {})
        self.x = x
        # A program that does not broadcast over a dim on the left runs one chain, without a chain plate.
        self.vectorized = vectorized
        self.num_chains = num_chains if vectorized else 1
        self.num_points = len(x)
        self.proposal = proposal
        self._inspect_model()
        if proposal == "guide" and self.sites:
            self._inspect_guide()
        # The recorder conditions and records; enumeration needs Pyro's enum handler and traces.
        self.use_traces = bool(use_traces or self.enumerated_names)
        # One plate for every evaluation (Pyro's plates can be entered again and again).
        self._chain_plate = (pyro.plate(CHAIN_PLATE, self.num_chains, dim=self.layout.chain_dim) if vectorized
                             else contextlib.nullcontext())
        # On the CPU a check that every state is finite costs nothing, and spares masking them all.
        self._check_finite_on_host = x.device.type == "cpu"
        self._weights = None

    # ----- what the model is, from a trace -----

    def _check_plates(self, site, owner):
        if plate_frame(site, self.layout.data_plate) is None:
            raise UserError(
                f"site {site['name']!r} of the {owner} is outside pyro.plate({self.layout.data_plate!r}) (a "
                "global site); AIS anneals the latents of each data point and cannot anneal a global latent: "
                "use --estimator is, which estimates the predictive log p(x_n | training data)"
            )

    def _inspect_model(self):
        with torch.no_grad():
            trace = poutine.trace(self.model).get_trace(self.x)
        layout = self.layout
        self.sites, self.enumerated_names = [], []
        offset = 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                if name in layout.observed_sites:
                    self._check_plates(site, "model")
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
            batch = (1,) * (layout.max_plate_nesting - len(batch)) + batch
            if batch[len(batch) + layout.data_dim] != self.num_points:
                raise UserError(
                    f"latent site {name!r} has batch shape {tuple(fn.batch_shape)}, which does not follow the "
                    f"{self.num_points} points of pyro.plate({layout.data_plate!r}); use --estimator is"
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
                                        layout.data_dim, offset)
            self.sites.append(site_info)
            offset += site_info.size
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

    def _chains(self):
        return self._chain_plate

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
        chain dim for a single chain run without a chain plate) and ``log|dz/du|`` of shape ``[C, n]``
        (``0.0`` when every site is unconstrained)."""
        from .importance_weights import point_view

        values, log_det = {}, 0.0
        for site in self.sites:
            # A site that is the whole state takes it as it is: a slice would cost a copy in backward.
            u_site = u if site.size == u.shape[-1] else u[..., site.offset : site.offset + site.size]
            u_site = u_site.reshape(u.shape[:2] + site.rest_shape + site.unconstrained_event_shape)
            if not site.simple:
                u_site = u_site.movedim(1, 1 + site.data_axis)
            if site.identity:
                z_site = u_site
            else:
                z_site = site.transform(u_site)
                ladj = site.transform.log_abs_det_jacobian(u_site, z_site)
                extra = ladj.dim() - (1 + len(site.batch_shape))
                if extra > 0:
                    ladj = ladj.sum(tuple(range(-extra, 0)))
                log_det = log_det + (ladj if site.simple else
                                     point_view(ladj, self.layout.data_dim, self.layout.max_plate_nesting))
            values[site.name] = z_site if self.vectorized else z_site[0]
        return values, log_det

    def sample_proposal(self):
        """``[C, n, dim]`` unconstrained draws from ``p0``: the prior by ancestral sampling, or the guide."""
        program = self.model if self.proposal == "prior" else self.lvm.guide
        with torch.no_grad(), self._chains():
            trace = poutine.trace(program).get_trace(self.x)
        return self.pack({site.name: trace.nodes[site.name]["value"] for site in self.sites})

    # ----- densities -----

    def _per_chain(self, log_prob):
        """A site's log density ``[C, *batch]`` as ``[C, n]``: plates nested in the data plate summed."""
        from .importance_weights import point_view

        shape = (self.num_chains, self.num_points)
        if torch.is_tensor(log_prob) and log_prob.shape == shape and self.layout.max_plate_nesting == 1:
            return log_prob
        layout = self.layout
        return point_view(log_prob, layout.data_dim, layout.max_plate_nesting).expand(shape)

    def _log_latent_and_joint(self, sites):
        """``log p(z)`` and ``log p(x, z)`` from the model's sample sites (messages, nothing enumerated)."""
        # The sums start from their first term, not from 0.0: the same values, and fewer kernels.
        log_latent, log_joint = None, None
        for site in sites:
            log_prob = self._per_chain(_site_log_prob(site))
            log_joint = log_prob if log_joint is None else log_joint + log_prob
            if site["name"] in self.latent_names:
                log_latent = log_prob if log_latent is None else log_latent + log_prob
        zero = torch.zeros(self.num_chains, self.num_points, dtype=self.x.dtype, device=self.x.device)
        return (zero if log_latent is None else log_latent), (zero if log_joint is None else log_joint)

    def _model_log_densities(self, values):
        """``log p(z)`` and ``log p(x, z)`` at continuous latents ``values``, discrete ones summed out
        by the variable elimination of :mod:`.importance_weights` (plates and ``pyro.markov`` chains)."""
        from .importance_weights import model_log_density

        if not self.use_traces:
            recorder = _SiteRecorder(values)
            with self._chains(), recorder:
                self.model(self.x)
            return self._log_latent_and_joint(recorder.sites)
        layout = self.layout
        model = poutine.enum(poutine.condition(self.model, data=values), first_available_dim=layout.first_enum_dim)
        with self._chains():
            trace = poutine.trace(model).get_trace(self.x)
        if not self.enumerated_names:  # the recorder's sums, in the same order: the same values bit for bit
            return self._log_latent_and_joint(
                site for site in trace.nodes.values() if site["type"] == "sample" and not site_is_subsample(site))
        plate = CHAIN_PLATE if self.vectorized else None
        options = dict(data_plate=layout.data_plate, particle_plate=plate)
        log_joint, _, _ = model_log_density(trace, set(), layout.max_plate_nesting, self.num_chains, **options)
        latent_trace = trace.copy()
        for name in layout.observed_sites:
            if name in latent_trace.nodes:
                latent_trace.remove_node(name)
        try:
            log_latent, _, _ = model_log_density(latent_trace, set(), layout.max_plate_nesting, self.num_chains,
                                                 **options)
        except UserError:  # no latent site in the data plate (all of them summed out with the data)
            log_latent = 0.0
        zero = torch.zeros(self.num_chains, self.num_points, dtype=self.x.dtype, device=self.x.device)
        return log_latent + zero, log_joint + zero

    def _guide_log_density(self, values):
        if not self.use_traces:
            recorder = _SiteRecorder(values)
            with self._chains(), recorder:
                self.lvm.guide(self.x)
            by_name = {site["name"]: site for site in recorder.sites}
            return sum(self._per_chain(_site_log_prob(by_name[site.name])) for site in self.sites)
        with self._chains():
            trace = poutine.trace(poutine.condition(self.lvm.guide, data=values)).get_trace(self.x)
        return sum(self._per_chain(_site_log_prob(trace.nodes[site.name])) for site in self.sites)

    def log_densities(self, u, beta=None, grad="beta"):
        """``(a0, a1, gradient)`` at the unconstrained state ``u``.

        ``grad="beta"``: the gradient in ``u`` of ``log f_beta = (1 - beta) a0 + beta a1``;
        ``grad="both"``: the pair ``(grad a0, grad a1)``, from which the gradient at any beta is
        ``(1 - beta) grad a0 + beta grad a1`` (the state's gradient at the next temperature, without
        running the model again); ``grad=None``: no gradient.

        Chains whose state is not finite (a diverging leapfrog trajectory) get ``a0 = a1 = -inf`` and
        a zero gradient, so that the Metropolis step rejects them.
        """
        with_grad = grad is not None
        # A sum is finite exactly when every term is. On the CPU one sum over all chains says
        # whether any needs masking; on a GPU that would wait for the device, so every chain is masked.
        all_finite = self._check_finite_on_host and math.isfinite(u.sum().item())
        finite = None if all_finite else torch.isfinite(u.sum(-1))
        u = (u if all_finite else torch.where(finite.unsqueeze(-1), u, torch.zeros_like(u))).detach()
        # Validation is off inside the trajectories: a far-out leapfrog state may give a distribution
        # parameters outside their support, and the Metropolis step, not an exception, should reject it.
        # The model was traced with validation on when the target was built.
        validation = pyro.validation_enabled(False) if _validation_on() else contextlib.nullcontext()
        with torch.enable_grad(), validation:
            u.requires_grad_(with_grad)
            values, log_det = self.unpack(u)
            log_latent, log_joint = self._model_log_densities(values)
            log_p0 = self._guide_log_density(values) if self.proposal == "guide" else log_latent
            if isinstance(log_det, float) and log_det == 0.0:  # unconstrained latents: x + 0.0 is x
                a0, a1 = log_p0, log_joint
            else:
                a0, a1 = log_p0 + log_det, log_joint + log_det
            gradient = None
            if grad == "beta":
                # The gradient of log f = (1 - beta) a0 + beta a1, seeded with the two weights rather
                # than formed as a sum: the same gradient, without the sum's kernels.
                gradient = self._gradient((a0, a1), self._beta_weights(beta, a0), u, finite, all_finite)
            elif grad == "both":
                ones = (torch.ones_like(a0),)
                gradient = (self._gradient((a0,), ones, u, finite, all_finite, retain_graph=True),
                            self._gradient((a1,), ones, u, finite, all_finite))
            elif with_grad:
                raise ValueError(f"grad must be 'beta', 'both' or None, got {grad!r}")
        a0, a1 = a0.detach(), a1.detach()
        if not all_finite:
            minus_inf = torch.full_like(a0, -math.inf)
            a0, a1 = torch.where(finite, a0, minus_inf), torch.where(finite, a1, minus_inf)
        return a0, a1, gradient

    def _beta_weights(self, beta, like):
        """``(1 - beta, beta)`` as tensors shaped like ``a0``, kept while beta stays (a trajectory)."""
        if self._weights is None or self._weights[0] != beta:
            self._weights = (beta, (torch.full_like(like, 1.0 - beta), torch.full_like(like, beta)))
        return self._weights[1]

    @staticmethod
    def _gradient(outputs, weights, u, finite, all_finite, retain_graph=False):
        (grad,) = torch.autograd.grad(outputs, u, grad_outputs=weights, allow_unused=True, retain_graph=retain_graph)
        grad = torch.zeros_like(u) if grad is None else grad
        if not all_finite:
            grad = torch.where(finite.unsqueeze(-1), grad, torch.zeros_like(grad))
        return grad

    def exact_log_marginal(self):
        """log p(x) per point by enumeration, for a model whose latents are all enumerated."""
        with torch.no_grad():
            _, log_joint = self._model_log_densities({})
        return log_joint[0]


def _at_beta(gradients, beta):
    """The gradient of ``log f_beta`` from the pair ``(grad a0, grad a1)``."""
    grad_a0, grad_a1 = gradients
    return (1.0 - beta) * grad_a0 + beta * grad_a1


def _hmc_transition(target, u, a0, a1, gradients, beta, step_size, num_leapfrog):
    """One HMC move per chain and point, leaving ``f_beta`` invariant.

    ``gradients`` is the pair ``(grad a0, grad a1)`` at ``u``; the last leapfrog step computes the
    pair at the proposed state, so that the next transition, at another beta, needs no evaluation of
    the model at its starting point. Returns the new state, its ``a0, a1`` and gradient pair, and
    the Metropolis acceptance probabilities ``[C, n]``.
    """
    eps = step_size.unsqueeze(-1)  # [n, 1], broadcasts against [C, n, dim]
    momentum = torch.randn_like(u)
    energy = -((1.0 - beta) * a0 + beta * a1) + 0.5 * momentum.pow(2).sum(-1)
    u_new = u
    p = momentum + 0.5 * eps * _at_beta(gradients, beta)
    for step in range(num_leapfrog):
        u_new = u_new + eps * p
        if step < num_leapfrog - 1:
            a0_new, a1_new, grad_new = target.log_densities(u_new, beta)
            p = p + eps * grad_new
        else:
            a0_new, a1_new, gradients_new = target.log_densities(u_new, grad="both")
            p = p + 0.5 * eps * _at_beta(gradients_new, beta)
    energy_new = -((1.0 - beta) * a0_new + beta * a1_new) + 0.5 * p.pow(2).sum(-1)
    log_accept = (energy - energy_new).nan_to_num(nan=-math.inf).clamp(max=0.0)
    accept_prob = log_accept.exp()
    accept = torch.rand_like(accept_prob) < accept_prob
    accept_state = accept.unsqueeze(-1)
    u = torch.where(accept_state, u_new, u)
    a0 = torch.where(accept, a0_new, a0)
    a1 = torch.where(accept, a1_new, a1)
    gradients = tuple(torch.where(accept_state, new, old) for new, old in zip(gradients_new, gradients))
    return u, a0, a1, gradients, accept_prob


def _anneal(target, u, betas, step_size, num_leapfrog, adapt_step_size, step_size_plan=None, progress=None):
    """One AIS pass along ``betas`` from ``u ~ f_{betas[0]}``; returns log weights ``[C, n]`` and stats.

    The model runs once at the start and then only inside the leapfrog trajectories: a transition
    ends with the densities and gradient pair of its state, which the next weight update and
    transition use as they are.

    ``step_size_plan`` (``[T-1, n]``) fixes the step size of every transition; otherwise they start
    at ``step_size`` and adapt if asked. The step sizes used are returned as ``"step_size_plan"``.
    """
    # Validation off for the whole pass (see _AnnealingTarget.log_densities), switched once.
    with pyro.validation_enabled(False):
        return _anneal_unvalidated(target, u, betas, step_size, num_leapfrog, adapt_step_size, step_size_plan,
                                   progress)


def _anneal_unvalidated(target, u, betas, step_size, num_leapfrog, adapt_step_size, step_size_plan, progress):
    num_chains, num_points = u.shape[:2]
    log_weight = torch.zeros(num_chains, num_points, dtype=u.dtype, device=u.device)
    eps = torch.full((num_points,), float(step_size), dtype=u.dtype, device=u.device)
    used_step_sizes, acceptance_rates = [], []
    num_transitions = len(betas) - 2  # the move after the last weight update would be wasted
    a0, a1, gradients = target.log_densities(u, grad="both" if num_transitions > 0 else None)
    for t in range(1, len(betas)):
        beta_prev, beta = float(betas[t - 1]), float(betas[t])
        if beta != beta_prev:
            increment = (beta - beta_prev) * (a1 - a0)
            # A chain whose state has no density under either end (-inf - -inf) carries no weight.
            log_weight = log_weight + torch.where(increment.isnan(), -math.inf, increment)
        if progress is not None:
            progress.advance(num_chains * num_points)
        if t > num_transitions:
            continue
        if step_size_plan is not None:
            eps = step_size_plan[t - 1]
        used_step_sizes.append(eps)
        u, a0, a1, gradients, accept_prob = _hmc_transition(target, u, a0, a1, gradients, beta, eps, num_leapfrog)
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


def check_ais_options(options):
    """``options`` completed with :data:`AIS_OPTIONS`' defaults; unknown names are refused."""
    import difflib

    for name in options:
        if name not in AIS_OPTIONS:
            close = difflib.get_close_matches(name, list(AIS_OPTIONS), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(AIS_OPTIONS)}"
            raise UserError(f"unknown AIS option {name!r}; {hint}")
    return {**AIS_OPTIONS, **options}


def ais_statistics(lvm, batches, num_chains, seed, options, progress=None, use_traces=False):
    """AIS log weights of ``num_chains`` chains for every point of ``batches``, as statistics.

    :param batches: ``[(batch_index, xb), ...]``; batch ``i`` runs from the seed ``block_seed(seed, i, 0)``
        (a program that does not broadcast over the chains runs them one at a time, chain c from
        ``block_seed(seed, i, c)``). A batch may be a :class:`~pyro_lvm.protocol.SubsampleBatch`.
    :param options: the keys of :data:`AIS_OPTIONS` (see :func:`check_ais_options`).
    :returns: ``(WeightStatistics over the points in order, extras)``, extras with ``num_chains,
        ais_steps, acceptance_rate, step_size_mean`` (means over the annealed points),
        ``annealed_points``, and ``exact_enumeration`` where every latent is enumerated.
    """
    from .importance_sampling import valid_points
    from .importance_weights import vectorizes

    options = check_ais_options(options)
    _check_options(num_chains, options["leapfrog_steps"], options["hmc_step_size"])
    betas = annealing_schedule(options["ais_steps"], options["schedule"])
    num_chains = int(num_chains)
    progress = or_silent(progress)
    first = batches[0][1] if batches else None
    program, info = _program(lvm, first)
    drawn_globals = [s.name for s in info.global_latents if s.in_guide and not s.point_mass]
    if drawn_globals:
        are = "is a global latent" if len(drawn_globals) == 1 else "are global latents"
        raise UserError(f"{', '.join(map(repr, drawn_globals))} {are} (outside the data plate); AIS "
                        f"anneals the latents of each data point and cannot anneal a global one: use --estimator "
                        f"is, which estimates the predictive log p(x_n | training data)")
    continuous = [s for s in info.latent_sites if s.local and not s.enumerated and not s.discrete]
    vectorized = not continuous or first is None or vectorizes(program, first if torch.is_tensor(first) else first.data)
    runs = [(0, num_chains)] if vectorized else [(c, 1) for c in range(num_chains)]
    parts, acceptance, step_size, points, exact = [], 0.0, 0.0, 0, False
    for batch_index, xb in batches:
        valid = valid_points(xb)
        if not continuous:
            # Every latent is enumerated (or a point mass): nothing to anneal, log p(x) is exact by
            # enumeration, and every chain would carry the same weight.
            from .exact import exact_log_marginal

            exact = True
            with torch.no_grad():
                log_px, _ = exact_log_marginal(program, xb if torch.is_tensor(xb) else xb.rows()[:valid], len(xb))
            parts.append(WeightStatistics.constant(log_px[:valid], num_chains))
            progress.advance(num_chains * valid * (len(betas) - 1))
            continue
        weights = []
        for offset, chains in runs:
            batch_seed = importance_sampling.block_seed(seed, batch_index, offset)
            # One swap of the program's parameter store for the whole pass, not one per density.
            with _seeded(xb.device, batch_seed), torch.no_grad(), program.running():
                target = _AnnealingTarget(program, xb, chains, options["proposal"], use_traces=use_traces,
                                          vectorized=vectorized)
                log_weight, stats = _anneal(target, target.sample_proposal(), betas, options["hmc_step_size"],
                                            int(options["leapfrog_steps"]), options["adapt_step_size"],
                                            progress=progress)
            weights.append(log_weight[:, :valid])
            acceptance += stats["acceptance_rate"] * valid * chains / num_chains
            step_size += stats["step_size_mean"] * valid * chains / num_chains
        parts.append(WeightStatistics.from_log_weights(torch.cat(weights, dim=0)))
        points += valid
    extras = {"num_chains": num_chains, "ais_steps": 0 if exact and not points else len(betas) - 1,
              "acceptance_rate": acceptance / points if points else 1.0,
              "step_size_mean": step_size / points if points else 0.0, "annealed_points": points}
    if exact:
        extras["exact_enumeration"] = True
    if not vectorized:
        extras["chains_one_at_a_time"] = True
    return WeightStatistics.cat(parts), extras


def annealed_importance_log_marginal(lvm, x, num_chains=16, ais_steps=200, proposal="prior", schedule="sigmoid",
                                     hmc_step_size=0.05, leapfrog_steps=10, adapt_step_size=True, seed=0,
                                     batch_size=None, progress=None):
    """Per-data-point AIS estimates of log p(x), a stochastic lower bound (see the module docstring).

    :param lvm: a model following the pyro-lvm protocol (``lvm.model(x)``, ``lvm.guide(x)``).
    :param torch.Tensor x: data ``[N, *data_shape]`` on the model's device; AIS runs on that device.
    :param int num_chains: independent AIS chains per data point.
    :param int ais_steps: annealing steps ``T`` (``T = 1`` is importance sampling from the proposal).
    :param str proposal: ``"prior"`` (``p0 = p(z)``) or ``"guide"`` (``p0 = q(z|x)``).
    :param schedule: ``"sigmoid"``, ``"linear"`` or an explicit sequence of betas from 0 to 1.
    :param float hmc_step_size: the initial leapfrog step size, in the unconstrained space.
    :param int leapfrog_steps: leapfrog steps per HMC transition.
    :param bool adapt_step_size: adapt each point's step size toward an acceptance rate of 0.65.
    :param int seed: seeds private RNG streams (one per batch); the caller's RNG state is left untouched.
    :param batch_size: points annealed at a time (default: all at once).
    :returns: ``(per_point, extras)``: a tensor ``[N]`` on the device of ``x`` in the model's dtype, and
        a JSON-able dict with ``num_chains, ais_steps, acceptance_rate, step_size_mean,
        log_weight_ess, mc_stderr`` (the Monte Carlo standard error of the mean over points).
    """
    options = dict(ais_steps=ais_steps, proposal=proposal, schedule=schedule, hmc_step_size=hmc_step_size,
                   leapfrog_steps=leapfrog_steps, adapt_step_size=adapt_step_size)
    program, _ = _program(lvm, x)
    size = int(batch_size) if batch_size else max(1, x.shape[0])
    batches = [(index, batch) for index, (batch, _) in enumerate(program.batches(x, size))]
    stats, extras = ais_statistics(program, batches, num_chains, seed, options, progress)
    del extras["annealed_points"]
    extras["log_weight_ess"] = float(stats.effective_sample_size().mean())
    extras["mc_stderr"] = stderr_of_mean(stats.mc_variance("log_mean_exp"))
    return stats.estimate("log_mean_exp").to(stats.dtype), extras


def _program(lvm, x):
    """The program of ``lvm`` and its info (inspected on ``x`` the first time)."""
    from ..protocol import as_program
    from .importance_weights import ensure_info

    program = as_program(lvm)
    if program.info is None:
        ensure_info(program, x if torch.is_tensor(x) else x.data)
    return program, program.info


def _model_device(lvm):
    for tensor in list(lvm.parameters()) + list(lvm.buffers()):
        return tensor.device
    return torch.device("cpu")


def bdmc(lvm, num_points=50, num_chains=4, ais_steps=200, seed=0, **ais_options):
    """Bidirectional Monte Carlo bounds on log p(x) for data simulated from the model.

    Draws ``(z*, x)`` from ``p(z) p(x|z)`` by ancestral sampling, then runs forward AIS on ``x``
    (a stochastic lower bound) and reverse AIS from ``z*`` (a stochastic upper bound), with the same
    schedule and the forward run's step sizes replayed in reverse.

    :param int num_points: simulated data points.
    :param ais_options: ``proposal, schedule, hmc_step_size, leapfrog_steps, adapt_step_size`` as in
        :func:`annealed_importance_log_marginal`.
    :returns: a JSON-able dict ``{"lower", "upper", "gap", "per_point_lower", "per_point_upper",
        "num_points", "num_chains", "ais_steps"}`` (means over points, in nats), plus ``"exact"`` and
        ``"per_point_exact"``, the exact log p(x) of the simulated points, when the model has
        ``log_marginal`` (a check of the estimator on a model where the answer is known).
    """
    unknown = sorted(set(ais_options) - set(AIS_OPTIONS))
    if unknown:
        raise UserError(f"unknown BDMC options {unknown}; known: {sorted(AIS_OPTIONS)}")
    options = check_ais_options(dict(ais_options, ais_steps=ais_steps))
    leapfrog_steps, hmc_step_size = int(options["leapfrog_steps"]), options["hmc_step_size"]
    _check_options(num_chains, leapfrog_steps, hmc_step_size)
    if int(num_points) < 1:
        raise UserError(f"BDMC needs num_points >= 1, got {num_points}")
    num_chains, num_points = int(num_chains), int(num_points)
    betas = annealing_schedule(options["ais_steps"], options["schedule"])

    from ..protocol import as_program
    from ..protocol.inspection import inspect_by_simulation

    program = as_program(lvm)
    inspect_by_simulation(program)
    with _seeded(_model_device(program), seed), torch.no_grad():
        x, simulations = program.simulate(num_points)
        x = x.detach()
        simulation = simulations[0]
        target = _AnnealingTarget(program, x, num_chains, options["proposal"])
        if target.sites:
            log_weight_forward, stats = _anneal(
                target, target.sample_proposal(), betas, hmc_step_size, leapfrog_steps, options["adapt_step_size"]
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
        "ais_steps": len(betas) - 1,
    }
    if exact is not None:
        result["exact"] = float(exact.mean())
        result["per_point_exact"] = exact.tolist()
    return result
