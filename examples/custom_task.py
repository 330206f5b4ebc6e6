"""A user task for ``kind: custom`` (see examples/custom_task.yaml).

The function is called on every rank with the run's seed and the config's
options; it returns the model and the data, and commlmo shards the data.
"""

import torch
from torch import nn


def noisy_linear(*, seed: int, features: int = 32, samples: int = 4096, noise: float = 0.1):
    """Regression y = x W* + noise; the model is one linear layer (plus a bias, sent to AdamW)."""
    data = torch.Generator().manual_seed(1234)  # the data set is the same whatever the run seed
    x = torch.randn(samples, features, generator=data)
    w_star = torch.randn(features, 4, generator=data) / features**0.5
    y = x @ w_star + noise * torch.randn(samples, 4, generator=data)
    torch.manual_seed(seed)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(features, 64), nn.Tanh(), nn.Linear(64, 4))
    split = samples * 9 // 10
    return model, (x[:split], y[:split], x[split:], y[split:])
