"""A Gaussian mixture with module parameters (the means) beside ``pyro.param`` ones (weights, scale).

Sources: the mixture of pyro-ppl/pyro examples/contrib/autoname/scoping_mixture.py (``pyro.param``
weights with a simplex constraint and a positive scale), the ``nn.Module`` + ``pyro.module``
registration of the VAE tutorial (https://pyro.ai/examples/vae.html), and model-side enumeration
of the assignment with ``infer={"enumerate": "parallel"}`` as in examples/hmm.py. The component
means are an ``nn.Parameter`` of the module; the weights and the per-dimension scale are
``pyro.param`` in Pyro's global parameter store: the mixed case of the issue, where the
``pyro.param`` values were silently left at their initial values.

Nothing is changed from these idioms; the sizes are constructor keywords with defaults. The tests
fit it on 2-dimensional points drawn from a 3-component mixture.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from torch.distributions import constraints


class GaussianMixture(nn.Module):
    def __init__(self, num_components=3, data_dim=2):
        super().__init__()
        self.num_components = num_components
        self.data_dim = data_dim
        self.locs = nn.Parameter(3.0 * torch.randn(num_components, data_dim))

    def model(self, data):
        pyro.module("mixture", self)
        weights = pyro.param(
            "weights",
            torch.ones(self.num_components) / self.num_components,
            constraint=constraints.simplex,
        )
        scale = pyro.param(
            "scale", torch.ones(self.data_dim), constraint=constraints.positive
        )
        with pyro.plate("data", data.shape[0]):
            assignment = pyro.sample(
                "assignment",
                dist.Categorical(weights),
                infer={"enumerate": "parallel"},
            )
            pyro.sample(
                "obs", dist.Normal(self.locs[assignment], scale).to_event(1), obs=data
            )

    def guide(self, data):
        pass
