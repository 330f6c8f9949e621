"""The hand-written reference of ``benchmarks/reproduce/iwae_mnist.py`` takes the toolkit's training steps.

The reproduction compares pyro-lvm with plain PyTorch point by point, which is only a comparison if the
reference computes the same objective and Adam step: here both start from the same weights, draw the
same random numbers and must end a few steps later with the same parameters (the toolkit's loss is
scaled to N points with Adam's epsilon 1e-4 * N / B, the reference's is the minibatch sum with 1e-4).
"""
import importlib.util

import pytest
import torch
from helpers import REPO

import pyro_lvm  # noqa: F401  (module-local params, as the toolkit sets them)
from pyro_lvm.objectives import get_objective
from pyro_lvm.protocol import build_model, inspect_model, load_model_class
from pyro_lvm.training import make_optimizer, make_step_loss, take_step
from pyro_lvm.training.schedules import iwae_stage_ends

spec = importlib.util.spec_from_file_location("iwae_mnist", REPO / "benchmarks" / "reproduce" / "iwae_mnist.py")
iwae_mnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(iwae_mnist)


@pytest.mark.parametrize("layers, objective, k", [(1, "vae", 1), (1, "iwae", 5), (2, "vae", 1), (2, "iwae", 5)])
def test_the_reference_takes_the_same_adam_steps_as_pyro_lvm(layers, objective, k):
    num_train, batch_size = 60000, iwae_mnist.BATCH_SIZE
    torch.manual_seed(0)
    lvm = build_model(load_model_class("vae"), (1, 28, 28), {"stochastic_layers": layers})
    batches = [torch.bernoulli(torch.rand(batch_size, 1, 28, 28) * 0.4) for _ in range(4)]
    lvm.initialize(batches[0])
    reference = iwae_mnist.ReferenceVAE(layers)
    reference.load_state_dict(lvm.state_dict())

    info = inspect_model(lvm, batches[0])
    pyro_objective = get_objective("elbo" if objective == "vae" else "iwae", particles=k, model_info=info)
    pyro_objective.loss(lvm.model, lvm.guide, batches[0])  # objectives set themselves up at their first call
    step_loss = make_step_loss(pyro_objective, lvm, num_train, batches[0], torch.device("cpu"), {"seed": 0})
    optimizer = make_optimizer(lvm, 1e-3, eps=iwae_mnist.ADAM_EPS * num_train / batch_size)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, eps=iwae_mnist.ADAM_EPS)
    for x in batches:
        state = torch.get_rng_state()
        take_step(step_loss, optimizer, x)
        torch.set_rng_state(state)
        reference_optimizer.zero_grad()
        (-reference.bound(x, objective, k).sum()).backward()
        reference_optimizer.step()
    # Four Adam steps at lr 1e-3 move each weight by up to 4e-3, and a wrong objective, loss scale or
    # epsilon would change most of those moves. Rounding alone changes a few: Adam normalizes each
    # element's step, so an element whose gradient is near zero can step either way (measured: at
    # most 8e-5, on under 0.03% of the elements).
    moved = torch.cat([(lvm.state_dict()[name] - value).abs().flatten() for name, value in reference.state_dict().items()])
    assert moved.max() < 2e-4 and (moved > 1e-5).float().mean() < 1e-3, (moved.max(), (moved > 1e-5).float().mean())


def test_the_references_schedule_and_estimate():
    for passes in (3280, 100, 7):
        assert iwae_mnist.stage_ends(passes * 3000) == iwae_stage_ends(passes * 3000)
    # The importance-sampling estimate in chunks of draws is log mean exp of all the log weights.
    torch.manual_seed(1)
    reference = iwae_mnist.ReferenceVAE(2)
    x = torch.bernoulli(torch.rand(7, 1, 28, 28) * 0.3)
    torch.manual_seed(3)
    estimate = reference.log_px(x, 1200, chunk=500)
    torch.manual_seed(3)
    with torch.no_grad():
        log_w = torch.cat([reference.log_weights(x, k) for k in (500, 500, 200)])
    torch.testing.assert_close(estimate, torch.logsumexp(log_w, 0) - torch.log(torch.tensor(1200.0)))
