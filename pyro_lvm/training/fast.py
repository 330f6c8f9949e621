"""An exact fast path for the training objectives of fully reparameterized models.

Pyro's ELBO classes are general: per step, ``Trace_ELBO.differentiable_loss`` records a guide trace
and a model trace (copying every message into a graph), prunes subsample sites (another copy),
computes log-densities *and* score-function parts for every site, checks site shapes, validates every
distribution's arguments and support, and calls ``.item()`` on each site's log-density (a host sync
on a GPU). For the programs most users fit with SVI -- every latent site reparameterized, nothing
enumerated, as in a VAE -- the objective is a plain function of the per-site log-densities, and
most of that work is unused. :class:`FastObjective` runs the user's guide and model under one light
messenger (:class:`_Sites`, which also applies the N/B scale of
:class:`~pyro_lvm.protocol.DataPlateScale` and replays the guide's values into the model) and then
evaluates, with ``s`` each site's scale (N/B inside the data plate) and K vectorized particles:

- ``elbo`` (Pyro's ``Trace_ELBO``)::

      loss = -(1/K) [ sum_{model sites} s log p(v) - sum_{guide sites} s log q(z) ]

  For a reparameterized site Pyro's surrogate is this same expression: the score-function term is
  zero and the entropy term is ``s log q(z)`` (Ranganath et al. 2014; Schulman et al. 2015).
- ``meanfield`` (Pyro's ``TraceMeanField_ELBO``)::

      loss = -(1/K) [ sum_{observed} s log p(x | z) - sum_{latent} s KL(q(z) || p(z)) ]

  with the analytic KL from torch's registry, and ``log p - log q`` where none is registered.
- ``iwae`` (:class:`~pyro_lvm.objectives.iwae.IWAE_ELBO`, Burda et al. 2015)::

      loss = -s sum_n [ logsumexp_k (log p(x_n, z_kn) - log q(z_kn | x_n)) - log K ]

The programs run exactly as under Pyro: the same plates (particle plates included, at the same
dims), the same draws from the same RNG stream, the same values; so the loss and its gradient equal
those of the Pyro objective up to float rounding (``tests/test_fast_path.py``). What is skipped:
trace bookkeeping, unused score parts, and argument/support validation, which checks and does not
compute (the first, probing call runs with validation on, and training still stops at the first
non-finite loss).

:func:`select_fast_path` picks the fast path only when it is exact: the objective is ``elbo``
(non-enumerated), ``meanfield`` or ``iwae`` (not ``iwae-dreg``), every guide site is
reparameterized and appears in the model, every model latent is in the guide, nothing is marked for
enumeration, no ``pyro.deterministic`` site, and (for ``iwae``) every site is in the data plate. The
same checks run at every call; if the program ever shows a site the fast path cannot evaluate, the
call restores the RNG state, warns once and falls back to the Pyro objective for good.
"""

import math
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample

from ..objectives import EnumerationAwareELBO, IWAE_ELBO
from ..protocol import DataPlateScale
from ..protocol.plates import plate_frame


class NotFast(Exception):
    """The program has a site that the fast path cannot evaluate exactly; the message says which."""


class _Sites(DataPlateScale):
    """:class:`DataPlateScale` that keeps each sample site's message and, in the model, replays the guide.

    It sits outside every plate of the program (particle plates included), like Pyro's trace and
    replay handlers, so the distributions it records are already broadcast to the plates' shape. The
    guide's subsample sites (a plate that subsamples itself) are replayed too, as ``poutine.replay``
    does, so that guide and model see the same points.
    """

    def __init__(self, num_data, data_plate, points=None, replay=None):
        super().__init__(num_data, data_plate, points)
        self.replay = replay
        self.sites = {}
        self.subsamples = {}

    def _process_message(self, msg):
        super()._process_message(msg)
        if self.replay is not None and msg["type"] == "sample" and not msg["is_observed"]:
            guide_site = self.replay.get(msg["name"])
            if guide_site is not None:  # what poutine.replay does
                msg["value"] = guide_site["value"]
                msg["infer"] = guide_site["infer"]
                msg["done"] = True

    def _postprocess_message(self, msg):
        if msg["type"] != "sample":
            return
        record = self.subsamples if site_is_subsample(msg) else self.sites
        if msg["name"] in record:
            raise NotFast(f"sample site {msg['name']!r} appears twice")
        record[msg["name"]] = msg


def _log_prob(site):
    """Scaled and masked log-density of a site, as Pyro's ``Trace.compute_log_prob`` has it."""
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"])


def _add(total, term):
    return term if total is None else total + term


def _per_point(log_prob, site, max_plate_nesting, data_plate):
    """A site's log-density reduced to [K, n], summing plates nested in the data plate (as IWAE does)."""
    batch_dims = max_plate_nesting + 1
    if log_prob.dim() < batch_dims:
        log_prob = log_prob.reshape((1,) * (batch_dims - log_prob.dim()) + tuple(log_prob.shape))
    data_dim = plate_frame(site, data_plate).dim
    inner = [d for d in range(-max_plate_nesting, 0) if d != data_dim]
    if inner:
        log_prob = log_prob.sum(inner, keepdim=True)
    return log_prob.reshape(log_prob.shape[-batch_dims], log_prob.shape[data_dim])


def objective_kind(objective):
    """``(kind, K, max_plate_nesting)`` of an objective the fast path knows, else ``(None, reason)``.

    Call it after the objective has seen the model once (objectives set themselves up lazily).
    """
    if type(objective) is IWAE_ELBO:  # exactly IWAE: DReG's gradient is not the plain one
        if objective.max_plate_nesting == float("inf"):
            return None, "iwae has not guessed max_plate_nesting yet"
        return "iwae", objective.num_particles, int(objective.max_plate_nesting)
    inner = getattr(objective, "_elbo", None) if isinstance(objective, EnumerationAwareELBO) else objective
    if isinstance(inner, TraceEnum_ELBO):
        return None, "the model enumerates discrete sites (TraceEnum_ELBO)"
    kind = ("meanfield" if type(inner) is TraceMeanField_ELBO else
            "elbo" if type(inner) is Trace_ELBO else None)
    if kind is None:
        return None, f"no fast path for objective {type(inner).__name__}"
    if inner.num_particles > 1 and not inner.vectorize_particles:
        return None, "particles are not vectorized"
    if inner.max_plate_nesting == float("inf") and inner.num_particles > 1:
        return None, "the objective has not guessed max_plate_nesting yet"
    return kind, inner.num_particles, inner.max_plate_nesting


class FastObjective:
    """``loss(x)``: the objective's ``differentiable_loss(DataPlateScale(N)(model), ..., x)``, computed cheaply.

    :param kind: ``elbo``, ``meanfield`` or ``iwae`` (see :func:`objective_kind`).
    :param fallback: ``f(x) -> loss``, the Pyro objective, used from the first call the fast path refuses.
    """

    def __init__(self, lvm, kind, num_particles, max_plate_nesting, num_data, fallback=None):
        self.lvm, self.kind, self.num_particles = lvm, kind, int(num_particles)
        self.max_plate_nesting = max_plate_nesting
        self.num_data = num_data
        info = getattr(lvm, "info", None)
        self.data_plate = info.data_plate.name if info is not None else "data"
        self.points = getattr(lvm, "current_points", None)
        self.fallback = fallback
        self.refused = None  # the reason, once the fast path has refused a call
        self.validate = False

    def _particles(self):
        # The plate each objective puts its vectorized particles in (same name, size and dim).
        if self.kind == "iwae":
            return pyro.plate("particles", self.num_particles, dim=-(self.max_plate_nesting + 1))
        if self.num_particles > 1:
            return pyro.plate("num_particles_vectorized", self.num_particles, dim=-self.max_plate_nesting)
        return None

    def _run(self, program, x, replay):
        recorder = _Sites(self.num_data, self.data_plate, self.points, replay)
        particles = self._particles()
        with recorder:
            if particles is None:
                program(x)
            else:
                with particles:
                    program(x)
        return recorder.sites, recorder.subsamples

    def _check(self, guide_sites, model_sites):
        for name, site in guide_sites.items():
            if site["is_observed"] or name not in model_sites:
                raise NotFast(f"guide site {name!r} is observed or not in the model")
            if not site["fn"].has_rsample:
                raise NotFast(f"guide site {name!r} is not reparameterized")
        for name, site in model_sites.items():
            infer = site["infer"]
            if infer.get("enumerate") or infer.get("_deterministic"):
                raise NotFast(f"model site {name!r} is enumerated or deterministic")
            if not site["is_observed"] and name not in guide_sites:
                raise NotFast(f"model latent {name!r} is not in the guide")
            if self.kind == "iwae" and (plate_frame(site, self.data_plate) is None or not isinstance(site["scale"], float)):
                raise NotFast(f"site {name!r} is outside the data plate or has a tensor scale")

    def _loss(self, x):
        guide_sites, guide_subsamples = self._run(self.lvm.guide, x, None)
        model_sites, _ = self._run(self.lvm.model, x, {**guide_subsamples, **guide_sites})
        self._check(guide_sites, model_sites)
        if self.kind == "iwae":
            return self._iwae(guide_sites, model_sites)
        # Terms are added with _add, which starts from the first term rather than from 0 and skips
        # dividing by K = 1: the same values bit for bit, two autograd nodes fewer per step.
        elbo = None
        for name, site in model_sites.items():
            if self.kind == "elbo" or site["is_observed"]:
                elbo = _add(elbo, _log_prob(site).sum())
                continue
            q = guide_sites[name]
            try:  # the analytic KL where torch has one, as TraceMeanField_ELBO does
                kl = torch.distributions.kl_divergence(q["fn"], site["fn"])
            except NotImplementedError:
                elbo = _add(elbo, _log_prob(site).sum()) - _log_prob(q).sum()
                continue
            kl = scale_and_mask(kl, q["scale"], q["mask"])
            elbo = _add(elbo, -(kl.sum() if torch.is_tensor(kl) else kl * q["fn"].batch_shape.numel()))
        if self.kind == "elbo":
            for site in guide_sites.values():
                elbo = elbo - _log_prob(site).sum()
        return -elbo if self.num_particles == 1 else -elbo / self.num_particles

    def _iwae(self, guide_sites, model_sites):
        nesting = self.max_plate_nesting
        unscaled = lambda site: _per_point(scale_and_mask(  # noqa: E731
            site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"]), 1.0, site["mask"]), site, nesting,
            self.data_plate)
        log_q = log_p = None
        for site in guide_sites.values():
            log_q = _add(log_q, unscaled(site))
        for site in model_sites.values():
            log_p = _add(log_p, unscaled(site))
        log_w = log_p - (0.0 if log_q is None else log_q)
        log_w = log_w.expand(self.num_particles, log_w.shape[-1])
        scales = {site["scale"] for site in (*model_sites.values(), *guide_sites.values())}
        if len(scales) != 1:
            raise NotFast("the sites of the data plate are scaled differently")
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)
        return -(scales.pop() * bound).sum()

    def __call__(self, x):
        if self.refused is not None:
            return self.fallback(x)
        rng = torch.get_rng_state()
        # Not while a CUDA graph is being captured (pyro_lvm/training/cuda_graph.py): no fallback is possible
        # there, and the generator's state cannot be read.
        capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" and not capturing else None
        try:
            with pyro.validation_enabled(self.validate):
                return self._loss(x)
        except NotFast as err:
            if self.fallback is None:
                raise
            # The program changed shape after selection: put the RNG back so the Pyro objective
            # sees the same draws, and use it from now on.
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            self.refused = str(err)
            warnings.warn(f"pyro-lvm fast path off from now on: {err}; using the Pyro objective")
            return self.fallback(x)


def select_fast_path(objective, lvm, num_data, probe, fallback=None):
    """A :class:`FastObjective` for ``objective`` on ``lvm``, or ``(None, reason)`` when it would not be exact.

    Returns ``(fast, None)`` or ``(None, reason)``. ``probe`` is a small data batch; the program is run
    once on it, without gradients and in eval mode: the caller forks the RNG around this call so that
    the training stream is untouched.
    """
    kind = objective_kind(objective)
    if kind[0] is None:
        return None, kind[1]
    fast = FastObjective(lvm, *kind, num_data=num_data, fallback=None)
    was_training = lvm.training
    lvm.eval()
    try:
        with torch.no_grad(), poutine.block():
            fast.validate = True
            fast(probe)
    except NotFast as err:
        return None, str(err)
    except Exception as err:  # anything else: not our business to fix, the Pyro objective will say
        return None, f"{type(err).__name__}: {err}"
    finally:
        fast.validate = False
        lvm.train(was_training)
    fast.fallback = fallback
    return fast, None
