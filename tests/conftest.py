"""Shared fixtures: a tiny slice of mnist5k and a single-threaded torch for exact reproducibility."""

import dataclasses

import pytest
import torch

from lmcflow.data import Data, load_dataset


@pytest.fixture(scope="session")
def tiny_data() -> Data:
    """256 train / 128 test images of the embedded mnist5k split (uint8, (N, 1, 28, 28)).

    mnist5k is ordered by class, so the subsets are fixed random draws (all ten classes), not
    the first rows.
    """
    full = load_dataset("mnist5k")
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(full.train_y), generator=g)[:256].sort().values
    te = torch.randperm(len(full.test_y), generator=g)[:128].sort().values
    return dataclasses.replace(
        full,
        train_x=full.train_x[tr].clone(), train_y=full.train_y[tr].clone(),
        test_x=full.test_x[te].clone(), test_y=full.test_y[te].clone(),
    )


@pytest.fixture(scope="module")
def one_thread():
    """Run the tests of a module with one intra-op thread (deterministic reductions, no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mnist2k() -> Data:
    """2000 train / 500 test images of the embedded mnist5k split (fixed random subsets): enough
    to train small networks to well above chance in seconds."""
    full = load_dataset("mnist5k")
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(full.train_y), generator=g)[:2000]
    te = torch.randperm(len(full.test_y), generator=g)[:500]
    return dataclasses.replace(full, train_x=full.train_x[tr], train_y=full.train_y[tr],
                               test_x=full.test_x[te], test_y=full.test_y[te])


def sgd_train(model, data: Data, epochs: int = 3, seed: int = 0, lr: float = 0.05):
    """Plain SGD (momentum 0.9, batch 64) on ``data``'s training split; the model in eval mode."""
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x, y = data.normalize(data.train_x), data.train_y
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
