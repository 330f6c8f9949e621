"""A mixture of Bernoullis whose assignment is enumerated *sequentially* (``infer={"enumerate": "sequential"}``).

Pyro offers two enumeration strategies (https://pyro.ai/examples/enumeration.html): ``"parallel"``
(a tensor dimension on the left) and ``"sequential"`` (one trace per value, ``iter_discrete_traces``).
Here the guide samples the local assignment from an amortized Categorical and marks it sequential,
as the enumeration tutorial's guide-side examples do; the model is a plain mixture of Bernoullis
over binary pixels with ``pyro.param`` weights and an ``nn.Module`` encoder.

    k_n ~ Cat(w),   x_nd | k_n ~ Bernoulli(p_{k_n d});   q(k_n | x_n) = Cat(softmax(encoder(x_n)))
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from torch.distributions import constraints


class SequentialMixture(nn.Module):
    def __init__(self, data_dim=8, num_components=2):
        super().__init__()
        self.num_components = num_components
        self.data_dim = data_dim
        self.encoder = nn.Linear(data_dim, num_components)

    def model(self, x):
        weights = pyro.param("weights", torch.ones(self.num_components) / self.num_components,
                             constraint=constraints.simplex)
        probs = pyro.param("probs", lambda: torch.rand(self.num_components, self.data_dim) * 0.5 + 0.25,
                           constraint=constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(weights))
            pyro.sample("obs", dist.Bernoulli(probs[k]).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Categorical(logits=self.encoder(x)), infer={"enumerate": "sequential"})
