"""Every feature on ``--device cuda``: fitting with each objective, every estimator, sampling,
diagnostics, the report, resume, the fast path and the chunk budget, with nothing left on the CPU.

The gated PixelCNN decoder and the fuzziness diagnostic have a test of their own below.
These run only where PyTorch sees a GPU (the rest of the suite covers the same code on the CPU);
elsewhere they skip with that reason. Statistical checks compare with closed forms, with tolerances
from the estimates' own standard errors, exactly as the CPU tests do.
"""
import contextlib
import json
import math
import warnings

import pytest
import torch
from helpers import SMALL_VAE, cli_process, one_json

import pyro
import pyro_lvm
from pyro_lvm.estimators import estimate_log_marginal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; the CPU paths of the same features are tested elsewhere")

SMALL_VAE_HP = {"latent_dim": 4, "hidden": (32, 32)}
TINY_PIXELCNN_HP = {"latent_dim": 4, "channels": 16, "layers": 2}


def _on_cuda(module):
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors and all(t.device.type == "cuda" for t in tensors)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short cuda fit per zoo model, shared by the tests below."""
    root = tmp_path_factory.mktemp("cuda-runs")
    specs = {
        "mog": dict(data="faithful", epochs=30, batch_size=64, lr=0.05),
        "ppca": dict(data="faithful", epochs=60, batch_size=64, lr=0.02),
        "vae": dict(data="digits", epochs=3, hyperparameters=SMALL_VAE_HP),
        "pixelcnn-vae": dict(data="digits", epochs=1, hyperparameters=_pixelcnn_hparams()),
    }
    return {name: pyro_lvm.fit(name, out=root / name, device="cuda", progress=False, log=lambda m: None, **kw)
            for name, kw in specs.items()}


def _pixelcnn_hparams():
    from pyro_lvm.protocol import load_model_class, resolve_hyperparameters

    known = resolve_hyperparameters(load_model_class("pixelcnn-vae"), {})
    return {k: v for k, v in TINY_PIXELCNN_HP.items() if k in known}


@pytest.mark.parametrize("name", ["mog", "ppca", "vae", "pixelcnn-vae"])
def test_zoo_model_fits_evaluates_samples_diagnoses_and_reports_on_cuda(runs, name, tmp_path):
    run = runs[name]
    assert run.device.type == "cuda" and _on_cuda(run.model)
    assert all(math.isfinite(m["train_elbo"]) and math.isfinite(m["valid_elbo"]) for m in run.metrics)
    state = torch.load(run.path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] >= 1

    x = run.data.test[:40]
    assert x.device.type == "cuda"
    estimators = {"elbo": 10, "iwae": 20, "is": 200} | ({"exact": 1} if name in ("mog", "ppca") else {})
    for estimator, k in estimators.items():
        est = estimate_log_marginal(run.model, x, estimator, num_samples=k, batch_size=16, seed=0)
        assert est.per_point.device.type == "cuda" and est.per_point.shape == (len(x),)
        assert torch.isfinite(est.per_point).all(), estimator
    record = pyro_lvm.evaluate(run, estimator="is", samples=100, limit=40)
    assert {"ess_mean", "khat_max", "khat_frac_above_0.7"} <= set(record) and math.isfinite(record["log_px"])

    out = tmp_path / ("grid.png" if run.data.is_image else "samples.csv")
    assert pyro_lvm.sample(run, n=16 if name != "pixelcnn-vae" else 4, out=out).stat().st_size > 0

    if name == "mog":  # its only latent is enumerated, not sampled: diagnose refuses it, on any device
        with pytest.raises(pyro_lvm.UserError, match="enumerated"):
            pyro_lvm.diagnose(run)
    else:
        diagnosis = pyro_lvm.diagnose(run, is_samples=50)
        json.dumps(diagnosis)
        assert {"kl_per_dim", "kl_total", "active_units", "mutual_information"} <= set(diagnosis)
    if name == "vae":
        index = pyro_lvm.report(run, out=tmp_path / "report")
        assert index.exists() and list(index.parent.glob("*.png"))


def test_estimators_on_cuda_agree_with_cpu_and_with_the_closed_form(runs):
    """Exact log p(x) of PPCA on cuda equals the CPU's; ``is`` and AIS on cuda agree with it."""
    gpu_run = runs["ppca"]
    cpu_run = pyro_lvm.load_run(gpu_run.path, device="cpu")
    x_gpu = gpu_run.data.test
    exact_gpu = estimate_log_marginal(gpu_run.model, x_gpu, "exact").per_point
    exact_cpu = estimate_log_marginal(cpu_run.model, cpu_run.data.test, "exact").per_point
    torch.testing.assert_close(exact_gpu.cpu(), exact_cpu, rtol=1e-5, atol=1e-5)

    for estimator, k, opts in (("is", 1000, {}), ("ais", 16, {"ais_steps": 100})):
        est = estimate_log_marginal(gpu_run.model, x_gpu, estimator, num_samples=k, seed=1, **opts)
        difference = (est.per_point - exact_gpu).double()
        standard_error = float(difference.std() / math.sqrt(difference.numel()))
        # A consistent estimator: its mean error is within 3 standard errors (plus float32 rounding).
        assert abs(float(difference.mean())) < 3 * standard_error + 1e-3, (estimator, difference.mean(), standard_error)


@pytest.mark.parametrize("objective,particles", [("elbo", 1), ("meanfield", 1), ("iwae", 5), ("iwae-dreg", 5)])
def test_each_objective_trains_on_cuda(objective, particles, tmp_path):
    run = pyro_lvm.fit("vae", data="digits", out=tmp_path / "run", device="cuda", epochs=2, objective=objective,
                       particles=particles, hyperparameters=SMALL_VAE_HP, progress=False, log=lambda m: None)
    assert _on_cuda(run.model)
    first, last = run.metrics[0]["valid_elbo"], run.metrics[-1]["valid_elbo"]
    assert math.isfinite(first) and last > first


def test_remedies_train_on_cuda(tmp_path):
    run = pyro_lvm.fit("vae", data="digits", out=tmp_path / "run", device="cuda", epochs=2, kl_warmup=20,
                       free_bits=0.1, hyperparameters=SMALL_VAE_HP, progress=False, log=lambda m: None)
    assert all(math.isfinite(m["valid_elbo"]) for m in run.metrics)


def test_fast_path_matches_the_pyro_objective_on_cuda():
    """The fast path's loss and gradients equal the Pyro objective's on the GPU as on the CPU."""
    from pyro_lvm.training.fast import FastObjective, select_fast_path
    from pyro_lvm.objectives import get_objective
    from pyro_lvm.protocol import DataPlateScale, build_model, inspect_model, load_model_class

    pyro.settings.set(module_local_params=True)
    device = torch.device("cuda")
    torch.manual_seed(0)
    lvm = build_model(load_model_class("vae"), (1, 8, 8), SMALL_VAE_HP, device)
    x = torch.bernoulli(torch.rand(50, 1, 8, 8, device=device))
    for name, particles in (("elbo", 1), ("meanfield", 1), ("iwae", 5)):
        objective = get_objective(name, particles=particles, model_info=inspect_model(lvm, x[:2]))
        scale = DataPlateScale(1000)
        model, guide = scale(lvm.model), scale(lvm.guide)
        with torch.no_grad():
            objective.loss(model, guide, x[:2])

        def plain(batch, objective=objective, model=model, guide=guide):
            return objective.differentiable_loss(model, guide, batch)

        fast, reason = select_fast_path(objective, lvm, 1000, x[:2], fallback=plain)
        assert isinstance(fast, FastObjective), reason
        results = []
        for loss_fn in (plain, fast):
            torch.manual_seed(3)
            lvm.zero_grad(set_to_none=True)
            loss = loss_fn(x)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in lvm.parameters()]))
        (loss, grads), (fast_loss, fast_grads) = results
        assert fast_loss.device.type == "cuda"
        torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=0.0)
        for g, h in zip(grads, fast_grads):
            torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


def test_resume_on_cuda_continues_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    kw = dict(data="digits", out=out, device="cuda", hyperparameters=SMALL_VAE_HP, progress=False,
              log=lambda m: None, seed=5)
    pyro_lvm.fit("vae", epochs=1, **kw)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    run = pyro_lvm.fit("vae", resume=True, out=out, epochs=3, progress=False, log=lambda m: None)
    assert [m["epoch"] for m in run.metrics] == [1, 2, 3]
    assert _on_cuda(run.model)


def test_importance_sampling_on_cuda_keeps_to_its_chunk_budget(runs):
    """The allocator's peak while ``is`` runs stays under the chunk budget, and the estimate does
    not depend on the budget."""
    run = runs["vae"]
    x = run.data.test[:100]
    results = {}
    for budget_mb in (4, 64):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        est = estimate_log_marginal(run.model, x, "is", num_samples=2000, batch_size=100,
                                    max_memory_mb=budget_mb, seed=0)
        peak_increase = torch.cuda.max_memory_allocated() - before
        assert peak_increase <= budget_mb * 2 ** 20, (budget_mb, peak_increase / 2 ** 20)
        results[budget_mb] = est.per_point
    torch.testing.assert_close(results[4], results[64], rtol=1e-5, atol=1e-4)


def test_cli_end_to_end_on_cuda(tmp_path):
    out = tmp_path / "run"
    fit = cli_process("fit", "vae", "--data", "digits", *SMALL_VAE, "--epochs", "2", "--device", "cuda",
                      "--cuda-graph", "--out", out, "--quiet")
    assert fit.returncode == 0, fit.stderr
    assert "CUDA graph capture failed" not in fit.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cuda" and config["cuda_graph"] is True
    evaluation = cli_process("evaluate", out, "--estimator", "is", "--samples", "500", "--json")
    assert evaluation.returncode == 0, evaluation.stderr
    record = one_json(evaluation.stdout)
    assert record["num_points"] == 300 and math.isfinite(record["log_px"])
    sample = cli_process("sample", out, "-n", "16", "--out", tmp_path / "grid.png")
    assert sample.returncode == 0 and (tmp_path / "grid.png").stat().st_size > 0
    diagnose = cli_process("diagnose", out, "--json")
    assert diagnose.returncode == 0, diagnose.stderr
    assert "kl_per_dim" in one_json(diagnose.stdout)


def test_cuda_graph_fit_equals_the_eager_fit(tmp_path, monkeypatch):  # fit --cuda-graph
    """Replaying the captured step (pyro_lvm/training/cuda_graph.py) trains the same parameters as the eager
    fast path: same kernels, same random numbers; the short last batch of each epoch runs eagerly."""
    from pyro_lvm.training import cuda_graph

    captures = []
    original = cuda_graph.GraphedStepLoss._capture
    monkeypatch.setattr(cuda_graph.GraphedStepLoss, "_capture",
                        lambda self, x: captures.append(tuple(x.shape)) or original(self, x))
    kw = dict(data="digits", device="cuda", epochs=2, hyperparameters=SMALL_VAE_HP, progress=False,
              log=lambda m: None, seed=7)
    with _no_warning():  # a failed capture warns; here it must not fail
        graphed = pyro_lvm.fit("vae", out=tmp_path / "graphed", cuda_graph=True, **kw)
    assert captures == [(100, 1, 8, 8)]
    assert json.loads((tmp_path / "graphed" / "config.json").read_text())["cuda_graph"] is True
    eager = pyro_lvm.fit("vae", out=tmp_path / "eager", **kw)
    assert len(captures) == 1
    for (name, a), b in zip(graphed.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for m, n in zip(graphed.metrics, eager.metrics):
        assert m["train_elbo"] == pytest.approx(n["train_elbo"], rel=1e-5)


def test_gated_pixelcnn_and_fuzziness_on_cuda(tmp_path):
    """The gated decoder trains, samples exactly (cached rows) and is diagnosed and reported on the GPU."""
    from pyro_lvm.distributions import autoregressive_sample

    hparams = {"latent_dim": 4, "decoder": "gated", "pixelcnn_layers": 2, "pixelcnn_channels": 8,
               "first_kernel_size": 3}
    run = pyro_lvm.fit("pixelcnn-vae", data="digits", out=tmp_path / "run", device="cuda", epochs=1,
                       hyperparameters=hparams, progress=False, log=lambda m: None)
    assert _on_cuda(run.model)
    network = run.model.pixelcnn
    z = torch.randn(32, 4, device="cuda")
    uniforms = torch.rand(32, 1, 8, 8, device="cuda")
    with torch.no_grad():
        x = autoregressive_sample(network, z, uniforms)
        probabilities = torch.sigmoid(network(x, z))
    assert x.device.type == "cuda"
    # The rule x = [u < p] against one full pass; GPU kernels for a crop and for the whole image may
    # round differently, so only draws with u within 1e-4 of p may disagree.
    clear = (uniforms - probabilities).abs() > 1e-4
    assert torch.equal(x[clear], (uniforms < probabilities).float()[clear])
    diagnosis = pyro_lvm.diagnose(run)
    assert math.isfinite(diagnosis["fuzziness"]) and 0 < diagnosis["fuzziness_ratio"] <= 1 + 1e-6
    index = pyro_lvm.report(run, out=tmp_path / "report")
    assert (index.parent / "fuzziness.png").stat().st_size > 0


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*CUDA graph capture failed.*")
        yield
