"""Rotated MNIST of random images for quick round-robin runs in tests."""
import torch

from loaders.rotated_mnist import make_tasks
from training import round_robin


def use_tiny_rotated_mnist(monkeypatch, train, test):
    """The round-robin trainer loads ``train`` and ``test`` random 28x28 images (fixed seed) as its rotated MNIST."""
    generator = torch.Generator().manual_seed(0)

    def tiny_data(root, subset, seed):
        def split(n):
            return make_tasks(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator),
                              torch.randint(0, 10, (n,), generator=generator))
        return {"train": split(train), "test": split(test)}

    monkeypatch.setattr(round_robin, "load_rotated_mnist", tiny_data)
