"""Per-data-point log importance weights with vectorized particles.

For a model p(x, z) and a guide q(z | x) whose local latents sit in ``pyro.plate("data", n)``, the
log importance weight of particle k at data point n is

    log w_kn = log p(x_n, z_kn) - log q(z_kn | x_n),        z_kn ~ q(z | x_n),

with discrete latents that the model enumerates (``infer={"enumerate": "parallel"}``) summed out
exactly, point by point:

    log p(x_n, z_kn) = log sum_c p(x_n, z_kn, c).

Everything else in pyro-lvm that talks about log p(x) is built on these weights: the ELBO is
mean_k log w_kn, the IWAE bound (Burda et al., 2015) is log mean_k w_kn, importance sampling is the
same log mean with many particles.

How the K particles are vectorized: the guide runs inside ``pyro.plate("particles", K,
dim=-(max_plate_nesting + 1))``, to the left of every plate of the program, so each local site has
batch shape ``[K, ..., n]``; the model is replayed against the guide's values inside the same plate
and under :class:`~pyro.poutine.enum_messenger.EnumMessenger`, which puts each enumerated site's
values on its own dimension further left. The enumerated dimensions are summed out with
:func:`pyro.ops.contract.contract_to_tensor`, contracting to the ordinal {particles, data}: this is
the tensor-variable-elimination of ``TraceEnum_ELBO`` (Obermeyer et al., 2019), so plates nested
inside the data plate are handled exactly too (sum over the enumerated values first, then the
product over the inner plate). Log densities are *unscaled*: the scale of the data plate (N/B when
the data are subsampled) is returned separately, so that a bound can apply it outside its
logsumexp, where it belongs.

Latent sites outside the data plate (global latents) have no per-point weight: they raise
:class:`~pyro_lvm.errors.UserError`.
"""

import copy
from collections import OrderedDict
from typing import NamedTuple, Optional, Union

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.util import prune_subsample_sites

from ..errors import UserError

PARTICLE_PLATE = "particles"
DATA_PLATE = "data"


class ImportanceWeights(NamedTuple):
    """The pieces of a per-point importance-weighted bound.

    ``log_weights`` [K, n]: log p(x, z) - log q(z | x), unscaled, differentiable.
    ``scale``: the common scale of the sites in the data plate (N/B under subsampling, else 1.0).
    ``score_log_q`` [K, n]: log q of the guide sites that are not reparameterized (a score-function
    gradient needs it), or ``None`` when every guide site is reparameterized.
    """

    log_weights: torch.Tensor
    scale: Union[float, torch.Tensor]
    score_log_q: Optional[torch.Tensor]


def particle_plate(num_particles, max_plate_nesting):
    """The plate that vectorizes particles, to the left of the program's own plates."""
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))


def _data_frame(site):
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            return frame
    return None


def _is_deterministic(site):
    return site["infer"].get("_deterministic", False)


def guess_max_plate_nesting(model, guide, args=(), kwargs=None):
    """The number of nested vectorized plates in one unenumerated run of guide and model.

    Like ``ELBO._guess_max_plate_nesting``, this assumes the program's structure is static.
    """
    kwargs = kwargs or {}
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [frame.dim
            for trace in (model_trace, guide_trace)
            for site in trace.nodes.values() if site["type"] == "sample"
            for frame in site["cond_indep_stack"] if frame.vectorized]
    if not any(_data_frame(site) is not None for site in model_trace.nodes.values()
               if site["type"] == "sample"):
        raise UserError("the model has no pyro.plate('data', n); put the observed site 'x' and the "
                        "local latents inside it (see docs/ARCHITECTURE.md)")
    return -min(dims) if dims else 0


def model_has_enumeration(model, guide, args=(), kwargs=None):
    """Whether the model has sites marked for parallel enumeration that the guide does not sample."""
    kwargs = kwargs or {}
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return any(site["type"] == "sample" and not site["is_observed"]
               and site["infer"].get("enumerate") == "parallel" and name not in guide_trace
               for name, site in model_trace.nodes.items())


def trace_guide(guide, args, kwargs, num_particles, max_plate_nesting):
    """Run the guide once with ``num_particles`` vectorized particles; subsample sites pruned."""
    with particle_plate(num_particles, max_plate_nesting):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return prune_subsample_sites(guide_trace)


def trace_model(model, replay_trace, args, kwargs, num_particles, max_plate_nesting):
    """Replay the model against ``replay_trace`` (guide values), enumerating its marked sites."""
    enumerated = poutine.enum(model, first_available_dim=-(max_plate_nesting + 2))
    with particle_plate(num_particles, max_plate_nesting):
        model_trace = poutine.trace(poutine.replay(enumerated, trace=replay_trace)).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_trace)


def _to_particles_by_points(log_prob, site, max_plate_nesting, num_particles):
    """Reduce one site's log density to [K, n]: sum over plates nested inside the data plate."""
    batch_dims = max_plate_nesting + 1
    if log_prob.dim() < batch_dims:
        log_prob = log_prob.reshape((1,) * (batch_dims - log_prob.dim()) + tuple(log_prob.shape))
    if log_prob.dim() > batch_dims:
        raise ValueError(f"site {site['name']!r} has log_prob of shape {tuple(log_prob.shape)}, "
                         f"more batch dims than the {batch_dims} plates (particles included)")
    data_dim = _data_frame(site).dim
    inner = [d for d in range(-max_plate_nesting, 0) if d != data_dim]
    if inner:
        log_prob = log_prob.sum(inner, keepdim=True)
    return log_prob.reshape(log_prob.shape[-batch_dims], log_prob.shape[data_dim])


def _site_log_prob(site, fn=None):
    """Unscaled log density of a site, masked as the program asked (``poutine.mask``)."""
    fn = site["fn"] if fn is None else fn
    log_prob = fn.log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_prob, 1.0, site["mask"])


def _check_local(site, role):
    if _data_frame(site) is None:
        raise UserError(f"{role} site {site['name']!r} is outside pyro.plate('data'): a global latent has "
                        f"no per-data-point weight; use the elbo or meanfield objective to fit it, or move "
                        f"it into the data plate")


def detach_distribution(fn):
    """A copy of distribution ``fn`` whose tensors are detached from the autograd graph.

    Works for any distribution whose parameters are tensors held in its ``__dict__`` (possibly
    through ``base_dist`` and transforms, as in ``Independent`` and ``TransformedDistribution``).
    Transforms that hold ``nn.Parameter`` s (normalizing flows) cannot be detached this way.
    """
    if isinstance(fn, torch.nn.Module) and any(p.requires_grad for p in fn.parameters()):
        raise UserError(f"cannot stop gradients through {type(fn).__name__}, which holds trainable "
                        f"parameters (a normalizing flow?); use the iwae objective instead of iwae-dreg")
    new = copy.copy(fn)
    for key, value in vars(fn).items():
        if isinstance(value, torch.Tensor):
            new.__dict__[key] = value.detach()
        elif isinstance(value, (torch.distributions.Distribution, torch.distributions.Transform)):
            new.__dict__[key] = detach_distribution(value)
        elif isinstance(value, (list, tuple)) and any(
                isinstance(v, (torch.distributions.Distribution, torch.distributions.Transform)) for v in value):
            new.__dict__[key] = type(value)(
                detach_distribution(v) if isinstance(v, (torch.distributions.Distribution,
                                                         torch.distributions.Transform)) else v
                for v in value)
    return new


def guide_log_density(guide_trace, max_plate_nesting, num_particles, detach_params=False):
    """log q(z | x) per particle and point, [K, n]; plus the part from non-reparameterized sites.

    With ``detach_params`` the density is evaluated with the guide's distribution parameters
    detached, so gradients reach the guide only through the sampled values (the
    doubly-reparameterized estimator needs this).

    Returns ``(log_q, score_log_q, scales)``.
    """
    log_q = 0.0
    score_log_q = None
    scales = []
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or _is_deterministic(site):
            continue
        _check_local(site, "guide")
        fn = detach_distribution(site["fn"]) if detach_params else site["fn"]
        term = _to_particles_by_points(_site_log_prob(site, fn), site, max_plate_nesting, num_particles)
        log_q = log_q + term
        scales.append(site["scale"])
        if not site["fn"].has_rsample:
            score_log_q = term if score_log_q is None else score_log_q + term
    return log_q, score_log_q, scales


def model_log_density(model_trace, guide_names, max_plate_nesting, num_particles):
    """log p(x, z) per particle and point, [K, n], with enumerated sites summed out exactly.

    Returns ``(log_p, scales)``.
    """
    sites = []
    enumerated = False
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or _is_deterministic(site):
            continue
        _check_local(site, "model")
        if site["infer"].get("_enumerate_dim") is not None:
            enumerated = True
        elif not site["is_observed"] and name not in guide_names:
            raise UserError(f"latent site {name!r} is in the model but not in the guide; sample it in the "
                            f"guide, or mark it for enumeration with infer={{'enumerate': 'parallel'}} "
                            f"if it is discrete")
        sites.append(site)
    scales = [site["scale"] for site in sites]
    if not enumerated:
        log_p = 0.0
        for site in sites:
            log_p = log_p + _to_particles_by_points(_site_log_prob(site), site, max_plate_nesting,
                                                    num_particles)
        return log_p, scales

    # Sum the enumerated dims out by variable elimination, contracting to {particles, data}.
    # The particle or data plate may have size 1 (or no tensor may depend on the particles, as with
    # an empty guide); such a plate has no dim in the packed tensors and is left out of the
    # ordinals, so nothing is multiplied over it. The result is broadcast to [K, n] below.
    model_trace.symbolize_dims()
    packed_terms = [(site, packed.pack(_site_log_prob(site), site["infer"]["_dim_to_symbol"]))
                    for site in sites]
    present = set().union(*(term._pyro_dims for _, term in packed_terms))
    outer = {model_trace.plate_to_symbol[name] for name in (PARTICLE_PLATE, DATA_PLATE)}
    tensor_tree = {}
    for site, term in packed_terms:
        ordinal = frozenset(symbol for symbol in (model_trace.plate_to_symbol[f.name]
                                                  for f in site["cond_indep_stack"] if f.vectorized)
                            if symbol in present or symbol not in outer)
        tensor_tree.setdefault(ordinal, []).append(term)
    plate_symbols = set(model_trace.plate_to_symbol.values())
    sum_dims = set(model_trace.symbol_to_dim) - plate_symbols
    target = frozenset(outer & present)
    contracted = contract_to_tensor(OrderedDict(sorted(tensor_tree.items(), key=lambda kv: len(kv[0]))),
                                    sum_dims, target_ordinal=target)
    log_p = packed.unpack(contracted, model_trace.symbol_to_dim)
    data_site = next(site for site in sites if _data_frame(site) is not None)
    return _to_particles_by_points(log_p, data_site, max_plate_nesting, num_particles), scales


def common_scale(scales):
    """The one scale shared by every site of the data plate; a bound per point needs exactly one."""
    distinct = []
    for scale in scales:
        if not any(scale is other or bool(torch.all(torch.as_tensor(scale) == torch.as_tensor(other)))
                   for other in distinct):
            distinct.append(scale)
    if len(distinct) > 1:
        raise UserError("the sites in the data plate are scaled differently (poutine.scale?); an "
                        "importance-weighted bound needs one scale for the whole data point")
    return distinct[0] if distinct else 1.0


def compute_importance_weights(model, guide, args=(), kwargs=None, num_particles=1,
                               max_plate_nesting=None, replay_transform=None, detach_guide_params=False):
    """Trace guide and model with ``num_particles`` vectorized particles: :class:`ImportanceWeights`.

    :param replay_transform: optional ``f(site) -> value``, applied to each guide value before the
        model and log q see it (the doubly-reparameterized estimator rescales gradients there).
    :param detach_guide_params: evaluate log q with the guide's parameters detached.
    """
    kwargs = kwargs or {}
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    guide_trace = trace_guide(guide, args, kwargs, num_particles, max_plate_nesting)
    replay_trace = guide_trace
    if replay_transform is not None:
        replay_trace = guide_trace.copy()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                replay_trace.nodes[name] = dict(site, value=replay_transform(site))
    log_q, score_log_q, guide_scales = guide_log_density(replay_trace, max_plate_nesting, num_particles,
                                                         detach_params=detach_guide_params)
    model_trace = trace_model(model, replay_trace, args, kwargs, num_particles, max_plate_nesting)
    log_p, model_scales = model_log_density(model_trace, set(guide_trace.nodes), max_plate_nesting,
                                            num_particles)
    log_weights = log_p - log_q
    if not torch.is_tensor(log_weights) or log_weights.dim() != 2:
        raise UserError("the model has no sample sites in pyro.plate('data')")
    log_weights = log_weights.expand(num_particles, log_weights.shape[-1])
    return ImportanceWeights(log_weights, common_scale(model_scales + guide_scales), score_log_q)


def importance_log_weights(lvm, x, num_particles, max_plate_nesting=None):
    """log p(x, z_k) - log q(z_k | x) for ``lvm`` (model protocol) on data ``x``: a tensor [K, n].

    Differentiable when the guide's sites are reparameterized; unscaled.
    """
    return compute_importance_weights(lvm.model, lvm.guide, (x,), {}, num_particles,
                                      max_plate_nesting).log_weights
