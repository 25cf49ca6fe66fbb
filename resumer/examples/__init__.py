"""Small models and factories used by the demo, the docs and the tests (``--model resumer.examples:mlp_v1``).

Each v2 is a code change people make between runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IN, HIDDEN, OUT = 16, 64, 4


def mlp_v1() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def mlp_v2_dropout() -> nn.Module:
    """v1 with a parameterless Dropout inserted after the first activation: later indices shift by one."""
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Dropout(0.1), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, OUT))


def mlp_v2_wider_head() -> nn.Module:
    """v1 with the output layer resized (a new task with more classes)."""
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 8))


class CNN(nn.Module):
    """A small CNN with BatchNorm (running stats and num_batches_tracked are buffers)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def cnn() -> nn.Module:
    return CNN()


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)


def step_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)


def batch(step: int, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic synthetic regression data for a given global step (data position = step)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch_size, IN, generator=g)
    y = torch.sin(x[:, :OUT] * 2) + 0.1 * torch.randn(batch_size, OUT, generator=g)
    return x, y


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, scheduler=None) -> float:  # noqa: ANN001
    """One deterministic training step on ``batch(step)``; returns the loss."""
    x, y = batch(step)
    out = model(x)
    return optimizer_step(optimizer, scheduler, nn.functional.mse_loss(out[:, : y.shape[1]], y))


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any, loss: torch.Tensor) -> float:
    """Backward, optimizer step, scheduler step; returns the loss as a float (shared by every example)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())
