"""The model protocol (issue 10): any Pyro program read from its traces, never a silent wrong number.

Small programs written as Pyro users write them, each checking one piece of the machinery against an
independent value: parameters (``pyro.param`` optimized, saved, restored), plates (self-subsampling,
size-less, at another dim), sampling without ``num_samples``, guide-side enumeration, global latents
(the predictive and the validation bound), the rate of a hierarchical guide, the refusals and the
reports of errors in the user's code. The fast path is compared with the Pyro objective on every
program of the corpus (``tests/pyro_programs``) where it runs.
"""

import json
import math
import textwrap
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import cli
from pyro.infer import Trace_ELBO

import pyro_lvm
from pyro_lvm.errors import UserError
from pyro_lvm.estimators import estimate_log_marginal
from pyro_lvm.objectives import get_objective
from pyro_lvm.protocol import DataPlateScale, EvaluationScale, build_model, inspect_model, load_model_class
from pyro_lvm.training.fast import FastObjective, select_fast_path


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def refused(capsys, *args):
    """Run the CLI; it must exit 2 with one ``error:`` line and no traceback. Returns the line."""
    code, _, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (code, err)
    return lines[0]


def npz(tmp_path, x, name="data.npz"):
    path = tmp_path / name
    n = len(x)
    np.savez(path, train=x[: n * 3 // 5], valid=x[n * 3 // 5: n * 4 // 5], test=x[n * 4 // 5:])
    return path


GAUSSIANS = np.random.default_rng(0).normal([1.0, -2.0], [0.5, 2.0], (200, 2)).astype(np.float32)

PARAMS_ONLY = """
import pyro, pyro.distributions as dist, torch
from torch.distributions import constraints

def model(data):
    loc = pyro.param("loc", torch.zeros(2))
    scale = pyro.param("scale", torch.ones(2), constraint=constraints.positive)
    with pyro.plate("points", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale).to_event(1), obs=data)

def guide(data):
    pass
"""


def test_pyro_param_only_is_optimized_saved_and_restored(tmp_path, capsys):
    """A model of nothing but ``pyro.param`` (once a StopIteration; before that never optimized): the fit
    reaches the maximum-likelihood Gaussian, and ``load_run`` in an empty parameter store restores it."""
    program = write(tmp_path, "gauss.py", PARAMS_ONLY)
    data = npz(tmp_path, GAUSSIANS)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "fit", program, "--data", data, "--epochs", "150", "--batch-size", "120", "--lr", "0.05",
                       "--quiet", "--out", run)
    assert code == 0, err
    pyro.clear_param_store()
    loaded = pyro_lvm.load_run(run, device="cpu")
    state = loaded.model.state_dict()
    train = torch.from_numpy(GAUSSIANS[:120])
    # The maximum-likelihood fit: the sample mean and standard deviation (1/N), to Adam's accuracy.
    torch.testing.assert_close(state["pyro.param:loc"], train.mean(0), atol=0.02, rtol=0)
    assert len(pyro.get_param_store()) == 0, "the program's parameters must not leak into Pyro's global store"
    exact = pyro_lvm.evaluate(loaded, estimator="exact", split="train", record=False)["log_px"]
    closed = dist.Normal(train.mean(0), train.std(0, unbiased=False)).log_prob(train).sum(-1).mean().item()
    assert exact == pytest.approx(closed, abs=0.01)


MIXED = """
import pyro, pyro.distributions as dist, torch
from torch import nn
from torch.distributions import constraints

class Shift(nn.Module):
    def __init__(self, data_dim=2):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(data_dim))

    def model(self, x):
        pyro.module("shift", self)
        scale = pyro.param("scale", torch.ones(2), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(self.loc, scale).to_event(1), obs=x)

    def guide(self, x):
        pass
"""


def test_module_parameters_beside_pyro_param_are_all_optimized(tmp_path, capsys):
    program = write(tmp_path, "mixed.py", MIXED)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "fit", f"{program}:Shift", "--data", npz(tmp_path, GAUSSIANS), "--epochs", "150",
                       "--batch-size", "120", "--lr", "0.05", "--quiet", "--out", run)
    assert code == 0, err
    state = pyro_lvm.load_run(run, device="cpu").model.state_dict()
    train = torch.from_numpy(GAUSSIANS[:120])
    torch.testing.assert_close(state["loc"], train.mean(0), atol=0.02, rtol=0)
    # pyro.param values are kept unconstrained, as Pyro's store keeps them: log(scale) here.
    torch.testing.assert_close(state["pyro.param:scale"], train.std(0, unbiased=False).log(), atol=0.03, rtol=0)


class SubsampledPPCA(pyro.nn.PyroModule):
    """A data plate that subsamples itself; the model receives all the data."""

    def __init__(self, size=5):
        super().__init__()
        self.size = size
        self.weight = pyro.nn.PyroParam(torch.tensor([[1.0], [-0.5]]))
        self.encoder = pyro.nn.PyroModule[torch.nn.Linear](2, 1)

    def model(self, data):
        with pyro.plate("data", len(data), subsample_size=self.size) as index:
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ self.weight.T, 0.5).to_event(1), obs=data[index])

    def guide(self, data):
        with pyro.plate("data", len(data), subsample_size=self.size) as index:
            pyro.sample("z", dist.Normal(self.encoder(data[index]), 0.3).to_event(1))


def test_a_self_subsampling_plate_gets_pyros_scale_once_and_the_same_points_in_guide_and_model():
    """The fast path and the Pyro path give Trace_ELBO's loss: the plate's N/B, not N/B twice, and the
    guide's points in the model (once the fast path drew other indices in the model)."""
    from pyro_lvm.protocol import as_program
    from pyro_lvm.training.loop import training_scale

    torch.manual_seed(0)
    x = torch.randn(40, 2)
    program = as_program(SubsampledPPCA())
    info = inspect_model(program, x)
    assert info.data_plate.kind == "subsampling" and info.data_plate.subsample_size == 5
    objective = get_objective("elbo", model_info=info)
    scale = training_scale(program, len(x))
    batch = next(iter(program.training_batches(x, 100).epoch(0)))[1]
    torch.manual_seed(1)
    ours = objective.differentiable_loss(scale(program.model), scale(program.guide), batch)
    # Pyro on the user's own program, drawing the same indices (conditioned the same way).
    torch.manual_seed(1)
    conditioned = {info.data_plate.name: batch.indices}
    with warnings.catch_warnings():  # conditioned, the model's plate is "observed": Pyro says so
        warnings.simplefilter("ignore")
        theirs = Trace_ELBO().differentiable_loss(pyro.poutine.condition(program.user.model, data=conditioned),
                                                  pyro.poutine.condition(program.user.guide, data=conditioned), x)
    torch.testing.assert_close(ours, theirs)
    fast, reason = select_fast_path(objective, program, len(x), program.probe(x))
    assert isinstance(fast, FastObjective), reason
    torch.manual_seed(1)
    torch.testing.assert_close(fast(batch), ours, rtol=1e-6, atol=1e-6)
    # Evaluation covers every point, whatever the batch size: 40 points in batches of the plate's 5.
    estimate = estimate_log_marginal(program, x[:13], "elbo", num_samples=3, batch_size=100)
    assert estimate.per_point.shape == (13,)


SIZELESS = """
import pyro, pyro.distributions as dist, torch

class Sizeless(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(1))

    def model(self, xs):
        with pyro.plate("data"):
            pyro.sample("x", dist.Normal(self.loc.expand(len(xs)), 1.0), obs=xs)

    def guide(self, xs):
        pass
"""


def test_a_size_less_plate_gets_the_size_of_the_data_it_sees(tmp_path):
    """``pyro.plate("data")`` with a minibatch of B of N points: the scale is N/B (once it was negative,
    and training minimized the ELBO)."""
    cls = load_model_class(f"{write(tmp_path, 'sizeless.py', SIZELESS)}:Sizeless")
    x = torch.randn(30, 1)
    program = build_model(cls, (1,), {})
    info = inspect_model(program, x)
    assert info.data_plate.kind == "sizeless" and info.point_shape == ()
    scale = DataPlateScale(30, info.data_plate.name, program.current_points)
    loss = Trace_ELBO().differentiable_loss(scale(program.model), scale(program.guide), x[:10])
    expected = -3.0 * dist.Normal(0.0, 1.0).log_prob(x[:10, 0]).sum()
    torch.testing.assert_close(loss, expected)


TUTORIAL_STYLE = """
import pyro, pyro.distributions as dist, torch
from torch import nn

class LinearVAE(nn.Module):
    def __init__(self, z_dim=1, data_dim=3):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Linear(z_dim, data_dim)
        self.encoder = nn.Linear(data_dim, 2 * z_dim)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(self.decoder(z), 0.1).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("latent", dist.Normal(loc, log_scale.exp()).to_event(1))
"""


def test_sampling_a_model_without_num_samples_uses_pyros_handlers(tmp_path):
    """``model(self, x)`` sizes its plate from x: samples come from ``poutine.uncondition`` on a
    placeholder batch, with the model's own p(x | z) (checked against the decoder's mean and scale)."""
    cls = load_model_class(f"{write(tmp_path, 'tutorial.py', TUTORIAL_STYLE)}:LinearVAE")
    program = build_model(cls, (3,), {})
    inspect_model(program, torch.randn(5, 3))
    with torch.no_grad():
        program.user.decoder.weight.zero_()
        program.user.decoder.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    torch.manual_seed(0)
    samples = program.sample(4000)
    assert samples.shape == (4000, 3)
    torch.testing.assert_close(samples.mean(0), torch.tensor([1.0, -2.0, 3.0]), atol=4 * 0.1 / math.sqrt(4000), rtol=0)


class GuideEnumerated(pyro.nn.PyroModule):
    """y ~ Categorical(w), x | y ~ N(mu_y, 1); the guide enumerates y with q(y | x) (SS-VAE style)."""

    def __init__(self):
        super().__init__()
        self.mu = torch.tensor([-2.0, 1.0, 4.0])
        self.classifier = pyro.nn.PyroModule[torch.nn.Linear](1, 3)

    def model(self, x):
        with pyro.plate("data"):
            y = pyro.sample("y", dist.Categorical(torch.tensor([0.2, 0.3, 0.5]).expand(len(x), 3)))
            pyro.sample("x", dist.Normal(self.mu[y].unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data"):
            pyro.sample("y", dist.Categorical(logits=self.classifier(x)), infer={"enumerate": "parallel"})


def test_guide_side_enumeration_is_summed_out_exactly():
    """With y enumerated in the guide, every estimator's weight sums over y: log p(x) exactly, whatever q."""
    x = torch.linspace(-4, 6, 9).unsqueeze(-1)
    exact = torch.logsumexp(dist.Normal(torch.tensor([-2.0, 1.0, 4.0]), 1.0).log_prob(x)
                            + torch.tensor([0.2, 0.3, 0.5]).log(), -1)
    lvm = GuideEnumerated()
    info = inspect_model(lvm, x)
    assert [s.name for s in info.guide_enumerated] == ["y"]
    for name in ("exact", "is", "iwae"):
        torch.testing.assert_close(estimate_log_marginal(lvm, x, name, num_samples=5).per_point, exact)
    # The ELBO is the guide's expectation over y (TraceEnum_ELBO's), a bound below it.
    elbo = estimate_log_marginal(lvm, x, "elbo", num_samples=5).per_point
    pyro_elbo = -pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(lvm.model, lvm.guide, x)
    assert float(elbo.sum()) == pytest.approx(pyro_elbo, rel=1e-5)
    assert bool((elbo <= exact + 1e-5).all())
    with pytest.raises(UserError, match="meanfield"):
        get_objective("meanfield", model_info=info)


class HierarchicalGuide(pyro.nn.PyroModule):
    """p(z2) p(z1 | z2) p(x | z1) with a guide q(z1 | x) q(z2 | z1): the guide draws z1 first, so the
    per-site closed-form KL of z1 (against p(z1 | z2) at a z2 drawn after it) is not the KL."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(2.0 * z2, 0.5).to_event(1))
            pyro.sample("x", dist.Normal(z1, 0.5).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(0.8 * x, 0.4).to_event(1))
            pyro.sample("z2", dist.Normal(0.3 * z1, 0.6).to_event(1))


def test_the_rate_of_a_hierarchical_guide_is_its_own_kl():
    """diagnose's rate equals E_q[log q(z1, z2 | x) - log p(z1, z2)] (Monte Carlo here, 20000 draws a
    point), and its ELBO equals the elbo estimator, within Monte Carlo error."""
    from pyro_lvm.diagnostics import diagnose_model

    torch.manual_seed(0)
    x = torch.randn(60, 1) * 2
    lvm = HierarchicalGuide()
    result = diagnose_model(lvm, x, num_kl_samples=64)
    assert result["rate_method"].startswith("Monte Carlo") and result["kl_analytic"] is False
    with torch.no_grad(), pyro.plate("draws", 20000, dim=-2):
        guide = pyro.poutine.trace(lvm.guide).get_trace(x)
        model = pyro.poutine.trace(pyro.poutine.replay(lvm.model, trace=guide)).get_trace(x)
    terms = sum(guide.nodes[n]["fn"].log_prob(guide.nodes[n]["value"])
                - model.nodes[n]["fn"].log_prob(guide.nodes[n]["value"]) for n in ("z1", "z2"))
    log_w = model.nodes["x"]["fn"].log_prob(x) - terms
    # diagnose draws 64 codes a point over 60 points: its Monte Carlo error, from the spread of the terms.
    rate_error = float((terms - terms.mean(0)).std()) / math.sqrt(64 * 60)
    assert result["rate"] == pytest.approx(terms.mean().item(), abs=4 * rate_error + 1e-3)
    # The per-site closed forms would say otherwise (the bug of the issue): about 1 nat here.
    elbo = estimate_log_marginal(lvm, x, "elbo", num_samples=64, seed=3)
    elbo_error = math.sqrt(2) * float((log_w - log_w.mean(0)).std()) / math.sqrt(64 * 60)
    assert result["elbo"] == pytest.approx(elbo.log_px, abs=4 * elbo_error + 1e-3)
    # I_q(x; z) needs q(z|x_m) as one fixed distribution per point: with q(z2 | z1) it is not, and
    # the mixture of the sites' marginals would be a plausible wrong number; null with the reason
    # instead, and the collapse rule falls back on the rate (which bounds I_q from above).
    assert result["mutual_information"] is None and result["marginal_kl"] is None
    assert "hierarchical" in result["null_reason"]["mutual_information"]
    assert isinstance(result["collapsed"], bool) and "undefined" in result["verdict"]


class GlobalShift(pyro.nn.PyroModule):
    """mu ~ N(0, 1) global, z_n ~ N(0, 1), x_n ~ N(mu + z_n, 0.5^2); guides q(mu) = N(m, s^2), q(z_n | x_n)."""

    def __init__(self, s=0.2, z_scale=0.45):
        super().__init__()
        self.m = pyro.nn.PyroParam(torch.tensor(0.7))
        self.s = pyro.nn.PyroParam(torch.tensor(s), constraint=dist.constraints.positive)
        self.z_scale = z_scale

    def model(self, x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(mu + z, 0.5), obs=x)

    def guide(self, x):
        pyro.sample("mu", dist.Normal(self.m, self.s))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.8 * (x - self.m), self.z_scale))


def test_the_validation_bound_charges_the_global_kl_once_per_training_set():
    """The per-point bound on B points of a split is the local terms plus KL(q(mu) || p(mu)) / N_train:
    summed over the split's batches, the global KL is charged once per N training points."""
    from pyro_lvm.training.loop import bound_per_point
    from pyro_lvm.protocol import as_program

    torch.manual_seed(0)
    x = torch.randn(30) + 0.7
    s, z_scale = 1e-4, 2e-4  # narrow guides: the one-sample likelihood term is its expectation to 1e-4
    program = as_program(GlobalShift(s, z_scale))
    inspect_model(program, x.unsqueeze(-1))
    objective = get_objective("meanfield", model_info=program.info)  # analytic KLs
    bound = bound_per_point(objective, program.model, program.guide, x.unsqueeze(-1), 10, x.device, seed=0,
                            num_train=300, lvm=program)
    kl_global = torch.distributions.kl_divergence(dist.Normal(0.7, s), dist.Normal(0.0, 1.0))
    q_z = dist.Normal(0.8 * (x - 0.7), z_scale)
    kl_local = torch.distributions.kl_divergence(q_z, dist.Normal(0.0, 1.0)).sum()
    # E_q log N(x | mu + z, 0.5^2) in closed form: mean mu + E z, variance s^2 + z_scale^2.
    expected_loglik = (dist.Normal(0.7 + q_z.loc, 0.5).log_prob(x) - (s ** 2 + z_scale ** 2) / (2 * 0.25)).sum()
    expected = (expected_loglik - kl_local) / len(x) - kl_global / 300
    # Charging the global KL once per batch instead would move the bound by (3 - 0.1) KL / 30 = 0.4 nats.
    assert bound == pytest.approx(float(expected), abs=1e-3)
    # Per point, a model with a global latent gives the held-out predictive, labelled as such.
    estimate = estimate_log_marginal(program, x.unsqueeze(-1), "is", num_samples=500)
    assert estimate.extras["global_latents"] == ["mu"] and "predictive" in estimate.extras["quantity"]


def test_evaluation_scale_keeps_local_sites_whole():
    scale = EvaluationScale(1000, 10, "data")
    lvm = GlobalShift()
    x = torch.randn(10)
    trace = pyro.poutine.trace(scale(lvm.model)).get_trace(x)
    assert trace.nodes["x"]["scale"] == 1.0 and trace.nodes["mu"]["scale"] == pytest.approx(0.01)


# ----- refusals and errors in user code --------------------------------------------------------

def test_errors_in_the_users_code_name_the_file_and_line(tmp_path, capsys):
    data = npz(tmp_path, GAUSSIANS)
    typo = write(tmp_path, "typo.py", PARAMS_ONLY.replace("pyro.sample(\"obs\"", "pyro.sampel(\"obs\""))
    line = refused(capsys, "fit", typo, "--data", data, "--out", tmp_path / "a")
    assert "typo.py:" in line and "AttributeError" in line and "sampel" in line
    assert not (tmp_path / "a").exists()
    cli_at_import = write(tmp_path, "script.py", "import argparse\nargparse.ArgumentParser().parse_args(['--bad'])\n"
                          + PARAMS_ONLY)
    line = refused(capsys, "fit", cli_at_import, "--data", data, "--out", tmp_path / "b")
    assert "SystemExit" in line and "__main__" in line
    constructor = write(tmp_path, "ctor.py", MIXED.replace("super().__init__()", "super().__init__()\n        1 / 0"))
    line = refused(capsys, "fit", f"{constructor}:Shift", "--data", data, "--out", tmp_path / "c")
    assert "ctor.py:" in line and "ZeroDivisionError" in line
    late = write(tmp_path, "late.py", PARAMS_ONLY.replace("def guide(data):\n    pass", textwrap.dedent("""\
        calls = [0]
        def guide(data):
            calls[0] += 1
            if calls[0] > 5:
                raise ValueError("the user's bug at the fifth step")""")))
    line = refused(capsys, "fit", late, "--data", data, "--epochs", "3", "--batch-size", "30", "--quiet",
                   "--out", tmp_path / "d")
    assert "late.py:" in line and "the user's bug" in line
    assert not (tmp_path / "d").exists(), "a fit stopped by the user's code before a checkpoint leaves no run"


def test_refusals_say_what_to_change(tmp_path, capsys):
    data = npz(tmp_path, GAUSSIANS)
    required = write(tmp_path, "required.py", MIXED.replace("data_dim=2", "data_dim"))
    assert "-p data_dim=VALUE" in refused(capsys, "fit", f"{required}:Shift", "--data", data,
                                                  "--out", tmp_path / "a")
    extra = write(tmp_path, "extra.py", PARAMS_ONLY.replace("def model(data):", "def model(data, lengths):"))
    assert "'lengths'" in refused(capsys, "fit", extra, "--data", data, "--out", tmp_path / "b")
    discrete_guide = write(tmp_path, "discrete.py", """
        import pyro, pyro.distributions as dist, torch
        def model(data):
            w = pyro.param("w", torch.tensor(0.5))
            with pyro.plate("data", len(data)):
                c = pyro.sample("c", dist.Bernoulli(0.5 * torch.ones(len(data))))
                pyro.sample("obs", dist.Normal(c.unsqueeze(-1) * w * torch.ones(2), 1.0).to_event(1), obs=data)
        def guide(data):
            p = pyro.param("p", torch.tensor(0.5), constraint=dist.constraints.unit_interval)
            with pyro.plate("data", len(data)):
                pyro.sample("c", dist.Bernoulli(p.expand(len(data))))
        """)
    for objective, fix in (("meanfield", "--objective elbo"), ("iwae-dreg", "iwae objective")):
        line = refused(capsys, "fit", discrete_guide, "--data", data, "--objective", objective, "--particles", "2",
                       "--out", tmp_path / objective)
        assert fix in line and "'c'" in line
        assert not (tmp_path / objective).exists()
    assert cli(capsys, "fit", discrete_guide, "--data", data, "--epochs", "1", "--quiet",
               "--out", tmp_path / "elbo")[0] == 0  # the score-function ELBO takes it


def test_an_autoguide_over_local_latents_is_refused_on_new_points(tmp_path, capsys):
    local = write(tmp_path, "local.py", """
        import pyro, pyro.distributions as dist, torch
        from pyro.infer.autoguide import AutoNormal
        def model(data):
            loc = pyro.param("loc", torch.zeros(2))
            with pyro.plate("data", len(data)):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
                pyro.sample("obs", dist.Normal(z + loc, 1.0).to_event(1), obs=data)
        guide = AutoNormal(model)
        """)
    data = npz(tmp_path, GAUSSIANS)
    assert "--batch-size 120" in refused(capsys, "fit", local, "--data", data, "--batch-size", "50",
                                         "--out", tmp_path / "a")
    run = tmp_path / "run"
    assert cli(capsys, "fit", local, "--data", data, "--batch-size", "120", "--epochs", "2", "--quiet",
               "--out", run)[0] == 0
    assert "amortized guide" in refused(capsys, "evaluate", run, "--estimator", "is", "--samples", "10")
    code, out, err = cli(capsys, "evaluate", run, "--split", "train", "--estimator", "is", "--samples", "10", "--json")
    assert code == 0 and math.isfinite(json.loads(out)["log_px"]), err


# ----- the fast path on the corpus ---------------------------------------------------------------

FAST_PATH_PROGRAMS = {"factor_analysis_functions", "ppca_nn_module", "ppca_subsample", "fa_nested_plates",
                      "two_layer_vae"}


def _corpus_cases():
    from test_pyro_programs import CASES

    return [c for c in CASES if not c.needs_mnist]


@pytest.mark.parametrize("case", _corpus_cases(), ids=lambda c: c.name)
def test_the_fast_path_equals_the_pyro_objective_on_every_corpus_program(case):
    """Where the fast path runs, its loss and gradients equal the Pyro objective's on the same draws
    (the training scale included); where it would not be exact, it does not run."""
    from test_pyro_programs import PROGRAMS

    from pyro_lvm.training.loop import training_scale

    splits = case.data()
    train = torch.from_numpy(splits["train"])
    hparams = dict(case.fit[i + 1].split("=", 1) for i, arg in enumerate(case.fit) if arg == "-p")
    objective_name = case.fit[case.fit.index("--objective") + 1] if "--objective" in case.fit else "elbo"
    cls = load_model_class(str(PROGRAMS / case.program))
    from pyro_lvm.protocol import resolve_hyperparameters
    from pyro_lvm.data.registry import _shape_points

    data = _shape_points(train.float(), "corpus")
    pyro.set_rng_seed(0)
    program = build_model(cls, tuple(data.shape[1:]), resolve_hyperparameters(cls, hparams))
    info = inspect_model(program, data, check_data=False)
    batch_size = int(case.fit[case.fit.index("--batch-size") + 1]) if "--batch-size" in case.fit else 100
    from pyro_lvm.protocol.checks import check_fit

    try:
        check_fit(program, {"batch_size": batch_size}, data)
    except UserError:
        return  # a fit pyro-lvm refuses: nothing runs, fast or not
    from pyro_lvm.estimators.importance_weights import vectorizes

    vectorizes(program, data)  # as fit does: a program that does not broadcast runs its particles one by one
    for name, particles in ((objective_name, 1), ("iwae", 3)):
        try:
            objective = get_objective(name, particles=particles, model_info=info)
        except UserError:
            continue  # refused for this program: nothing runs, fast or not
        scale = training_scale(program, len(data))
        plain = (lambda batch: objective.differentiable_loss(scale(program.model), scale(program.guide), batch))
        batch = next(iter(program.training_batches(data, batch_size).epoch(0)))[1]
        with torch.no_grad():
            objective.loss(scale(program.model), scale(program.guide), batch)
        fast, reason = select_fast_path(objective, program, len(data), program.probe(data), fallback=plain)
        # Not vacuous: on the corpus's fully reparameterized programs the fast path does run.
        assert fast is not None or case.name not in FAST_PATH_PROGRAMS, reason
        if fast is None:
            continue
        results = []
        for step in (plain, fast):
            torch.manual_seed(5)
            program.zero_grad(set_to_none=True)
            loss = step(batch)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() if p.grad is not None else None for p in program.parameters()]))
        (loss, grads), (fast_loss, fast_grads) = results
        torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-5, msg=f"{case.name} {name}")
        for g, h in zip(grads, fast_grads):
            if g is None or h is None:
                assert g is None and h is None
                continue
            torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-5 * (1 + float(g.abs().max())), msg=case.name)
        assert fast.refused is None, fast.refused


SEQUENCE_MODEL_WITH_A_BUG = """
import pyro, pyro.distributions as dist, torch

def model(sequences):
    num_sequences, max_length, data_dim = sequences.shape
    probs = pyro.param("probs", torch.full((data_dim,), 0.5))
    with pyro.plate("sequences", num_sequences):
        for t in pyro.markov(range(max_length)):
            pyro.sample(f"y_{t}", dist.Bernoulli(probs).to_event(1), obs=sequences[:, t] * undefined_scale)

def guide(sequences):
    pass
"""


def test_a_bug_is_reported_under_the_point_shape_the_program_was_written_for(tmp_path, capsys):
    """Sequences [N, T, D] load as (1, T, D) per point and are also tried as (T, D): the error to report
    is the one the program reached under (T, D) (a NameError on the observed line), not the unpacking
    error that (1, T, D) causes at its first line, and the message names the shape it ran on."""
    path = write(tmp_path, "sequences.py", SEQUENCE_MODEL_WITH_A_BUG)
    data = npz(tmp_path, (np.random.default_rng(0).random((40, 5, 3)) < 0.5).astype(np.float32))
    err = refused(capsys, "fit", path, "--data", data, "--epochs", "1", "--out", tmp_path / "run")
    assert "NameError" in err and "sequences.py:9 " in err and "(5, 3) per point" in err, err


REQUIRED_ARGUMENTS = """
import pyro, pyro.distributions as dist, torch, torch.nn as nn

class PPCA(nn.Module):
    def __init__(self, data_dim, z_dim, hidden=(4, 2)):
        super().__init__()
        assert isinstance(data_dim, int) and isinstance(z_dim, int)
        self.z_dim = z_dim
        self.decoder = nn.Linear(z_dim, data_dim)
        self.encoder = nn.Linear(data_dim, 2 * z_dim)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
"""


def test_constructor_parameters_without_defaults_are_required_hyperparameters(tmp_path, capsys):
    """As in the Bayesian regression tutorial's ``BayesianRegression(in_features, out_features)``: a
    parameter without a default is given with -p (read as an int here); left out, the fit is refused
    with the -p to add, before any run directory exists."""
    path = f"{write(tmp_path, 'required.py', REQUIRED_ARGUMENTS)}:PPCA"
    data = npz(tmp_path, GAUSSIANS)
    run = tmp_path / "run"
    err = refused(capsys, "fit", path, "--data", data, "-p", "z_dim=1", "--epochs", "1", "--out", run)
    assert "-p data_dim=VALUE" in err and "z_dim=VALUE" not in err, err
    assert not run.exists()
    code, _, err = cli(capsys, "fit", path, "--data", data, "-p", "data_dim=2", "-p", "z_dim=1", "--epochs", "1",
                       "--quiet", "--out", run)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["hyperparameters"] == {"data_dim": 2, "z_dim": 1,
                                                                               "hidden": [4, 2]}
    assert pyro_lvm.load_run(run, device="cpu").model.decoder.out_features == 2


DISCRETE_VECTOR = """
import pyro, pyro.distributions as dist, torch
from pyro.infer import config_enumerate
from torch.distributions import constraints

@config_enumerate
def model(data):
    probs = pyro.param("probs", torch.full((2, 2), 0.5), constraint=constraints.unit_interval)
    with pyro.plate("data", len(data)):
        h = pyro.sample("h", dist.Bernoulli(torch.full((2,), 0.5)).to_event(1))
        pyro.sample("obs", dist.Normal(h @ probs, 1.0).to_event(1), obs=data)

def guide(data):
    pass
"""


def test_a_discrete_vector_that_config_enumerate_passes_over_is_refused_with_the_plate_fix(tmp_path, capsys):
    """``config_enumerate`` leaves a ``Bernoulli(...).to_event(1)`` site unmarked (it has no enumerable
    support): the refusal says so and what to write instead, not "mark it for enumeration"."""
    path = write(tmp_path, "vector.py", DISCRETE_VECTOR)
    err = refused(capsys, "fit", path, "--data", npz(tmp_path, GAUSSIANS), "--epochs", "1", "--out", tmp_path / "r")
    assert "cannot be enumerated" in err and "pyro.plate instead of .to_event()" in err, err
    assert not (tmp_path / "r").exists()


TORCH_DISTRIBUTION = """
import pyro, torch
import torch.distributions as tdist

def model(data):
    loc = pyro.param("loc", torch.zeros(2))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", tdist.Independent(tdist.Normal(loc, 1.0), 1), obs=data)

def guide(data):
    pass
"""


def test_an_observation_from_torch_distributions_is_refused_naming_pyro_distributions(tmp_path, capsys):
    path = write(tmp_path, "torch_dist.py", TORCH_DISTRIBUTION)
    err = refused(capsys, "fit", path, "--data", npz(tmp_path, GAUSSIANS), "--epochs", "1", "--out", tmp_path / "r")
    assert "torch.distributions" in err and "import pyro.distributions as dist" in err, err


PART_OF_X = """
import pyro, pyro.distributions as dist, torch

def model(data):
    loc = pyro.param("loc", torch.zeros(1))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=data[:, :1])
        OBSERVED_AGAIN

def guide(data):
    pass
"""


@pytest.mark.parametrize("again, expected", [("pass", "observes 1 of the 2 entries"),
                                             ("pyro.sample('y', dist.Normal(0.0, 1.0).expand([len(data), 2])"
                                              ".to_event(1), obs=data)", "more than once")])
def test_observing_a_part_of_x_or_an_entry_twice_is_refused(tmp_path, capsys, again, expected):
    """log p of x[:, :1] is not log p(x), and an entry observed twice is counted twice: both refused
    before any run directory exists (they used to fit and report the wrong density as log p(x))."""
    path = write(tmp_path, "part.py", PART_OF_X.replace("OBSERVED_AGAIN", again))
    err = refused(capsys, "fit", path, "--data", npz(tmp_path, GAUSSIANS), "--epochs", "1", "--out", tmp_path / "r")
    assert expected in err, err
    assert not (tmp_path / "r").exists()


TRANSFORMED_X = """
import pyro, pyro.distributions as dist, torch

def model(data):
    loc = pyro.param("loc", torch.zeros(2))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=OBSERVED)

def guide(data):
    pass
"""


@pytest.mark.parametrize("observed, works", [("(data - 1.0) / 2.0", False), ("torch.log1p(data.abs())", False),
                                             ("data.double().float()", True), ("data.flip(-1)", True)])
def test_a_transform_of_x_is_refused_and_a_cast_or_a_gather_is_the_data(tmp_path, capsys, observed, works):
    path = write(tmp_path, "transformed.py", TRANSFORMED_X.replace("OBSERVED", observed))
    args = ("fit", path, "--data", npz(tmp_path, GAUSSIANS), "--epochs", "1", "--quiet", "--out", tmp_path / "r")
    if works:
        code, _, err = cli(capsys, *args)
        assert code == 0, err
    else:
        assert "Jacobian" in refused(capsys, *args)
