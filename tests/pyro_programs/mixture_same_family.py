"""A Gaussian mixture written as one ``dist.MixtureSameFamily`` likelihood: no latent at all.

The assignments are marginalised inside the distribution (``MixtureSameFamily(Categorical(w),
Normal(locs, scales))``, as PyTorch documents it and as Pyro users write density models), so the
model is a plain maximum-likelihood density with ``pyro.param`` parameters and an empty guide,
written like the intro tutorial's ``pyro.param`` models (https://pyro.ai/examples/intro_long.html).

    x_n ~ sum_k w_k N(loc_k, scale_k^2)        (2-D, diagonal components)
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

K = 3


def model(data):
    weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    scales = pyro.param("scales", torch.ones(K, 2), constraint=constraints.positive)
    mixture = dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(locs, scales).to_event(1))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", mixture, obs=data)


def guide(data):
    pass
