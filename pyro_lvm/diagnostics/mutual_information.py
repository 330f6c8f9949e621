"""Mutual information between data and code under the aggregate posterior.

The guide and the data distribution define a joint q(x, z) = p_data(x) q(z|x), whose marginal on z
is the aggregate posterior q(z) = E_x q(z|x). Its mutual information

    I_q(x; z) = E_x E_q(z|x)[log q(z|x) - log q(z)]

is the part of the rate that the code actually spends on telling data points apart: the rate splits as
E_x KL(q(z|x) || p(z)) = I_q(x; z) + KL(q(z) || p(z)) (Hoffman & Johnson, 2016, "ELBO surgery").
Posterior collapse is I_q(x; z) ~ 0.

Estimator. With the N points of a split, q(z) is the mixture (1/N) sum_m q(z|x_m), and

    I_hat = (1/(N K)) sum_n sum_k [log q(z_nk|x_n) - logsumexp_m log q(z_nk|x_m) + log N],
    z_nk ~ q(z|x_n),

with the log-sum-exp over *all* N points of the split, accumulated chunk by chunk, so the result
does not depend on any minibatch size (unlike the in-batch estimate of He et al., 2019, "Lagging
inference networks"). Chunks and random draws are fixed by ``chunk_size`` and the seed alone.

Bias. I_hat is the InfoNCE bound (van den Oord et al., 2018; Poole et al., 2019) with the optimal
critic log q(z|x): E[I_hat] <= I_q(x; z) and I_hat <= log N always, because the own term q(z_n|x_n)/N
is part of the mixture. The bias is small when I_q(x; z) is well below log N and grows as I_q
approaches it; a value near log N only says "at least this much". The Monte-Carlo error over z is
that of a mean of N K terms.

q(z|x_m) is evaluated with each site's distribution as the guide produced it for x_m, which is
q(z|x_m) only where that distribution is fixed given x_m. For a guide whose local sites depend on each
other's sampled values (a hierarchical guide), on a global draw, or on enumerated values, it is not:
``diagnose`` checks that first (:func:`.fuzziness.check_fixed_posterior`) and reports the mutual
information as null with the reason rather than this estimator's number for such a guide.
"""

import math

import pyro.poutine as poutine
import torch

from .traces import unwrap_factors


PAIRWISE_ELEMENTS = 2**24  # bounds the [codes, points, latent dims] tensor of one chunk pair (64 MiB)


def aggregate_posterior_mutual_information(lvm, x, sites, num_samples=1, chunk_size=None):
    """I_hat(x; z) in nats over all points of ``x``; ``sites`` are the guide's local latent sites.

    ``chunk_size`` (points per chunk) defaults to what keeps one chunk pair within
    ``PAIRWISE_ELEMENTS``; it depends on the latent size only, never on the caller's batch size.
    The guide runs on the program's own batches (:meth:`~pyro_lvm.protocol.Program.batches`: for a
    self-subsampling plate, its subsample size, the padding of the last batch left out of the
    mixture). Call under ``torch.no_grad()`` and a seeded RNG.
    """
    from ..protocol import as_program

    program = as_program(lvm)
    num_points = x.shape[0]
    if chunk_size is None:
        latent_dims = sum(site.dims for site in sites)
        chunk_size = max(16, min(1024, int(math.sqrt(PAIRWISE_ELEMENTS / (num_samples * latent_dims)))))
    components, codes, own_log_q = [], [], []
    for batch, valid in program.batches(x, chunk_size):
        draws = [poutine.trace(program.guide).get_trace(batch) for _ in range(num_samples)]
        # The mixture components q(.|x_m): one distribution per site, batch shape [chunk].
        components.append(({site.name: draws[0].nodes[site.name]["fn"] for site in sites}, valid))
        # Codes z_nk, k-major, and log q(z_nk|x_n) from the very trace that drew them.
        codes.append({site.name: torch.cat([draw.nodes[site.name]["value"][:valid] for draw in draws])
                      for site in sites})
        own_log_q.append(torch.cat([_log_q(draw, sites)[:valid] for draw in draws]))

    total = 0.0
    for code, log_q in zip(codes, own_log_q):
        log_mixture = torch.full_like(log_q, -math.inf)
        for component, valid in components:
            # log q(z_j | x_m) for every code j against every point m of this chunk: [codes, chunk].
            pairwise = sum(pairwise_log_prob(component[site.name], code[site.name]) for site in sites)
            log_mixture = torch.logaddexp(log_mixture, pairwise[..., :valid].logsumexp(-1))
        total += (log_q - (log_mixture - math.log(num_points))).sum().item()
    return total / (num_points * num_samples)


def pairwise_log_prob(fn, codes):
    """log fn_m(z_j) for every code z_j [J, *event] and every distribution m in the batch of ``fn``
    (batch shape [C]): a tensor [J, C].

    A diagonal Normal is expanded into three matrix products, in double precision because the
    expansion subtracts large terms (sum_d z_d^2 / s_d^2 + mu_d^2 / s_d^2 - 2 z_d mu_d / s_d^2);
    any other distribution is evaluated by broadcasting.
    """
    factor = unwrap_factors(fn)
    if not (isinstance(factor, torch.distributions.Normal) and len(fn.batch_shape) == 1):
        return fn.log_prob(codes.unsqueeze(1))
    shape = fn.batch_shape + fn.event_shape
    loc = factor.loc.expand(shape).reshape(shape[0], -1).double()
    precision = factor.scale.expand(shape).reshape(shape[0], -1).double() ** -2
    z = codes.reshape(codes.shape[0], -1).double()
    square = (z**2) @ precision.T - 2 * z @ (loc * precision).T + (loc**2 * precision).sum(-1)
    normalizer = 0.5 * precision.log().sum(-1) - 0.5 * loc.shape[-1] * math.log(2 * math.pi)
    return (normalizer - 0.5 * square).to(codes.dtype)


def _log_q(guide_trace, sites):
    """log q(z|x) of the sampled codes in one guide trace, summed over the sites: [chunk]."""
    return sum(guide_trace.nodes[site.name]["fn"].log_prob(guide_trace.nodes[site.name]["value"]) for site in sites)
