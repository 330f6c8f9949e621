"""A two-component mixture whose likelihood is a ``dist.MaskedMixture``, the assignment enumerated.

Pyro's ``MaskedMixture`` (pyro.distributions, used in ``examples/capture_recapture/cjs.py``-style
zero-inflated likelihoods and in the enumeration tutorial's mixtures) chooses, per element, between
two component distributions with a boolean mask. Written as a ``PyroModule`` whose parameters are
``PyroParam``; the ``model`` method carries ``@config_enumerate`` as a decorator (the GMM tutorial
decorates a function the same way); the guide is empty (every latent is enumerated).

    k_n ~ Bernoulli(pi),    x_n | k_n ~ N(loc_{k_n}, scale_{k_n}^2)
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints


class MaskedGaussianMixture(PyroModule):
    def __init__(self, init_separation=2.0):
        super().__init__()
        self.pi = PyroParam(torch.tensor(0.5), constraint=constraints.unit_interval)
        self.locs = PyroParam(torch.tensor([-init_separation, init_separation]))
        self.scales = PyroParam(torch.ones(2), constraint=constraints.positive)

    @config_enumerate
    def model(self, data):
        with pyro.plate("data", len(data)):
            k = pyro.sample("k", dist.Bernoulli(self.pi))
            mask = k.bool()
            pyro.sample("obs", dist.MaskedMixture(mask, dist.Normal(self.locs[0], self.scales[0]),
                                                  dist.Normal(self.locs[1], self.scales[1])), obs=data)

    def guide(self, data):
        pass
