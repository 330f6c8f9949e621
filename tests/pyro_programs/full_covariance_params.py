"""A full-covariance Gaussian mixture with ``constraints.lower_cholesky`` and ``simplex`` parameters.

Pyro users parameterise covariances with a Cholesky factor: ``pyro.param("scale_tril", ...,
constraint=constraints.lower_cholesky)`` and ``dist.MultivariateNormal(loc, scale_tril=...)`` (the GMM
and the LKJ tutorials). The assignment is enumerated with ``@config_enumerate``, the guide is empty,
the data plate is ``obs_plate``. The unconstrained values Pyro optimizes must be saved and restored.

    k_n ~ Cat(w),   x_n | k_n ~ N(loc_k, L_k L_k^T)
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from torch.distributions import constraints

K = 3


@config_enumerate
def model(data):
    weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([[0.0, -1.0], [2.0, 2.0], [-2.0, 2.0]]))
    scale_tril = pyro.param("scale_tril", torch.eye(2).expand(K, 2, 2).clone(), constraint=constraints.lower_cholesky)
    with pyro.plate("obs_plate", data.shape[0]):
        k = pyro.sample("k", dist.Categorical(weights))
        pyro.sample("x", dist.MultivariateNormal(locs[k], scale_tril=scale_tril[k]), obs=data)


def guide(data):
    pass
