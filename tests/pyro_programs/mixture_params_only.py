"""A Gaussian mixture whose parameters are all ``pyro.param`` (no module, no parameter attribute).

Source: pyro-ppl/pyro examples/contrib/autoname/scoping_mixture.py (``model``: ``pyro.param`` weights,
locs and scale, a size-less ``pyro.plate("data")``, the local model under ``@scope(prefix="local")``)
with the assignment summed out in the model as the enumeration tutorial does
(https://pyro.ai/examples/enumeration.html: ``@config_enumerate`` on the model and an empty guide,
``def guide(): pass``). This is the maximum-likelihood mixture of the issue: nothing but
``pyro.param`` values to learn.

Changed, and why:
- ``model(K, data)`` becomes ``model(data)`` with ``K = 2`` a module constant (as in the GMM tutorial):
  the data are the program's argument;
- the example's guide learns one assignment distribution per training point (``assignment_probs``
  of shape ``[len(data), K]``); here the assignment is enumerated in the model instead, so that the
  guide is empty and the fitted model is a mixture density for any new point.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.contrib.autoname import scope
from pyro.infer import config_enumerate
from torch.distributions import constraints

K = 2


@config_enumerate
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


def guide(data):
    pass
