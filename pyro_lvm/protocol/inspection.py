"""What pyro-lvm learns about a program from Pyro traces: :class:`ModelInfo`.

:func:`inspect_model` runs the guide and the model replayed against it on a few data points (on a
copy of the user's object, so that nothing about the real one is fixed by a probe: an ``AutoGuide``
sets itself up at its first call) and reads off

- the **observed sites**: every site the model samples with ``obs=``, whatever its name
  (``pyro.factor`` sites are not observations), and how each one's value is laid out in a data point
  (the *observation map*, found by running the model on data whose entries are their own positions:
  ``obs=x.reshape(-1, 784)``, ``obs=sequences[batch, t]`` and ``obs=data[..., 0]`` are all gathers
  of x); sampling puts data points back together from it;
- the **data plate**: the plate that holds all observed sites, whatever its name and dim, and its
  kind: a fixed size, no size (sized by broadcasting), or subsampling itself
  (``pyro.plate("data", len(x), subsample_size=B)``; the program then receives all the data);
- the **point shape** the program reads: the data's own, or a scalar per point for data of shape
  (1,), ``(H, W)`` for one-channel images of shape (1, H, W), or a flattened vector, whichever the
  program runs on with observed values of the shape of their distribution;
- the **latent sites**: local (inside the data plate) or global, discrete or continuous, enumerated
  in the model or in the guide (``infer={"enumerate": "parallel"}``), reparameterized, point masses
  (``AutoDelta``), in ``pyro.markov`` chains, and parameters that live inside the data plate (a guide
  that learns one parameter per data point, such as ``AutoNormal`` over local latents);
- how the program samples without data (``num_samples`` argument or a placeholder batch).

Programs that cannot be read (nothing observed, observed sites outside any common plate, a latent
the guide does not sample) are refused with a :class:`~pyro_lvm.errors.UserError` that says what
to change; an exception from the user's code is reported at its file and line.
"""

import dataclasses
import math
import warnings
from typing import Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_factor, site_is_subsample

from ..errors import DEVICE_MISMATCH, UserError, mixed_devices_message
from .loading import user_code_error
from .plates import plate_frame, program_frames
from .program import Program, SubsampleBatch

PROBE_POINTS = 2


@dataclasses.dataclass
class SiteInfo:
    name: str
    event_shape: tuple
    batch_shape: tuple
    discrete: bool
    enumerated: bool
    local: bool  # inside the data plate
    in_guide: bool = True
    enumerated_in: Optional[str] = None  # "model" or "guide"
    reparameterized: bool = True  # in the guide
    point_mass: bool = False  # the guide's distribution is a Delta
    guide_fn: str = ""


@dataclasses.dataclass
class ObservedSite:
    name: str
    event_shape: tuple
    support: object
    likelihood: str
    positions: Optional[torch.Tensor] = None  # where each entry of one point's value lies in the point
    point_value_shape: tuple = ()  # the value's shape for one point (data plate dim removed)


@dataclasses.dataclass
class DataPlate:
    name: str = "data"
    dim: int = -1
    kind: str = "fixed"  # "fixed", "sizeless" or "subsampling"
    subsample_size: Optional[int] = None


@dataclasses.dataclass
class ModelInfo:
    """What the toolkit learns from traces of the model and the guide on a data batch."""

    latent_sites: list
    observed: SiteInfo
    max_plate_nesting: int
    observed_support: object = None
    likelihood: str = ""
    observed_sites: list = dataclasses.field(default_factory=list)
    data_plate: DataPlate = dataclasses.field(default_factory=DataPlate)
    point_shape: Optional[tuple] = None
    data_shape: Optional[tuple] = None
    guide_only_sites: list = dataclasses.field(default_factory=list)
    global_auxiliary_sites: list = dataclasses.field(default_factory=list)
    per_point_parameters: list = dataclasses.field(default_factory=list)
    sample_with_num_samples: bool = False
    markov: bool = False
    vectorizable: Optional[bool] = None
    # why the observed sites' density is not log p(x) (a part of x, or an entry twice), else None:
    # fit and the estimators refuse such a program; diagnostics of what it observes still run
    coverage_problem: Optional[str] = None

    @property
    def enumerated(self):
        return [s for s in self.latent_sites if s.enumerated]

    @property
    def model_enumerated(self):
        return [s for s in self.latent_sites if s.enumerated_in == "model"]

    @property
    def guide_enumerated(self):
        return [s for s in self.latent_sites if s.enumerated_in == "guide"]

    @property
    def global_latents(self):
        return [s for s in self.latent_sites if not s.local]

    @property
    def local_latents(self):
        return [s for s in self.latent_sites if s.local]

    @property
    def continuous_latents(self):
        return [s for s in self.latent_sites if not s.discrete]

    @property
    def guide_latents(self):
        return [s for s in self.latent_sites if s.in_guide]

    @property
    def observed_names(self):
        return [s.name for s in self.observed_sites]

    @property
    def point_mass_guide(self):
        """Every latent the guide samples is a point mass (``AutoDelta``, MAP): particles are all alike."""
        sampled = [s for s in self.guide_latents if not s.enumerated]
        return bool(sampled) and all(s.point_mass for s in sampled)

    @property
    def per_point_guide(self):
        return bool(self.per_point_parameters)


def _likelihood_name(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


def _unwrap(fn):
    while isinstance(fn, (torch.distributions.Independent, pyro.distributions.torch_distribution.ExpandedDistribution)) \
            or type(fn).__name__ in ("MaskedDistribution",):
        fn = fn.base_dist
    return fn


def as_program(lvm):
    """The :class:`Program` of ``lvm``: itself, or a wrapper kept on the object (for objects that were
    built outside :func:`~pyro_lvm.protocol.building.build_model`, as in tests and notebooks)."""
    if isinstance(lvm, Program):
        return lvm
    cached = getattr(lvm, "__dict__", {}).get("_pyro_lvm_program")
    if cached is not None:
        return cached
    program = Program(lvm, module_local_params=bool(pyro.settings.get("module_local_params")))
    try:
        lvm.__dict__["_pyro_lvm_program"] = program
    except (AttributeError, TypeError):
        pass
    return program


# ----- reading traces ------------------------------------------------------------------------------

def _sample_sites(trace):
    return [(name, site) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)]


def _observed(trace):
    return [(name, site) for name, site in _sample_sites(trace)
            if site["is_observed"] and not site_is_factor(site) and not site["infer"].get("_deterministic")]


def _find_data_plate(program, model_trace, num_points):
    observed = _observed(model_trace)
    if not observed:
        raise UserError(f"{program.program_name}.model observes no data: observe it with "
                        f"pyro.sample(name, distribution, obs=x) inside a pyro.plate over the data points")
    common = None
    for _, site in observed:
        names = [f.name for f in program_frames(site)]
        common = names if common is None else [n for n in common if n in names]
    if not common:
        names = ", ".join(repr(n) for n, _ in observed)
        raise UserError(f"{program.program_name}.model observes {names} outside a common pyro.plate; put the "
                        f"observed sites inside one pyro.plate over the data points (pyro.plate('data', len(x)))")
    subsample_sites = {name: site for name, site in model_trace.nodes.items() if site_is_subsample(site)}

    def rank(name):
        # The plate over the data points: sized by them (its full size is the number of points the
        # program received), else size-less (sized by broadcasting), else the outermost common plate.
        frame = plate_frame(observed[0][1], name)
        site = subsample_sites.get(name)
        full = site["fn"].size if site is not None else (getattr(frame, "full_size", None) or frame.size)
        if full == num_points:
            return 0
        if frame.size in (-1, None):
            return 1
        return 2

    chosen = min(common, key=lambda name: (rank(name), common.index(name)))
    frame = plate_frame(observed[0][1], chosen)
    kind, subsample_size = "fixed", None
    if frame.size in (-1, None):
        kind = "sizeless"
    site = subsample_sites.get(chosen)
    if site is not None and site["fn"].subsample_size is not None:
        full = site["fn"].size
        if full != num_points:
            raise UserError(f"pyro.plate({chosen!r}, {full}, subsample_size={site['fn'].subsample_size}) in "
                            f"{program.program_name}.model subsamples {full} points but the model received "
                            f"{num_points}; size the plate by the data it receives: "
                            f"pyro.plate({chosen!r}, len(x), subsample_size=B)")
        kind, subsample_size = "subsampling", int(site["fn"].subsample_size)
    return DataPlate(chosen, frame.dim, kind, subsample_size)


def _observed_mismatch(program, model_trace, shape):
    """A UserError if an observed site's value does not have the shape of its distribution."""
    for name, site in _observed(model_trace):
        fn, value = site["fn"], site["value"]
        expected = tuple(fn.batch_shape) + tuple(fn.event_shape)
        try:
            broadcast = tuple(torch.broadcast_shapes(tuple(value.shape), expected))
        except RuntimeError:
            broadcast = None
        if broadcast != expected or value.dim() > len(expected):
            if not isinstance(fn, pyro.distributions.torch_distribution.TorchDistributionMixin):
                return UserError(f"{program.program_name}.model observes {name!r} with a torch.distributions "
                                 f"{type(fn).__name__}, which Pyro's plates do not broadcast; use Pyro's own "
                                 f"(import pyro.distributions as dist; dist.{_likelihood_name(fn)}(...))")
            per_point = expected[1:] if len(expected) > len(fn.event_shape) else tuple(fn.event_shape)
            return UserError(f"the data have shape {tuple(program.data_shape)} per point but "
                             f"{program.program_name}.model observes {name!r} with a distribution of shape "
                             f"{per_point} per point (value {tuple(value.shape)[1:]}); use .to_event() in the "
                             f"model or give data of the right shape")
    return None


def _broadcast_over_points(program, model_trace, plate, num_points):
    """A UserError if an observed value does not vary along the data plate (one value broadcast over
    all points: the data were read with the wrong point shape, e.g. [n, 1] for scalars)."""
    if num_points <= 1:
        return None
    for name, site in _observed(model_trace):
        value, fn = site["value"], site["fn"]
        dim = value.dim() - len(fn.event_shape) + plate.dim
        if dim < 0 or value.shape[dim] != num_points:
            return UserError(f"{program.program_name}.model observes {name!r} with a value of shape "
                             f"{tuple(value.shape)} that does not follow the {num_points} points of "
                             f"pyro.plate({plate.name!r}) at dim {plate.dim}; give the observed value the "
                             f"plate's shape (data of shape {tuple(program.data_shape)} per point)")
    return None


def _point_shape_candidates(data_shape):
    candidates = [tuple(data_shape)]
    if tuple(data_shape) == (1,):
        candidates.append(())
    if len(data_shape) == 3 and data_shape[0] == 1:
        candidates.append(tuple(data_shape[1:]))
    if len(data_shape) > 1:
        candidates.append((math.prod(data_shape),))
    return candidates


def _traces(program, batch):
    """Guide trace and the model trace replayed against it (no particles, no enumeration)."""
    with torch.no_grad():
        guide_trace = poutine.trace(program.guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(program.model, trace=guide_trace)).get_trace(batch)
    return guide_trace, model_trace


def _describe_failure(program, err, data_shape):
    if DEVICE_MISMATCH in str(err):
        return UserError(mixed_devices_message(str(err).splitlines()[0], program.program_name))
    blamed = user_code_error(err, f"while running {program.program_name} on data of shape {tuple(data_shape)} "
                                  f"per point")
    return blamed


def _copy_for_inspection(program):
    """A program around a fresh instance of the user's class, when the program knows how to build one:
    probes must not set up the real object (an ``AutoGuide`` fixes its plates at its first call).
    Deep copies are not used: ``AutoGuide.__getstate__`` clears the original's model."""
    if program.factory is None:
        return program
    with torch.random.fork_rng(devices=[]):
        user = program.factory()
    twin = Program(user, data_shape=program.data_shape, module_local_params=program.module_local_params)
    return twin.to(program.device())


class _SubsampleSpy(poutine.messenger.Messenger):
    """Records the plates that subsample themselves as they are built (before any later site fails)."""

    def __init__(self):
        super().__init__()
        self.plates = {}

    def _process_message(self, msg):
        if site_is_subsample(msg) and msg["fn"].subsample_size is not None:
            self.plates.setdefault(msg["name"], (msg["fn"].size, int(msg["fn"].subsample_size)))


class _Progress(poutine.messenger.Messenger):
    """Counts the sites a program reached: of several point shapes that all fail, the one under which
    the program ran furthest is the one it was written for, and its failure is the one to report."""

    def __init__(self):
        super().__init__()
        self.sites = 0

    def _process_message(self, msg):
        self.sites += 1


def _self_subsampling_plates(program, probe):
    spy = _SubsampleSpy()
    try:
        with torch.no_grad(), pyro.validation_enabled(False), poutine.block(), spy:
            program.model(probe)
    except Exception:  # noqa: BLE001 -- the real trace below reports the program's errors
        pass
    return spy.plates


def _trace_program(original, x):
    """Find the point shape and data plate: ``(twin, point_shape, data_plate, guide_trace, model_trace, probe)``.

    Each point shape is tried on a fresh instance (when the program can make one), so that state a
    failed try created (a ``pyro.param`` shaped by the data it saw) does not carry over.
    """
    failures = []
    for shape in _point_shape_candidates(original.data_shape):
        program = _copy_for_inspection(original)
        program.eval()
        probe = x[:PROBE_POINTS]
        program.info = _provisional_info(shape)
        subsampling = _self_subsampling_plates(program, probe)
        if subsampling:
            # The program takes all the data and picks B points itself: trace it on B of them, the
            # indices set on the plate's subsample site in guide and model alike.
            name, (_, size) = next(iter(subsampling.items()))
            program.info = _provisional_info(shape, DataPlate(name, -1, "subsampling", size))
            probe = program.probe(x)
        progress = _Progress()
        try:
            with progress:
                guide_trace, model_trace = _traces(program, probe)
        except UserError as err:
            failures.append((progress.sites, err))
            continue
        except Exception as err:  # noqa: BLE001 -- sorted into the user's errors and ours below
            described = _describe_failure(program, err, shape)
            if described is None:
                raise
            failures.append((progress.sites, described))
            continue
        reached = len(guide_trace.nodes) + len(model_trace.nodes)
        mismatch = _observed_mismatch(program, model_trace, shape)
        if mismatch is not None:
            failures.append((reached, mismatch))
            continue
        plate = _find_data_plate(program, model_trace, len(x) if subsampling else len(probe))
        mismatch = _broadcast_over_points(program, model_trace, plate, len(probe))
        if mismatch is not None:
            failures.append((reached, mismatch))
            continue
        return program, shape, plate, guide_trace, model_trace, probe
    # the failure of the shape the program got furthest with (the first such shape on a tie)
    raise max(failures, key=lambda failure: failure[0])[1]


def _provisional_info(point_shape, plate=None):
    return ModelInfo([], None, 1, point_shape=point_shape, data_plate=plate or DataPlate())


def _latent_sites(program, guide_trace, model_trace, plate):
    # A Delta site is a point mass only if nothing random feeds it: AutoNormal and the other
    # continuous AutoGuides emit Delta sites whose value is a transform of an auxiliary draw.
    auxiliary = any(site["infer"].get("is_auxiliary") for _, site in _sample_sites(guide_trace))
    latents = []
    for name, site in _sample_sites(model_trace):
        if site["is_observed"] or site["infer"].get("_deterministic"):
            continue
        fn = site["fn"]
        guide_site = guide_trace.nodes.get(name)
        in_guide = guide_site is not None and guide_site["type"] == "sample"
        discrete = bool(fn.support.is_discrete) if hasattr(fn, "support") else False
        model_enumerated = site["infer"].get("enumerate") == "parallel" and not in_guide
        guide_enumerated = in_guide and guide_site["infer"].get("enumerate") == "parallel"
        enumerate_ = (guide_site if in_guide else site)["infer"].get("enumerate")
        if enumerate_ not in (None, "parallel"):
            raise UserError(f"site {name!r} is marked enumerate={enumerate_!r}; pyro-lvm sums out discrete "
                            f"latents with parallel enumeration: mark it infer={{'enumerate': 'parallel'}}")
        if discrete and not in_guide and not getattr(fn, "has_enumerate_support", False):
            # config_enumerate passes such a site over silently: say why it cannot be summed out
            raise UserError(f"discrete latent {name!r} of {program.program_name}.model cannot be enumerated: its "
                            f"distribution ({_likelihood_name(fn)} with event shape {tuple(fn.event_shape)}) has no "
                            f"enumerable support (Pyro cannot enumerate a .to_event() vector of discrete "
                            f"values); declare its coordinates with a pyro.plate instead of .to_event(), or "
                            f"sample it in the guide")
        guide_fn = guide_site["fn"] if in_guide else None
        latents.append(SiteInfo(
            name, tuple(fn.event_shape), tuple(fn.batch_shape), discrete, model_enumerated or guide_enumerated,
            plate_frame(site, plate.name) is not None, in_guide=in_guide,
            enumerated_in="model" if model_enumerated else "guide" if guide_enumerated else None,
            reparameterized=bool(guide_fn.has_rsample) if guide_fn is not None else True,
            point_mass=(guide_fn is not None and not auxiliary
                        and isinstance(_unwrap(guide_fn), pyro.distributions.Delta)),
            guide_fn=type(_unwrap(guide_fn)).__name__ if guide_fn is not None else ""))
    return latents


def _max_plate_nesting(*traces):
    nesting = 0
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] in ("sample", "param"):
                for frame in program_frames(site):
                    if frame.dim is not None:
                        nesting = max(nesting, -frame.dim)
    return max(nesting, 1)


def _value_by_point(site, plate, flatten=True):
    """A site's value as ``[points, -1]`` (or ``[points, *per point]``), the data plate's dim first."""
    fn, value = site["fn"], site["value"]
    shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
    try:
        value = value.expand(torch.broadcast_shapes(tuple(value.shape), shape))
    except RuntimeError:
        pass
    dim = value.dim() - len(fn.event_shape) + plate.dim
    if dim < 0:
        return value.reshape(1, -1) if flatten else value.unsqueeze(0)
    value = value.movedim(dim, 0)
    return value.reshape(value.shape[0], -1) if flatten else value


def _observation_map(program, x, plate, probe, observed):
    """For each observed site, the positions in a (program-shaped) data point of its value's entries.

    The model runs on data whose entries are their own positions: an observed value that is a gather
    of x (``x.reshape(-1, 784)``, ``data[..., 0]``, ``sequences[batch, t]``) holds the positions it was
    gathered from. A model that computes with the data's values (``p[A.long()]`` with A observed)
    cannot run on positions; it runs on the real data made a forward-mode dual tensor whose tangent
    holds the positions, which the gathers carry along.
    """
    rows = min(len(x), max(PROBE_POINTS, plate.subsample_size or 0))
    point = math.prod(program.point_shape) if program.point_shape else 1
    if rows * point >= 2 ** 24:  # positions must be exact in float32
        rows = PROBE_POINTS
    data = x[:rows]
    ids = torch.arange(rows * point, dtype=x.dtype, device=x.device).reshape(data.shape)
    if isinstance(probe, SubsampleBatch):
        order = torch.arange(rows, device=x.device).repeat(-(-len(probe) // rows))[:len(probe)]
        wrap = (lambda d: SubsampleBatch(d, order))
    else:
        order = torch.arange(rows, device=x.device)
        wrap = (lambda d: d)
    for attempt in ("ids", "dual"):
        try:
            with torch.no_grad(), pyro.validation_enabled(False), poutine.block(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # forward-mode AD's first use warns about torch.jit
                if attempt == "dual":
                    import torch.autograd.forward_ad as forward_ad

                    with forward_ad.dual_level():
                        trace = poutine.trace(program.model).get_trace(wrap(forward_ad.make_dual(data, ids)))
                        found = {}
                        for name in observed:
                            site = trace.nodes.get(name)
                            tangent = forward_ad.unpack_dual(site["value"]).tangent if site is not None else None
                            if tangent is not None:
                                found[name] = _value_by_point(dict(site, value=tangent), plate)
                else:
                    trace = poutine.trace(program.model).get_trace(wrap(ids))
                    found = {name: _value_by_point(trace.nodes[name], plate) for name in observed if name in trace.nodes}
        except Exception:  # noqa: BLE001 -- a program that cannot run this way has no map from it
            continue
        positions = {}
        for name, values in found.items():
            if values.shape[0] != len(order):
                continue
            relative = values - (order.to(values.dtype) * point).unsqueeze(-1)
            first = relative[0]
            if (torch.equal(relative, first.expand_as(relative)) and bool((first >= 0).all())
                    and bool((first < point).all()) and torch.equal(first, first.round())):
                positions[name] = first.long()
        if len(positions) == len(observed):
            return positions
    return {}


def _unmapped_observations(program, model_trace, plate, probe, observed, positions):
    """Observed sites the observation map did not place: the value of one that holds a whole point
    exactly (a cast, ``obs=x.long()``, that carries no positions) is the data; any other is a
    transform of the data (``(x - m) / s``, ``log1p(x)``, ``x > 0.5``), whose density is not the
    density of x (the Jacobian, or the lost values, are missing): refused, with the fix."""
    missing = [name for name in observed if name not in positions]
    if not missing:
        return {}
    data = probe.data[probe.indices] if isinstance(probe, SubsampleBatch) else probe
    data = program.to_program(data).reshape(len(data), -1)
    if len(missing) == 1 and len(observed) == 1:
        value = _value_by_point(model_trace.nodes[missing[0]], plate)
        if value.shape == data.shape and torch.equal(value.to(data.dtype), data):
            return {missing[0]: torch.arange(data.shape[1], device=data.device)}
    raise UserError(f"{program.program_name}.model observes {', '.join(map(repr, missing))} with a value that is "
                    f"not a part of x (a transform such as (x - m) / s, log1p(x) or x > 0.5?): its density is "
                    f"not log p(x), the Jacobian of the transform is missing; observe x itself (a slice or "
                    f"reshape of it) and put the transform in the distribution (dist.TransformedDistribution), "
                    f"or transform the data file instead")


def _coverage_problem(program, point_shape, positions):
    """Why the observed sites are not x: together they must hold every entry of a data point exactly
    once. Observing a part of x (``obs=x[:, :2]``, the rest used as covariates or ignored) gives the
    density of that part, and observing an entry twice counts it twice; neither is log p(x)."""
    size = math.prod(point_shape) if point_shape else 1
    if not positions:
        return None
    counts = torch.bincount(torch.cat([p.reshape(-1).cpu() for p in positions.values()]), minlength=size)
    sites = ", ".join(map(repr, positions))
    if bool((counts > 1).any()):
        return (f"{program.program_name}.model observes {int((counts > 1).sum())} of the {size} entries of each "
                f"data point more than once (sites {sites}): their density would be counted twice in log p(x); "
                f"observe each entry of x once")
    if bool((counts == 0).any()):
        return (f"{program.program_name}.model observes {int((counts > 0).sum())} of the {size} entries of each "
                f"data point (sites {sites}): the density of a part of x is not log p(x); observe all of x, "
                f"or give a data file with only the entries the model explains")
    return None


def observed_values(info, trace):
    """The observed sites' values in ``trace`` (a sampling trace) put together into points
    ``[n, *point_shape]`` with the observation map."""
    shape = tuple(info.point_shape)
    size = math.prod(shape)
    pieces = [(s, _value_by_point(trace.nodes[s.name], info.data_plate)) for s in info.observed_sites]
    points = pieces[0][1].shape[0]
    if all(s.positions is not None for s, _ in pieces):
        out = pieces[0][1].new_zeros(points, size)
        for site, values in pieces:
            out[:, site.positions] = values.to(out.dtype)
        return out.reshape((points,) + shape)
    if len(pieces) == 1 and pieces[0][1].shape[1] == size:
        return pieces[0][1].reshape((points,) + shape)
    raise UserError(f"cannot tell how the observed sites {', '.join(s.name for s, _ in pieces)} make up a data "
                    f"point (they are not parts of x); observe x, or slices of it, with obs=")


def _per_point_parameters(guide_trace, plate):
    """Parameters with one entry per data point: read inside the data plate with an ``event_dim``
    (as ``AutoNormal`` reads its locations), their batch dim at the plate's dim as large as the plate."""
    names = []
    for name, site in guide_trace.nodes.items():
        frame = plate_frame(site, plate.name) if site["type"] == "param" else None
        event_dim = site["kwargs"].get("event_dim") if frame is not None else None
        if event_dim is None or frame.dim is None:
            continue
        value = site["value"]
        value = value.unconstrained() if hasattr(value, "unconstrained") else value
        dim = frame.dim - event_dim
        full = getattr(frame, "full_size", None) or frame.size
        if value.dim() >= -dim and full and full > 1 and value.shape[dim] == full:
            names.append(name)
    return names


def inspect_model(lvm, x, check_data=True):
    """Trace the program on (the first points of) ``x`` and return its :class:`ModelInfo`.

    ``lvm`` is a :class:`Program` or any object with ``model`` and ``guide`` (wrapped by
    :func:`as_program`). The program's ``pyro.param`` s are created on the real object from a batch
    of ``x`` and registered (:meth:`Program.collect_parameters`); with ``check_data`` the points of
    ``x`` must lie in the support of the observed sites. For a data plate that subsamples itself,
    ``x`` must be all the data the program will be given (the training split).
    """
    program = as_program(lvm)
    if program.data_shape is None:
        program.data_shape = tuple(x.shape[1:])
    if len(x) == 0:
        raise UserError("no data points to inspect the model on; check the split")
    devices = [x.device] if x.device.type == "cuda" else []
    # The probes draw random numbers and run in eval mode; the caller's RNG stream and the program's
    # mode are left as they were.
    was_training = program.training
    with torch.random.fork_rng(devices=devices):
        program.eval()
        try:
            info = _inspect(program, x)
            program.info = info
            materialize(program, x)
        finally:
            program.train(was_training)
    if check_data:
        check_support(info, x)
    return info


def _parameter_shapes(program):
    shapes = {name: tuple(value.shape) for name, value in program._store["params"].items()}
    if isinstance(program.user, torch.nn.Module):
        shapes.update({name: tuple(value.shape) for name, value in program.user.named_parameters()})
    return shapes


def _size_dependent_parameters(program, x, info, shapes):
    """Parameters whose shape follows the number of points the program was first run on (a
    ``pyro.param`` of shape [len(x), K], an ``AutoDiagonalNormal`` over local latents): a second fresh
    instance is run on one point more and the shapes compared."""
    if program.factory is None or info.data_plate.kind == "subsampling" or len(x) <= PROBE_POINTS:
        return []
    other = _copy_for_inspection(program)
    other.eval()
    other.info = info
    try:
        _traces(other, x[:PROBE_POINTS + 1])
    except Exception:  # noqa: BLE001 -- a program that fails here fails in materialize too, with its message
        return []
    changed = _parameter_shapes(other)
    return sorted(name for name, shape in shapes.items() if name in changed and changed[name] != shape)


def _inspect(program, x):
    twin, shape, plate, guide_trace, model_trace, probe = _trace_program(program, x)
    twin.info = _provisional_info(shape, plate)
    observed = [name for name, _ in _observed(model_trace)]
    positions = _observation_map(twin, x, plate, probe, observed)
    positions.update(_unmapped_observations(twin, model_trace, plate, probe, observed, positions))
    coverage_problem = _coverage_problem(twin, shape, positions)
    latents = _latent_sites(twin, guide_trace, model_trace, plate)
    observed_sites = []
    for name, site in _observed(model_trace):
        fn = site["fn"]
        per_point = tuple(_value_by_point(site, plate, flatten=False).shape[1:])
        observed_sites.append(ObservedSite(name, tuple(fn.event_shape), fn.support, _likelihood_name(fn),
                                           positions.get(name), per_point))
    first = observed_sites[0]
    guide_only = [name for name, site in _sample_sites(guide_trace)
                  if not site["is_observed"] and name not in model_trace.nodes]
    global_auxiliary = [name for name in guide_only if plate_frame(guide_trace.nodes[name], plate.name) is None]
    info = ModelInfo(
        latent_sites=latents,
        observed=SiteInfo(first.name, first.event_shape, (), False, False, True),
        max_plate_nesting=_max_plate_nesting(guide_trace, model_trace),
        observed_support=first.support, likelihood=first.likelihood,
        observed_sites=observed_sites, data_plate=plate, point_shape=shape, data_shape=tuple(program.data_shape),
        guide_only_sites=guide_only, global_auxiliary_sites=global_auxiliary, per_point_parameters=_per_point_parameters(guide_trace, plate),
        sample_with_num_samples=program.model_call.takes_num_samples,
        markov=any("_markov_depth" in site["infer"] for _, site in _sample_sites(model_trace)),
        coverage_problem=coverage_problem)
    if twin is not program:
        sized = _size_dependent_parameters(program, x, info, _parameter_shapes(twin))
        info.per_point_parameters = sorted(set(info.per_point_parameters) | set(sized))
    return info


def inspect_by_simulation(lvm, num_points=2):
    """Inspect a program that can sample without data (``model(None, num_samples=n)``) on data it
    simulates itself: its last sample site is taken for the observation. For BDMC on an object that
    was never shown data."""
    program = as_program(lvm)
    if program.info is not None:
        return program.info
    if not program.model_call.takes_num_samples:
        raise UserError(f"{program.program_name} has not seen data and its model takes no num_samples; "
                        f"inspect it on data first (pyro_lvm.load_run, or pyro_lvm.inspect_model(model, x))")
    with torch.no_grad(), poutine.block(), program.running(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(program.user.model).get_trace(None, num_samples=num_points)
    values = [site["value"] for _, site in _sample_sites(trace) if site["value"].dim() >= 1
              and site["value"].shape[0] == num_points]
    if not values:
        raise UserError(f"{program.program_name}.model(None, num_samples={num_points}) draws no data points")
    return inspect_model(program, values[-1].detach(), check_data=False)


def materialize(program, x):
    """Run guide and model once on the real object, so that lazily created state (``pyro.param``,
    an ``AutoGuide``'s parameters) exists, and register the parameters. A guide with one parameter
    per data point is set up on all of ``x`` (the training split), the points it will be fitted on."""
    info = program.info
    batch = x if info is not None and info.per_point_guide and not program.subsampling else program.probe(x)
    try:
        guide_trace, model_trace = _traces(program, batch)
    except Exception as err:  # noqa: BLE001
        described = _describe_failure(program, err, program.data_shape)
        if described is None:
            raise
        raise described from err
    program.collect_parameters((guide_trace, model_trace))
    if program.info is not None and program.info.per_point_guide:
        program.training_points = len(x)


def check_support(info, x, split="data"):
    """Refuse data outside the support of the observed sites' distributions (e.g. non-binary data under
    a Bernoulli likelihood), with the fix in the message."""
    if info is None or len(x) == 0:
        return
    point = tuple(info.point_shape) if info.point_shape is not None else tuple(x.shape[1:])
    flat = x.reshape(len(x), -1)
    for site in info.observed_sites:
        if site.support is None:
            continue
        if site.positions is not None:
            values = flat[:, site.positions].reshape((len(x),) + tuple(site.point_value_shape))
        elif len(info.observed_sites) == 1 and flat.shape[1] == math.prod(site.point_value_shape or point):
            values = flat.reshape((len(x),) + tuple(site.point_value_shape or point))
        else:
            continue
        try:
            ok = torch.as_tensor(site.support.check(values))
        except (RuntimeError, ValueError, IndexError):
            continue
        if bool(ok.all()):
            continue
        bad = int((~ok.reshape(len(x), -1)).any(-1).sum()) if ok.dim() else len(x)
        binary = "boolean" in str(site.support).lower() or "Bernoulli" in site.likelihood
        hint = ("binarize the data (--binarize dynamic or static) or use a Gaussian likelihood "
                "(-p likelihood=gaussian)" if binary else "transform the data or change the model's likelihood")
        raise UserError(f"{bad} {split} point(s) lie outside the support of the likelihood {site.likelihood} "
                        f"({site.support}) of site {site.name!r}; {hint}")
