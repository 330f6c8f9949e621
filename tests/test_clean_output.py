"""A normal run prints only pyro-lvm's own lines: no warning banner from a dependency.

Each command of the README runs as its own process on the embedded data, exactly as a user runs it,
with Python's default warning filters (no PYTHONWARNINGS); every line on stderr must be one the
toolkit writes. A dependency's DeprecationWarning or FutureWarning (arviz's refactor notice was one)
would add lines that match none of these.
"""
import re

import pytest

from helpers import cli_process

# Everything pyro-lvm itself writes to stderr on a successful run.
OWN_LINES = re.compile(r"^(fitting \S+ on |epoch \d+/\d+  train bound |run written to |resuming )")
SMALL_VAE = ["-p", "latent_dim=4", "-p", "hidden=32", "--epochs", "2"]


def _own_stderr(result):
    assert result.returncode == 0, result.stderr
    foreign = [line for line in result.stderr.splitlines() if line.strip() and not OWN_LINES.match(line)]
    assert not foreign, "lines on stderr that pyro-lvm did not write:\n" + "\n".join(foreign)


@pytest.mark.parametrize("model", ["vae", "mog"])
def test_every_command_prints_only_its_own_lines(tmp_path, model):
    run = tmp_path / model
    env = {"PYTHONWARNINGS": ""}
    _own_stderr(cli_process("fit", model, *(SMALL_VAE if model == "vae" else ["--epochs", "2"]), "--out", run, env=env))
    estimator = "is" if model == "vae" else "exact"
    _own_stderr(cli_process("evaluate", run, "--estimator", estimator, "--samples", "100", env=env))
    _own_stderr(cli_process("sample", run, "-n", "16", env=env))
    _own_stderr(cli_process("diagnose", run, "--json", env=env) if model == "vae" else cli_process("models", env=env))
    _own_stderr(cli_process("report", run, env=env))
