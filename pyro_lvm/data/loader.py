"""Minibatches sliced on the device, in an order that a checkpoint can reproduce.

The whole training split lives on the device; an epoch is one ``randperm`` there and a slice per
step, so no Python collation runs per batch (a ``DataLoader`` over a ``TensorDataset`` would cost
more than a small VAE's forward pass). The order of epoch ``e`` and the binarization noise of step
``s`` come from generators seeded by ``(seed, e)`` and ``(seed, e, s)``, so a run resumed at any
step sees exactly the batches that an uninterrupted run would have seen.
"""

import torch


def _mix(*numbers):
    # A fixed integer mix of the seed and the position; distinct inputs give distinct seeds.
    value = 0x9E3779B97F4A7C15
    for n in numbers:
        value = (value * 6364136223846793005 + int(n) + 1442695040888963407) % (1 << 63)
    return value


class DeviceBatches:
    """Shuffled minibatches of ``x`` (already on its device), epoch by epoch.

    Iterating over ``DeviceBatches.epoch(e, start_step=s)`` yields ``(step, batch)`` for
    ``step = s, s+1, ...``. With ``dynamic_binarize``, each batch is redrawn as
    ``x ~ Bernoulli(intensity)``.
    """

    def __init__(self, x, batch_size, seed=0, shuffle=True, dynamic_binarize=False):
        self.x = x
        self.batch_size = min(int(batch_size), len(x))
        self.seed = int(seed)
        self.shuffle = shuffle
        self.dynamic_binarize = dynamic_binarize

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def _generator(self, *key):
        return torch.Generator(device=self.x.device).manual_seed(_mix(self.seed, *key))

    def epoch(self, epoch, start_step=0):
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(epoch), device=self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        for step in range(start_step, len(self)):
            batch = self.x[order[step * self.batch_size:(step + 1) * self.batch_size]]
            if self.dynamic_binarize:
                noise = torch.rand(batch.shape, generator=self._generator(epoch, step), device=batch.device)
                batch = (noise < batch).to(batch.dtype)
            yield step, batch


def iterate_in_order(x, batch_size):
    """Consecutive slices of ``x``: for evaluation, where order does not matter."""
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size]
