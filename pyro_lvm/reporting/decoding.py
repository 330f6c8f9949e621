"""What the report shows of a model: its samples, its posterior means, and its decoder's means.

- Samples: ``lvm.model(None, num_samples=n)`` traced; the observed site's value is the sample.
- Posterior means: E_q[z|x] for every local latent site of the guide, in closed form where the
  guide's distribution has one, else the guide's sample (a single draw).
- Decoder means: the model run with its local latents fixed by :func:`pyro.poutine.condition`
  (n = the codes' batch size), reading the mean of the observed site's distribution p(x|z): the
  probabilities of a Bernoulli, the location of a Normal. A likelihood without a closed-form mean
  (an autoregressive decoder) shows a sample of p(x|z) instead.
"""

import pyro.poutine as poutine
import torch

from ..diagnostics.traces import OBSERVED_SITE, chunks, in_data_plate, posterior_mean


def draw_samples(lvm, num_samples):
    """``num_samples`` data points x ~ p(x) by ancestral sampling: a tensor [n, *data_shape]."""
    with torch.no_grad():
        trace = poutine.trace(lvm.model).get_trace(None, num_samples=num_samples)
    return trace.nodes[OBSERVED_SITE]["value"]


def guide_latent_sites(lvm, x):
    """Names and event shapes of the guide's local latent sites, in execution order."""
    with torch.no_grad():
        trace = poutine.trace(lvm.guide).get_trace(x[:1])
    return {
        name: tuple(site["fn"].event_shape)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and in_data_plate(site)
        and not site["infer"].get("is_auxiliary")
    }


def posterior_means(lvm, x, batch_size=500):
    """E_q[z|x] of every local latent site for every row of ``x``: {name: tensor [N, *event]}."""
    means = {}
    with torch.no_grad():
        for part in chunks(x.shape[0], batch_size):
            trace = poutine.trace(lvm.guide).get_trace(x[part])
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and not site["is_observed"] and in_data_plate(site):
                    means.setdefault(name, []).append(posterior_mean(site["fn"], site["value"]))
    return {name: torch.cat(parts) for name, parts in means.items()}


def flatten_codes(codes):
    """{name: [N, *event]} to one [N, L] matrix, sites concatenated in order."""
    return torch.cat([code.reshape(code.shape[0], -1) for code in codes.values()], dim=-1)


def decoder_means(lvm, codes):
    """E[x|z] (or a draw of p(x|z) where the likelihood has no mean) for the codes {name: [n, *event]}."""
    num_points = next(iter(codes.values())).shape[0]
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(lvm.model, data=codes)).get_trace(None, num_samples=num_points)
    site = trace.nodes[OBSERVED_SITE]
    try:
        return site["fn"].mean.expand(site["value"].shape)
    except NotImplementedError:
        return site["value"]
