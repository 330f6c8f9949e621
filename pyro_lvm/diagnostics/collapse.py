"""The posterior-collapse verdict.

A decoder that can model the data alone has no use for z, and then the optimum of the ELBO sets
q(z|x) = p(z) for every x: the rate and the mutual information drop to zero (Bowman et al., 2016;
Chen et al., 2017, "Variational lossy autoencoder"; Alemi et al., 2018). That is a property of the
model and the bound, not a training bug, and this module names it when it happens.

Rule: the model is *collapsed* when at most 10% of the latent dimensions are active (none, for fewer
than ten) **and** the aggregate-posterior mutual information I_q(x; z) is below 0.1 nats. Both are
required: a handful of active units can still carry many nats (not collapsed), and a code can be
spread thinly over many dimensions (not collapsed either). Where I_q(x; z) is undefined (``None``: a
guide whose q(z|x) is not one fixed distribution per point), the rate takes its place: it bounds the
mutual information from above (rate = I_q(x; z) + KL(q(z) || p(z))), so a rate below 0.1 nats is
collapse too.
"""

import math

COLLAPSE_ACTIVE_FRACTION = 0.1
COLLAPSE_MUTUAL_INFORMATION = 0.1  # nats


def is_collapsed(active_units, latent_dims, mutual_information, kl_total=None):
    information = kl_total if mutual_information is None else mutual_information
    if information is None:
        raise ValueError("is_collapsed needs the mutual information or, where it is undefined, the rate")
    return active_units <= COLLAPSE_ACTIVE_FRACTION * latent_dims and information < COLLAPSE_MUTUAL_INFORMATION


def verdict(active_units, latent_dims, mutual_information, kl_total, num_points, inactive_kl=0.0):
    """One plain-language sentence (or two) with the numbers behind the verdict."""
    information = "undefined for this guide" if mutual_information is None else f"{mutual_information:.2f} nats"
    numbers = f"{active_units} of {latent_dims} units active, I(x;z) = {information}, KL = {kl_total:.2f} nats"
    if is_collapsed(active_units, latent_dims, mutual_information, kl_total):
        return f"Posterior collapse: {numbers}: the decoder models the data without z."
    sentence = f"The latent code is used: {numbers}."
    if active_units < latent_dims:
        inactive = latent_dims - active_units
        units = "unit carries" if inactive == 1 else "units carry"
        sentence += f" {inactive} inactive {units} {inactive_kl:.2f} nats of KL (partial collapse: prunable)."

    ceiling = math.log(num_points)
    if mutual_information is not None and mutual_information > 0.9 * ceiling:
        sentence += (
            f" I(x;z) is near its ceiling log N = {ceiling:.2f} for N = {num_points} points:"
            " the true value may be higher."
        )
    return sentence
