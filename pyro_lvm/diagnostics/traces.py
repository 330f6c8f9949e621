"""Traces of a model's guide and model, run side by side for diagnostics.

Every diagnostic here compares the guide's q(z|x) with the model's prior p(z) site by site. Both are
read from Pyro traces: the guide is run on a batch of data, and the model is replayed against the
guide's samples, so that a prior that depends on other latents (a hierarchical prior) is evaluated at
the guide's values of those latents, exactly as :class:`~pyro.infer.Trace_ELBO` does.

Local latent sites are the guide's unobserved sample sites inside the ``"data"`` plate that also
appear in the model. Global latents (outside the plate) are replayed but not diagnosed; discrete
latents that the model enumerates and the guide does not sample are drawn from the model.
"""

import contextlib
import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution

DATA_PLATE = "data"
OBSERVED_SITE = "x"


@dataclass(frozen=True)
class LatentSite:
    """A local latent sample site: its name and the shape of one data point's value."""

    name: str
    event_shape: tuple

    @property
    def dims(self):
        return math.prod(self.event_shape)


def in_data_plate(site):
    return any(frame.name == DATA_PLATE for frame in site["cond_indep_stack"])


def local_latent_sites(guide_trace, model_trace):
    """The guide's local latent sites (in execution order) that the model also samples."""
    sites = []
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site["infer"].get("is_auxiliary"):
            continue
        if in_data_plate(site) and name in model_trace.nodes:
            sites.append(LatentSite(name, tuple(site["fn"].event_shape)))
    return sites


def max_plate_nesting(*traces):
    """How many batch dimensions the vectorized plates of these traces use (at least 1)."""
    nesting = 1
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.dim is not None:
                    nesting = max(nesting, -frame.dim)
    return nesting


def _with_particles(fn, num_particles, dim):
    # A fresh plate for every call, as Pyro's ELBO does when it vectorizes particles.
    def vectorized(*args, **kwargs):
        with pyro.plate("_diagnostic_particles", num_particles, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def trace_guide_and_model(lvm, x, num_particles=None, particle_dim=-2):
    """Run ``lvm.guide(x)``, replay ``lvm.model(x)`` against it, and return both traces.

    With ``num_particles`` both programs run inside a particle plate at ``particle_dim`` (left of
    every model plate), so sites get a leading batch dimension of that size.
    """
    guide, model = lvm.guide, lvm.model
    if num_particles is not None:
        guide = _with_particles(guide, num_particles, particle_dim)
        model = _with_particles(model, num_particles, particle_dim)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return guide_trace, model_trace


def particles_by_points(tensor, num_particles, num_points, event_shape=()):
    """Reshape a site's tensor from a particle-plate trace, [particles, *plates, points, *event],
    to [particles, points, *event], summing any plates nested inside the data plate."""
    return tensor.reshape(num_particles, -1, num_points, *event_shape).sum(1)


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
    except NotImplementedError:
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
