"""Shared helpers for the tests: running the CLI in-process and as a real process."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pyro_lvm.cli import main

REPO = Path(__file__).resolve().parent.parent
# Processes start here, not in the checkout: ``python -m pyro_lvm.cli`` puts its working directory
# first on sys.path, and from the checkout it would import the source tree instead of an install.
PROCESS_CWD = Path(tempfile.mkdtemp(prefix="pyro-lvm-tests-"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMALL_VAE = ["-p", "latent_dim=4", "-p", "hidden=32", "--batch-size", "100"]


def cli(capsys, *args):
    """Run ``pyro-lvm ARGS`` in this process; returns (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_process(*args, env=None, timeout=300):
    """Run ``pyro-lvm ARGS`` as its own process (as a user would)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pyro_lvm.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=PROCESS_CWD)


def one_json(stdout):
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {stdout!r}"
    return json.loads(lines[0])
