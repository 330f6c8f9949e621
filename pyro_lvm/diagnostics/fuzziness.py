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

q(z|x_m) is evaluated with each local latent site's distribution as the guide produced it for x_m
(sites treated as conditionally independent given x, as in :mod:`.mutual_information`).
"""

import math

import torch

from .mutual_information import PAIRWISE_ELEMENTS, pairwise_log_prob
from .traces import chunks, trace_guide_and_model

WEIGHT_ELEMENTS = 2**22  # bounds one block of weights, [codes, points] in double precision (32 MiB)


class CodeFuzziness:
    """F(z) for codes drawn from the aggregate posterior of a split, and what it is made of.

    ``per_code`` [J] is F(z_j), ``ess`` [J] the effective number of data points of q(x|z_j),
    ``codes`` {site: [J, *event]} the codes and ``sources`` [J] the index of the point each was drawn
    from (code j = k N + n comes from point n, draw k). :meth:`data_means` gives E_q(x|z)[x] of chosen
    codes, :meth:`summary` the JSON-able averages.
    """

    def __init__(self, x, sites, components, codes, sources, per_code, ess):
        self.x, self.sites, self.components = x, sites, components
        self.codes, self.sources, self.per_code, self.ess = codes, sources, per_code, ess

    @property
    def data_dims(self):
        return math.prod(self.x.shape[1:])

    def total_variance(self):
        """sum_d Var_data[x_d] over the split (the 1/N variance): F of codes that say nothing about x."""
        flat = self.x.reshape(self.x.shape[0], -1).double()
        return float(flat.var(0, unbiased=False).sum())

    def data_means(self, indices):
        """E_q(x|z)[x] = sum_m w_m(z) x_m for the codes ``indices``: a tensor [len, *data_shape]."""
        indices = torch.as_tensor(indices, device=self.per_code.device, dtype=torch.long)
        codes = {name: code[indices] for name, code in self.codes.items()}
        weights = _log_weights(self.components, self.sites, codes).softmax(-1)
        flat = self.x.reshape(self.x.shape[0], -1).double()
        return (weights @ flat).to(self.x.dtype).reshape((len(indices),) + tuple(self.x.shape[1:]))

    def extremes(self, count):
        """Indices of the ``count`` sharpest codes (smallest F, sharpest first) and the ``count``
        fuzziest (largest F, fuzziest first)."""
        order = torch.argsort(self.per_code)
        count = min(count, order.numel())
        return order[:count], order.flip(0)[:count]

    def summary(self):
        """The ``fuzziness*`` keys of :func:`pyro_lvm.diagnostics.diagnose_model`."""
        per_code = self.per_code.double()
        num_codes = per_code.numel()
        fuzziness = float(per_code.mean())
        stderr = float(per_code.std() / math.sqrt(num_codes)) if num_codes > 1 else math.nan
        total = self.total_variance()
        dims = self.data_dims
        return {
            "fuzziness": _finite(fuzziness),
            "fuzziness_mc_stderr": _finite(stderr),
            "fuzziness_per_dim": _finite(fuzziness / dims),
            "fuzziness_data_variance": _finite(total),
            "fuzziness_ratio": _finite(fuzziness / total) if total > 0 else None,
            "fuzziness_ess_mean": _finite(float(self.ess.double().mean())),
            "fuzziness_codes": num_codes,
            "fuzziness_units": (
                f"E_q(z) sum_d Var_q(x|z)[x_d]: squared units of x summed over its {dims} coordinates (for "
                "images in [0, 1], squared intensity summed over pixels); fuzziness_per_dim divides by "
                f"{dims}, fuzziness_ratio by the split's total variance fuzziness_data_variance "
                "(0: each code picks out one point, 1: codes say nothing about x)"
            ),
        }


def code_fuzziness(lvm, x, sites, num_samples=1, chunk_size=None):
    """Draw ``num_samples`` codes from q(z|x_n) for every point of ``x`` and compute F(z) for each,
    with weights over all points of ``x``; ``sites`` are the guide's local latent sites (see
    :func:`.traces.local_latent_sites`). Returns a :class:`CodeFuzziness`.

    ``chunk_size`` (points per guide pass) defaults to what keeps one pairwise block within
    ``PAIRWISE_ELEMENTS``, from the latent size only. Call under ``torch.no_grad()`` and a seeded RNG.
    """
    num_points = x.shape[0]
    latent_dims = sum(site.dims for site in sites)
    if chunk_size is None:
        chunk_size = max(16, min(1024, int(math.sqrt(PAIRWISE_ELEMENTS / latent_dims))))
    components, draws_by_sample = [], [[] for _ in range(num_samples)]
    for part in chunks(num_points, chunk_size):
        for k in range(num_samples):
            guide_trace, _ = trace_guide_and_model(lvm, x[part])
            if k == 0:  # the mixture components q(.|x_m): batch shape [chunk]
                components.append({site.name: guide_trace.nodes[site.name]["fn"] for site in sites})
            draws_by_sample[k].append({site.name: guide_trace.nodes[site.name]["value"] for site in sites})
    # Codes k-major over all points: code k N + n was drawn from q(z|x_n).
    codes = {site.name: torch.cat([draw[site.name] for draws in draws_by_sample for draw in draws]) for site in sites}
    sources = torch.arange(num_points, device=x.device).repeat(num_samples)

    flat = x.reshape(num_points, -1).double()
    squares = (flat**2).sum(-1)
    block = max(1, min(WEIGHT_ELEMENTS // num_points, PAIRWISE_ELEMENTS // (chunk_size * latent_dims)))
    per_code, ess = [], []
    for part in chunks(num_points * num_samples, block):
        weights = _log_weights(components, sites, {name: code[part] for name, code in codes.items()}).softmax(-1)
        mean = weights @ flat
        # sum_m w_m ||x_m||^2 - ||sum_m w_m x_m||^2, in double precision: the terms nearly cancel
        # for a sharp code.
        per_code.append((weights @ squares - (mean**2).sum(-1)).clamp_min(0))
        ess.append(1.0 / (weights**2).sum(-1))
    return CodeFuzziness(x, sites, components, codes, sources, torch.cat(per_code), torch.cat(ess))


def _finite(value):
    """JSON has no NaN or infinity: None instead."""
    return value if math.isfinite(value) else None


def _log_weights(components, sites, codes):
    """log q(z_j|x_m) for every code j and every point m, summed over the sites: [codes, points],
    in double precision."""
    columns = []
    for component in components:
        columns.append(sum(pairwise_log_prob(component[site.name], codes[site.name]) for site in sites).double())
    return torch.cat(columns, dim=-1)
