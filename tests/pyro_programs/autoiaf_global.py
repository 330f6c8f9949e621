"""Global latents with an ``AutoIAFNormal`` guide (a normalizing flow over all latents).

Source: the AutoGuide documentation (https://docs.pyro.ai/en/stable/infer.autoguide.html#autoiafnormal)
and the normalizing-flows tutorial's use of ``AutoIAFNormal(model, hidden_dim=...)``. The model is the
intro tutorial's kind of plain ``model(data)``: an unknown 2-D mean and a log scale, the data plate
``data``; the guide is ``AutoIAFNormal(model, hidden_dim=[16], num_transforms=1)`` at module level.

    mu ~ N(0, 5^2 I_2),   log_s ~ N(0, 1),   x_n ~ N(mu, exp(log_s)^2 I_2)
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoIAFNormal


def model(data):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 5.0).to_event(1))
    log_s = pyro.sample("log_s", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(mu, log_s.exp().unsqueeze(-1)).to_event(1), obs=data)


guide = AutoIAFNormal(model, hidden_dim=[16], num_transforms=1)
