"""Global latents with an ``AutoGuideList``: MAP for one site, a Normal for the other.

Source: the ``AutoGuideList`` documentation (https://docs.pyro.ai/en/stable/infer.autoguide.html):
``guide = AutoGuideList(model)``, ``guide.append(AutoDelta(poutine.block(model, expose=[...])))``,
``guide.append(AutoNormal(poutine.block(model, hide=[...])))``; the model is a plain function as in
the intro tutorial, the data plate declared once and reused (``data_plate = pyro.plate(...)``, then
``with data_plate:``, as the tensor-shapes tutorial does with ``x_axis``), named ``N``.

    loc ~ N(0, 10^2),    scale ~ LogNormal(0, 1),    x_n ~ N(loc, scale^2)
    q(loc) = N(m, s^2) (AutoNormal),    q(scale) = delta(scale*) (AutoDelta)
"""

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal


def model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    data_plate = pyro.plate("N", len(data))
    with data_plate:
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


guide = AutoGuideList(model)
guide.append(AutoDelta(poutine.block(model, expose=["scale"])))
guide.append(AutoNormal(poutine.block(model, hide=["scale"])))
