"""Bad input ends in exit status 2 with one line naming the problem and the fix, no traceback,
and no run directory left behind."""
import numpy as np
import pytest
import torch
from helpers import FIXTURES, REPO, SMALL_VAE, cli, cli_process

import pyro_lvm


def assert_refused(capsys, args, *needles, out=None):
    code, stdout, stderr = cli(capsys, *args)
    assert code == 2, (code, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not out.exists(), f"{out} was created by a refused command"
    return lines[0]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "run"


def test_unknown_model_suggests_the_closest_name(capsys, out):
    assert_refused(capsys, ["fit", "vea", "--out", out], "unknown model 'vea'", "vae", out=out)


def test_unknown_data_set_suggests_the_closest_name(capsys, out):
    assert_refused(capsys, ["fit", "vae", "--data", "mnsit", "--out", out], "unknown data set", "mnist", out=out)


def test_model_file_that_does_not_exist(capsys, out):
    assert_refused(capsys, ["fit", "nowhere/model.py:Model", "--out", out], "does not exist", out=out)


def test_model_file_that_does_not_import(capsys, out):
    assert_refused(capsys, ["fit", f"{FIXTURES / 'broken_import.py'}:Model", "--out", out],
                   "failed to import", "ModuleNotFoundError", out=out)


def test_class_without_guide(capsys, out):
    assert_refused(capsys, ["fit", f"{FIXTURES / 'no_guide.py'}:NoGuide", "--out", out], "guide", out=out)


def test_unknown_and_mistyped_hyperparameters(capsys, out):
    assert_refused(capsys, ["fit", "vae", "-p", "latent_dims=3", "--out", out], "latent_dims", "latent_dim", out=out)
    assert_refused(capsys, ["fit", "vae", "-p", "latent_dim=three", "--out", out], "latent_dim", "int", out=out)
    assert_refused(capsys, ["fit", "vae", "-p", "latent_dim", "--out", out], "KEY=VALUE", out=out)


def test_data_whose_shape_does_not_fit_the_model(capsys, out):
    assert_refused(capsys, ["fit", f"{FIXTURES / 'fixed_dim.py'}:ThreeDimensional", "--data", "faithful", "--out", out],
                   "shape (2,) per point", "(3,)", out=out)
    assert_refused(capsys, ["fit", "vae", "--data", "faithful", "-p", "architecture=conv", "--out", out],
                   "conv", out=out)


def test_non_binary_data_for_a_bernoulli_likelihood(capsys, out):
    assert_refused(capsys, ["fit", "vae", "--data", "digits", "--binarize", "none", *SMALL_VAE, "--out", out],
                   "Bernoulli", "--binarize", out=out)
    # The same on a file of intensities; auto binarization only applies to image data sets.
    path = out.parent / "vectors.npy"
    np.save(path, np.random.default_rng(0).uniform(size=(50, 6)).astype(np.float32))
    assert_refused(capsys, ["fit", "vae", "--data", path, "--out", out], "Bernoulli", out=out)


def test_nan_and_infinite_values_in_the_data(capsys, out):
    values = np.random.default_rng(0).normal(size=(40, 3))
    values[5, 1] = np.nan
    values[7, 0] = np.inf
    path = out.parent / "bad.csv"
    np.savetxt(path, values, delimiter=",")
    assert_refused(capsys, ["fit", "ppca", "--data", path, "--out", out], "NaN or infinite", out=out)


def test_data_set_missing_from_the_data_dir(capsys, out, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = assert_refused(capsys, ["fit", "vae", "--data", "binarized-mnist", "--data-dir", empty, "--out", out],
                          "not found", "--data-dir", out=out)
    assert str(empty) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(capsys, out):
    assert_refused(capsys, ["fit", "vae", "--device", "cuda", "--out", out], "no CUDA GPU", "--device cpu", out=out)


def test_bad_option_values(capsys, out):
    assert_refused(capsys, ["fit", "vae", "--objective", "elbow", "--out", out], "elbo", out=out)
    assert_refused(capsys, ["fit", "vae", "--epochs", "0", "--out", out], "--epochs", out=out)
    assert_refused(capsys, ["fit", "vae", "--lr", "nan", "--out", out], "--lr", out=out)
    assert_refused(capsys, ["fit", "vae", "--epochs", "ten", "--out", out], "--epochs", out=out)


def test_existing_run_directory_without_resume(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["fit", str(REPO / "examples" / "factor_analysis.py"), "--data", "faithful", "--epochs", "1", "--quiet"]
    assert cli(capsys, *args, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert_refused(capsys, [*args, "--out", out], "already exists", "--resume")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert before == after, "a refused fit changed the existing run"


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fitted") / "fa"
    code = pyro_lvm.cli.main(["fit", str(REPO / "examples" / "factor_analysis.py"), "--data", "faithful",
                              "--epochs", "1", "--quiet", "--out", str(out)])
    assert code == 0
    return out


def test_truncated_checkpoint(capsys, fitted_run, tmp_path):
    import shutil

    run = tmp_path / "truncated"
    shutil.copytree(fitted_run, run)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert_refused(capsys, ["evaluate", run, "--estimator", "exact"], "truncated or not a checkpoint")
    assert_refused(capsys, ["fit", "-", "--out", run, "--resume"], "truncated or not a checkpoint")


class _RunsCode:
    """Unpickling this would run ``touch``: a checkpoint crafted to execute code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_foreign_and_malicious_checkpoints_are_refused(capsys, fitted_run, tmp_path):
    import shutil

    run = tmp_path / "foreign"
    shutil.copytree(fitted_run, run)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, run / "checkpoint.pt")
    assert_refused(capsys, ["evaluate", run, "--estimator", "exact"], "not a pyro-lvm checkpoint")

    marker = tmp_path / "code-ran"
    torch.save({"format": "pyro-lvm-checkpoint-v1", "model": _RunsCode(marker)}, run / "checkpoint.pt")
    assert_refused(capsys, ["evaluate", run, "--estimator", "exact"], "refusing to load")
    assert not marker.exists(), "loading the checkpoint ran code"


def test_not_a_run_directory(capsys, tmp_path):
    assert_refused(capsys, ["evaluate", tmp_path / "nothing"], "does not exist")
    assert_refused(capsys, ["evaluate", tmp_path], "not a pyro-lvm run directory")


def test_bad_input_as_a_real_process_exits_2_without_traceback(tmp_path):
    result = cli_process("fit", "vea", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


MIXED_DEVICES = """
import pyro, pyro.distributions as dist, torch
from pyro.nn import PyroModule
class Mixed(PyroModule):
    def __init__(self, data_shape):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(data_shape))
    def model(self, x=None, num_samples=1):
        with pyro.plate("data", x.shape[0] if x is not None else num_samples):
            pyro.sample("x", dist.Normal(self.loc, 1.0).to_event(1), obs=x)
    def guide(self, x):
        # what PyTorch raises when a model's CPU tensor meets CUDA data (simulated: no GPU here)
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                           "devices, cuda:0 and cpu!")
"""


def test_a_model_that_mixes_devices_is_named_with_the_fix(capsys, out, tmp_path):
    """CPU tensors built inside a model meet the data on the GPU: exit 2 and how to fix it, both when
    the model is first traced and when the error comes later (from the training loop, say)."""
    from pyro_lvm.cli import _environment_error
    from pyro_lvm.errors import DEVICE_MISMATCH

    model_file = tmp_path / "mixed.py"
    model_file.write_text(MIXED_DEVICES)
    assert_refused(capsys, ["fit", f"{model_file}:Mixed", "--data", "faithful", "--out", out],
                   "Mixed mixes devices", "--device cpu", out=out)
    message = _environment_error(RuntimeError(f"{DEVICE_MISMATCH}, but found at least two devices, cuda:0 and cpu!"))
    assert "mixes devices" in message and "--device cpu" in message and "new_zeros" in message
