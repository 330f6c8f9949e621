"""Training objectives, all subclasses of :class:`pyro.infer.ELBO`, chosen by name.

- ``elbo``: Pyro's ``Trace_ELBO``, or ``TraceEnum_ELBO`` when the model enumerates discrete sites
  (they are then summed out exactly); particles vectorized.
- ``meanfield``: Pyro's ``TraceMeanField_ELBO``, the ELBO with analytic KL(q || p) terms where they
  exist. It cannot sum out enumerated sites, so an enumerated model is refused with a
  :class:`~pyro_lvm.errors.UserError` that names ``elbo`` and ``iwae`` (a silent fallback to
  ``TraceEnum_ELBO`` would fit a different estimator than the one asked for).
- ``iwae``: the K-particle importance-weighted bound (:mod:`pyro_lvm.objectives.iwae`).
- ``iwae-dreg``: the same bound with doubly-reparameterized gradients (:mod:`pyro_lvm.objectives.dreg`).

Whether the model or the guide enumerates, whether the guide is reparameterized, where the data
plate is and which latents are global are read from ``model_info``
(:func:`pyro_lvm.protocol.inspect_model`) when given, otherwise from a trace at the first call.
What an objective cannot do is refused before any training, naming the alternative:
``meanfield`` with a guide site that is not reparameterized (discrete, or enumerated in the guide)
or with enumeration in the model, ``iwae`` and ``iwae-dreg`` with global latents (a per-point bound
has no term for them), ``iwae-dreg`` with a non-reparameterized guide site.
"""

import difflib

import pyro.infer
from pyro.infer import ELBO

from ..errors import UserError
from ..estimators.importance_weights import guess_max_plate_nesting, model_has_enumeration
from .dreg import DReG_IWAE_ELBO
from .iwae import IWAE_ELBO
from .regularized import RegularizedELBO, check_remedies

OBJECTIVES = {
    "elbo": "evidence lower bound, Pyro's Trace_ELBO (TraceEnum_ELBO when sites are enumerated)",
    "meanfield": "evidence lower bound with analytic KL terms, Pyro's TraceMeanField_ELBO",
    "iwae": "importance-weighted bound with K particles (Burda et al. 2015)",
    "iwae-dreg": "importance-weighted bound, doubly-reparameterized gradients (Tucker et al. 2019)",
}


class EnumerationAwareELBO(ELBO):
    """An ELBO that picks its Pyro implementation when it first sees the model.

    ``choose(enumerated, max_plate_nesting)`` returns the ELBO to delegate to; ``enumerated`` is
    known from ``model_info`` or read from a trace of the first (model, guide, args) it is given.
    """

    def __init__(self, choose, num_particles=1, enumerated=None, max_plate_nesting=None, check=None):
        super().__init__(num_particles=num_particles)
        self._choose = choose
        self._check = check
        self._enumerated = enumerated
        self._model_plate_nesting = max_plate_nesting
        self._elbo = None

    def _delegate(self, model, guide, args, kwargs):
        if self._elbo is None:
            if self._check is not None:
                self._check(model, guide, args, kwargs)
            if self._enumerated is None:
                self._enumerated = model_has_enumeration(model, guide, args, kwargs)
            if self._enumerated and self._model_plate_nesting is None:
                self._model_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
            self._elbo = self._choose(self._enumerated, self._model_plate_nesting)
        return self._elbo

    def _get_trace(self, model, guide, args, kwargs):
        return self._delegate(model, guide, args, kwargs)._get_trace(model, guide, args, kwargs)

    def loss(self, model, guide, *args, **kwargs):
        return self._delegate(model, guide, args, kwargs).loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return self._delegate(model, guide, args, kwargs).loss_and_grads(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self._delegate(model, guide, args, kwargs).differentiable_loss(model, guide, *args, **kwargs)


def _info_enumerated(model_info):
    if model_info is None:
        return None
    return bool(getattr(model_info, "enumerated", []))


def _not_reparameterized(model_info):
    """Guide sites whose gradient needs a score function (discrete, enumerated in the guide, no rsample)."""
    return [s.name for s in getattr(model_info, "latent_sites", []) if s.in_guide and (
        s.enumerated_in == "guide" or not s.reparameterized)]


def check_objective(key, model_info):
    """Refuse, before any training, an objective that this program cannot use (see the module docstring)."""
    if model_info is None:
        return
    rough = _not_reparameterized(model_info)
    global_latents = [s.name for s in model_info.global_latents]
    if key == "meanfield":
        if model_info.model_enumerated:
            raise UserError("the meanfield objective (analytic KL) cannot sum out the model's "
                            "enumerated discrete sites; use --objective elbo or iwae")
        if rough:
            raise UserError(f"the meanfield objective (Pyro's TraceMeanField_ELBO) needs reparameterized guide "
                            f"sites, and guide site(s) {', '.join(map(repr, rough))} are not (discrete or "
                            f"enumerated); use --objective elbo, which sums them out or takes the score function")
    if key in ("iwae", "iwae-dreg") and global_latents:
        raise UserError(f"--objective {key} is a bound per data point, and the model's global latents "
                        f"({', '.join(map(repr, global_latents))}, outside the data plate) have no per-point term; "
                        f"use --objective elbo or meanfield to fit this model")
    if key == "iwae-dreg" and rough:
        raise UserError(f"iwae-dreg needs reparameterized guide sites, but {', '.join(map(repr, rough))} "
                        f"are not; use the iwae objective")


def _info_plate_nesting(model_info):
    return getattr(model_info, "max_plate_nesting", None) if model_info is not None else None


def get_objective(name, particles=1, model_info=None, kl_warmup=0, free_bits=0.0, kl_warmup_start=0.0, **kw):
    """The objective ``name`` (see :data:`OBJECTIVES`) with ``particles`` vectorized particles.

    :param model_info: optional :class:`pyro_lvm.protocol.ModelInfo`; tells whether the model
        enumerates sites and how many plates it has, saving a trace at the first call.
    :param kl_warmup: KL warm-up over this many steps (``elbo``/``meanfield`` only; 0: off).
    :param free_bits: free bits lambda, nats per latent dimension (``elbo``/``meanfield`` only; 0: off).
    :param kl_warmup_start: the KL weight beta at step 0 of the warm-up.
        With either remedy on, the objective is a
        :class:`~pyro_lvm.objectives.regularized.RegularizedELBO` (its ``loss`` stays the true ELBO).
    :param kw: passed to the ELBO's constructor (e.g. ``retain_graph``).
    :raises UserError: unknown name (with the closest known names), ``particles < 1``, or
        ``meanfield`` on a model with enumerated sites.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in OBJECTIVES:
        close = difflib.get_close_matches(key, list(OBJECTIVES), n=2, cutoff=0.4)
        hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(OBJECTIVES)}"
        raise UserError(f"unknown objective {name!r}; {hint}")
    particles = int(particles)
    if particles < 1:
        raise UserError(f"--particles must be at least 1, got {particles}")
    enumerated = _info_enumerated(model_info)
    plate_nesting = _info_plate_nesting(model_info)
    check_objective(key, model_info)
    data_plate = model_info.data_plate.name if model_info is not None and hasattr(model_info, "data_plate") else None
    # Programs that do not broadcast over a particle dimension run their particles one at a time.
    vectorize = getattr(model_info, "vectorizable", None) is not False

    # --- remedies for posterior collapse (KL warm-up, free bits): pyro_lvm/objectives/regularized.py
    kl_warmup, free_bits, kl_warmup_start = check_remedies(kl_warmup, free_bits, kl_warmup_start)
    if kl_warmup or free_bits:
        if key not in ("elbo", "meanfield"):
            raise UserError(f"--kl-warmup and --free-bits apply to --objective elbo or meanfield; the "
                            f"importance-weighted bound of {key!r} has no separate KL term to reweight")
        if enumerated:
            raise UserError("--kl-warmup and --free-bits do not support models with enumerated discrete "
                            "sites; fit this model without them")
        return RegularizedELBO(base=key, num_particles=particles, kl_warmup=kl_warmup,
                               kl_warmup_start=kl_warmup_start, free_bits=free_bits,
                               max_plate_nesting=plate_nesting or float("inf"), **kw)
    # --- end remedies

    if key == "iwae":
        return IWAE_ELBO(num_particles=particles, max_plate_nesting=plate_nesting or float("inf"),
                         data_plate=data_plate, vectorize=vectorize, **kw)
    if key == "iwae-dreg":
        if not vectorize and particles > 1:
            raise UserError("iwae-dreg needs a program that broadcasts over a particle dimension (Vindex, "
                            "... indexing); use --objective iwae")
        return DReG_IWAE_ELBO(num_particles=particles, max_plate_nesting=plate_nesting or float("inf"),
                              data_plate=data_plate, **kw)

    vectorized = vectorize
    if key == "elbo":
        def choose(is_enumerated, max_plate_nesting):
            if is_enumerated:
                return pyro.infer.TraceEnum_ELBO(num_particles=particles, vectorize_particles=vectorized,
                                                 max_plate_nesting=max_plate_nesting, **kw)
            return pyro.infer.Trace_ELBO(num_particles=particles, vectorize_particles=vectorized,
                                         max_plate_nesting=max_plate_nesting or float("inf"), **kw)
    else:
        def choose(is_enumerated, max_plate_nesting):
            if is_enumerated:
                raise UserError("the meanfield objective (analytic KL) cannot sum out enumerated discrete "
                                "sites; use --objective elbo or iwae")
            return pyro.infer.TraceMeanField_ELBO(num_particles=particles, vectorize_particles=vectorized,
                                                  max_plate_nesting=max_plate_nesting or float("inf"), **kw)
        if enumerated:
            choose(True, plate_nesting)
    return EnumerationAwareELBO(choose, num_particles=particles, enumerated=enumerated,
                                max_plate_nesting=plate_nesting,
                                check=_reparameterized_guide if key == "meanfield" and model_info is None else None)


def _reparameterized_guide(model, guide, args, kwargs):
    """meanfield without a ModelInfo: refuse a guide site that is not reparameterized, at the first call."""
    import pyro.poutine as poutine
    import torch

    with poutine.block(), torch.no_grad():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    rough = [name for name, site in trace.nodes.items()
             if site["type"] == "sample" and not site["is_observed"] and type(site["fn"]).__name__ != "_Subsample"
             and (not site["fn"].has_rsample or site["infer"].get("enumerate"))]
    if rough:
        raise UserError(f"the meanfield objective (Pyro's TraceMeanField_ELBO) needs reparameterized guide "
                        f"sites, and guide site(s) {', '.join(map(repr, rough))} are not (discrete or "
                        f"enumerated); use --objective elbo, which sums them out or takes the score function")


__all__ = ["OBJECTIVES", "get_objective", "IWAE_ELBO", "DReG_IWAE_ELBO", "EnumerationAwareELBO", "RegularizedELBO"]
