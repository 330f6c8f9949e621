"""The spread between two trainings of the hand-written reference: the yardstick for pyro-lvm against it.

``iwae_mnist.py`` compares pyro-lvm's test NLL with the hand-written reference's, with a standard error
paired over the test points. That standard error counts the spread over test points and the
importance-sampling noise, not the spread between two trainings of the same protocol. Where the
training is chaotic at the size of float32 rounding (IWAE k=5: ``rounding_sensitivity.py``), two
computations of the same steps end apart, and the paired standard error understates how far apart.

This script measures that spread directly: the reference trained twice for the same passes of the
shortened ``iwae`` schedule, on the same batches and draws, from the same weights and from those
weights times (1 + 1e-7 noise), both evaluated on the same test images with the same number of
importance samples; it prints their NLLs, the paired difference with its standard error, and the
largest relative parameter difference. If two references differ by more than 2 paired standard
errors, so can pyro-lvm and a reference, whatever their code. Run from the repository root:

    python benchmarks/reproduce/reference_spread.py --data-dir ../shared/data --row 1:iwae:5 --passes 20 --eval-points 1000
"""
import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

from pyro_lvm.data import load_dataset

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("iwae_mnist", HERE / "iwae_mnist.py")
iwae_mnist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(iwae_mnist)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent.parent / "shared" / "data"))
    parser.add_argument("--row", type=iwae_mnist.parse_row, default=(1, "iwae", 5), metavar="LAYERS:OBJECTIVE:K")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--eval-points", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--perturbation", type=float, default=1e-7, help="relative size of the start's noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-seed", type=int, help="seed of the start's noise (default seed + 1)")
    parser.add_argument("--out", default=str(HERE / "out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    data = load_dataset(str(iwae_mnist.protocol_data(args.data_dir, args.out)), None, "dynamic")
    test = data.test[:args.eval_points]

    torch.manual_seed(args.seed)
    first = iwae_mnist.ReferenceVAE(args.row[0])
    with torch.no_grad():  # the zoo vae's initialize: the output bias at the logit of the mean image
        first.output_bias.copy_(torch.logit(data.train.mean(0).clamp(1e-3, 1 - 1e-3)))
    second = iwae_mnist.ReferenceVAE(args.row[0])
    second.load_state_dict(first.state_dict())
    noise_seed = args.seed + 1 if args.noise_seed is None else args.noise_seed
    noise = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1 + args.perturbation * torch.randn(p.shape, generator=noise))
    rng = {"torch": torch.get_rng_state()}
    result = {"row": iwae_mnist.row_name(args.row), "passes": args.passes, "perturbation": args.perturbation, "noise_seed": noise_seed,
              "eval_points": len(test), "eval_samples": args.eval_samples, "seed": args.seed,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "threads": 1}
    per_point = []
    for name, reference in (("reference", first), ("perturbed", second)):
        result[f"{name}_train_seconds"] = iwae_mnist.train_reference(reference, data, args.row, args.passes,
                                                                     args.seed, rng, device)
        torch.manual_seed(args.seed + 1)
        with torch.no_grad():
            per_point.append(reference.log_px(test, args.eval_samples).double())
        result[f"{name}_nll"] = -per_point[-1].mean().item()
        iwae_mnist.log(f"{name}: test NLL {result[f'{name}_nll']:.3f}")
    difference = per_point[0] - per_point[1]
    after = second.state_dict()
    result["max_relative_parameter_difference"] = max(
        ((value - after[name]).abs().max() / after[name].abs().max().clamp_min(1e-12)).item()
        for name, value in first.state_dict().items())
    result["nll_difference"] = -difference.mean().item()  # NLL(reference) - NLL(perturbed), paired
    result["nll_difference_stderr"] = difference.std().item() / math.sqrt(len(test))
    result["within_2_stderr"] = abs(result["nll_difference"]) <= 2 * result["nll_difference_stderr"]
    path = Path(args.out) / f"reference-spread-{result['row']}-noise{noise_seed}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
