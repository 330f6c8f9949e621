"""``evaluate`` from the command line and the Python API: seeds, Monte Carlo errors, refinement, progress."""
import io
import json
import math
import sys

import pytest
from helpers import cli, one_json

import pyro_lvm
from pyro_lvm.cli import main
from pyro_lvm.errors import UserError


@pytest.fixture(scope="module")
def ppca_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ppca"
    pyro_lvm.fit("ppca", data="faithful", out=out, epochs=2, hyperparameters={"latent_dim": 1}, device="cpu",
                 progress=False, log=lambda m: None)
    return out


def _evaluate(capsys, run, *args):
    code, out, err = cli(capsys, "evaluate", run, *args, "--json")
    assert code == 0, err
    return one_json(out)


def test_ais_seed_changes_the_estimate_and_fixes_it(ppca_run, capsys):
    options = ["--estimator", "ais", "--samples", "4", "--ais-steps", "3", "--limit", "10"]
    first = _evaluate(capsys, ppca_run, *options, "--seed", "1")
    again = _evaluate(capsys, ppca_run, *options, "--seed", "1")
    other = _evaluate(capsys, ppca_run, *options, "--seed", "2")
    assert first["log_px"] == again["log_px"] and first["log_px"] != other["log_px"]
    assert first["ais_steps"] == 3 and first["num_chains"] == 4
    assert first["mc_stderr"] > 0 and first["mc_stderr_max"] >= first["mc_stderr"]


def test_json_reports_the_mc_error_and_null_where_it_is_undefined(ppca_run, capsys):
    record = _evaluate(capsys, ppca_run, "--estimator", "is", "--samples", "200")
    exact = _evaluate(capsys, ppca_run, "--estimator", "exact")
    assert 0 < record["mc_stderr"] < record["stderr"]  # 200 particles: well below the spread over points
    assert abs(record["log_px"] - exact["log_px"]) < 4 * record["mc_stderr"] + 1e-3
    assert exact["mc_stderr"] == 0.0
    code, out, _ = cli(capsys, "evaluate", ppca_run, "--estimator", "elbo", "--samples", "1", "--json")
    single = json.loads(out)
    assert code == 0 and '"mc_stderr": null' in out and single["mc_stderr"] is None
    assert "at least two samples" in single["null_reason"]["mc_stderr"]
    code, out, _ = cli(capsys, "evaluate", ppca_run, "--estimator", "is", "--samples", "50")
    assert code == 0 and "Monte Carlo standard error:" in out


def test_target_mc_error_from_the_command_line(ppca_run, capsys):
    record = _evaluate(capsys, ppca_run, "--estimator", "is", "--samples", "8", "--target-mc-error", "0.02",
                       "--max-samples", "256")
    samples = record["samples_per_point"]
    assert len(samples) == record["num_points"] == 40
    assert set(samples) <= {8 * 2 ** r for r in range(6)} and max(samples) > 8
    assert record["samples_total"] == sum(samples) and record["samples_max"] == max(samples)
    assert record["target_mc_error"] == 0.02 and record["max_samples"] == 256
    assert record["mc_stderr_max"] <= 0.02 or record["points_above_target"] > 0
    stored = json.loads((ppca_run / "evaluations.jsonl").read_text().splitlines()[-1])
    assert stored["samples_per_point"] == samples


@pytest.mark.parametrize("args,message", [
    (["--estimator", "iwae", "--target-mc-error", "0.1"], "iwae bound changes with K"),
    (["--estimator", "is", "--max-samples", "100"], "target-mc-error EPS as well"),
    (["--estimator", "is", "--samples", "10", "--target-mc-error", "0.1", "--max-samples", "5"], "max-samples"),
    (["--estimator", "is", "--target-mc-error", "-1"], "positive number"),
    (["--estimator", "is", "--ais-steps", "5"], "apply to --estimator ais only"),
    (["--estimator", "ais", "--ais-steps", "0"], "--ais-steps must be at least 1"),
    (["--estimator", "ais", "--bdmc-points", "-3"], "--bdmc-points must be an integer between 0"),
])
def test_bad_evaluate_options_are_refused_in_one_line(ppca_run, capsys, args, message):
    code, out, err = cli(capsys, "evaluate", ppca_run, *args)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_one_name_for_ais_steps_in_the_api(ppca_run):
    record = pyro_lvm.evaluate(ppca_run, estimator="ais", samples=2, ais_steps=2, limit=5, bdmc_points=3,
                               record=False)
    assert record["ais_steps"] == 2 and math.isfinite(record["bdmc_gap"])
    with pytest.raises(UserError, match="did you mean ais_steps"):
        pyro_lvm.evaluate(ppca_run, estimator="ais", samples=2, num_steps=2, limit=5, record=False)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("json_flag,stdout_is_terminal,bar", [
    (False, False, True), (True, True, True), (True, False, False)])
def test_progress_bar_on_a_terminal_and_none_when_json_is_piped(ppca_run, monkeypatch, json_flag,
                                                                stdout_is_terminal, bar):
    stderr, stdout = _Terminal(), (_Terminal() if stdout_is_terminal else io.StringIO())
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(sys, "stdout", stdout)
    args = ["evaluate", str(ppca_run), "--estimator", "is", "--samples", "300", "--batch-size", "5"]
    assert main(args + (["--json"] if json_flag else [])) == 0
    assert ("evaluate:" in stderr.getvalue()) == bar, stderr.getvalue()
    if json_flag:
        one_json(stdout.getvalue())
