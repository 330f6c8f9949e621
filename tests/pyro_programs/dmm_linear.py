"""A Deep Markov Model, kept tiny and linear-Gaussian, written as Pyro's DMM example writes it.

Source: ``examples/dmm.py`` (pyro-ppl/pyro) and the DMM tutorial (https://pyro.ai/examples/dmm.html):
an ``nn.Module`` with ``pyro.module("dmm", self)``, a learned ``z_0``, a transition network ``trans``
and an emitter, the loop ``for t in pyro.markov(range(1, T_max + 1))`` inside
``pyro.plate("z_minibatch", len(mini_batch))``, sites ``z_%d`` and ``obs_x_%d``, each under
``poutine.scale(scale=annealing_factor)`` and ``.mask(...)``; the guide runs an RNN over the reversed
sequence and a ``combiner`` that mixes z_{t-1} with the RNN state.

Changed, and why: the example's gated MLPs become linear maps with learned constant scales, so that
log p(x) has a closed form (the model is then a linear-Gaussian state-space model); the emission is
Gaussian (the example's is Bernoulli over 88 notes); sequences all have the full length, so the
example's ``mini_batch_mask`` and ``mini_batch_reversed`` arguments are computed inside (mask of ones,
``torch.flip``) instead of being passed in; ``annealing_factor`` keeps its default 1.0.

    z_t | z_{t-1} ~ N(A z_{t-1} + a, s_z^2 I),    x_t | z_t ~ N(C z_t + c, s_x^2 I)
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro import poutine


class Emitter(nn.Module):
    def __init__(self, input_dim, z_dim):
        super().__init__()
        self.lin_z_to_loc = nn.Linear(z_dim, input_dim)
        self.log_scale = nn.Parameter(torch.zeros(input_dim))

    def forward(self, z_t):
        return self.lin_z_to_loc(z_t), self.log_scale.exp()


class GatedTransition(nn.Module):
    def __init__(self, z_dim):
        super().__init__()
        self.lin_z_to_loc = nn.Linear(z_dim, z_dim)
        self.log_scale = nn.Parameter(torch.zeros(z_dim))

    def forward(self, z_t_1):
        return self.lin_z_to_loc(z_t_1), self.log_scale.exp().expand_as(z_t_1)


class Combiner(nn.Module):
    def __init__(self, z_dim, rnn_dim):
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.lin_hidden_to_loc = nn.Linear(rnn_dim, z_dim)
        self.lin_hidden_to_scale = nn.Linear(rnn_dim, z_dim)
        self.tanh = nn.Tanh()
        self.softplus = nn.Softplus()

    def forward(self, z_t_1, h_rnn):
        h_combined = 0.5 * (self.tanh(self.lin_z_to_hidden(z_t_1)) + h_rnn)
        loc = self.lin_hidden_to_loc(h_combined)
        scale = self.softplus(self.lin_hidden_to_scale(h_combined))
        return loc, scale


class DMM(nn.Module):
    def __init__(self, input_dim=2, z_dim=1, rnn_dim=8):
        super().__init__()
        self.emitter = Emitter(input_dim, z_dim)
        self.trans = GatedTransition(z_dim)
        self.combiner = Combiner(z_dim, rnn_dim)
        self.rnn = nn.RNN(input_size=input_dim, hidden_size=rnn_dim, nonlinearity="relu",
                          batch_first=True, bidirectional=False, num_layers=1)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))

    def model(self, mini_batch, annealing_factor=1.0):
        T_max = mini_batch.size(1)
        mini_batch_mask = torch.ones(mini_batch.shape[:2])
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(mini_batch.size(0), self.z_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.trans(z_prev)
                with poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample("z_%d" % t, dist.Normal(z_loc, z_scale)
                                      .mask(mini_batch_mask[:, t - 1:t]).to_event(1))
                emission_loc_t, emission_scale_t = self.emitter(z_t)
                pyro.sample("obs_x_%d" % t, dist.Normal(emission_loc_t, emission_scale_t)
                            .mask(mini_batch_mask[:, t - 1:t]).to_event(1), obs=mini_batch[:, t - 1, :])
                z_prev = z_t

    def guide(self, mini_batch, annealing_factor=1.0):
        T_max = mini_batch.size(1)
        mini_batch_mask = torch.ones(mini_batch.shape[:2])
        mini_batch_reversed = torch.flip(mini_batch, [1])
        pyro.module("dmm", self)
        h_0_contig = self.h_0.expand(1, mini_batch.size(0), self.rnn.hidden_size).contiguous()
        rnn_output, _ = self.rnn(mini_batch_reversed, h_0_contig)
        rnn_output = torch.flip(rnn_output, [1])
        z_prev = self.z_q_0.expand(mini_batch.size(0), self.z_q_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.combiner(z_prev, rnn_output[:, t - 1, :])
                z_dist = dist.Normal(z_loc, z_scale)
                with pyro.poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample("z_%d" % t, z_dist.mask(mini_batch_mask[:, t - 1:t]).to_event(1))
                z_prev = z_t
