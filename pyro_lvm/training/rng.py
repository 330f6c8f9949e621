"""Random-number state of a training run: saved in checkpoints, restored on resume, forked for probes.

A checkpoint holds the torch (and CUDA) generator states, so that ``--resume`` continues the very
stream the interrupted run was drawing from; work that must not disturb that stream (probing the
model, validation) runs under :func:`forked_rng`.
"""

import contextlib

import torch


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


@contextlib.contextmanager
def forked_rng(device, seed):
    """A context in which randomness is seeded by ``seed`` and the caller's RNG stream is untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
