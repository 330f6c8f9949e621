"""Gaussian mixture with the component z summed out exactly; weights, means, covariances learned.

.. math::

    p(z = k) = w_k, \\qquad p(x \\mid z = k) = \\mathcal{N}(x \\mid \\mu_k, \\Sigma_k), \\qquad
    \\log p(x) = \\operatorname{logsumexp}_k \\big[\\log w_k + \\log \\mathcal{N}(x \\mid \\mu_k, \\Sigma_k)\\big].

The component ``z`` of each point is a local latent marked for parallel enumeration, so
``TraceEnum_ELBO`` sums it out and the guide has no sample sites: the "ELBO" is then the exact
log-likelihood and SVI is gradient-based maximum likelihood (the same optimum as EM, Dempster,
Laird & Rubin 1977). ``covariance="full"`` learns a Cholesky factor :math:`\\Sigma_k = L_k L_k^T`
per component, ``"diag"`` a vector of standard deviations.

The likelihood of a mixture has many local maxima, and gradient steps from one start find one of
them. :meth:`initialize` therefore does what scikit-learn's ``GaussianMixture(n_init=10)`` does
(``init_starts=10``): from each of several greedy k-means++ clusterings (Arthur & Vassilvitskii, 2007)
of the standardized data it runs EM (up to ``init_em_iterations``, until the log-likelihood per point
changes by less than 1e-7) and keeps the start with the highest training log-likelihood;
``init_em_iterations=0`` keeps the clusters' own moments (one k-means++ start with ``init_starts=1``).
``fit`` then climbs the exact log-likelihood by SVI, in full-batch steps on up to 10,000 points
(:attr:`fit_defaults`), so that it reaches the maximum EM reaches (``tests/test_zoo.py`` compares
with scikit-learn).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from pyro.ops.indexing import Vindex


class MixtureOfGaussians(PyroModule):
    """A mixture of ``num_components`` Gaussians in ``D`` dimensions, ``data_shape == (D,)``."""

    # Options of ``pyro-lvm fit`` for this model, under the command's own defaults and over any
    # option given: the exact log-likelihood of small data sets is best climbed in full-batch steps
    # (the gradient of all points, no minibatch noise around the optimum; the whole set when it has
    # up to 10,000 points, minibatches of 10,000 beyond), and a cosine decay of the rate lets Adam
    # settle at the maximum instead of circling it.
    fit_defaults = {"batch_size": 10_000, "schedule": "cosine"}

    def __init__(self, data_shape, num_components=2, covariance="full", init_starts=10, init_em_iterations=200):
        super().__init__()
        if len(data_shape) != 1:
            raise ValueError(f"a Gaussian mixture models vectors, data_shape (D,); got {tuple(data_shape)}")
        if covariance not in ("full", "diag"):
            raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
        if num_components < 1:
            raise ValueError(f"num_components must be at least 1, got {num_components}")
        if init_starts < 1 or init_em_iterations < 0:
            raise ValueError(f"init_starts must be at least 1 and init_em_iterations at least 0, got "
                             f"{init_starts} and {init_em_iterations}")
        self.init_starts, self.init_em_iterations = init_starts, init_em_iterations
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
    def initialize(self, x, seed=None):
        """Best of ``init_starts`` greedy k-means++ starts, each refined by EM, on standardized data.

        Standardizing first makes the clustering independent of the units of each column (Old
        Faithful's eruption times are minutes, its waiting times tens of minutes). Beyond 2,000
        points the starts are compared on a random subset of 2,000, and the best one is refined by EM
        on up to 10,000. The starts draw
        from the global RNG (which ``fit --seed`` seeds), or from a generator seeded by ``seed``.
        """
        x = x.reshape(x.shape[0], -1)
        n, dim = x.shape
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed if seed is not None else int(torch.randint(2 ** 62, (1,)).item()))
        mean = x.mean(0)
        std = x.std(0).clamp_min(1e-6) if n > 1 else x.new_ones(dim)
        u = ((x - mean) / std).double()
        # On big data the starts are compared on a random subset and the best one refined on a larger
        # one, so that the cost of EM stays bounded.
        order = torch.randperm(n, generator=generator).to(u.device)
        starts_on, refined_on = u[order[:_START_POINTS]], u[order[:_REFINE_POINTS]]
        best = None
        data_floor = torch.linalg.eigvalsh(torch.cov(starts_on.T).reshape(dim, dim)).min() if n > dim else None
        for _ in range(self.init_starts):
            assignment = _kmeans(starts_on, self.num_components, generator)
            result = _em(starts_on, assignment, self.init_em_iterations)
            # The likelihood is unbounded where a component shrinks onto a few points, so such a start
            # wins on likelihood without being a maximum; it is kept only if every start is one.
            rank = (not _degenerate(result, len(starts_on), data_floor), result[-1])
            if best is None or rank > best[2]:
                best = result, assignment, rank
        weights, locs, covariances, _ = best[0]
        if len(refined_on) > len(starts_on):
            nearest = torch.cdist(refined_on, locs).argmin(-1)  # hard assignments to the chosen means
            weights, locs, covariances, _ = _em(refined_on, nearest, self.init_em_iterations)
        # Back to the data's units: x = mean + std * u.
        scale = std.double()
        self.weights = weights.to(x.dtype)
        self.locs = (locs * scale + mean.double()).to(x.dtype)
        covariances = covariances * scale[:, None] * scale[None, :]
        if self.covariance == "full":
            self.scale_tril = torch.linalg.cholesky(covariances).to(x.dtype)
        else:
            self.scales = covariances.diagonal(dim1=-2, dim2=-1).sqrt().to(x.dtype)


# Added to the diagonal of every covariance (standardized units) in the EM updates, as scikit-learn's
# reg_covar: it keeps a component on a few collinear points invertible.
_REG_COVAR = 1e-6
_EM_TOLERANCE = 1e-7  # change of the log-likelihood per point that ends the EM refinement
_START_POINTS = 2_000  # at most this many points (a random subset) compare the starts
_REFINE_POINTS = 10_000  # and this many refine the best one


def _kmeans(u, k, generator, iterations=100):
    """Cluster assignments of the rows of ``u``: greedy k-means++ seeding, then Lloyd's iterations.

    Greedy seeding (as scikit-learn's): each new centre is the best, by the resulting sum of squared
    distances, of 2 + log k candidates drawn with probability proportional to the squared distance to
    the nearest centre so far, which keeps single outliers from becoming clusters.
    """
    n = u.shape[0]
    trials = 2 + int(math.log(k)) if k > 1 else 1
    centres = u[torch.randint(n, (1,), generator=generator).item()].unsqueeze(0)
    for _ in range(1, k):
        d2 = torch.cdist(u, centres).pow(2).min(-1).values
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        candidates = torch.multinomial(weights.cpu(), trials, replacement=True, generator=generator).to(u.device)
        potentials = torch.minimum(d2.unsqueeze(0), torch.cdist(u[candidates], u).pow(2)).sum(-1)
        centres = torch.cat([centres, u[candidates[potentials.argmin()]].unsqueeze(0)])
    for _ in range(iterations):
        assignment = torch.cdist(u, centres).argmin(-1)
        new_centres = torch.stack([u[assignment == j].mean(0) if (assignment == j).any() else centres[j]
                                   for j in range(k)])
        if torch.allclose(new_centres, centres):
            break
        centres = new_centres
    return torch.cdist(u, centres).argmin(-1)


def _degenerate(result, n, data_floor):
    """Whether an EM result has a component on too few points (at most D + 1) or one whose covariance
    has collapsed (an eigenvalue below 1e-3 of the data covariance's smallest): a singularity of the
    likelihood, not a maximum."""
    weights, _, covariances, _ = result
    dim = covariances.shape[-1]
    if (weights * n <= dim + 1).any():
        return True
    return data_floor is not None and bool(torch.linalg.eigvalsh(covariances).min() < 1e-3 * data_floor)


def _em(u, assignment, iterations):
    """EM for a full-covariance mixture from hard ``assignment``s: ``(weights, locs, covariances, mean log-lik)``.

    Each M-step sets the weights, means and covariances to the responsibility-weighted moments; a
    component with fewer than D + 1 points starts from the covariance of all points.
    """
    n, dim = u.shape
    k = int(assignment.max().item()) + 1 if assignment.numel() else 1
    responsibilities = torch.nn.functional.one_hot(assignment, k).to(u.dtype)
    eye = torch.eye(dim, dtype=u.dtype, device=u.device)
    all_points = torch.cov(u.T).reshape(dim, dim) + _REG_COVAR * eye if n > 1 else eye
    previous = -math.inf
    for step in range(iterations + 1):
        counts = responsibilities.sum(0)
        weights = (counts + 1e-10) / (n + k * 1e-10)
        locs = responsibilities.T @ u / counts.clamp_min(1e-10)[:, None]
        centred = u.unsqueeze(0) - locs.unsqueeze(1)  # [k, n, D]
        covariances = (responsibilities.T.unsqueeze(-1) * centred).transpose(-1, -2) @ centred
        covariances = covariances / counts.clamp_min(1e-10)[:, None, None] + _REG_COVAR * eye
        if step == 0:  # the clusters of k-means: too few members give no usable covariance
            covariances = torch.where((counts > dim)[:, None, None], covariances, all_points)
        # log N(u | loc_k, Sigma_k) through the Cholesky factor, for all points and components at once
        tril = torch.linalg.cholesky(covariances)
        whitened = torch.linalg.solve_triangular(tril, centred.transpose(-1, -2), upper=False)  # [k, D, n]
        log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_joint = (-0.5 * whitened.pow(2).sum(-2) - log_det[:, None] - 0.5 * dim * math.log(2 * math.pi)).T \
            + weights.log()
        log_likelihood = torch.logsumexp(log_joint, -1).mean().item()
        if step == iterations or abs(log_likelihood - previous) < _EM_TOLERANCE:
            break
        previous = log_likelihood
        responsibilities = log_joint.softmax(-1)
    return weights, locs, covariances, log_likelihood
