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


def site_kl(q, p, value, analytic=True):
    """KL(q || p) for one sample site, given the guide's sampled ``value`` (used for Monte Carlo).

    ``q`` and ``p`` are the site's distributions from the guide and the replayed model traces. With
    ``analytic=False`` the closed form is not used even where torch has one: the site's closed-form
    KL is the KL of the guide only when p's parameters do not depend on latents the guide draws
    after this site (:func:`pyro_lvm.diagnostics.traces.analytic_kl_is_exact`).
    """
    event_dims = len(q.event_shape)
    batch_shape = value.shape[: value.dim() - event_dims]
    q_factor, p_factor = unwrap_factors(q), unwrap_factors(p)
    if q_factor.event_shape == () and p_factor.event_shape == ():
        try:
            if not analytic:
                raise NotImplementedError
            terms, exact = kl_divergence(q_factor, p_factor), True
        except NotImplementedError:
            terms, exact = q_factor.log_prob(value) - p_factor.log_prob(value), False
        shape = torch.broadcast_shapes(terms.shape, value.shape)
        per_dim = terms.expand(shape).reshape(*shape[: len(shape) - event_dims], -1)
        return SiteKL(per_dim, per_dim.sum(-1), exact)
    try:
        if not analytic:
            raise NotImplementedError
        total, exact = kl_divergence(q, p), True
    except NotImplementedError:
        total, exact = q.log_prob(value) - p.log_prob(value), False
    return SiteKL(None, total.expand(torch.broadcast_shapes(total.shape, batch_shape)), exact)
