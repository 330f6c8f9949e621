"""The toy mixture of Pyro's discrete-enumeration example: (A) -> [B] -> (C), two observed sites.

Source: pyro-ppl/pyro examples/toy_mixture_model_discrete_enumeration.py. ``model`` and ``guide``
are the example's: global Beta probabilities ``p_A``, ``p_B``, ``p_C`` with a guide of ``pyro.param``
Beta parameters ``a``, ``b``, ``c``; inside ``pyro.plate("data_plate", num_obs)`` the observed ``A``,
the hidden ``B`` (enumerated, ``@config_enumerate`` and ``infer={"enumerate": "parallel"}``, indexed
with ``Vindex``) and the observed ``C``. Every parameter is a ``pyro.param``; the latents are global
(the p's) and local discrete (B).

Changed, and why: the example's ``model(prior, obs, num_obs)`` / ``guide(prior, obs, num_obs)`` take a
dict ``obs = {"A": ..., "C": ...}``, the prior's pseudo-counts and the number of points; here they take
the data set, one row ``(A, C)`` per point, and build the same three values from it (``prior`` is
the example's ``generate_data`` prior, a module constant). Under the Beta guide the held-out
predictive p(A, C | training data) has a closed form (the Beta means), which the tests use.
"""

import pyro
import pyro.distributions as dist
import pyro.infer
import torch
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

# domain = [False, True]
PRIOR = {
    "A": torch.tensor([1.0, 10.0]),
    "B": torch.tensor([[10.0, 1.0], [1.0, 10.0]]),
    "C": torch.tensor([[10.0, 1.0], [1.0, 10.0]]),
}


@pyro.infer.config_enumerate
def model(data):
    obs, num_obs = {"A": data[..., 0], "C": data[..., 1]}, len(data)
    p_A = pyro.sample("p_A", dist.Beta(1, 1))
    p_B = pyro.sample("p_B", dist.Beta(torch.ones(2), torch.ones(2)).to_event(1))
    p_C = pyro.sample("p_C", dist.Beta(torch.ones(2), torch.ones(2)).to_event(1))
    with pyro.plate("data_plate", num_obs):
        A = pyro.sample("A", dist.Bernoulli(p_A.expand(num_obs)), obs=obs["A"])
        # Vindex used to ensure proper indexing into the enumerated sample sites
        B = pyro.sample(
            "B",
            dist.Bernoulli(Vindex(p_B)[A.type(torch.long)]),
            infer={"enumerate": "parallel"},
        )
        pyro.sample("C", dist.Bernoulli(Vindex(p_C)[B.type(torch.long)]), obs=obs["C"])


def guide(data):
    prior = PRIOR
    a = pyro.param("a", prior["A"], constraint=constraints.positive)
    pyro.sample("p_A", dist.Beta(a[0], a[1]))
    b = pyro.param("b", prior["B"], constraint=constraints.positive)
    pyro.sample("p_B", dist.Beta(b[:, 0], b[:, 1]).to_event(1))
    c = pyro.param("c", prior["C"], constraint=constraints.positive)
    pyro.sample("p_C", dist.Beta(c[:, 0], c[:, 1]).to_event(1))
