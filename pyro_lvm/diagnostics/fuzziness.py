"""Fuzziness of codes: how broad q(x|z) is under the aggregate posterior.

The guide and the data distribution define a joint q(x, z) = p_data(x) q(z|x) and, for each code z,

    q(x|z) = p_data(x) q(z|x) / q(z),       q(z) = E_x q(z|x),

the data points that code stands for. Maximum likelihood makes the decoder p(x|z) approximate
q(x|z); a factorized decoder's best fit to a broad q(x|z) is an average of the points it mixes, so the
spread of q(x|z) measures how fuzzy the samples from that code will be (Zhao, Song & Ermon, 2017,
"Towards Deeper Understanding of Variational Autoencoding Models"). The fuzziness of a code is

    F(z) = E_q(x|z) ||x - E_q(x|z)[x]||^2 = sum_d Var_q(x|z)[x_d],

and the diagnostic is its average over the aggregate posterior, F = E_q(z) F(z).

Estimator. With the N points x_1..x_N of a split as p_data, q(x|z) puts the self-normalized weight

    w_m(z) = q(z|x_m) / sum_l q(z|x_l)

on x_m, so F(z) = sum_m w_m ||x_m||^2 - ||sum_m w_m x_m||^2, exactly, for the split's empirical
distribution. Codes z_nk ~ q(z|x_n), k = 1..K for every point n, are draws from q(z); F is their
mean, with Monte Carlo error std_nk F(z_nk) / sqrt(N K). Every weight uses all N points, chunk by
chunk, so the result does not depend on any batch size. Against a population p_data the split's
value is low where a code's weights sit on few points (a small effective sample size
1 / sum_m w_m^2, reported as ``fuzziness_ess_mean``): with N points a code cannot mix more than N.

Units: squared units of x, summed over the D coordinates of one data point (for images in [0, 1],
squared intensity summed over pixels). Two references fix the scale: F = 0 when every code picks out
one data point, and F = sum_d Var_data[x_d], the split's total variance, when the codes say nothing
about x (q(z|x) the same for every x). ``fuzziness_ratio`` is F over that total variance.

Which x and which z. x is the data point as the program observes it: its observed sites' values,
read from a trace of the model on each batch and put together into points with the observation map
(:func:`pyro_lvm.protocol.observed_values`), the same points the decoder's means are put together into
(:func:`pyro_lvm.reporting.decoding.decoder_means`); no site name is assumed. z is every local latent
site the guide samples (:func:`.traces.diagnosed_sites`), flattened and concatenated.

When it is undefined. The weights need q(z|x_m) as one fixed distribution per data point, for every
point. :func:`code_fuzziness` raises :class:`FuzzinessUndefined` (``diagnose --json`` then gives null
with the reason in ``null_reason``) where that does not hold: a guide that sums latents out by
enumeration (its q(z|x) is a sum over the enumerated values), a guide site whose distribution
changes with the guide's other random draws (a hierarchical guide; a local site that depends on a
global draw; a local point mass placed by an auxiliary draw, as ``AutoDiagonalNormal``'s: checked by
drawing the guide four times on the same points and comparing each site's density at one value), a
site whose distribution is not indexed by the data plate first, a guide with one parameter per
training point on other points, or observed sites that do not put together into data points. A
guide that is a fixed point mass per point (``AutoDelta``) gives F = 0: each code is its own point's.
"""

import math

import pyro.poutine as poutine
import torch

from ..errors import UserError
from ..protocol import as_program, observed_values
from ..protocol.plates import plate_frame
from .mutual_information import PAIRWISE_ELEMENTS, pairwise_log_prob
from .traces import diagnosed_sites

WEIGHT_ELEMENTS = 2**22  # bounds one block of weights, [codes, points] in double precision (32 MiB)
DEPENDENCE_POINTS = 8  # points of the probe that checks the guide's distributions are fixed given x
DEPENDENCE_DRAWS = 3  # further guide draws compared with the first


class FuzzinessUndefined(Exception):
    """The fuzziness cannot be computed for this program; ``str(err)`` says why (for ``null_reason``)."""


class CodeFuzziness:
    """F(z) for codes drawn from the aggregate posterior of a split, and what it is made of.

    ``points`` [N, *point_shape] are the data points as the program observes them, ``per_code`` [J]
    F(z_j), ``ess`` [J] the effective number of data points of q(x|z_j), ``codes`` {site: [J, *event]}
    the codes and ``sources`` [J] the index of the point each was drawn from (code j = k N + n comes
    from point n, draw k). :meth:`data_means` gives E_q(x|z)[x] of chosen codes, :meth:`summary` the
    JSON-able averages.
    """

    def __init__(self, points, sites, components, codes, sources, per_code, ess, data_dims=None, program=None):
        self.points, self.sites, self.components = points, sites, components
        self.codes, self.sources, self.per_code, self.ess = codes, sources, per_code, ess
        self.data_dims = data_dims if data_dims is not None else math.prod(points.shape[1:])
        self.program = program

    def total_variance(self):
        """sum_d Var_data[x_d] over the split (the 1/N variance): F of codes that say nothing about x."""
        flat = self.points.reshape(self.points.shape[0], -1).double()
        return float(flat.var(0, unbiased=False).sum())

    def data_means(self, indices):
        """E_q(x|z)[x] = sum_m w_m(z) x_m for the codes ``indices``: a tensor [len, *data_shape], in the
        data's shape (as :func:`~pyro_lvm.reporting.decoding.decoder_means` gives the decoder's)."""
        indices = torch.as_tensor(indices, device=self.per_code.device, dtype=torch.long)
        codes = {name: code[indices] for name, code in self.codes.items()}
        weights = _log_weights(self.components, self.sites, codes).softmax(-1)
        flat = self.points.reshape(self.points.shape[0], -1).double()
        means = (weights @ flat).to(torch.get_default_dtype()).reshape((len(indices),) + tuple(self.points.shape[1:]))
        return self.program.from_program(means) if self.program is not None else means

    def extremes(self, count):
        """Indices of the ``count`` sharpest codes (smallest F, sharpest first) and the ``count``
        fuzziest (largest F, fuzziest first)."""
        order = torch.argsort(self.per_code)
        count = min(count, order.numel())
        return order[:count], order.flip(0)[:count]

    def summary(self):
        """The ``fuzziness*`` keys of :func:`pyro_lvm.diagnostics.diagnose_model`; a value that is not
        a finite number is None, with why under ``null_reason``."""
        per_code = self.per_code.double()
        num_codes = per_code.numel()
        fuzziness = float(per_code.mean())
        stderr = float(per_code.std() / math.sqrt(num_codes)) if num_codes > 1 else math.nan
        total = self.total_variance()
        dims = self.data_dims
        values = {
            "fuzziness": fuzziness,
            "fuzziness_mc_stderr": stderr,
            "fuzziness_per_dim": fuzziness / dims,
            "fuzziness_data_variance": total,
            "fuzziness_ratio": fuzziness / total if total > 0 else math.nan,
            "fuzziness_ess_mean": float(self.ess.double().mean()),
        }
        reasons = {}
        for key, value in values.items():
            if not math.isfinite(value):
                values[key] = None
                reasons[key] = ("the split's data do not vary (total variance 0)" if key == "fuzziness_ratio"
                                and total <= 0 else "one code only: no standard error" if
                                key == "fuzziness_mc_stderr" and num_codes < 2 else
                                "not finite: a NaN or infinite value in the guide's densities or the data")
        values["fuzziness_codes"] = num_codes
        values["fuzziness_units"] = units(dims)
        if reasons:
            values["null_reason"] = reasons
        return values


def units(dims):
    """What the ``fuzziness*`` numbers are measured in, for points of ``dims`` observed coordinates."""
    return (f"E_q(z) sum_d Var_q(x|z)[x_d]: squared units of x summed over its {dims} coordinates (for "
            "images in [0, 1], squared intensity summed over pixels); fuzziness_per_dim divides by "
            f"{dims}, fuzziness_ratio by the split's total variance fuzziness_data_variance "
            "(0: each code picks out one point, 1: codes say nothing about x)")


SUMMARY_KEYS = ("fuzziness", "fuzziness_mc_stderr", "fuzziness_per_dim", "fuzziness_data_variance",
                "fuzziness_ratio", "fuzziness_ess_mean")


def undefined_summary(reason):
    """The ``fuzziness*`` keys for a program where F is undefined: nulls, and ``reason`` for each."""
    values = {key: None for key in SUMMARY_KEYS}
    values["fuzziness_codes"] = 0
    values["null_reason"] = {key: reason for key in SUMMARY_KEYS}
    return values


def code_fuzziness(lvm, x, num_samples=1, chunk_size=None, sites=None):
    """Draw ``num_samples`` codes from q(z|x_n) for every point of ``x`` and compute F(z) for each,
    with weights over all points of ``x``. ``sites`` (default: :func:`.traces.diagnosed_sites` of the
    program's :class:`~pyro_lvm.protocol.ModelInfo`) are the guide's local latent sites. Returns a
    :class:`CodeFuzziness`; raises :class:`FuzzinessUndefined` with the reason where F is undefined.

    ``chunk_size`` (points per guide pass) defaults to what keeps one pairwise block within
    ``PAIRWISE_ELEMENTS``, from the latent size only; a self-subsampling program runs on its own
    batches. Call under ``torch.no_grad()`` and a seeded RNG.
    """
    from ..estimators.importance_weights import ensure_info

    program = as_program(lvm)
    info = ensure_info(program, x)
    sites = diagnosed_sites(info) if sites is None else sites
    num_points = x.shape[0]
    check_fixed_posterior(program, info, x, sites)
    latent_dims = sum(site.dims for site in sites)
    if chunk_size is None:
        chunk_size = max(16, min(1024, int(math.sqrt(PAIRWISE_ELEMENTS / latent_dims))))
    plate = info.data_plate.name
    components, draws_by_sample, points = [], [[] for _ in range(num_samples)], []
    for batch, valid in program.batches(x, chunk_size):
        points.append(_observed_points(program, batch)[:valid])
        for k in range(num_samples):
            guide_trace = poutine.trace(program.guide).get_trace(batch)
            per_point = {site.name: _per_point(guide_trace.nodes[site.name], plate) for site in sites}
            if k == 0:  # the mixture components q(.|x_m): batch shape [chunk]
                components.append(({name: fn for name, (fn, _) in per_point.items()}, valid))
            draws_by_sample[k].append({name: value[:valid] for name, (_, value) in per_point.items()})
    # Codes k-major over all points: code k N + n was drawn from q(z|x_n).
    codes = {site.name: torch.cat([draw[site.name] for draws in draws_by_sample for draw in draws]) for site in sites}
    sources = torch.arange(num_points, device=x.device).repeat(num_samples)
    points = torch.cat(points)

    flat = points.reshape(num_points, -1).double()
    squares = (flat**2).sum(-1)
    block = max(1, min(WEIGHT_ELEMENTS // num_points, PAIRWISE_ELEMENTS // (chunk_size * latent_dims)))
    per_code, ess = [], []
    for start in range(0, num_points * num_samples, block):
        part = slice(start, min(start + block, num_points * num_samples))
        weights = _log_weights(components, sites, {name: code[part] for name, code in codes.items()}).softmax(-1)
        mean = weights @ flat
        # sum_m w_m ||x_m||^2 - ||sum_m w_m x_m||^2, in double precision: the terms nearly cancel
        # for a sharp code.
        per_code.append((weights @ squares - (mean**2).sum(-1)).clamp_min(0))
        ess.append(1.0 / (weights**2).sum(-1))
    return CodeFuzziness(points, sites, components, codes, sources, torch.cat(per_code), torch.cat(ess),
                         data_dims=_observed_dims(info), program=program)


def check_fixed_posterior(program, info, x, sites):
    """Raise :class:`FuzzinessUndefined` where q(z|x_m) is not one fixed distribution per point (what
    the fuzziness's weights and the mutual information's mixture q(z) = (1/N) sum_m q(z|x_m) need)."""
    if info.guide_enumerated:
        raise FuzzinessUndefined(
            f"the guide enumerates {', '.join(s.name for s in info.guide_enumerated)}: q(z|x) is a sum over "
            "its values, not one distribution per site, and the weights q(z|x_m) are not computed for it")
    if not program.has_posterior_for(x):
        raise FuzzinessUndefined("the guide keeps one parameter per training point: it has no q(z|x) for "
                                 "these points (use the train split)")
    plate = info.data_plate.name
    probe = program.probe(x, min(len(x), DEPENDENCE_POINTS))
    traces = [poutine.trace(program.guide).get_trace(probe) for _ in range(1 + DEPENDENCE_DRAWS)]
    for site in sites:
        fn, value = _per_point(traces[0].nodes[site.name], plate)
        first = fn.log_prob(value)
        for trace in traces[1:]:
            again = _per_point(trace.nodes[site.name], plate)[0].log_prob(value)
            if not torch.allclose(first, again, rtol=1e-4, atol=1e-5, equal_nan=True):
                raise FuzzinessUndefined(
                    f"the guide's distribution of {site.name} changes with its other random draws (a "
                    "hierarchical guide, or a local site that depends on a global draw): q(z|x_m) is not one "
                    "fixed distribution per point")


def _per_point(node, plate):
    """A guide site's ``(fn, value)`` with the data plate as the only batch dimension of ``fn``."""
    fn, value = node["fn"], node["value"]
    frame = plate_frame(node, plate)
    batch = len(fn.batch_shape)
    if frame is None or frame.dim is None or batch + frame.dim != 0:
        raise FuzzinessUndefined(
            f"the guide's distribution of {node['name']} has batch shape {tuple(fn.batch_shape)} with the data "
            "plate not its first dimension: the weights q(z|x_m) need one distribution per data point")
    if batch > 1:  # plates nested inside the data plate: part of one point's code
        fn = fn.to_event(batch - 1)
    return fn, value.expand(tuple(fn.batch_shape) + tuple(fn.event_shape))


def _observed_points(program, batch):
    """The batch's data points as the model observes them, ``[points, *point_shape]``."""
    trace = poutine.trace(program.model).get_trace(batch)
    try:
        return observed_values(program.info, trace)
    except UserError as err:
        raise FuzzinessUndefined(str(err)) from None


def _observed_dims(info):
    """How many coordinates of a data point the observed sites hold."""
    positions = [s.positions for s in info.observed_sites]
    if positions and all(p is not None for p in positions):
        return int(torch.unique(torch.cat([p.reshape(-1).cpu() for p in positions])).numel())
    return math.prod(info.point_shape) if info.point_shape else 1


def _log_weights(components, sites, codes):
    """log q(z_j|x_m) for every code j and every point m, summed over the sites: [codes, points],
    in double precision."""
    num_codes = next(iter(codes.values())).shape[0]
    columns = []
    for component, valid in components:
        total = 0.0
        for site in sites:
            pairwise = pairwise_log_prob(component[site.name], codes[site.name])
            if pairwise.shape[:1] != (num_codes,) or pairwise.dim() != 2:
                raise FuzzinessUndefined(f"the guide's distribution of {site.name} does not give one density per "
                                         "code and data point")
            total = total + pairwise[:, :valid].double()
        columns.append(total)
    return torch.cat(columns, dim=-1)
