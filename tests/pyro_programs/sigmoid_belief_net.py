"""A sigmoid belief network: two layers of binary latents, an amortized Bernoulli guide.

    p(h2) = Bernoulli(sigmoid(b2)),  p(h1 | h2) = Bernoulli(sigmoid(W2 h2 + b1)),
    p(x | h1) = Bernoulli(sigmoid(W1 h1 + b0));    q(h1 | x) q(h2 | h1), each a logistic layer

Neal (1992), "Connectionist learning of belief networks"; trained with a score-function guide as in
Mnih & Gregor (2014), "Neural Variational Inference and Learning in Belief Networks". Written as
Pyro's VAE tutorial writes a model (https://pyro.ai/examples/vae.html: ``nn.Module``,
``pyro.module``, ``model(self, x)``, ``pyro.plate("data", x.shape[0])``, observed site ``"obs"``).
Pyro has no sigmoid-belief-net example; the latents are discrete and not marked for enumeration,
so the guide samples them and Pyro's ``Trace_ELBO`` uses the score-function estimator. With a few
hidden units the exact log p(x) is a sum over all hidden configurations.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn


class SigmoidBeliefNet(nn.Module):
    def __init__(self, input_dim=784, h1_dim=200, h2_dim=200):
        super().__init__()
        self.h2_dim = h2_dim
        self.prior_logits = nn.Parameter(torch.zeros(h2_dim))
        self.layer2 = nn.Linear(h2_dim, h1_dim)
        self.layer1 = nn.Linear(h1_dim, input_dim)
        self.encoder1 = nn.Linear(input_dim, h1_dim)
        self.encoder2 = nn.Linear(h1_dim, h2_dim)

    def model(self, x):
        pyro.module("sbn", self)
        with pyro.plate("data", x.shape[0]):
            logits2 = self.prior_logits.expand(x.shape[0], self.h2_dim)
            h2 = pyro.sample("h2", dist.Bernoulli(logits=logits2).to_event(1))
            h1 = pyro.sample("h1", dist.Bernoulli(logits=self.layer2(h2)).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.layer1(h1)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("sbn", self)
        with pyro.plate("data", x.shape[0]):
            h1 = pyro.sample("h1", dist.Bernoulli(logits=self.encoder1(x)).to_event(1))
            pyro.sample("h2", dist.Bernoulli(logits=self.encoder2(h1)).to_event(1))
