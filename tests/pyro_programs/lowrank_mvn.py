"""A Bayesian Gaussian with correlated global latents and an ``AutoLowRankMultivariateNormal`` guide.

Written as Pyro's AutoGuide documentation and the intro tutorial write global models: a plain
``model(data)`` with a vector latent under ``.to_event(1)`` outside the data plate (named ``batch``),
and ``guide = AutoLowRankMultivariateNormal(model, rank=1)`` at module level
(https://docs.pyro.ai/en/stable/infer.autoguide.html#autolowrankmultivariatenormal).

    mu ~ N(0, 5^2 I_3),    log_sigma ~ N(0, I_3),    x_n ~ N(mu, diag(exp(log_sigma))^2)
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoLowRankMultivariateNormal

D = 3


def model(data):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 5.0).to_event(1))
    log_sigma = pyro.sample("log_sigma", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("batch", data.shape[0]):
        pyro.sample("x", dist.Normal(mu, log_sigma.exp()).to_event(1), obs=data)


guide = AutoLowRankMultivariateNormal(model, rank=1)
