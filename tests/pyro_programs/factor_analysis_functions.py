"""Factor analysis as module-level functions ``model(data)`` and ``guide(data)``, all ``pyro.param``.

    z ~ N(0, I_K),    x | z ~ N(W z + mu, diag(psi)),    q(z | x) = N(A x + c, diag(s^2))

Written the way Pyro's introductory tutorial writes a model with learnable parameters
(https://pyro.ai/examples/intro_long.html: ``simple_model`` and ``custom_guide``, plain functions that
create their parameters with ``pyro.param(name, lambda: init, constraint=...)`` and a
``pyro.plate("data", ...)``), with an amortized linear guide as in the VAE tutorial. The parameter
shapes follow the data at the first call, as ``pyro.param`` initialisers do.

Pyro has no factor-analysis example file of its own; this is the standard model written with those
idioms. ``K = 1`` is a module constant, like ``K`` in the GMM tutorial. Exact marginal:
x ~ N(mu, W W^T + diag(psi)).
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

K = 1  # number of factors


def model(data):
    D = data.shape[-1]
    W = pyro.param("W", lambda: 0.1 * torch.randn(D, K))
    mu = pyro.param("mu", lambda: torch.zeros(D))
    psi = pyro.param("psi", lambda: torch.ones(D), constraint=constraints.positive)
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(z @ W.T + mu, psi.sqrt()).to_event(1), obs=data)


def guide(data):
    D = data.shape[-1]
    A = pyro.param("A", lambda: torch.zeros(K, D))
    c = pyro.param("c", lambda: torch.zeros(K))
    s = pyro.param("s", lambda: torch.ones(K), constraint=constraints.positive)
    with pyro.plate("data", data.shape[0]):
        pyro.sample("z", dist.Normal(data @ A.T + c, s).to_event(1))
