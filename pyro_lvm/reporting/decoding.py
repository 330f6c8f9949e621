"""What the report shows of a model: its samples, its posterior means, and its decoder's means.

- Samples: :meth:`pyro_lvm.protocol.Program.sample` (ancestral sampling through Pyro's handlers).
- Posterior means: E_q[z|x] for every local latent site of the guide, in closed form where the
  guide's distribution has one, else the guide's sample (a single draw).
- Decoder means: the model run on a placeholder batch with its local latents fixed by
  :func:`pyro.poutine.condition` and its observed sites unconditioned, reading the mean of each
  observed site's distribution p(x|z) (the probabilities of a Bernoulli, the location of a Normal)
  and putting the points together as sampling does. A likelihood without a closed-form or finite
  mean (an autoregressive decoder; a Categorical, whose mean torch leaves NaN) shows a sample of
  p(x|z) instead.
"""

import pyro.poutine as poutine
import torch

from ..diagnostics.traces import diagnosed_sites, posterior_mean
from ..protocol import as_program, observed_values
from ..protocol.program import SubsampleBatch


def _program(lvm, x=None):
    from ..estimators.importance_weights import ensure_info

    program = as_program(lvm)
    if x is not None:
        ensure_info(program, x)
    return program


def draw_samples(lvm, num_samples, like=None):
    """``num_samples`` data points x ~ p(x) by ancestral sampling: a tensor [n, *data_shape]."""
    with torch.no_grad():
        return _program(lvm, like).sample(num_samples, like=like)


def guide_latent_sites(lvm, x):
    """Names and event shapes of the guide's local latent sites (not summed out), in order."""
    program = _program(lvm, x)
    return {site.name: tuple(site.event_shape) for site in diagnosed_sites(program.info)}


def posterior_means(lvm, x, batch_size=500):
    """E_q[z|x] of every local latent site for every row of ``x``: {name: tensor [N, *event]}."""
    program = _program(lvm, x)
    names = [site.name for site in diagnosed_sites(program.info)]
    means = {}
    with torch.no_grad():
        for batch, valid in program.batches(x, batch_size):
            trace = poutine.trace(program.guide).get_trace(batch)
            for name in names:
                site = trace.nodes[name]
                means.setdefault(name, []).append(posterior_mean(site["fn"], site["value"])[:valid])
    return {name: torch.cat(parts) for name, parts in means.items()}


def flatten_codes(codes):
    """{name: [N, *event]} to one [N, L] matrix, sites concatenated in order."""
    return torch.cat([code.reshape(code.shape[0], -1) for code in codes.values()], dim=-1)


def _mean_trace(trace):
    """The trace with each observed site's value replaced by its distribution's mean, where it has one."""
    trace = trace.copy()
    for name, site in list(trace.nodes.items()):
        if site["type"] == "sample" and site["infer"].get("was_observed"):
            try:
                mean = site["fn"].mean.expand(site["value"].shape)
            except (NotImplementedError, RuntimeError):
                continue
            if not bool(torch.isfinite(mean).all()):
                continue  # no numeric mean (a Categorical's is NaN, as its labels are not numbers): the sample
            trace.nodes[name] = dict(site, value=mean)
    return trace


def decoder_means(lvm, codes, like=None):
    """E[x|z] (or a draw of p(x|z) where the likelihood has no mean) for the codes {name: [n, *event]};
    ``like``: data points for the model to run on while its observed sites are unconditioned."""
    program = _program(lvm)
    num_points = next(iter(codes.values())).shape[0]
    placeholder = program.placeholder(num_points, like)
    pieces = []
    with torch.no_grad():
        for batch, valid in program.batches(placeholder, max(num_points, 1)):
            data = codes if not isinstance(batch, SubsampleBatch) else {k: v[batch.indices] for k, v in codes.items()}
            data = {**program._global_draws(batch), **data}  # the global latents from the guide, as in sampling
            trace = poutine.trace(poutine.condition(program.unconditioned_model, data=data)).get_trace(batch)
            pieces.append(observed_values(program.info, _mean_trace(trace))[:valid])
    return program.from_program(torch.cat(pieces))
