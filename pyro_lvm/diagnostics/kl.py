"""KL divergence of the guide from the prior, per latent dimension.

For one data point and one local latent site,

    KL(q(z|x) || p(z)) = E_q(z|x)[log q(z|x) - log p(z)],

and its average over the data is the *rate* R of Alemi et al. (2018), "Fixing a Broken ELBO". When
q and p factorise over the site's dimensions (``Normal(loc, scale).to_event(1)`` against
``Normal(0, 1).expand([d]).to_event(1)``), the KL is a sum of one term per dimension, and a dimension
whose term is ~0 for every x carries no information about x.

Each term is computed in closed form where :func:`torch.distributions.kl_divergence` has one for the
pair of one-dimensional distributions (Normal/Normal and the rest of torch's registry), otherwise by
Monte Carlo, averaging log q(z_d|x) - log p(z_d) over the guide's samples. A site whose q or p does
not factorise (a ``MultivariateNormal``, a normalizing flow) has no per-dimension KL: only its total
is computed, in closed form if registered, else by Monte Carlo.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributions import kl_divergence

from .traces import unwrap_factors


@dataclass
class SiteKL:
    """KL terms of one site, with the leading (particle, data) dimensions of the value kept.

    ``per_dim`` has the site's event dimensions flattened into one last dimension, or is ``None``
    when q or p does not factorise; ``total`` sums over them. ``analytic`` says no sampling was used.
    """

    per_dim: Optional[torch.Tensor]
    total: torch.Tensor
    analytic: bool


def site_kl(q, p, value):
    """KL(q || p) for one sample site, given the guide's sampled ``value`` (used for Monte Carlo).

    ``q`` and ``p`` are the site's distributions from the guide and the replayed model traces.
    """
    event_dims = len(q.event_shape)
    batch_shape = value.shape[: value.dim() - event_dims]
    q_factor, p_factor = unwrap_factors(q), unwrap_factors(p)
    if q_factor.event_shape == () and p_factor.event_shape == ():
        try:
            terms, analytic = kl_divergence(q_factor, p_factor), True
        except NotImplementedError:
            terms, analytic = q_factor.log_prob(value) - p_factor.log_prob(value), False
        per_dim = terms.expand(value.shape).reshape(*batch_shape, -1)
        return SiteKL(per_dim, per_dim.sum(-1), analytic)
    try:
        total, analytic = kl_divergence(q, p), True
    except NotImplementedError:
        total, analytic = q.log_prob(value) - p.log_prob(value), False
    return SiteKL(None, total.expand(batch_shape), analytic)
