"""A model with one local latent per point and an ``AutoNormal`` guide, from Pyro's modules tutorial.

Source: https://pyro.ai/examples/modules.html (pyro-ppl/pyro, tutorial/source/modules.ipynb):
``NormalModel`` / ``LocalModel`` (a ``PyroModule`` whose ``loc`` is a ``PyroSample`` from N(0, 1),
accessed for the first time inside ``pyro.plate("data", len(data))``, so one ``loc`` per point), with
``guide = AutoNormal(model)`` as the tutorial builds its guides. The AutoNormal learns one q(loc_n)
per *training* point: it is not amortized, so there is no q for a new point.

Changed: the tutorial's ``assert loc.shape == (len(data),)`` is left out (it demonstrates the shape
rule and fails under a vectorized particle plate), and the instances are made at import so that the
file offers ``model`` and ``guide``. The marginal of one point is N(0, 2).
"""

import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample


class NormalModel(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroSample(dist.Normal(0, 1))


class LocalModel(NormalModel):
    def forward(self, data):
        with pyro.plate("data", len(data)):
            # If .loc is accessed (for the first time) inside the plate,
            # then it will be expanded by the plate to shape (plate.size,).
            loc = self.loc
            pyro.sample("obs", dist.Normal(loc, 1), obs=data)


model = LocalModel()
guide = AutoNormal(model)
