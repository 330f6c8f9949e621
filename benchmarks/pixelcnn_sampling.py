"""Sampling speed of the PixelCNN decoders: each network's cached sampler against a whole pass per pixel.

Exact ancestral sampling from an autoregressive decoder takes one network evaluation per pixel
(``pyro_lvm.distributions.autoregressive_sample``). Done naively, every evaluation is a forward pass
over the whole image; the networks' ``sampler(context)`` caches what does not depend on the pixels
still to be drawn: the conditioning once, for the gated PixelCNN the vertical stack once per row (on
the rows above) and per pixel only the horizontal stack over its row up to the pixel; for the plain
PixelCNN the rows drawn so far. ``cached`` and ``full`` draw the same images from the same uniforms
(checked), interleaved ``--rounds`` times; the figure is the ratio of their median times.

    python benchmarks/pixelcnn_sampling.py [--size 28] [--layers 12] [--channels 32] [--samples 16] [--json]
"""

import argparse
import json
import statistics
import time

import torch

from pyro_lvm.distributions import autoregressive_sample
from pyro_lvm.nn import GatedPixelCNN, PixelCNN


class FullPass(torch.nn.Module):
    """The same network without ``sampler``: a whole forward pass per pixel."""

    def __init__(self, network):
        super().__init__()
        self.network, self.data_shape = network, network.data_shape
        self.context_event_dim = network.context_event_dim

    def forward(self, x, context):
        return self.network(x, context)


def _timed(network, context, uniforms, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        x = autoregressive_sample(network, context, uniforms)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28, help="image height and width")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    shape = (1, args.size, args.size)
    networks = {
        "gated": (GatedPixelCNN(shape, 32, num_layers=args.layers, channels=args.channels),
                  torch.randn(args.samples, 32)),
        "plain": (PixelCNN(shape, 4, num_layers=args.layers, channels=args.channels),
                  torch.randn(args.samples, 4, args.size, args.size)),
    }
    rows = []
    for name, (network, context) in networks.items():
        network, context = network.to(device).eval(), context.to(device)
        uniforms = torch.rand((args.samples,) + shape, device=device)
        times = {"cached": [], "full": []}
        for _ in range(args.rounds):
            for kind, net in (("cached", network), ("full", FullPass(network))):
                seconds, x = _timed(net, context, uniforms, device)
                times[kind].append(seconds)
                if kind == "cached":
                    reference = x
                elif not torch.equal(x, reference):
                    raise SystemExit(f"{name}: the cached sampler drew different images from the full passes")
        cached, full = statistics.median(times["cached"]), statistics.median(times["full"])
        rows.append({"network": name, "cached_s": cached, "full_s": full, "full_over_cached": full / cached})
    record = {"setting": vars(args), "torch": torch.__version__, "rows": rows}
    if args.json:
        print(json.dumps(record))
        return
    print(f"## PixelCNN sampling, {args.samples} images {shape}, {args.layers} layers x {args.channels} channels, "
          f"{args.device}, median of {args.rounds}")
    print("| network | cached s | full pass per pixel s | full / cached |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['network']} | {row['cached_s']:.2f} | {row['full_s']:.2f} | **{row['full_over_cached']:.1f}** |")


if __name__ == "__main__":
    main()
