"""Global latents with an ``@easy_guide`` guide: a joint Normal over a group of sites, a MAP site.

Source: the easyguide tutorial (https://pyro.ai/examples/easyguide.html, tutorial/source/
easyguide.ipynb): ``@easy_guide(model)`` on ``def guide(self, data)``, ``self.group(match=...)`` with
``group.sample("joint", ...)`` over ``pyro.param`` locations and scales, ``self.map_estimate(...)``.
The model is a two-component Gaussian mixture with enumerated assignments (the GMM tutorial's
``@config_enumerate``) whose component locations are one global vector latent (``.to_event(1)``: a group's sites are
flattened into one event); the scale is MAP.

    locs_k ~ N(0, 10^2),  scale ~ LogNormal(0, 2),  k_n ~ Cat(1/2, 1/2),  x_n ~ N(locs_{k_n}, scale^2)
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.contrib.easyguide import easy_guide
from pyro.infer import config_enumerate
from torch.distributions import constraints

K = 2


@config_enumerate
def model(data):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(K), 10.0).to_event(1))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(torch.ones(K) / K))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


@easy_guide(model)
def guide(self, data):
    self.map_estimate("scale")
    group = self.group(match="locs")
    loc = pyro.param("locs_loc", torch.tensor([-1.0, 1.0]))
    scale = pyro.param("locs_scale", 0.1 * torch.ones(K), constraint=constraints.positive)
    group.sample("joint", dist.Normal(loc, scale).to_event(1))
