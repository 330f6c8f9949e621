"""How far the reference's own training drifts from a start changed at the size of float32 rounding.

Trains ``ReferenceVAE`` of ``iwae_mnist.py`` (one stochastic layer) for one pass of the shortened
``iwae`` schedule twice, from the same weights and from those weights times (1 + 1e-7 noise), on the
same batches and draws, and prints the largest relative parameter difference. This is the yardstick
for pyro-lvm against the reference: two computations of the same steps that differ by rounding can
drift apart no less than this. Run from the repository root after ``iwae_mnist.py`` has written its data:

    python benchmarks/reproduce/rounding_sensitivity.py iwae 5     # or: vae 1
"""
import importlib.util
import json
import sys
from pathlib import Path

import torch

from pyro_lvm.data import load_dataset

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("iwae_mnist", HERE / "iwae_mnist.py")
iwae_mnist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(iwae_mnist)


def main(objective="iwae", k=5):
    torch.set_num_threads(1)
    row = (1, objective, int(k))
    data = load_dataset(str(HERE / "out" / "mnist-60k-10k.npz"), None, "dynamic")
    torch.manual_seed(0)
    first = iwae_mnist.ReferenceVAE(1)
    with torch.no_grad():
        first.output_bias.copy_(torch.logit(data.train.mean(0).clamp(1e-3, 1 - 1e-3)))
    second = iwae_mnist.ReferenceVAE(1)
    second.load_state_dict(first.state_dict())
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=noise))
    rng = {"torch": torch.get_rng_state()}
    for reference in (first, second):
        iwae_mnist.train_reference(reference, data, row, 1, 0, rng, torch.device("cpu"))
    after = second.state_dict()
    drift = max(((value - after[name]).abs().max() / after[name].abs().max()).item()
                for name, value in first.state_dict().items())
    print(json.dumps({"row": iwae_mnist.row_name(row), "max_relative_parameter_difference_after_1_pass": drift}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
