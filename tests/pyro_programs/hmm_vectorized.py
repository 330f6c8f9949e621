"""The vectorized HMM of Pyro's HMM example (``model_1``): ``pyro.markov``, one observed site per step.

Source: pyro-ppl/pyro examples/hmm.py, ``model_1`` and its guide from ``main()``:

    x[t-1] --> x[t] --> x[t+1]        probs_x ~ Dirichlet (transitions), probs_y ~ Beta (emissions)
       |        |         |           x[t] enumerated ("parallel"), y[t] observed per tone
       V        V         V
    y[t-1]     y[t]     y[t+1]

The data plate is ``pyro.plate("sequences", num_sequences, batch_size, dim=-2)`` (named
``sequences``, at dim -2 because the ``tones`` plate holds dim -1, and subsampling itself when
``batch_size`` is given); inside it one site ``y_{t}`` per time step observes ``sequences[batch, t]``.
The guide is the example's ``AutoDelta`` over the blocked model exposing ``probs_*`` (MAP); the
hidden states are summed out.

Changed, and why:
- ``model_1(sequences, lengths, args, batch_size=None, include_prior=True)`` becomes
  ``model(sequences, lengths=None, batch_size=None, include_prior=True)``: the program's one data
  argument is the sequences; ``lengths`` defaults to full-length sequences (the tests' data have
  no padding), and ``args.hidden_dim`` / ``args.jit`` become the module constants ``HIDDEN_DIM``
  and ``JIT = False``;
- the logging set-up, the data loader and ``main()`` are left out.
Sizes: 3 hidden states; the tests use a few short sequences of a few tones.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta
from pyro.util import ignore_jit_warnings

HIDDEN_DIM = 3
JIT = False


# Note that this is the "HMM" model in reference [1] (with the difference that
# in [1] the probabilities probs_x and probs_y are not MAP-regularized with
# Dirichlet and Beta distributions for any of the models)
def model(sequences, lengths=None, batch_size=None, include_prior=True):
    # Sometimes it is safe to ignore jit warnings. Here we use the
    # pyro.util.ignore_jit_warnings context manager to silence warnings about
    # conversion to integer, since we know all three numbers will be the same
    # across all invocations to the model.
    with ignore_jit_warnings():
        num_sequences, max_length, data_dim = map(int, sequences.shape)
        if lengths is None:
            lengths = torch.full((num_sequences,), max_length, dtype=torch.long, device=sequences.device)
        assert lengths.shape == (num_sequences,)
        assert lengths.max() <= max_length
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample(
            "probs_x",
            dist.Dirichlet(0.9 * torch.eye(HIDDEN_DIM) + 0.1).to_event(1),
        )
        probs_y = pyro.sample(
            "probs_y",
            dist.Beta(0.1, 0.9).expand([HIDDEN_DIM, data_dim]).to_event(2),
        )
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    # We subsample batch_size items out of num_sequences items. Note that since
    # we're using dim=-1 for the notes plate, we need to batch over a different
    # dimension, here dim=-2.
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        x = 0
        # If we are not using the jit, then we can vary the program structure
        # each call by running for a dynamically determined number of time
        # steps, lengths.max(). However if we are using the jit, then we try to
        # keep a single program structure for all minibatches; the fixed
        # structure ends up being faster since each program structure would
        # need to trigger a new jit compile stage.
        for t in pyro.markov(range(max_length if JIT else lengths.max())):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(
                    "x_{}".format(t),
                    dist.Categorical(probs_x[x]),
                    infer={"enumerate": "parallel"},
                )
                with tones_plate:
                    pyro.sample(
                        "y_{}".format(t),
                        dist.Bernoulli(probs_y[x.squeeze(-1)]),
                        obs=sequences[batch, t],
                    )


guide = AutoDelta(
    poutine.block(model, expose_fn=lambda msg: msg["name"].startswith("probs_"))
)
