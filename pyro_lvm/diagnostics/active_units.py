"""Active units: latent dimensions whose posterior mean moves with the data.

Burda, Grosse & Salakhutdinov (2015), "Importance weighted autoencoders", Section 5.2: dimension d is
active when

    A_d = Var_x( E_q(z|x)[z_d] ) > 0.01.

An inactive dimension has the same posterior mean for every data point, so the decoder cannot learn
anything about x from it; it is usually also at its prior (KL ~ 0). The threshold assumes a prior of
unit scale, as in N(0, I).
"""

import torch

ACTIVE_UNIT_THRESHOLD = 0.01


def active_unit_variances(posterior_means):
    """A_d for every dimension, from posterior means of shape [N, D] (the sample variance over N)."""
    if posterior_means.shape[0] < 2:
        return torch.zeros(posterior_means.shape[-1], device=posterior_means.device)
    return posterior_means.var(dim=0)


def count_active_units(variances, threshold=ACTIVE_UNIT_THRESHOLD):
    return int((variances > threshold).sum().item())
