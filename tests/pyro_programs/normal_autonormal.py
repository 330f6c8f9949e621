"""A model with global latents only and an ``AutoNormal`` guide, as Pyro's modules tutorial writes it.

Source: https://pyro.ai/examples/modules.html (pyro-ppl/pyro, tutorial/source/modules.ipynb):
``NormalModel`` / ``GlobalModel`` (a ``PyroModule`` whose ``loc`` is a ``PyroSample`` from N(0, 1),
accessed outside the plate, so global; the data observed at ``"obs"`` in ``pyro.plate("data",
len(data))``), and, as the tutorial does, ``model = Model(...)`` and ``guide = AutoNormal(model)``
at module level: the model is the module's ``forward``.

Changed: the tutorial's ``assert loc.shape == ()`` is left out (it demonstrates the shape rule and
would fail under a vectorized particle plate, as in ``Trace_ELBO(vectorize_particles=True)``), and
the instances are made at import so that the file offers ``model`` and ``guide``. The posterior is
conjugate; under q(loc) = N(m, s^2) the held-out predictive is N(x; m, 1 + s^2).
"""

import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample


class NormalModel(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroSample(dist.Normal(0, 1))


class GlobalModel(NormalModel):
    def forward(self, data):
        # If .loc is accessed (for the first time) outside the plate,
        # then it will have empty shape ().
        loc = self.loc
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(loc, 1), obs=data)


model = GlobalModel()
guide = AutoNormal(model)
