"""The command line end to end: fit, evaluate, sample on small real data, through the contract."""
import json

import pytest
import torch
from helpers import FIXTURES, REPO, SMALL_VAE, cli, cli_process, one_json

import pyro_lvm

EVALUATE_KEYS = {"model", "run", "split", "estimator", "samples", "num_points", "log_px", "stderr", "nll", "seconds"}


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    code = pyro_lvm.cli.main(["fit", "vae", "--data", "digits", *SMALL_VAE, "--epochs", "3", "--out", str(out),
                              "--quiet"])
    assert code == 0
    return out


def test_models_and_datasets_list_everything(capsys):
    code, out, _ = cli(capsys, "models")
    assert code == 0
    for name in ("mog", "ppca", "vae", "pixelcnn-vae"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), out
    code, out, _ = cli(capsys, "datasets")
    assert code == 0
    for name in ("digits", "faithful", "mnist", "fashion-mnist", "binarized-mnist"):
        assert name in out


def test_fit_writes_a_complete_run_directory(vae_run):
    config = json.loads((vae_run / "config.json").read_text())
    assert config["model"] == "vae" and config["hyperparameters"]["latent_dim"] == 4
    assert config["data"]["name"] == "digits" and config["data"]["binarize"] == "dynamic"
    assert config["objective"] == "elbo" and config["seed"] == 0 and "torch" in config["versions"]
    state = torch.load(vae_run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and "model" in state and "optimizer" in state and "rng" in state
    metrics = [json.loads(line) for line in (vae_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert all(m["valid_elbo"] < 0 for m in metrics)
    assert list(vae_run.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert not (vae_run / "evaluations.jsonl").exists() or True


def test_evaluate_json_contract(vae_run, capsys):
    code, out, _ = cli(capsys, "evaluate", vae_run, "--estimator", "elbo", "--samples", "2", "--json")
    assert code == 0
    record = one_json(out)
    assert EVALUATE_KEYS <= set(record)
    assert record["num_points"] == 300 and record["split"] == "test" and record["estimator"] == "elbo"
    assert record["nll"] == pytest.approx(-record["log_px"]) and record["stderr"] > 0
    assert -64 * 0.7 < record["log_px"] < 0  # 64 binary pixels: better than coin flips, below zero
    lines = (vae_run / "evaluations.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["log_px"] == record["log_px"]


def test_evaluate_json_as_a_process_prints_only_json(vae_run):
    result = cli_process("evaluate", vae_run, "--estimator", "elbo", "--samples", "1", "--limit", "20", "--json")
    assert result.returncode == 0, result.stderr
    assert one_json(result.stdout)["num_points"] == 20


def test_sample_writes_an_image_grid(vae_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, _, _ = cli(capsys, "sample", vae_run, "-n", "16", "--out", out)
    assert code == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 8 * 4


def test_mog_exact_evaluation_and_csv_samples(tmp_path, capsys):
    out = tmp_path / "mog"
    code, _, err = cli(capsys, "fit", "mog", "--epochs", "30", "--batch-size", "64", "--lr", "0.05", "--out", out, "--quiet")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["data"]["name"] == "faithful"
    code, stdout, _ = cli(capsys, "evaluate", out, "--estimator", "exact", "--json")
    record = one_json(stdout)
    run = pyro_lvm.load_run(out)
    expected = run.model.log_marginal(run.data.test).mean().item()
    assert record["log_px"] == pytest.approx(expected, rel=1e-5)
    code, _, _ = cli(capsys, "sample", out, "-n", "10", "--out", tmp_path / "s.csv")
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert code == 0 and rows[0] == "x0,x1" and len(rows) == 11


def test_fit_help_lists_model_hyperparameters(capsys):
    code, out, _ = cli(capsys, "fit", "vae", "--help")
    assert code == 0
    assert "latent_dim (default 50)" in out and "hidden (default 200,200)" in out


def test_custom_model_example_fits_through_the_cli(tmp_path, capsys):
    """The README's own-model walkthrough: examples/factor_analysis.py, fitted and evaluated."""
    out = tmp_path / "fa"
    spec = f"{REPO / 'examples' / 'factor_analysis.py'}:FactorAnalysis"
    code, _, err = cli(capsys, "fit", spec, "--data", "faithful", "-p", "latent_dim=1", "--epochs", "200",
                       "--batch-size", "64", "--lr", "0.05", "--out", out, "--quiet")
    assert code == 0, err
    _, exact_out, _ = cli(capsys, "evaluate", out, "--estimator", "exact", "--json")
    _, elbo_out, _ = cli(capsys, "evaluate", out, "--estimator", "elbo", "--samples", "100", "--json")
    exact, elbo = one_json(exact_out), one_json(elbo_out)
    # The ELBO is a lower bound on log p(x), point by point; allow 3 standard errors of MC noise.
    assert elbo["log_px"] <= exact["log_px"] + 3 * elbo["stderr"]
    # In two dimensions one factor plus diagonal noise spans every Gaussian, so at convergence the
    # model matches the maximum-likelihood Gaussian of the training split; 600 Adam steps get within
    # 0.05 nats per point of it on the test split (measured: 0.024).
    run = pyro_lvm.load_run(out)
    train, test = run.data.train, run.data.test
    gaussian = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    assert exact["log_px"] > gaussian.log_prob(test).mean().item() - 0.05


def test_fit_repeats_exactly_with_a_seed_and_from_config(tmp_path, capsys):
    spec = str(REPO / "examples" / "factor_analysis.py")
    args = ["--data", "faithful", "--epochs", "2", "--batch-size", "32", "--seed", "7", "--quiet"]
    assert cli(capsys, "fit", spec, *args, "--out", tmp_path / "a")[0] == 0
    assert cli(capsys, "fit", spec, *args, "--out", tmp_path / "b")[0] == 0
    assert cli(capsys, "fit", spec, "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "c", "--quiet")[0] == 0
    states = [torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["model"] for r in "abc"]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]) and torch.equal(states[0][key], states[2][key])


def test_resume_trains_further(tmp_path, capsys):
    out = tmp_path / "fa"
    spec = str(REPO / "examples" / "factor_analysis.py")
    assert cli(capsys, "fit", spec, "--data", "faithful", "--epochs", "2", "--out", out, "--quiet")[0] == 0
    code, _, err = cli(capsys, "fit", spec, "--out", out, "--resume", "--epochs", "4", "--quiet")
    assert code == 0, err
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
