"""The Gaussian mixture of Pyro's GMM tutorial: plain functions, ``@config_enumerate``, MAP globals.

Source: https://pyro.ai/examples/gmm.html (pyro-ppl/pyro, tutorial/source/gmm.ipynb). ``model(data)``
is the tutorial's, unchanged: global ``weights`` (Dirichlet), ``scale`` (LogNormal) and ``locs`` (in a
``components`` plate), the local ``assignment`` enumerated by ``@config_enumerate``, scalar data observed
at ``"obs"`` inside ``pyro.plate("data", len(data))``. The guide is the tutorial's ``AutoDelta`` over
the blocked model that exposes only the globals (MAP estimation); the assignments are summed out.

Changed, and why:
- the tutorial calls the guide ``global_guide``; here it is named ``guide``, the name a functions file
  offers its guide under (as in ``SVI(model, guide, ...)``);
- its ``init_loc_fn`` reads the data set (``data.var()``, a random choice of points) from a global
  variable, which a model file does not have at import; here the weights start uniform (as in the
  tutorial), the scale at 1 and the locations at a draw from their prior (``init_to_sample``);
- the tutorial's five points become a few hundred points drawn by the tests from a 2-component
  mixture; ``K = 2`` as in the tutorial.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_sample

K = 2  # Fixed number of components.


@config_enumerate
def model(data):
    # Global variables.
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))

    with pyro.plate("data", len(data)):
        # Local variables.
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def init_loc_fn(site):
    if site["name"] == "weights":
        # Initialize weights to uniform.
        return torch.ones(K) / K
    if site["name"] == "scale":
        return torch.tensor(1.0)
    if site["name"] == "locs":
        return init_to_sample(site)
    raise ValueError(site["name"])


guide = AutoDelta(
    poutine.block(model, expose=["weights", "locs", "scale"]),
    init_loc_fn=init_loc_fn,
)
