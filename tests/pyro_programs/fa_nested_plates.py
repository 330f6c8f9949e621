"""One-factor analysis written with two plates: the data plate at dim -2, a features plate at dim -1.

    z_n ~ N(0, 1),   x_nd | z_n ~ N(w_d z_n + mu_d, psi_d),   q(z_n | x_n) = N(a . x_n + c, s^2)

Plates as Pyro's tensor-shapes tutorial writes nested plates
(https://pyro.ai/examples/tensor_shapes.html: ``x_axis = pyro.plate("x_axis", ..., dim=-2)``,
``y_axis = pyro.plate("y_axis", ..., dim=-1)``, sites under ``with x_axis, y_axis``): instead of
``.to_event(1)``, each of the D features of a point is an independent site dimension of the
``features`` plate, so the per-point latent z has shape [N, 1] and the data plate is dim -2. The
parameters are ``PyroParam`` of a ``PyroModule`` (modules tutorial). Exact marginal:
x_n ~ N(mu, w w^T + diag(psi)).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints


class NestedPlateFA(PyroModule):
    def __init__(self, data_dim=3):
        super().__init__()
        self.w = PyroParam(0.1 * torch.randn(data_dim))
        self.mu = PyroParam(torch.zeros(data_dim))
        self.psi = PyroParam(torch.ones(data_dim), constraint=constraints.positive)
        self.a = PyroParam(torch.zeros(data_dim))
        self.c = PyroParam(torch.tensor(0.0))
        self.s = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

    def model(self, x):
        data_plate = pyro.plate("data", x.shape[0], dim=-2)
        features_plate = pyro.plate("features", x.shape[1], dim=-1)
        with data_plate:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with features_plate:
                pyro.sample("obs", dist.Normal(z * self.w + self.mu, self.psi.sqrt()), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0], dim=-2):
            loc = (x * self.a).sum(-1, keepdim=True) + self.c
            pyro.sample("z", dist.Normal(loc, self.s))
