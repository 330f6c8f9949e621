"""Pyro's scoped mixture example, guide included: one ``pyro.param`` assignment posterior per point.

Source: pyro-ppl/pyro examples/contrib/autoname/scoping_mixture.py, ``model`` and ``guide`` as the
example writes them (``pyro.param`` weights, locs and scale; a size-less ``pyro.plate("data")``; the
local model and guide under ``@scope(prefix="local")``), the guide enumerated as the example's
``main()`` does with ``config_enumerate(guide)``. The guide's ``assignment_probs`` has one row per
*training* point: it is not amortized, so it says nothing about new points. Only the mixture
density itself (the assignment summed out) is a per-point quantity for those.

Changed, and why: ``model(K, data)`` / ``guide(K, data)`` become ``model(data)`` / ``guide(data)`` with
``K = 2`` a module constant (the data are the program's argument), and ``config_enumerate`` is
applied where the guide is defined rather than in ``main()``.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.contrib.autoname import scope
from pyro.infer import config_enumerate
from torch.distributions import constraints

K = 2


def model(data):
    # Global parameters.
    weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", 10 * torch.randn(K))
    scale = pyro.param("scale", torch.tensor(0.5), constraint=constraints.positive)

    with pyro.plate("data"):
        return local_model(weights, locs, scale, data)


@scope(prefix="local")
def local_model(weights, locs, scale, data):
    assignment = pyro.sample(
        "assignment", dist.Categorical(weights).expand_by([len(data)])
    )
    return pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


@config_enumerate
def guide(data):
    assignment_probs = pyro.param(
        "assignment_probs",
        torch.ones(len(data), K) / K,
        constraint=constraints.unit_interval,
    )
    with pyro.plate("data"):
        return local_guide(assignment_probs)


@scope(prefix="local")
def local_guide(probs):
    return pyro.sample("assignment", dist.Categorical(probs))
