"""pyro-lvm: latent variable models written as Pyro programs, fitted with SVI, with honest log p(x).

The public API mirrors the command line, one function per command::

    run = pyro_lvm.fit("vae", data="digits", epochs=10, out="runs/vae")
    result = pyro_lvm.evaluate(run, estimator="is", samples=1000)
    pyro_lvm.sample(run, n=64, out="grid.png")
    pyro_lvm.diagnose(run)
    pyro_lvm.report(run, out="report/")

Importing the package is cheap; the heavy modules load on first use.
"""

import importlib

__version__ = "0.1.0"

# Pyro's settings are left as Pyro has them: a user's program runs as under plain Pyro. Each program
# keeps its ``pyro.param`` s in a parameter store of its own (pyro_lvm.protocol.program), so several
# models live side by side in one process.

_API = {
    "fit": "pyro_lvm.api",
    "evaluate": "pyro_lvm.api",
    "sample": "pyro_lvm.api",
    "diagnose": "pyro_lvm.api",
    "report": "pyro_lvm.api",
    "load_run": "pyro_lvm.runs",
    "Run": "pyro_lvm.runs",
    "load_model_class": "pyro_lvm.protocol",
    "build_model": "pyro_lvm.protocol",
    "inspect_model": "pyro_lvm.protocol",
    "load_dataset": "pyro_lvm.data",
    "estimate_log_marginal": "pyro_lvm.estimators",
    "get_objective": "pyro_lvm.objectives",
    "UserError": "pyro_lvm.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pyro_lvm' has no attribute {name!r}")
