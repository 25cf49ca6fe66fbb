"""``resumer demo``: the whole story on a laptop, with no services.

Train a small MLP, checkpoint it, change the model the way people do (insert a Dropout: every later
nn.Sequential index shifts), show what plain PyTorch says, show the plan, resume, keep training.
"""

from __future__ import annotations

import datetime as dt
import os

import torch
from rich.console import Console

import resumer
from resumer import examples as ex
from resumer.render.text import plan_renderable


def run_demo(workdir: str, steps: int, console: Console) -> int:
    torch.manual_seed(0)
    run = os.path.join(os.path.abspath(workdir), dt.datetime.now().strftime("run-%Y%m%d-%H%M%S-%f"))
    root = os.path.join(run, "checkpoints")
    say = console.rule

    say("1. Train v1 and checkpoint every 10 steps")
    model, opt = ex.mlp_v1(), None
    opt = ex.adam(model)
    sched = ex.step_lr(opt)
    for step in range(1, steps + 1):
        loss = ex.train_step(model, opt, step, sched)
        if step % 10 == 0 or step == steps:
            uri = resumer.save_checkpoint(root, step, model, opt, sched, extra={"loss": loss})
            console.print(f"step {step:>4}  loss {loss:.4f}  saved {uri}", markup=False, highlight=False)

    say("2. The code changes: a Dropout is inserted after the first ReLU")
    v2 = ex.mlp_v2_dropout()
    try:
        v2.load_state_dict(model.state_dict())
    except RuntimeError as exc:
        first = str(exc).splitlines()
        console.print("plain load_state_dict says:", first[0], first[1].strip() if len(first) > 1 else "",
                      markup=False, highlight=False)

    say("3. resumer plan under strict, no renames")
    v2, opt2 = ex.mlp_v2_dropout(), None
    opt2 = ex.adam(v2)
    sched2 = ex.step_lr(opt2)
    refused = resumer.plan(root, v2, opt2, sched2)
    console.print(refused.describe_refusal(), markup=False, highlight=False)

    say("4. resumer plan with --rename auto")
    plan = resumer.plan(root, v2, opt2, sched2, renames="auto")
    console.print(plan_renderable(plan))

    say("5. Resume and keep training")
    res = resumer.resume(root, v2, opt2, sched2, renames="auto")
    console.print(f"resumed at step {res.step} from {res.checkpoint} ({res.bytes_read} bytes, "
                  f"{res.load_seconds * 1e3:.1f} ms); lr {opt2.param_groups[0]['lr']}", markup=False, highlight=False)
    for step in range(res.step + 1, res.step + 11):
        loss = ex.train_step(v2, opt2, step, sched2)
    console.print(f"step {res.step + 10:>4}  loss {loss:.4f} (v2, optimizer state carried by name)",
                  markup=False, highlight=False)
    last = resumer.save_checkpoint(root, res.step + 10, v2, opt2, sched2, extra={"loss": loss})
    console.print(f"saved {last}\nTry: resumer inspect {root}", markup=False, highlight=False)
    return 0
