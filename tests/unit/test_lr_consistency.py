"""Under ``partial``, group hyperparameters and the scheduler stay in step: the next lr is the uninterrupted run's."""

from __future__ import annotations

import pytest
import torch

import resumer
from resumer import examples as ex
from resumer.core.plan import Action, Section

J = 6


def _sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # chainable: steps from the group's lr


@pytest.fixture
def saved(tmp_path: pytest.TempPathFactory) -> tuple[str, list[float]]:
    """A run saved at step J, and the lr it would use for the next steps had it gone on."""
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = ex.adam(model)
    sched = _sched(opt)
    for step in range(1, J + 1):
        ex.train_step(model, opt, step, sched)
    root = str(tmp_path)
    resumer.save_checkpoint(root, J, model, opt, sched)
    following = []
    for step in range(J + 1, J + 4):
        following.append(opt.param_groups[0]["lr"])
        ex.train_step(model, opt, step, sched)
    return root, following


def test_resized_head_keeps_saved_lr_and_scheduler(saved: tuple[str, list[float]]) -> None:
    root, following = saved
    model = ex.mlp_v2_wider_head()
    opt = ex.adam(model)
    sched = _sched(opt)
    res = resumer.resume(root, model, opt, sched, policy="partial")
    assert res.plan.entry(Section.OPTIMIZER_GROUP, "group 0").action is Action.CARRY
    assert res.plan.entry(Section.SCHEDULER, "scheduler").action is Action.RESTORE
    lrs = []
    for step in range(J + 1, J + 4):
        lrs.append(opt.param_groups[0]["lr"])
        ex.train_step(model, opt, step, sched)
    assert lrs == following
    assert following[0] != 1e-2  # the code's initial lr would differ: the test can see a wrong restore


def test_groups_that_do_not_line_up_reset_the_scheduler_too(saved: tuple[str, list[float]]) -> None:
    root, _ = saved
    model = ex.mlp_v2_wider_head()
    opt = torch.optim.Adam(list(model.parameters())[2:], lr=1e-2)  # the first layer frozen: another group
    sched = _sched(opt)
    res = resumer.resume(root, model, opt, sched, policy="partial")
    entry = res.plan.entry(Section.SCHEDULER, "scheduler")
    assert entry.action is Action.FRESH
    assert "starts from the code's hyperparameters, so a restored scheduler would step from another learning " \
           "rate than the uninterrupted run's" in entry.reason
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == 1e-2
    strict = resumer.plan(root, model, opt, sched)
    assert strict.entry(Section.SCHEDULER, "scheduler").refused
