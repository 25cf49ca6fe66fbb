"""Training entry used by the resume-equivalence tests; each mode runs in its own process.

    python train_script.py MODEL straight K OUT          train steps 1..K
    python train_script.py MODEL first J ROOT OUT        train 1..J, save_checkpoint at J
    python train_script.py MODEL resume K ROOT OUT       resume from ROOT, train J+1..K
OUT receives (losses, model state_dict, optimizer state_dict, scheduler state_dict) via torch.save.
Data and dropout draw from the GLOBAL RNG, so the RNG restore is part of what is tested.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import resumer
from resumer import examples as ex


def build(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(1234)
    if kind == "mlp":
        model = ex.mlp_v2_dropout()
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        model = ex.cnn()
        opt = torch.optim.SGD(model.parameters(), lr=5e-2, momentum=0.9, weight_decay=1e-4)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def step(kind: str, model: nn.Module, opt: torch.optim.Optimizer, sched) -> float:  # noqa: ANN001
    if kind == "mlp":
        x = torch.randn(16, ex.IN)
        y = torch.sin(x[:, : ex.OUT])
    else:
        x = torch.randn(8, 3, 6, 6)
        y = torch.randn(8, 4)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss)


def main(argv: list[str]) -> None:
    kind, mode, n = argv[0], argv[1], int(argv[2])
    model, opt, sched = build(kind)
    start = 1
    if mode == "resume":
        start = resumer.resume(argv[3], model, opt, sched).step + 1  # RNG comes from the checkpoint
    else:
        torch.manual_seed(99)
    losses = [step(kind, model, opt, sched) for _ in range(start, n + 1)]
    if mode == "first":
        resumer.save_checkpoint(argv[3], n, model, opt, sched)
    torch.save({"losses": losses, "model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, argv[-1])


if __name__ == "__main__":
    main(sys.argv[1:])
