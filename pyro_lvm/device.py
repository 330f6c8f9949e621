"""Which torch device a command runs on: ``auto``, ``cpu`` or ``cuda[:N]``.

A module of its own, below both the run directory (:mod:`pyro_lvm.runs`) and training
(:mod:`pyro_lvm.training`), so that loading a run does not import the training loop.
"""

import torch

from .errors import UserError


def resolve_device(name, fallback_to_cpu=False):
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a :class:`UserError`
    (or the CPU, with ``fallback_to_cpu``: a run fitted on a GPU is still readable on a laptop)."""
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            if fallback_to_cpu:
                return torch.device("cpu")
            raise UserError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu or auto")
        try:
            return torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
