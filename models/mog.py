"""Gaussian mixture with the component z summed out exactly; weights, means, covariances learned.

.. math::

    p(z = k) = w_k, \\qquad p(x \\mid z = k) = \\mathcal{N}(x \\mid \\mu_k, \\Sigma_k), \\qquad
    \\log p(x) = \\operatorname{logsumexp}_k \\big[\\log w_k + \\log \\mathcal{N}(x \\mid \\mu_k, \\Sigma_k)\\big].

The component ``z`` of each point is a local latent marked for parallel enumeration, so
``TraceEnum_ELBO`` sums it out and the guide has no sample sites: the "ELBO" is then the exact
log-likelihood and SVI is gradient-based maximum likelihood (the same optimum as EM, Dempster,
Laird & Rubin 1977). ``covariance="full"`` learns a Cholesky factor :math:`\\Sigma_k = L_k L_k^T`
per component, ``"diag"`` a vector of standard deviations. :meth:`initialize` starts from a
seeded k-means++ clustering (Arthur & Vassilvitskii, 2007) of the standardized data.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from pyro.ops.indexing import Vindex


class MixtureOfGaussians(PyroModule):
    """A mixture of ``num_components`` Gaussians in ``D`` dimensions, ``data_shape == (D,)``."""

    def __init__(self, data_shape, num_components=2, covariance="full"):
        super().__init__()
        if len(data_shape) != 1:
            raise ValueError(f"a Gaussian mixture models vectors, data_shape (D,); got {tuple(data_shape)}")
        if covariance not in ("full", "diag"):
            raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
        if num_components < 1:
            raise ValueError(f"num_components must be at least 1, got {num_components}")
        self.data_shape = tuple(data_shape)
        self.num_components = num_components
        self.covariance = covariance
        dim = data_shape[0]
        # Distinct means break the symmetry between components even without ``initialize``; a
        # private generator keeps construction deterministic and leaves the global RNG alone.
        generator = torch.Generator().manual_seed(0)
        self.weights = PyroParam(torch.full((num_components,), 1.0 / num_components), constraint=dist.constraints.simplex)
        self.locs = PyroParam(torch.randn(num_components, dim, generator=generator))
        if covariance == "full":
            self.scale_tril = PyroParam(torch.eye(dim).expand(num_components, dim, dim).clone(),
                                        constraint=dist.constraints.lower_cholesky)
        else:
            self.scales = PyroParam(torch.ones(num_components, dim), constraint=dist.constraints.positive)

    def _components(self, z=None):
        """The component distributions, all of them (batch ``[K]``) or those selected by ``z``."""
        locs = self.locs if z is None else Vindex(self.locs)[..., z, :]
        if self.covariance == "full":
            scale_tril = self.scale_tril if z is None else Vindex(self.scale_tril)[..., z, :, :]
            return dist.MultivariateNormal(locs, scale_tril=scale_tril)
        scales = self.scales if z is None else Vindex(self.scales)[..., z, :]
        return dist.Normal(locs, scales).to_event(1)

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        weights = self.weights
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", self._components(z), obs=x)

    def guide(self, x):
        # z is summed out by enumeration in the model; the mixture has nothing else to infer.
        pass

    def log_marginal(self, x):
        """Exact ``log p(x)`` per point, shape ``[n]``: the component sum done by logsumexp."""
        log_joint = self._components().log_prob(x.unsqueeze(-2)) + self.weights.log()
        return torch.logsumexp(log_joint, dim=-1)

    @torch.no_grad()
    def initialize(self, x, seed=0):
        """Seeded k-means++ then Lloyd iterations on standardized data; moments of the clusters.

        Standardizing first makes the clustering independent of the units of each column (Old
        Faithful's eruption times are minutes, its waiting times tens of minutes).
        """
        x = x.reshape(x.shape[0], -1)
        n, dim = x.shape
        k = self.num_components
        generator = torch.Generator().manual_seed(seed)
        mean = x.mean(0)
        std = x.std(0).clamp_min(1e-6) if n > 1 else x.new_ones(dim)
        u = (x - mean) / std
        # k-means++ seeding: each new centre is a point drawn with probability proportional to its
        # squared distance to the nearest centre chosen so far.
        centres = [u[torch.randint(n, (1,), generator=generator).item()]]
        for _ in range(1, k):
            d2 = torch.cdist(u, torch.stack(centres)).pow(2).min(-1).values
            weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
            idx = torch.multinomial(weights.cpu(), 1, generator=generator).item()
            centres.append(u[idx])
        centres = torch.stack(centres)
        for _ in range(100):
            assignment = torch.cdist(u, centres).argmin(-1)
            new_centres = torch.stack([u[assignment == j].mean(0) if (assignment == j).any() else centres[j]
                                       for j in range(k)])
            if torch.allclose(new_centres, centres):
                break
            centres = new_centres
        assignment = torch.cdist(u, centres).argmin(-1)

        counts = torch.stack([(assignment == j).sum() for j in range(k)]).to(x.dtype)
        self.weights = (counts + 1) / (counts + 1).sum()
        self.locs = centres * std + mean
        covariances = []
        data_cov = torch.cov(x.T).reshape(dim, dim) if n > 1 else x.new_ones(1).diag_embed()
        for j in range(k):
            members = x[assignment == j]
            # Few members give a singular covariance; shrink towards the data covariance for those.
            cov = torch.cov(members.T).reshape(dim, dim) if members.shape[0] > dim else data_cov
            cov = cov + 1e-6 * data_cov.diagonal().mean() * torch.eye(dim, dtype=x.dtype, device=x.device)
            covariances.append(cov)
        covariances = torch.stack(covariances)
        if self.covariance == "full":
            self.scale_tril = torch.linalg.cholesky(covariances)
        else:
            self.scales = covariances.diagonal(dim1=-2, dim2=-1).sqrt()
