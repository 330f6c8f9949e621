"""A model file that parses its command line at import, as Pyro's ``examples/*.py`` scripts do
when their ``argparse`` block is not under ``if __name__ == "__main__":``.

The example scripts build an ``argparse.ArgumentParser`` and call ``parser.parse_args()``; moved to
the top level (a common way of turning an example into an importable file), it runs at import and
reads pyro-lvm's own command line, which it does not understand: ``SystemExit`` at import. It must
be reported as the user's error (exit 2, one line, naming the file and line), not swallowed.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch

parser = argparse.ArgumentParser(description="Gaussian mean")
parser.add_argument("-n", "--num-steps", default=1000, type=int)
parser.add_argument("-lr", "--learning-rate", default=0.01, type=float)
args = parser.parse_args()


def model(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def guide(data):
    pass
