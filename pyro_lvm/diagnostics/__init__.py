"""Diagnostics of latent usage: is z used, and how much?

:func:`diagnose_model` reports, over a whole data split, the KL of the guide from the prior per latent
dimension, the active units, the mutual information between data and code under the aggregate
posterior, rate, distortion and ELBO, the fuzziness of the codes (the spread of q(x|z)), and a
posterior-collapse verdict in plain language. :func:`diagnose_run` does the same for a fitted run;
:func:`code_fuzziness` gives the fuzziness code by code.
"""

from .diagnose import diagnose_model, diagnose_run, model_device
from .fuzziness import code_fuzziness

__all__ = ["code_fuzziness", "diagnose_model", "diagnose_run", "model_device"]
