"""The training loop: exact repeats, resume after a hard kill, NaN handling, one writer per run."""
import json

import numpy as np
import pytest
import torch
from helpers import FIXTURES, REPO, cli, cli_process

import pyro_lvm
from pyro_lvm.data import DeviceBatches
from pyro_lvm.errors import UserError
from pyro_lvm.runs import RunLock

KILLED = f"{FIXTURES / 'killed_model.py'}:KilledFactorAnalysis"
# Bit-identical resumes are the CPU's promise (and the kill counts guide calls, which a replayed CUDA
# graph does not make), so the run is pinned to the CPU even where a GPU is present.
FIT = ["fit", KILLED, "--data", "faithful", "--epochs", "4", "--batch-size", "32", "--seed", "3",
       "--checkpoint-every", "4", "--device", "cpu", "--quiet"]


def test_resume_after_sigkill_mid_epoch_is_bit_identical(tmp_path):
    # 192 training points in batches of 32: 6 steps an epoch. The model SIGKILLs the process at its
    # 16th guide call in training (epoch 3, after the checkpoint of global step 12).
    reference = cli_process(*FIT, "--out", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    killed = cli_process(*FIT, "--out", tmp_path / "killed", env={"PYRO_LVM_TEST_KILL_AT": "16"})
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0) or state["global_step"] == 12
    resumed = cli_process("fit", KILLED, "--out", tmp_path / "killed", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr

    final = [torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("reference", "killed")]
    for key, value in final[0]["model"].items():
        assert torch.equal(value, final[1]["model"][key]), key
    metrics = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
               for r in ("reference", "killed")]
    assert [m["train_elbo"] for m in metrics[0]] == [m["train_elbo"] for m in metrics[1]]
    assert [m["valid_elbo"] for m in metrics[0]] == [m["valid_elbo"] for m in metrics[1]]


def test_a_second_fit_on_the_same_run_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with RunLock(tmp_path):
        with pytest.raises(UserError, match="another pyro-lvm fit is writing"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # free again once the first one let go


NAN_MODEL = '''
import pyro, pyro.distributions as dist, torch
from pyro.nn import PyroModule

class Exploding(PyroModule):
    """Its decoder scale turns negative after a few steps, so the likelihood's log-prob is NaN."""
    def __init__(self, data_shape):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.zeros(data_shape))
        self.calls = 0
    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        self.calls += 1
        scale = self.log_scale.exp() * (-1.0 if self.calls > 8 and self.training else 1.0)
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(self.log_scale.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), scale, validate_args=False).to_event(1), obs=x)
    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.log_scale.new_zeros(2), 1.0).to_event(1))
'''


def test_nan_loss_stops_with_the_step_and_site_and_keeps_the_checkpoint(tmp_path, capsys):
    model_file = tmp_path / "exploding.py"
    model_file.write_text(NAN_MODEL)
    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(0).normal(size=(100, 1)).astype(np.float32))
    out = tmp_path / "run"
    code, _, err = cli(capsys, "fit", f"{model_file}:Exploding", "--data", data, "--epochs", "5", "--batch-size", "20",
                       "--out", out, "--quiet")
    assert code == 2
    assert "NaN or infinite" in err and "model site 'x'" in err and "step" in err and "--resume" in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] >= 1 and all(torch.isfinite(v).all() for v in state["model"].values())

    skipped = tmp_path / "skipped"
    code, _, err = cli(capsys, "fit", f"{model_file}:Exploding", "--data", data, "--epochs", "2", "--batch-size", "20",
                       "--out", skipped, "--on-nan", "skip")
    assert code == 0, err
    metrics = [json.loads(line) for line in (skipped / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_steps"] > 0


def test_device_batches_cover_every_point_once_per_epoch_and_resume_in_place():
    x = torch.arange(23.0).unsqueeze(-1)
    batches = DeviceBatches(x, 5, seed=1)
    seen = torch.cat([b for _, b in batches.epoch(0)]).squeeze(-1)
    assert sorted(seen.tolist()) == list(range(23))
    later = [b for _, b in batches.epoch(0, start_step=2)]
    assert torch.equal(torch.cat(later), torch.cat([b for _, b in batches.epoch(0)][2:]))
    assert not torch.equal(seen, torch.cat([b for _, b in batches.epoch(1)]).squeeze(-1))


def test_python_api_matches_the_cli(tmp_path):
    run = pyro_lvm.fit(str(REPO / "examples" / "factor_analysis.py"), data="faithful", epochs=1,
                       out=tmp_path / "api", progress=False, log=lambda m: None)
    record = pyro_lvm.evaluate(run, estimator="exact")
    assert record["num_points"] == 40 and record["log_px"] < 0
    assert run.config["data"]["name"] == "faithful" and len(run.metrics) == 1


def test_the_training_optimizer_matches_the_default_adam_bit_for_bit():
    """fit's multi-tensor Adam (make_optimizer) takes exactly the steps of torch's default Adam."""
    from pyro_lvm.training import make_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [make_optimizer(models[0], 1e-2), torch.optim.Adam(models[1].parameters(), lr=1e-2, foreach=False)]
    x = torch.randn(20, 5)
    for _ in range(30):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
