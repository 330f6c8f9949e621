"""The fast path computes the same loss and gradients as the Pyro objectives, and refuses what it cannot."""
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import pyro_lvm
from pyro_lvm.training.fast import FastObjective, select_fast_path
from pyro_lvm.objectives import get_objective
from pyro_lvm.protocol import DataPlateScale, build_model, inspect_model, load_model_class

NUM_DATA = 1000


def _setup(lvm, name, particles, x):
    info = inspect_model(lvm, x[:2])
    objective = get_objective(name, particles=particles, model_info=info)
    scale = DataPlateScale(NUM_DATA)
    model, guide = scale(lvm.model), scale(lvm.guide)
    with torch.no_grad():
        objective.loss(model, guide, x[:2])  # objectives set themselves up lazily
    return objective, (lambda batch: objective.differentiable_loss(model, guide, batch))


def _loss_and_grads(lvm, loss_fn, x, seed):
    torch.manual_seed(seed)
    lvm.zero_grad(set_to_none=True)
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lvm.parameters()]


@pytest.fixture(scope="module")
def vae():
    pyro.settings.set(module_local_params=True)
    torch.manual_seed(0)
    lvm = build_model(load_model_class("vae"), (1, 8, 8), {"latent_dim": 4, "hidden": (32, 32)})
    x = torch.bernoulli(torch.rand(50, 1, 8, 8))
    return lvm, x


@pytest.mark.parametrize("name,particles", [("elbo", 1), ("elbo", 3), ("meanfield", 1), ("iwae", 5)])
def test_fast_path_matches_the_pyro_objective_on_the_vae(vae, name, particles):
    lvm, x = vae
    objective, plain = _setup(lvm, name, particles, x)
    fast, reason = select_fast_path(objective, lvm, NUM_DATA, x[:2], fallback=plain)
    assert isinstance(fast, FastObjective) and fast.kind == name, reason
    for seed in (0, 1):
        loss, grads = _loss_and_grads(lvm, plain, x, seed)
        fast_loss, fast_grads = _loss_and_grads(lvm, fast, x, seed)
        torch.testing.assert_close(fast_loss, loss, rtol=1e-6, atol=0.0)
        for g, h in zip(grads, fast_grads):
            torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    assert fast.refused is None


def test_fast_path_refuses_enumeration_and_dreg():
    pyro.settings.set(module_local_params=True)
    mog = build_model(load_model_class("mog"), (2,), {})
    x = torch.randn(20, 2)
    for name in ("elbo", "iwae", "iwae-dreg"):
        objective, plain = _setup(mog, name, 2, x)
        fast, reason = select_fast_path(objective, mog, NUM_DATA, x[:2], fallback=plain)
        assert fast is None and reason, name
    objective, _ = _setup(build_model(load_model_class("vae"), (1, 8, 8), {"latent_dim": 2, "hidden": (8,)}),
                          "iwae-dreg", 2, torch.bernoulli(torch.rand(4, 1, 8, 8)))
    assert select_fast_path(objective, None, NUM_DATA, None)[0] is None  # refused before touching the model
    warmup = get_objective("elbo", particles=1, kl_warmup=10)  # KL warm-up is not the plain ELBO
    assert select_fast_path(warmup, None, NUM_DATA, None)[0] is None


class SwitchingModel(PyroModule):
    """Gains a discrete (not reparameterized) latent when ``switch`` is set, after the fast path was chosen."""

    def __init__(self, data_shape):
        super().__init__()
        self.loc = torch.nn.Linear(data_shape[0], 2)
        self.switch = False

    def model(self, x=None, num_samples=1):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            shift = pyro.sample("c", dist.Bernoulli(0.5)).unsqueeze(-1) if self.switch else 0.0
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True) + shift, 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc(x), 1.0).to_event(1))
            if self.switch:
                pyro.sample("c", dist.Bernoulli(0.3))


def test_a_program_that_changes_shape_falls_back_with_the_same_draws():
    pyro.settings.set(module_local_params=True)
    lvm, x = SwitchingModel((1,)), torch.randn(30, 1)
    objective, plain = _setup(lvm, "elbo", 1, x)
    fast, reason = select_fast_path(objective, lvm, NUM_DATA, x[:2], fallback=plain)
    assert fast is not None, reason
    lvm.switch = True
    expected, grads = _loss_and_grads(lvm, plain, x, 7)
    with pytest.warns(UserWarning, match="not reparameterized"):
        loss, fast_grads = _loss_and_grads(lvm, fast, x, 7)
    assert fast.refused and torch.equal(loss, expected)
    assert all(torch.equal(g, h) for g, h in zip(grads, fast_grads))


def test_fit_with_and_without_the_fast_path_ends_at_the_same_parameters(tmp_path, monkeypatch):
    options = dict(data="digits", epochs=1, batch_size=200, objective="iwae", particles=2, device="cpu",
                   hyperparameters={"latent_dim": 2, "hidden": [16]}, progress=False, log=lambda m: None)
    fast = pyro_lvm.fit("vae", out=tmp_path / "fast", **options)
    monkeypatch.setenv("PYRO_LVM_FAST", "0")
    plain = pyro_lvm.fit("vae", out=tmp_path / "plain", **options)
    for key, value in plain.model.state_dict().items():
        torch.testing.assert_close(fast.model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert fast.metrics[0]["train_elbo"] == pytest.approx(plain.metrics[0]["train_elbo"], rel=1e-5)
