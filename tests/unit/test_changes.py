"""Each code change people make, under each policy: the plan's content, then the weights and optimizer state.

Saved side: the example MLP (Linear-ReLU-Linear-ReLU-Linear) trained a few steps with Adam + StepLR.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resumer
from resumer import examples as ex
from resumer.core.plan import Action, Section

J = 5


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = ex.adam(model)
    sched = ex.step_lr(opt)
    for step in range(1, J + 1):
        ex.train_step(model, opt, step, sched)
    root = str(tmp_path_factory.mktemp("changes"))
    resumer.save_checkpoint(root, J, model, opt, sched)
    return root, model, opt


def adam_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return opt.state[p]


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = ex.mlp_v1()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def insert_identity() -> nn.Module:
    m = ex.mlp_v1()
    layers = list(m)
    return nn.Sequential(layers[0], layers[1], nn.Identity(), *layers[2:])


def add_layer() -> nn.Module:
    return nn.Sequential(*ex.mlp_v1(), nn.ReLU(), nn.Linear(ex.OUT, ex.OUT))


def remove_layer() -> nn.Module:
    return nn.Sequential(nn.Linear(ex.IN, ex.HIDDEN), nn.ReLU(), nn.Linear(ex.HIDDEN, ex.HIDDEN))


def bf16() -> nn.Module:
    return ex.mlp_v1().to(torch.bfloat16)


def two_groups(model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return torch.optim.Adam([{"params": params[:-2]}, {"params": params[-2:], "lr": 1e-3}], lr=1e-2)


# change -> (model factory, optimizer factory, renames, {policy: ok?})
CHANGES = {
    "unchanged": (ex.mlp_v1, ex.adam, None, {"strict": True, "partial": True, "reset-optimizer": True}),
    "insert-parameterless": (insert_identity, ex.adam, None,
                             {"strict": False, "partial": True, "reset-optimizer": False}),
    "insert-parameterless+auto": (insert_identity, ex.adam, "auto",
                                  {"strict": True, "partial": True, "reset-optimizer": True}),
    "wrapped": (Wrapped, ex.adam, None, {"strict": False, "partial": False, "reset-optimizer": False}),
    "wrapped+auto": (Wrapped, ex.adam, "auto", {"strict": True, "partial": True, "reset-optimizer": True}),
    "wrapped+explicit": (Wrapped, ex.adam, {r"^": "backbone."},
                         {"strict": True, "partial": True, "reset-optimizer": True}),
    "layer-added": (add_layer, ex.adam, None, {"strict": False, "partial": True, "reset-optimizer": False}),
    "head-resized": (ex.mlp_v2_wider_head, ex.adam, None,
                     {"strict": False, "partial": True, "reset-optimizer": False}),
    "layer-removed": (remove_layer, ex.adam, None, {"strict": False, "partial": True, "reset-optimizer": False}),
    "optimizer-switched": (ex.mlp_v1, ex.sgd, None, {"strict": False, "partial": True, "reset-optimizer": True}),
    "new-param-group": (ex.mlp_v1, two_groups, None, {"strict": False, "partial": True, "reset-optimizer": True}),
    "dtype-bf16": (bf16, ex.adam, None, {"strict": False, "partial": True, "reset-optimizer": False}),
}


@pytest.mark.parametrize("policy", ["strict", "partial", "reset-optimizer"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_policy_outcome(saved: tuple, change: str, policy: str) -> None:
    root, _, _ = saved
    factory, opt_factory, renames, expected = CHANGES[change]
    model = factory()
    opt = opt_factory(model)
    before = copy.deepcopy(model.state_dict())
    plan = resumer.plan(root, model, opt, policy=policy, renames=renames)
    assert plan.ok is expected[policy], plan.describe()
    assert plan.to_dict()["ok"] is expected[policy]
    if not plan.ok:
        with pytest.raises(resumer.PlanRefused) as info:
            resumer.resume(root, model, opt, policy=policy, renames=renames)
        assert info.value.plan.refusals == plan.refusals
        assert "Cannot resume" in str(info.value)
        for k, v in model.state_dict().items():  # a refused plan changes nothing
            assert torch.equal(v, before[k]), k
    else:
        res = resumer.resume(root, model, opt, policy=policy, renames=renames)
        assert res.step == J


def _plan(root: str, model: nn.Module, opt: torch.optim.Optimizer | None, **kw: object) -> resumer.Plan:
    return resumer.plan(root, model, opt, **kw)


def test_insert_parameterless_strict_refusal_names_the_fix(saved: tuple) -> None:
    root, _, _ = saved
    model = insert_identity()
    plan = _plan(root, model, ex.adam(model))
    texts = [str(r) for r in plan.refusals]
    assert "model '3.weight': missing in checkpoint; '2.weight' has the same shape (renamed? index shift?)" in texts
    assert any(t.startswith("model '2.weight': in the checkpoint but not in the current model") for t in texts)
    assert plan.suggestion == "--rename auto"
    assert "To resume: --rename auto" in plan.describe_refusal()


def test_insert_parameterless_auto_continues_exactly_like_the_old_model(saved: tuple) -> None:
    root, old_model, old_opt = saved
    model = insert_identity()
    opt = ex.adam(model)
    sched = ex.step_lr(opt)
    plan = _plan(root, model, opt, renames="auto")
    renamed = {e.source: e.name for e in plan.section(Section.MODEL) if e.action is Action.LOAD_RENAMED}
    assert renamed == {"2.weight": "3.weight", "2.bias": "3.bias", "4.weight": "5.weight", "4.bias": "5.bias"}
    assert all("same order" in r.evidence for r in plan.renames)
    assert plan.counts()["optimizer_carried"] == 6
    resumer.resume(root, model, opt, sched, renames="auto")
    # Continue the original model from the same state (a deep copy, resumed the same way) as the reference.
    ref = ex.mlp_v1()
    ref_opt = ex.adam(ref)
    ref_sched = ex.step_lr(ref_opt)
    resumer.resume(root, ref, ref_opt, ref_sched)
    for step in range(J + 1, J + 6):
        assert ex.train_step(model, opt, step, sched) == ex.train_step(ref, ref_opt, step, ref_sched)
    for new, old in (("0", "0"), ("3", "2"), ("5", "4")):
        assert torch.equal(model.get_submodule(new).weight, ref.get_submodule(old).weight)
        assert torch.equal(opt.state[model.get_submodule(new).weight]["exp_avg"],
                           ref_opt.state[ref.get_submodule(old).weight]["exp_avg"])


def test_insert_parameterless_partial_without_renames_loads_only_matching(saved: tuple) -> None:
    root, old, old_opt = saved
    model = insert_identity()
    init = copy.deepcopy(model.state_dict())
    opt = ex.adam(model)
    plan = _plan(root, model, opt, policy="partial")
    c = plan.counts()
    assert (c["loaded"], c["fresh"], c["dropped"]) == (2, 4, 4)
    resumer.resume(root, model, opt, policy="partial")
    assert torch.equal(model[0].weight, old[0].weight)
    assert torch.equal(model[3].weight, init["3.weight"])  # keeps the code's init, as the plan says
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], old_opt.state[old[0].weight]["exp_avg"])
    assert model[3].weight not in opt.state  # fresh: Adam initialises it at the next step


def test_wrapped_module_auto_rename(saved: tuple) -> None:
    root, old, old_opt = saved
    model = Wrapped()
    opt = ex.adam(model)
    plan = _plan(root, model, opt, renames="auto")
    assert {r.source: r.target for r in plan.renames}["0.weight"] == "backbone.0.weight"
    assert all("wrapped" in r.rule for r in plan.renames)
    resumer.resume(root, model, opt, renames="auto")
    assert torch.equal(model.backbone[4].bias, old[4].bias)
    assert torch.equal(opt.state[model.backbone[4].bias]["exp_avg_sq"], old_opt.state[old[4].bias]["exp_avg_sq"])


def test_layer_added_partial_keeps_init_for_new_layer(saved: tuple) -> None:
    root, old, old_opt = saved
    model = add_layer()
    init = copy.deepcopy(model.state_dict())
    opt = ex.adam(model)
    plan = _plan(root, model, opt)
    assert {str(r) for r in plan.refusals} == {"model '6.weight': missing in checkpoint",
                                               "model '6.bias': missing in checkpoint"}
    assert plan.suggestion == "--policy partial"
    resumer.resume(root, model, opt, policy="partial")
    assert torch.equal(model[6].weight, init["6.weight"])
    assert torch.equal(model[4].weight, old[4].weight)
    assert plan.entry(Section.OPTIMIZER_STATE, "6.weight").action is Action.FRESH


def test_head_resized(saved: tuple) -> None:
    root, old, old_opt = saved
    model = ex.mlp_v2_wider_head()
    init = copy.deepcopy(model.state_dict())
    opt = ex.adam(model)
    strict = _plan(root, model, opt)
    assert "model '4.weight': shape differs: saved float32[4, 64], now float32[8, 64]" in [str(r) for r in
                                                                                           strict.refusals]
    partial = _plan(root, model, opt, policy="partial")
    e = partial.entry(Section.MODEL, "4.weight")
    assert (e.action, e.saved, e.current) == (Action.SHAPE_MISMATCH, "float32[4, 64]", "float32[8, 64]")
    assert partial.entry(Section.OPTIMIZER_STATE, "4.weight").action is Action.FRESH
    resumer.resume(root, model, opt, policy="partial")
    assert torch.equal(model[4].weight, init["4.weight"])
    assert torch.equal(model[2].weight, old[2].weight)
    assert torch.equal(opt.state[model[2].weight]["exp_avg"], old_opt.state[old[2].weight]["exp_avg"])
    assert model[4].weight not in opt.state


def test_layer_removed_partial_drops_tensors_and_state(saved: tuple) -> None:
    root, old, _ = saved
    model = remove_layer()
    opt = ex.adam(model)
    plan = _plan(root, model, opt, policy="partial")
    dropped = {e.name for e in plan.section(Section.MODEL) if e.action is Action.DROP}
    assert dropped == {"4.weight", "4.bias"}
    assert {e.name for e in plan.section(Section.OPTIMIZER_STATE) if e.action is Action.DROP} == dropped
    resumer.resume(root, model, opt, policy="partial")
    assert torch.equal(model[2].weight, old[2].weight)


def test_optimizer_switched(saved: tuple) -> None:
    root, old, _ = saved
    model = ex.mlp_v1()
    opt = ex.sgd(model)
    strict = _plan(root, model, opt)
    assert [str(r) for r in strict.refusals] == ["optimizer 'optimizer': Adam saved, SGD now"]
    assert strict.suggestion == "--policy reset-optimizer"
    res = resumer.resume(root, model, opt, policy="reset-optimizer")
    assert res.plan.optimizer_action() is Action.RESET
    assert not opt.state  # fresh SGD
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["momentum"] == 0.9
    assert torch.equal(model[0].weight, old[0].weight)


def test_new_param_group(saved: tuple) -> None:
    root, old, old_opt = saved
    model = ex.mlp_v1()
    opt = two_groups(model)
    strict = _plan(root, model, opt)
    assert any("optimizer param group 0" in str(r) for r in strict.refusals)
    resumer.resume(root, model, opt, policy="partial")
    # State follows names whatever the grouping; the groups keep the code's hyperparameters.
    assert torch.equal(opt.state[model[4].weight]["exp_avg"], old_opt.state[old[4].weight]["exp_avg"])
    assert opt.param_groups[1]["lr"] == 1e-3


def test_dtype_change_casts_under_partial(saved: tuple) -> None:
    root, old, old_opt = saved
    model = bf16()
    opt = ex.adam(model)
    strict = _plan(root, model, opt)
    assert "model '0.weight': dtype differs: saved float32, now bfloat16" in [str(r) for r in strict.refusals]
    plan = _plan(root, model, opt, policy="partial")
    assert plan.entry(Section.MODEL, "0.weight").action is Action.CAST
    resumer.resume(root, model, opt, policy="partial")
    assert torch.equal(model[0].weight, old[0].weight.to(torch.bfloat16))
    st = opt.state[model[0].weight]
    assert st["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(st["exp_avg"], old_opt.state[old[0].weight]["exp_avg"].to(torch.bfloat16))


def test_model_only_resume_lists_optimizer_unused(saved: tuple) -> None:
    root, old, _ = saved
    model = ex.mlp_v1()
    plan = _plan(root, model, None)
    assert plan.ok
    assert plan.optimizer_action() is Action.UNUSED
    assert "not used" in plan.entry(Section.OPTIMIZER, "optimizer").reason
