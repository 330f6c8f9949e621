"""Pyro's Bayesian regression tutorial, unchanged: a conditional model p(y | x), not a model of x.

Source: https://pyro.ai/examples/bayesian_regression.html (tutorial/source/bayesian_regression.ipynb):
``PyroModule[nn.Linear]`` whose ``weight`` and ``bias`` are ``PyroSample`` priors,
``forward(self, x, y=None)`` observing ``y`` at ``"obs"`` in ``pyro.plate("data", x.shape[0])``,
``sigma ~ Uniform(0, 10)``, and ``guide = AutoDiagonalNormal(model)``.

pyro-lvm fits models of the data it is given (``model(x)``); this one observes nothing when called
with one array, since ``y`` defaults to None: it must be refused with a line that says so.
"""

import pyro
import pyro.distributions as dist
import torch.nn as nn
from pyro.infer.autoguide import AutoDiagonalNormal
from pyro.nn import PyroModule, PyroSample


class BayesianRegression(PyroModule):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(dist.Normal(0., 1.).expand([out_features, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0., 10.).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0., 10.))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            obs = pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


model = BayesianRegression(3, 1)
guide = AutoDiagonalNormal(model)
