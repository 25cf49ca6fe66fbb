"""Plain torch.save checkpoints: layouts, position-keyed optimizer state mapped to names, class inference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import resumer
from resumer import examples as ex
from resumer.plan import Action, Section


def trained(opt_factory=ex.adam):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = opt_factory(model)
    for step in range(1, 3):
        ex.train_step(model, opt, step)
    return model, opt


def test_bare_state_dict(tmp_path: pytest.TempPathFactory) -> None:
    model, _ = trained()
    path = str(tmp_path / "bare.pt")
    torch.save(model.state_dict(), path)
    fresh = ex.mlp_v1()
    res = resumer.resume(path, fresh)
    assert res.step == 0 and res.plan.counts()["loaded"] == 6
    assert torch.equal(fresh[2].weight, model[2].weight)


def test_common_dict_layout_carries_optimizer_by_name(tmp_path: pytest.TempPathFactory) -> None:
    model, opt = trained()
    path = str(tmp_path / "ckpt.pt")
    torch.save({"epoch": 5, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "loss": 0.125}, path)
    fresh = ex.mlp_v2_dropout()  # and the code changed: auto renames + by-name state follow it
    fresh_opt = ex.adam(fresh)
    res = resumer.resume(path, fresh, fresh_opt, renames="auto")
    assert res.step == 5 and res.extra == {"loss": 0.125}
    assert "verified by shape for 6 of 6 parameters" in " ".join(res.plan.notes)
    assert "Adam inferred" in " ".join(res.plan.notes)
    assert torch.equal(fresh_opt.state[fresh[5].weight]["exp_avg"], opt.state[model[4].weight]["exp_avg"])
    assert torch.equal(fresh_opt.state[fresh[3].bias]["exp_avg_sq"], opt.state[model[2].bias]["exp_avg_sq"])


def test_optimizer_built_in_another_order_is_detected(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = torch.optim.Adam(list(reversed(list(model.parameters()))), lr=1e-2)
    ex.train_step(model, opt, 1)
    path = str(tmp_path / "reordered.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    fresh = ex.mlp_v1()
    plan = resumer.plan(path, fresh, ex.adam(fresh))
    assert not plan.ok
    assert "cannot be tied to names" in str(plan.refusals[0])
    assert plan.suggestion == "--policy reset-optimizer"
    ok = resumer.plan(path, fresh, ex.adam(fresh), policy="reset-optimizer")
    assert ok.ok and ok.optimizer_action() is Action.RESET


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))


def test_custom_buffer_makes_positions_ambiguous(tmp_path: pytest.TempPathFactory) -> None:
    model = WithBuffer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = str(tmp_path / "buf.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    fresh = WithBuffer()
    plan = resumer.plan(path, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert "keyed by position for 2 parameters but the saved model has 3" in plan.entry(
        Section.OPTIMIZER, "optimizer").reason


def test_adam_or_adamw_ambiguity_is_said(tmp_path: pytest.TempPathFactory) -> None:
    model, opt = trained()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g.pop("decoupled_weight_decay")  # as in files from torch versions without the flag
    path = str(tmp_path / "old.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": sd}, path)
    fresh = ex.mlp_v1()
    plan = resumer.plan(path, fresh, ex.adam(fresh))
    assert plan.ok
    assert any("Adam or AdamW: the file's state and hyperparameter keys cannot tell them apart" in n
               for n in plan.notes)
    assert not resumer.plan(path, fresh, ex.sgd(fresh)).ok


def test_sgd_inferred(tmp_path: pytest.TempPathFactory) -> None:
    model, opt = trained(ex.sgd)
    path = str(tmp_path / "sgd.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    fresh = ex.mlp_v1()
    fresh_opt = ex.sgd(fresh)
    resumer.resume(path, fresh, fresh_opt)
    assert torch.equal(fresh_opt.state[fresh[0].weight]["momentum_buffer"],
                       opt.state[model[0].weight]["momentum_buffer"])


def test_unrecognised_layout_and_truncated_file(tmp_path: pytest.TempPathFactory) -> None:
    path = str(tmp_path / "odd.pt")
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(resumer.CheckpointError, match="without a model state_dict"):
        resumer.plan(path, ex.mlp_v1())
    model, _ = trained()
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(resumer.CheckpointError, match="not a readable torch.save file"):
        resumer.plan(str(cut), ex.mlp_v1())
