"""Traces of a model's guide and model, run side by side for diagnostics.

Every diagnostic here compares the guide's q(z|x) with the model's prior p(z) site by site. Both are
read from Pyro traces: the guide is run on a batch of data (enumerating what it enumerates), and the
model is replayed against the guide's samples (enumerating what it enumerates), so that a prior that
depends on other latents (a hierarchical prior) is evaluated at the guide's values of those latents,
exactly as :class:`~pyro.infer.Trace_ELBO` does. Names and dims (the data plate, the observed sites)
come from the program's :class:`~pyro_lvm.protocol.ModelInfo`.

The diagnosed sites are the guide's local latents (inside the data plate) that the model samples
too and that are not summed out; global latents and enumerated ones are not diagnosed (their
terms still enter the rate and the ELBO).
"""

import contextlib
import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution

from ..protocol.plates import plate_frame


@dataclass(frozen=True)
class LatentSite:
    """A local latent sample site: its name and the shape of one data point's value."""

    name: str
    event_shape: tuple

    @property
    def dims(self):
        return math.prod(self.event_shape)


def in_data_plate(site, data_plate="data"):
    return plate_frame(site, data_plate) is not None


def diagnosed_sites(info):
    """The guide's local latents that the model samples and nothing sums out, in the guide's order."""
    return [LatentSite(s.name, tuple(s.event_shape)) for s in info.latent_sites
            if s.local and s.in_guide and not s.enumerated]


def analytic_kl_is_exact(program, batch, sites):
    """Whether the sum over sites of the closed-form KL(q_i || p_i) is the KL of the guide.

    It is when nothing is enumerated, the guide has no auxiliary sites (``AutoNormal`` 's), and the
    prior of every diagnosed site depends only on latents that the guide draws *before* it: then
    E_q[log q_i - log p_i] = E over the earlier draws of KL(q_i || p_i). A hierarchical guide that
    draws z1 before z2 against a prior p(z2) p(z1 | z2) breaks that (p_1 depends on a later draw),
    and the rate must be estimated by Monte Carlo. Dependencies are read with autograd: the model is
    replayed on the guide's values made leaves, and each prior's log-density is differentiated with
    respect to the other latents.
    """
    info = program.info
    if info.enumerated or info.guide_only_sites:
        return False
    with torch.enable_grad(), pyro.validation_enabled(False), poutine.block():
        guide_trace = poutine.trace(program.guide).get_trace(batch)
        order = [name for name, site in guide_trace.nodes.items() if site["type"] == "sample"
                 and not site["is_observed"] and type(site["fn"]).__name__ != "_Subsample"]
        leaves = {name: guide_trace.nodes[name]["value"].detach().clone().requires_grad_(
                  guide_trace.nodes[name]["value"].is_floating_point()) for name in order}
        replay = poutine.Trace()
        for name in order:
            replay.add_node(name, type="sample", name=name, value=leaves[name], is_observed=False,
                            infer=dict(guide_trace.nodes[name]["infer"]))
        model_trace = poutine.trace(poutine.replay(program.model, trace=replay)).get_trace(batch)
        for site in sites:
            node = model_trace.nodes[site.name]
            log_prob = node["fn"].log_prob(leaves[site.name].detach()).sum()
            later = [name for name in order[order.index(site.name) + 1:] if leaves[name].requires_grad]
            if not later or not log_prob.requires_grad:
                continue
            grads = torch.autograd.grad(log_prob, [leaves[name] for name in later], allow_unused=True)
            if any(g is not None and bool((g != 0).any()) for g in grads):
                return False
    return True


def unwrap_factors(fn):
    """Strip ``Independent`` and ``ExpandedDistribution`` wrappers, which only reshape batch and event
    dimensions, down to the distribution that computes the density. Its ``log_prob`` broadcasts
    against a value of the wrapped distribution's full shape."""
    while isinstance(fn, (torch.distributions.Independent, ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def posterior_mean(fn, samples, particle_dims=0):
    """E_q[z|x] from the guide's distribution where it has a closed form, else the mean of its samples
    over the leading ``particle_dims`` dimensions."""
    try:
        mean = fn.mean.expand(samples.shape)
    except (NotImplementedError, RuntimeError):
        mean = samples
    return mean.mean(dim=tuple(range(particle_dims))) if particle_dims else mean


def chunks(num_points, chunk_size):
    """``slice`` objects covering ``range(num_points)`` in order."""
    return [slice(start, min(start + chunk_size, num_points)) for start in range(0, num_points, chunk_size)]


@contextlib.contextmanager
def seeded(seed, device):
    """A forked RNG seeded with ``seed`` on the CPU and on ``device``: diagnostics are reproducible
    and leave the caller's random state untouched."""
    device = torch.device(device)
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
