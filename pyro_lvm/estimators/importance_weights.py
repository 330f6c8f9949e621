"""Per-data-point log importance weights with vectorized particles.

For a model p(x, z) and a guide q(z | x) whose local latents sit in the data plate (the plate that
holds the observed sites, whatever its name and dim), the log importance weight of particle k at
data point n is

    log w_kn = log p(x_n, z_kn) - log q(z_kn | x_n),        z_kn ~ q(z | x_n),

with discrete latents summed out exactly, point by point:

- enumerated in the model (``infer={"enumerate": "parallel"}``, ``pyro.markov`` chains included):
  log p(x_n, z_kn) = log sum_c p(x_n, z_kn, c), by the tensor-variable elimination of
  ``TraceEnum_ELBO`` (Obermeyer et al., 2019): ``pyro.ops.contract.contract_to_tensor`` contracting
  to the ordinal {particles, data plate}, so plates nested inside the data plate and chains are
  handled exactly;
- enumerated in the guide (``TraceEnum_ELBO``'s guide-side enumeration): the guide's other sites are
  drawn for every value y, and the weight is stratified over y,
  log w_kn = log sum_y p(x_n, y, z_kny) / q(z_kny | x_n, y), an unbiased estimate of p(x_n)
  (q(y | x) cancels). The ELBO term of such a program is the guide's expectation over y,
  sum_y q(y | x_n) [log p(x_n, y, z_kny) - log q(y | x_n) - log q(z_kny | x_n, y)], returned apart.

Global latents (outside the data plate) have no per-point weight. They are drawn from the guide
with each particle, theta_k ~ q(theta), and left out of the weight, so that
log mean_k w_kn estimates log E_q(theta) p(x_n | theta), the predictive log-likelihood of x_n under
the fitted posterior (:func:`compute_importance_weights` says which sites were left out); the
importance-weighted *objectives* refuse them.

Particles: the guide runs inside ``pyro.plate("particles", K, dim=-(max_plate_nesting + 1))``, to
the left of every plate of the program, the guide's enumerated sites further left, and the model,
replayed against the guide, enumerates to the left of those (as ``TraceEnum_ELBO`` allocates them).
A program that does not broadcast over a particle dimension (``locs[assignment]`` rather than
``Vindex``) runs its particles one at a time (``vectorize=False``; see
:func:`check_vectorization`). Log densities are *unscaled*: the scale of the data plate (N/B under
subsampling) is returned separately, so that a bound applies it outside its logsumexp.
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
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.runtime import _ENUM_ALLOCATOR
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from ..errors import UserError
from ..protocol.plates import plate_frame, program_frames

PARTICLE_PLATE = "particles"


class ImportanceWeights(NamedTuple):
    """The pieces of a per-point importance-weighted bound.

    ``log_weights`` [K, n]: log p(x, z) - log q(z | x), unscaled, differentiable.
    ``scale``: the common scale of the sites in the data plate (N/B under subsampling, else 1.0).
    ``score_log_q`` [K, n]: log q of the guide sites that are not reparameterized (a score-function
    gradient needs it), or ``None`` when every guide site is reparameterized.
    ``elbo`` [K, n]: the per-point ELBO term (equal to ``log_weights`` unless the guide enumerates).
    ``global_sites``: the latent sites outside the data plate, drawn from the guide and left out.
    """

    log_weights: torch.Tensor
    scale: Union[float, torch.Tensor]
    score_log_q: Optional[torch.Tensor]
    elbo: Optional[torch.Tensor] = None
    global_sites: tuple = ()


def particle_plate(num_particles, max_plate_nesting):
    """The plate that vectorizes particles, to the left of the program's own plates."""
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))


def _is_deterministic(site):
    return site["infer"].get("_deterministic", False)


def _sample_sites(trace):
    return [(name, site) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)]


def find_data_plate(model_trace, num_points=None):
    """The name of the data plate of a model trace: the plate that holds every observed site,
    preferring one of ``num_points`` points, then a size-less one, then the outermost."""
    observed = [site for _, site in _sample_sites(model_trace)
                if site["is_observed"] and type(site["fn"]).__name__ != "Unit" and not _is_deterministic(site)]
    if not observed:
        raise UserError("the model observes no data: observe it with pyro.sample(name, distribution, obs=x) "
                        "inside a pyro.plate over the data points")
    common = None
    for site in observed:
        names = [f.name for f in program_frames(site)]
        common = names if common is None else [n for n in common if n in names]
    if not common:
        raise UserError("the model's observed sites do not share a pyro.plate; put them inside one "
                        "pyro.plate over the data points")

    def rank(name):
        frame = plate_frame(observed[0], name)
        full = getattr(frame, "full_size", None) or frame.size
        return 0 if num_points is not None and full == num_points else 1 if frame.size in (-1, None) else 2

    return min(common, key=lambda name: (rank(name), common.index(name)))


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
            for site in trace.nodes.values() if site["type"] in ("sample", "param")
            for frame in program_frames(site) if frame.dim is not None]
    find_data_plate(model_trace)  # refuses a program without observed sites in a plate
    return max(-min(dims), 1) if dims else 1


def model_has_enumeration(model, guide, args=(), kwargs=None):
    """Whether model or guide has sites marked for parallel enumeration (the guide's, or the model's
    that the guide does not sample)."""
    kwargs = kwargs or {}
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    if any(site["infer"].get("enumerate") == "parallel" and not site["is_observed"] for _, site in _sample_sites(guide_trace)):
        return True
    return any(not site["is_observed"] and site["infer"].get("enumerate") == "parallel" and name not in guide_trace
               for name, site in _sample_sites(model_trace))


def _enum_state():
    return (_ENUM_ALLOCATOR.next_available_dim, _ENUM_ALLOCATOR.next_available_id, dict(_ENUM_ALLOCATOR.dim_to_id))


def _set_enum_state(state):
    _ENUM_ALLOCATOR.next_available_dim, _ENUM_ALLOCATOR.next_available_id = state[0], state[1]
    _ENUM_ALLOCATOR.dim_to_id = dict(state[2])


class GuideTrace(NamedTuple):
    trace: object
    enum_state: Optional[tuple]  # the enumeration allocator after the guide, for the model to go on from


def trace_guide(guide, args, kwargs, num_particles, max_plate_nesting, vectorize=True):
    """Run the guide once, ``num_particles`` vectorized particles (or one, without a particle plate, when
    ``vectorize`` is False), its enumerated sites enumerated; subsample sites pruned."""
    enumerated = EnumMessenger(first_available_dim=-(max_plate_nesting + 2))(guide)
    if vectorize:
        with particle_plate(num_particles, max_plate_nesting):
            guide_trace = poutine.trace(enumerated).get_trace(*args, **kwargs)
    else:
        guide_trace = poutine.trace(enumerated).get_trace(*args, **kwargs)
    state = _enum_state() if any(site["infer"].get("_enumerate_dim") is not None
                                 for _, site in _sample_sites(guide_trace)) else None
    return GuideTrace(prune_subsample_sites(guide_trace), state)


def trace_model(model, replay_trace, args, kwargs, num_particles, max_plate_nesting, enum_state=None,
                vectorize=True):
    """Replay the model against ``replay_trace`` (guide values), enumerating its marked sites to the
    left of the guide's (``enum_state``: the allocator as the guide left it)."""
    if enum_state is None:
        enumerated = poutine.enum(model, first_available_dim=-(max_plate_nesting + 2))
    else:
        _set_enum_state(enum_state)
        enumerated = EnumMessenger()(model)
    replayed = poutine.trace(poutine.replay(enumerated, trace=replay_trace))
    if vectorize:
        with particle_plate(num_particles, max_plate_nesting):
            model_trace = replayed.get_trace(*args, **kwargs)
    else:
        model_trace = replayed.get_trace(*args, **kwargs)
    return prune_subsample_sites(model_trace)


def point_view(tensor, data_dim, max_plate_nesting):
    """A batch tensor of one site reduced to ``[..., K, n]``: plates nested in the data plate summed,
    the data plate last, the particle dim before it, enumeration dims (if any) further left."""
    batch_dims = max_plate_nesting + 1
    if not torch.is_tensor(tensor):
        tensor = torch.as_tensor(tensor)
    if tensor.dim() < batch_dims:
        tensor = tensor.reshape((1,) * (batch_dims - tensor.dim()) + tuple(tensor.shape))
    inner = [d for d in range(-max_plate_nesting, 0) if d != data_dim]
    if inner:
        tensor = tensor.sum(inner, keepdim=True)
    tensor = tensor.movedim(data_dim, -1)
    return tensor.reshape(tuple(tensor.shape[:-max_plate_nesting]) + (tensor.shape[-1],))


def _site_log_prob(site, fn=None):
    """Unscaled log density of a site, masked as the program asked (``poutine.mask``)."""
    fn = site["fn"] if fn is None else fn
    log_prob = fn.log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_prob, 1.0, site["mask"])


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


def _refuse_global(name, role, objective):
    raise UserError(f"{role} site {name!r} is outside the data plate (a global latent): {objective} is a bound "
                    f"per data point and has no term for it; use --objective elbo or meanfield to fit this model")


class GuideTerms(NamedTuple):
    log_q: object  # [..., K, n]: non-enumerated local guide sites
    log_q_enumerated: object  # [..., K, n] or None: the guide's enumerated sites
    score_log_q: object
    scales: list
    global_sites: tuple
    enumerated_dims: frozenset


def guide_log_density(guide_trace, max_plate_nesting, num_particles, detach_params=False, data_plate=None,
                      allow_global=True, objective="the importance-weighted bound"):
    """log q(z | x) per particle and point of a guide trace: :class:`GuideTerms`.

    With ``detach_params`` the density is evaluated with the guide's distribution parameters
    detached, so gradients reach the guide only through the sampled values (the
    doubly-reparameterized estimator needs this).
    """
    data_plate = data_plate or "data"
    log_q, log_q_enum, score_log_q = 0.0, None, None
    scales, global_sites, enum_dims = [], [], set()
    for name, site in _sample_sites(guide_trace):
        if site["is_observed"] or _is_deterministic(site):
            continue
        frame = plate_frame(site, data_plate)
        if frame is None:
            if not allow_global:
                _refuse_global(name, "guide", objective)
            global_sites.append(name)
            continue
        fn = detach_distribution(site["fn"]) if detach_params else site["fn"]
        term = point_view(_site_log_prob(site, fn), frame.dim, max_plate_nesting)
        scales.append(site["scale"])
        if site["infer"].get("_enumerate_dim") is not None:
            enum_dims.add(site["infer"]["_enumerate_dim"])
            if any(f.name != data_plate for f in program_frames(site)):
                raise UserError(f"guide site {name!r} is enumerated inside a plate nested in the data plate; "
                                f"pyro-lvm sums out guide-enumerated sites of the data plate only: enumerate it in "
                                f"the model instead")
            log_q_enum = term if log_q_enum is None else log_q_enum + term
            continue
        log_q = log_q + term
        if not site["fn"].has_rsample:
            score_log_q = term if score_log_q is None else score_log_q + term
    return GuideTerms(log_q, log_q_enum, score_log_q, scales, tuple(global_sites), frozenset(enum_dims))


def model_log_density(model_trace, guide_names, max_plate_nesting, num_particles, data_plate=None,
                      allow_global=True, objective="the importance-weighted bound", guide_enumerated_dims=frozenset(),
                      particle_plate=PARTICLE_PLATE):
    """log p(x, z) per particle and point, ``[..., K, n]``, with the model's enumerated sites summed out
    exactly (the guide's enumerated dims, if any, are kept on the left).

    Returns ``(log_p, scales, global_sites)``.
    """
    data_plate = data_plate or "data"
    sites, global_sites = [], []
    model_enumerated = False
    for name, site in _sample_sites(model_trace):
        if _is_deterministic(site):
            continue
        frame = plate_frame(site, data_plate)
        if frame is None:
            if site["is_observed"]:
                raise UserError(f"observed site {name!r} is outside the data plate {data_plate!r}; put every "
                                f"observed site inside the plate over the data points")
            if site["infer"].get("_enumerate_dim") is not None and name not in guide_names:
                raise UserError(f"model site {name!r} is enumerated outside the data plate: a global discrete "
                                f"latent couples all data points, so log p(x) has no per-point terms; sample it "
                                f"in the guide")
            if not allow_global:
                _refuse_global(name, "model", objective)
            global_sites.append(name)
            continue
        if site["infer"].get("_enumerate_dim") is not None and name not in guide_names:
            model_enumerated = True
        elif not site["is_observed"] and name not in guide_names:
            raise UserError(f"latent site {name!r} is in the model but not in the guide; sample it in the "
                            f"guide, or mark it for enumeration with infer={{'enumerate': 'parallel'}} "
                            f"if it is discrete")
        sites.append(site)
    if not sites:
        raise UserError(f"the model has no sample sites in the data plate {data_plate!r}")
    scales = [site["scale"] for site in sites]
    data_dim = plate_frame(sites[0], data_plate).dim
    if not model_enumerated:
        log_p = 0.0
        for site in sites:
            log_p = log_p + point_view(_site_log_prob(site), data_dim, max_plate_nesting)
        return log_p, scales, tuple(global_sites)

    # Sum the model's enumerated dims out by variable elimination, contracting to {particles, data}.
    # The particle or data plate may have size 1 (or no tensor may depend on the particles, as with
    # an empty guide); such a plate has no dim in the packed tensors and is left out of the
    # ordinals, so nothing is multiplied over it. Dims the guide enumerated are kept.
    model_trace.symbolize_dims()
    packed_terms = [(site, packed.pack(_site_log_prob(site), site["infer"]["_dim_to_symbol"])) for site in sites]
    present = set().union(*(term._pyro_dims for _, term in packed_terms))
    outer = {model_trace.plate_to_symbol[name] for name in (particle_plate, data_plate)
             if name is not None and name in model_trace.plate_to_symbol}
    tensor_tree = {}
    for site, term in packed_terms:
        ordinal = frozenset(symbol for symbol in (model_trace.plate_to_symbol[f.name]
                                                  for f in site["cond_indep_stack"] if f.vectorized)
                            if symbol in present or symbol not in outer)
        tensor_tree.setdefault(ordinal, []).append(term)
    plate_symbols = set(model_trace.plate_to_symbol.values())
    kept = {symbol for symbol, dim in model_trace.symbol_to_dim.items() if dim in guide_enumerated_dims}
    sum_dims = set(model_trace.symbol_to_dim) - plate_symbols - kept
    target = frozenset(outer & present)
    contracted = contract_to_tensor(OrderedDict(sorted(tensor_tree.items(), key=lambda kv: len(kv[0]))),
                                    sum_dims, target_ordinal=target)
    log_p = packed.unpack(contracted, model_trace.symbol_to_dim)
    return point_view(log_p, data_dim, max_plate_nesting), scales, tuple(global_sites)


def combine(log_p, guide_terms, num_particles, num_points):
    """``(log w [K, n], elbo [K, n])`` from the model's and the guide's terms (see the module docstring)."""
    combined = log_p - guide_terms.log_q
    if not torch.is_tensor(combined):
        combined = torch.as_tensor(combined)
    if guide_terms.log_q_enumerated is None and combined.dim() <= 2:
        combined = combined.reshape((1,) * (2 - combined.dim()) + tuple(combined.shape))
        log_w = combined.expand(num_particles, num_points)
        return log_w, log_w
    log_q_enum = guide_terms.log_q_enumerated if guide_terms.log_q_enumerated is not None else torch.zeros(())
    shape = torch.broadcast_shapes(combined.shape, torch.as_tensor(log_q_enum).shape, (num_particles, num_points))
    combined, log_q_enum = combined.expand(shape), torch.as_tensor(log_q_enum, device=combined.device).expand(shape)
    combined = combined.reshape(-1, num_particles, num_points)
    log_q_enum = log_q_enum.reshape(-1, num_particles, num_points)
    log_w = torch.logsumexp(combined, dim=0)
    elbo = (log_q_enum.exp() * (combined - log_q_enum)).sum(0)
    return log_w, elbo


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


def _num_points(model_trace, data_plate):
    """The points of the data plate in a trace: its size, or for a size-less plate the largest size
    along its dim among the sites' batch shapes (an enumerated value is not expanded over the points)."""
    points = 1
    for _, site in _sample_sites(model_trace):
        frame = plate_frame(site, data_plate)
        if frame is None:
            continue
        if frame.size is not None and frame.size > 0:
            return frame.size
        for shape in (tuple(site["fn"].batch_shape),
                      tuple(site["value"].shape[:site["value"].dim() - site["fn"].event_dim])):
            if len(shape) >= -frame.dim:
                points = max(points, shape[frame.dim])
    return points


def _one_pass(model, guide, args, kwargs, num_particles, max_plate_nesting, replay_transform, detach_guide_params,
              data_plate, allow_global, objective, vectorize):
    guide_run = trace_guide(guide, args, kwargs, num_particles, max_plate_nesting, vectorize=vectorize)
    guide_trace = guide_run.trace
    replay_trace = guide_trace
    if replay_transform is not None:
        replay_trace = guide_trace.copy()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                replay_trace.nodes[name] = dict(site, value=replay_transform(site))
    model_trace = trace_model(model, replay_trace, args, kwargs, num_particles, max_plate_nesting,
                              guide_run.enum_state, vectorize=vectorize)
    if data_plate is None:
        data_plate = find_data_plate(model_trace, len(args[0]) if args and hasattr(args[0], "__len__") else None)
    terms = guide_log_density(replay_trace, max_plate_nesting, num_particles, detach_params=detach_guide_params,
                              data_plate=data_plate, allow_global=allow_global, objective=objective)
    log_p, model_scales, model_globals = model_log_density(
        model_trace, set(guide_trace.nodes), max_plate_nesting, num_particles, data_plate=data_plate,
        allow_global=allow_global, objective=objective, guide_enumerated_dims=terms.enumerated_dims)
    points = _num_points(model_trace, data_plate)
    log_w, elbo = combine(log_p, terms, num_particles, points)
    score = terms.score_log_q
    if score is not None:
        score = torch.as_tensor(score).expand(num_particles, points)
    return ImportanceWeights(log_w, common_scale(model_scales + terms.scales), score, elbo,
                             tuple(dict.fromkeys(model_globals + terms.global_sites)))


def compute_importance_weights(model, guide, args=(), kwargs=None, num_particles=1,
                               max_plate_nesting=None, replay_transform=None, detach_guide_params=False,
                               data_plate=None, allow_global=False, objective="the importance-weighted bound",
                               vectorize=True):
    """Trace guide and model with ``num_particles`` particles: :class:`ImportanceWeights`.

    :param replay_transform: optional ``f(site) -> value``, applied to each guide value before the
        model and log q see it (the doubly-reparameterized estimator rescales gradients there).
    :param detach_guide_params: evaluate log q with the guide's parameters detached.
    :param data_plate: the data plate's name (found from the model trace when None).
    :param allow_global: draw global latents from the guide and leave them out of the weights
        (estimators: the predictive log-likelihood); otherwise refuse them (objectives).
    :param vectorize: particles in one vectorized pass; False runs them one at a time, for programs
        that do not broadcast over a particle dimension.
    """
    kwargs = kwargs or {}
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    options = (max_plate_nesting, replay_transform, detach_guide_params, data_plate, allow_global, objective)
    if vectorize:
        return _one_pass(model, guide, args, kwargs, num_particles, *options, vectorize=True)
    if replay_transform is not None:
        raise UserError("iwae-dreg needs a program that broadcasts over a particle dimension; use --objective iwae")
    passes = [_one_pass(model, guide, args, kwargs, 1, *options, vectorize=False) for _ in range(num_particles)]
    score = None if passes[0].score_log_q is None else torch.cat([p.score_log_q for p in passes])
    return ImportanceWeights(torch.cat([p.log_weights for p in passes]), passes[0].scale, score,
                             torch.cat([p.elbo for p in passes]), passes[0].global_sites)


def importance_log_weights(lvm, x, num_particles, max_plate_nesting=None):
    """log p(x, z_k) - log q(z_k | x) for ``lvm`` on data ``x``: a tensor [K, n].

    Differentiable when the guide's sites are reparameterized; unscaled; global latents drawn from
    the guide (the predictive weights).
    """
    from ..protocol import as_program

    from . import check_factorizing_guide, check_per_point_guide

    program = as_program(lvm)
    info = ensure_info(program, x)
    check_per_point_guide(program, x)
    check_factorizing_guide(program)
    vectorize = vectorizes(program, x)
    pieces = [compute_importance_weights(program.model, program.guide, (batch,), {}, num_particles,
                                         max_plate_nesting or info.max_plate_nesting, data_plate=info.data_plate.name,
                                         allow_global=True, vectorize=vectorize).log_weights[:, :valid]
              for batch, valid in program.batches(x, len(x))]
    return torch.cat(pieces, dim=-1)


def ensure_info(program, x):
    """The program's :class:`~pyro_lvm.protocol.ModelInfo`, inspecting it on ``x`` the first time."""
    if program.info is None:
        from ..protocol import inspect_model

        inspect_model(program, x, check_data=False)
    return program.info


def vectorizes(program, x):
    """Whether the program's particles can run vectorized (checked once on a batch of ``x``)."""
    info = ensure_info(program, x)
    if info.vectorizable is None:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            info.vectorizable = check_vectorization(program, x)
    return info.vectorizable


def check_vectorization(program, x, tolerance=1e-4):
    """Whether two vectorized particles give the weights that two separate runs give.

    Pyro's vectorized particles need a program that broadcasts over a dimension on the left
    (``Vindex``, ``...`` indexing). One that does not either fails or silently mixes particles
    (``locs[assignment]`` indexes the particle dimension); both are caught here by replaying each
    vectorized particle's draws alone (no particle plate) and comparing the weights.
    """
    info = program.info
    if not [s for s in info.guide_latents if not s.enumerated]:
        return True  # nothing is drawn: one particle is the only one
    batch = program.probe(x)
    mpn = info.max_plate_nesting
    plate = info.data_plate.name
    try:
        with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
            guide_run = trace_guide(program.guide, (batch,), {}, 2, mpn, vectorize=True)
            model_trace = trace_model(program.model, guide_run.trace, (batch,), {}, 2, mpn, guide_run.enum_state)
            terms = guide_log_density(guide_run.trace, mpn, 2, data_plate=plate)
            log_p, _, _ = model_log_density(model_trace, set(guide_run.trace.nodes), mpn, 2, data_plate=plate,
                                            guide_enumerated_dims=terms.enumerated_dims)
            points = _num_points(model_trace, plate)
            vectorized, _ = combine(log_p, terms, 2, points)
            for k in range(2):
                draws = poutine.Trace()
                for name, site in _sample_sites(guide_run.trace):
                    if site["is_observed"] or site["infer"].get("_enumerate_dim") is not None:
                        continue
                    value = site["value"]
                    axis = value.dim() - site["fn"].event_dim - (mpn + 1)
                    if axis < 0:
                        return False
                    k_ = k if value.shape[axis] == 2 else 0
                    # Drop the particle dim where nothing is to its left; keep it (size 1) under enumeration dims.
                    value = value.select(axis, k_) if axis == 0 else value.narrow(axis, k_, 1)
                    draws.add_node(name, type="sample", name=name, value=value, is_observed=False, infer={})
                replayed_guide = poutine.replay(program.guide, trace=draws)
                single = trace_guide(replayed_guide, (batch,), {}, 1, mpn, vectorize=False)
                single_model = trace_model(program.model, single.trace, (batch,), {}, 1, mpn, single.enum_state,
                                           vectorize=False)
                single_terms = guide_log_density(single.trace, mpn, 1, data_plate=plate)
                single_p, _, _ = model_log_density(single_model, set(single.trace.nodes), mpn, 1, data_plate=plate,
                                                   guide_enumerated_dims=single_terms.enumerated_dims)
                alone, _ = combine(single_p, single_terms, 1, points)
                if alone.shape[-1] != vectorized.shape[-1]:
                    return False
                if not torch.allclose(alone[0], vectorized[k], rtol=tolerance, atol=tolerance * (1 + alone.abs().max())):
                    return False
    except UserError:
        raise
    except Exception:  # noqa: BLE001 -- a program that fails under a particle plate does not vectorize
        return False
    return True
