"""reconcile is pure: table-driven tests on hand-built Signatures (no torch tensors, no IO)."""

from __future__ import annotations

import json

import pytest

from resumer.core.errors import UsageError
from resumer.core.plan import Action, Plan, Policy, Section
from resumer.core.reconcile import reconcile
from resumer.core.renames import parse_renames
from resumer.core.signature import (
    OptimizerSpec,
    ParamGroupSpec,
    ParamState,
    SchedulerSpec,
    Signature,
    StateEntry,
    TensorSpec,
)

ADAM = "torch.optim.adam.Adam"


def t(name: str, *shape: int, dtype: str = "float32", kind: str = "parameter") -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(shape), dtype=dtype, kind=kind)


def sig(tensors: list[TensorSpec], *, opt: str | None = ADAM, groups: list[list[str]] | None = None,
        state: bool = True, scheduler: str | None = None, lr: float = 0.01) -> Signature:
    params = [x.name for x in tensors if x.kind == "parameter"]
    groups = groups if groups is not None else [params]
    spec = None
    if opt:
        spec = OptimizerSpec(
            cls=opt,
            groups=tuple(ParamGroupSpec(params=tuple(g), hyperparams=(("lr", lr),)) for g in groups),
            state=tuple(ParamState(param=p.name, entries=(StateEntry(key="exp_avg", shape=p.shape, dtype=p.dtype),
                                                          StateEntry(key="step", shape=(), dtype="float32")))
                        for p in tensors if p.kind == "parameter") if state else ())
    sched = SchedulerSpec(cls=scheduler, num_groups=len(groups)) if scheduler else None
    return Signature(tensors=tuple(tensors), optimizer=spec, scheduler=sched, step=100, rng=("torch",))


BASE = [t("0.weight", 8, 4), t("0.bias", 8), t("2.weight", 2, 8), t("2.bias", 2)]
SAVED = sig(BASE, scheduler="StepLR")


def current(tensors: list[TensorSpec], **kw: object) -> Signature:
    kw.setdefault("state", False)
    kw.setdefault("scheduler", "StepLR")
    return sig(tensors, **kw)  # type: ignore[arg-type]


# difference -> current signature, {policy: ok}
CASES = {
    "identical": (current(BASE), {"strict": True, "partial": True, "reset-optimizer": True}),
    "resized": (current([*BASE[:2], t("2.weight", 3, 8), t("2.bias", 3)]),
                {"strict": False, "partial": True, "reset-optimizer": False}),
    "added": (current([*BASE, t("4.weight", 2, 2)]), {"strict": False, "partial": True, "reset-optimizer": False}),
    "removed": (current(BASE[:2]), {"strict": False, "partial": True, "reset-optimizer": False}),
    "dtype": (current([t(x.name, *x.shape, dtype="bfloat16") for x in BASE]),
              {"strict": False, "partial": True, "reset-optimizer": False}),
    "optimizer-class": (current(BASE, opt="torch.optim.sgd.SGD"),
                        {"strict": False, "partial": True, "reset-optimizer": True}),
    "scheduler-class": (current(BASE, scheduler="CosineAnnealingLR"),
                        {"strict": False, "partial": True, "reset-optimizer": True}),
    "nothing-matches": (current([t("a", 1), t("b", 2)]), {"strict": False, "partial": False,
                                                         "reset-optimizer": False}),
}


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("case", list(CASES))
def test_policy_table(case: str, policy: Policy) -> None:
    cur, expected = CASES[case]
    plan = reconcile(SAVED, cur, policy)
    assert plan.ok is expected[policy.value], plan.describe()
    # Each refusal reads as a sentence and the JSON form is stable and serialisable.
    for r in plan.refusals:
        assert ": " in str(r)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["format"] == "resumer-plan" and d["version"] == 1 and d["ok"] is plan.ok
    assert Plan.from_dict(d) == plan


def test_every_saved_and_current_tensor_is_accounted_for() -> None:
    cur = current([t("0.weight", 8, 4), t("2.weight", 3, 8), t("new", 5)])
    plan = reconcile(SAVED, cur, "partial")
    model = plan.section(Section.MODEL)
    saved_names = {e.source for e in model if e.source}
    assert saved_names == {x.name for x in BASE}  # every saved tensor: loaded, mismatched or dropped
    assert {e.name for e in model if e.action is not Action.DROP} == {"0.weight", "2.weight", "new"}
    assert {e.name: e.action for e in model} == {"0.weight": Action.LOAD, "2.weight": Action.SHAPE_MISMATCH,
                                                 "0.bias": Action.DROP, "2.bias": Action.DROP,
                                                 "new": Action.INIT_FRESH}


def test_strict_refusal_message_lists_differences_and_the_fix() -> None:
    cur = current([t("0.weight", 8, 4), t("0.bias", 8), t("3.weight", 2, 8), t("3.bias", 2)],
                  opt="torch.optim.sgd.SGD")
    plan = reconcile(SAVED, cur, "strict", checkpoint="s3://runs/a/step-0000001200")
    text = plan.describe_refusal()
    assert text.splitlines()[0] == ("Cannot resume s3://runs/a/step-0000001200 under policy 'strict': "
                                    "5 differences")
    assert "  - model '3.weight': missing in checkpoint; '2.weight' has the same shape (renamed? index shift?)" in text
    assert "  - optimizer 'optimizer': Adam saved, SGD now" in text
    assert text.endswith("To resume: --rename auto --policy reset-optimizer")


def test_reset_optimizer_keeps_step_and_resets_scheduler() -> None:
    plan = reconcile(SAVED, current(BASE), "reset-optimizer")
    assert plan.ok
    assert plan.optimizer_action() is Action.RESET
    assert plan.entry(Section.SCHEDULER, "scheduler").action is Action.RESET
    assert plan.entry(Section.STEP, "step").action is Action.KEEP and plan.step == 100


def test_optimizer_state_follows_explicit_rename() -> None:
    cur = current([t("enc.weight", 8, 4), t("enc.bias", 8), t("2.weight", 2, 8), t("2.bias", 2)])
    plan = reconcile(SAVED, cur, "strict", {r"^0\.": "enc."})
    assert plan.ok, plan.describe()
    e = plan.entry(Section.OPTIMIZER_STATE, "enc.weight")
    assert (e.action, e.source) == (Action.CARRY, "0.weight")
    assert plan.entry(Section.MODEL, "enc.weight").action is Action.LOAD_RENAMED
    assert plan.renames[0].evidence == "explicit rule"


def test_rename_collision_is_refused() -> None:
    plan = reconcile(SAVED, current(BASE), "partial", {r"\.(weight|bias)$": ".x"})
    assert any(r.subject == "renames" and "both renamed to" in r.problem for r in plan.refusals)


def test_auto_index_shift_even_where_names_coincide() -> None:
    """Two parameterless layers inserted: saved 4.* now sits at 6.*, and the current 4.* is saved 2.*."""
    saved = sig([t("0.weight", 8, 4), t("2.weight", 8, 8), t("4.weight", 2, 8)], scheduler="StepLR")
    cur = current([t("0.weight", 8, 4), t("4.weight", 8, 8), t("6.weight", 2, 8)])
    plan = reconcile(saved, cur, "strict", "auto")
    assert plan.ok, plan.describe()
    assert {r.source: r.target for r in plan.renames} == {"2.weight": "4.weight", "4.weight": "6.weight"}
    # Without auto, strict refuses: '4.weight' would otherwise load the wrong layer.
    assert not reconcile(saved, cur, "strict").ok


def test_auto_does_not_guess_when_ambiguous() -> None:
    # Two unmatched saved tensors of the same shape could each be the one new name: 'wrap.fc.weight' is saved
    # 'fc.weight' wrapped under 'wrap', or saved 'wrap.weight' with 'fc' inserted. No inference.
    saved = sig([t("fc.weight", 4, 4), t("wrap.weight", 4, 4)])
    cur = current([t("wrap.fc.weight", 4, 4)])
    plan = reconcile(saved, cur, "strict", "auto")
    assert not plan.renames and not plan.ok
    # One saved tensor, two new names it could have been wrapped into: no inference either.
    saved = sig([t("fc.weight", 4, 4)])
    cur = current([t("a.fc.weight", 4, 4), t("b.fc.weight", 4, 4)])
    plan = reconcile(saved, cur, "strict", "auto")
    assert not plan.renames and not plan.ok
    # Same indices as a shift (0, 2 saved; 1, 3 now) but the shapes come in the other order: the layers
    # were reordered or replaced, not shifted. No inference.
    saved = sig([t("0.weight", 4, 4), t("2.weight", 8, 4)])
    cur = current([t("1.weight", 8, 4), t("3.weight", 4, 4)])
    plan = reconcile(saved, cur, "strict", "auto")
    assert not plan.renames and not plan.ok
    # A layer added in a Sequential (lengths differ) is not an index shift.
    saved = sig([t("0.weight", 4, 4), t("2.weight", 4, 4)])
    cur = current([t("0.weight", 4, 4), t("1.weight", 4, 4), t("3.weight", 4, 4)])
    plan = reconcile(saved, cur, "strict", "auto")
    assert not plan.renames and not plan.ok


def test_auto_wrapping_and_unwrapping() -> None:
    wrapped = current([t("model." + x.name, *x.shape) for x in BASE])
    plan = reconcile(SAVED, wrapped, "strict", "auto")
    assert plan.ok and len(plan.renames) == 4
    assert all(r.auto and "wrapped" in r.rule for r in plan.renames)
    saved = sig([t("model." + x.name, *x.shape) for x in BASE], scheduler="StepLR")
    plan = reconcile(saved, current(BASE), "strict", "auto")
    assert plan.ok and all("unwrapped 'model'" in r.rule for r in plan.renames)


def test_new_param_group_strict_refuses_partial_uses_code_hyperparameters() -> None:
    cur = current(BASE, groups=[["0.weight", "0.bias"], ["2.weight", "2.bias"]])
    strict = reconcile(SAVED, cur, "strict")
    assert [r.subject for r in strict.refusals] == ["optimizer param group 0", "optimizer param group 1",
                                                    "optimizer saved param group 0", "scheduler 'scheduler'"]
    assert str(strict.refusals[-1]) == "scheduler 'scheduler': drives 1 param groups saved, 2 now"
    assert strict.suggestion == "--policy reset-optimizer"
    partial = reconcile(SAVED, cur, "partial")
    assert partial.ok
    assert partial.entry(Section.OPTIMIZER_GROUP, "group 1").action is Action.FRESH
    assert partial.counts()["optimizer_carried"] == 4


def test_hyperparameter_differences_are_shown() -> None:
    plan = reconcile(SAVED, current(BASE, lr=0.5), "strict")
    assert plan.entry(Section.OPTIMIZER_GROUP, "group 0").reason == (
        "saved hyperparameters restored (lr 0.01 saved, 0.5 in code)")


def test_no_optimizer_in_checkpoint() -> None:
    saved = sig(BASE, opt=None)
    assert not reconcile(saved, current(BASE), "strict").ok
    assert reconcile(saved, current(BASE), "reset-optimizer").ok
    p = reconcile(saved, current(BASE), "partial")
    assert p.ok and p.optimizer_action() is Action.FRESH


def test_parse_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="Unknown policy 'lenient'. Choose one of: strict, partial, reset-optimizer"):
        Policy.parse("lenient")
    with pytest.raises(UsageError, match="write OLD_REGEX=NEW"):
        parse_renames(["no-equals-sign"])
    with pytest.raises(UsageError, match="Bad rename"):
        parse_renames({"(unclosed": "x"})
    assert parse_renames(["auto", "a=b"]).auto


def test_world_size_change_is_noted() -> None:
    saved = Signature(tensors=tuple(BASE), step=1, world_size=4)
    cur = Signature(tensors=tuple(BASE), world_size=2)
    assert "world size 4 saved, 2 now" in reconcile(saved, cur).notes


def test_per_rank_rng_is_restored_per_rank_only_at_the_saved_world_size_and_the_plan_says_so() -> None:
    saved = Signature(tensors=tuple(BASE), step=1, rng=("cpu",), world_size=2, rng_ranks=2)
    same = reconcile(saved, Signature(tensors=tuple(BASE), world_size=2))
    assert [e.reason for e in same.entries if e.section is Section.RNG] == ["restored on each rank, its own"]
    assert not any("world size" in n for n in same.notes)
    other = reconcile(saved, Signature(tensors=tuple(BASE), world_size=1))
    assert [e.reason for e in other.entries if e.section is Section.RNG] == [
        "restored on every rank, rank 0's (saved per rank for 2 ranks)"]
    assert ("world size 2 saved, 1 now: each of the 2 ranks' RNG state was saved, and every rank now restores "
            "rank 0's") in other.notes
    assert Signature.from_dict(saved.to_dict()) == saved
    assert "rng_ranks" not in Signature(tensors=tuple(BASE)).to_dict()  # digests of other plans unchanged


def test_suggestion_never_drops_what_a_rename_would_keep() -> None:
    """``partial`` would resume, but would drop 'enc.weight' while 'backbone.weight' (same shape) starts fresh."""
    saved = sig([t("enc.weight", 4, 4), t("head.weight", 2, 4)], opt=None)
    current = sig([t("backbone.weight", 4, 4), t("head.weight", 2, 4)], opt=None)
    plan = reconcile(saved, current, "strict")
    assert plan.suggestion == ("--rename OLD=NEW for what was renamed: 1 saved tensor(s) would be dropped while "
                               "current ones of the same shape start fresh (e.g. saved 'enc.weight', current "
                               "'backbone.weight')")
    partial = reconcile(saved, current, "partial")
    assert partial.ok and any("renamed? Try --rename auto, or --rename OLD=NEW" in n for n in partial.notes)
    renamed = reconcile(saved, current, "strict", {"^enc\\.": "backbone."})
    assert renamed.ok


def test_auto_infers_nested_wrapping_only_when_unambiguous() -> None:
    saved = sig([t("h.0.attn.weight", 4, 4), t("h.1.attn.weight", 4, 4)], opt=None)
    nested = sig([t("base.model.h.0.attn.base_layer.weight", 4, 4),
                  t("base.model.h.1.attn.base_layer.weight", 4, 4)], opt=None)
    plan = reconcile(saved, nested, "strict", "auto")
    assert plan.ok
    assert {r.source: r.target for r in plan.renames} == {
        "h.0.attn.weight": "base.model.h.0.attn.base_layer.weight",
        "h.1.attn.weight": "base.model.h.1.attn.base_layer.weight"}
    ambiguous = sig([t("base.h.0.attn.a.weight", 4, 4), t("base.h.0.attn.b.weight", 4, 4),
                     t("base.h.1.attn.base_layer.weight", 4, 4)], opt=None)
    plan = reconcile(saved, ambiguous, "partial", "auto")
    assert [(r.source, r.target) for r in plan.renames] == [
        ("h.1.attn.weight", "base.h.1.attn.base_layer.weight")]


def test_plan_json_round_trips_exactly_and_refuses_what_it_cannot_read() -> None:
    saved = sig([t("enc.weight", 4, 4), t("norm.weight", 4), t("head.weight", 2, 4)])
    current = sig([t("backbone.weight", 4, 4), t("norm.weight", 4), t("head.weight", 3, 4)])
    plans = [reconcile(saved, current, "strict", checkpoint="s3://b/run/step-0000000007"),
             reconcile(saved, current, "partial", {"^enc\\.": "backbone."}, checkpoint="/r/step-0000000007"),
             reconcile(saved, current, "partial")]
    positional = Plan(policy=Policy.PARTIAL, checkpoint=None, step=3, entries=(),
                      positions=(("a.weight", "#0"), ("b.weight", "#1")))
    for plan in [*plans, positional]:
        back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
        assert back == plan
    assert plans[0].refusals and plans[0].suggestion and any(e.refused for e in plans[0].entries)
    assert plans[1].renames and plans[2].notes
    minimal = Plan.from_dict({"format": "resumer-plan", "version": 1, "policy": "strict", "entries": [
        {"section": "model", "name": "x", "action": "load"}]})
    assert minimal.entries[0].reason == "" and minimal.entries[0].refused is False
    assert (minimal.renames, minimal.refusals, minimal.notes, minimal.positions) == ((), (), (), ())
    for bad in ({"format": "resumer-plan", "version": 2, "policy": "strict", "entries": []},
                {"format": "other", "version": 1, "policy": "strict", "entries": []},
                {"policy": "strict", "entries": []}):
        with pytest.raises(UsageError, match="Not a resumer plan of version <= 1"):
            Plan.from_dict(bad)


def test_positional_state_that_no_group_lists_is_refused_not_a_crash() -> None:
    saved_tensors = [t("a.weight", 4, 4), t("b.weight", 4)]
    groups = (ParamGroupSpec(params=("#0", "#1")),)
    state = tuple(ParamState(param=k, entries=(StateEntry(key="exp_avg", shape=s),))
                  for k, s in (("#0", (4, 4)), ("#1", (4,)), ("#7", (4,))))
    saved = Signature(tensors=tuple(saved_tensors), optimizer=OptimizerSpec(cls=ADAM, groups=groups, state=state,
                                                                            positional=True))
    plan = reconcile(saved, sig(saved_tensors))
    assert not plan.ok
    assert "position 7 holds state but no param group lists it" in str(plan.refusals[0])


def test_every_positional_state_entry_must_fit_its_parameter() -> None:
    """Not only the first: a second moment of another shape would crash the first step after the resume."""
    saved_tensors = [t("a.weight", 4, 4), t("b.weight", 4)]
    groups = (ParamGroupSpec(params=("#0", "#1")),)
    good = (StateEntry(key="exp_avg", shape=(4, 4)), StateEntry(key="exp_avg_sq", shape=(4, 4)))
    bad = (StateEntry(key="exp_avg", shape=(4, 4)), StateEntry(key="exp_avg_sq", shape=(2, 8)))
    for entries, ok in ((good, True), (bad, False)):
        state = (ParamState(param="#0", entries=entries),
                 ParamState(param="#1", entries=(StateEntry(key="exp_avg", shape=(4,)),)))
        saved = Signature(tensors=tuple(saved_tensors),
                          optimizer=OptimizerSpec(cls=ADAM, groups=groups, state=state, positional=True))
        plan = reconcile(saved, sig(saved_tensors))
        assert plan.ok is ok
        if not ok:
            assert "the state at position 0 has shape [2, 8]" in str(plan.refusals[0])


def test_positional_state_falling_on_a_new_parameter_names_the_position() -> None:
    """A position the current optimizer gives to a parameter the checkpoint lacks: nothing is guessed."""
    saved_tensors = [t("a.weight", 4, 4), t("b.weight", 4)]
    groups = (ParamGroupSpec(params=("#0", "#1")),)
    state = tuple(ParamState(param=k, entries=(StateEntry(key="exp_avg", shape=s),))
                  for k, s in (("#0", (4, 4)), ("#1", (4,))))
    saved = Signature(tensors=tuple(saved_tensors), optimizer=OptimizerSpec(cls=ADAM, groups=groups, state=state,
                                                                            positional=True))
    plan = reconcile(saved, sig([t("a.weight", 4, 4), t("c.weight", 4)]), "partial")
    (entry,) = plan.section(Section.OPTIMIZER)
    assert entry.action is Action.RESET
    assert ("optimizer state is keyed by position; position 1 falls on the current parameter 'c.weight', which the "
            "checkpoint's model does not hold") in entry.reason
    assert not any(e.action is Action.CARRY for e in plan.section(Section.OPTIMIZER_STATE))


def test_refusal_message_lists_at_most_25_and_json_keeps_every_refusal() -> None:
    many = [t(f"layer{i}.weight", 4) for i in range(30)]
    plan = reconcile(sig(many, opt=None), sig([], opt=None), checkpoint="/r/step-0000000100")
    assert len(plan.refusals) == 30 and not plan.ok
    text = plan.describe_refusal()
    assert text.startswith("Cannot resume /r/step-0000000100 under policy 'strict': 30 differences")
    assert sum(line.startswith("  - ") for line in text.splitlines()) == 25
    assert "  ... and 5 more (see the full plan: --json)" in text.splitlines()
    d = plan.to_dict()
    assert d["summary"] == plan.summary()
    assert [r["text"] for r in d["refusals"]] == [str(r) for r in plan.refusals]
    assert d["refusals"][0]["text"].startswith("model 'layer0.weight': ")


def test_plan_entry_describes_itself() -> None:
    from resumer.core.plan import PlanEntry

    plain = PlanEntry(section=Section.MODEL, name="a.weight", action=Action.LOAD)
    assert plain.describe() == "model 'a.weight': load"
    moved = PlanEntry(section=Section.MODEL, name="b.weight", action=Action.LOAD_RENAMED, source="a.weight",
                      reason="rule ^a -> b")
    assert moved.describe() == "model 'b.weight': load-renamed from 'a.weight' (rule ^a -> b)"


def test_auto_index_shift_in_a_nested_container_and_the_rule_names_it() -> None:
    """An activation inserted in 'blocks.0.mlp': only that container's later children move; the outer
    containers (whose indices did not change) are looked past, not a reason to stop looking."""
    saved = sig([t("blocks.0.mlp.0.weight", 8, 4), t("blocks.0.mlp.2.weight", 4, 8), t("head.0.weight", 2, 4)],
                scheduler="StepLR")
    cur = current([t("blocks.0.mlp.0.weight", 8, 4), t("blocks.0.mlp.3.weight", 4, 8), t("head.0.weight", 2, 4)])
    plan = reconcile(saved, cur, "strict", "auto")
    assert plan.ok, plan.describe()
    (r,) = plan.renames
    assert (r.source, r.target) == ("blocks.0.mlp.2.weight", "blocks.0.mlp.3.weight")
    assert r.rule == "auto: index shift in 'blocks.0.mlp'"
    assert r.evidence == ("children of 'blocks.0.mlp' with parameters [0, 2] saved, [0, 3] now; same order, names, "
                          "shapes and dtypes")
    top = reconcile(sig([t("0.weight", 8, 4), t("2.weight", 2, 8)]), current([t("0.weight", 8, 4),
                                                                             t("3.weight", 2, 8)]), "strict", "auto")
    assert [r.rule for r in top.renames] == ["auto: index shift in the top-level module"]


@pytest.mark.parametrize(("saved_name", "current_name", "rule"), [
    ("fc.weight", "fc.inner.weight", "auto: wrapped 'fc.*' under 'inner'"),
    ("fc.weight", "model.fc.weight", "auto: wrapped '*' under 'model'"),
    ("q.weight", "base_model.model.q.base_layer.weight",  # peft LoRA
     "auto: wrapped 'base_model.model' at the front, then 'base_layer' after 'q'"),
    ("base_model.model.q.base_layer.weight", "q.weight",
     "auto: unwrapped 'base_model.model' at the front, then 'base_layer' after 'q'"),
    ("base_model.model.q.weight", "q.weight", "auto: unwrapped 'base_model.model'"),
    ("fc.weight", "fc.weight.inner.weight", "auto: wrapped 'fc.*' under 'weight.inner'"),  # the leaf stays the leaf
])
def test_auto_wrapping_rule_says_what_was_inserted_or_removed(saved_name: str, current_name: str, rule: str) -> None:
    plan = reconcile(sig([t(saved_name, 4, 4)]), sig([t(current_name, 4, 4)]), "strict", "auto")
    assert plan.ok, plan.describe()
    assert [(r.source, r.target, r.rule) for r in plan.renames] == [(saved_name, current_name, rule)]


def test_rename_rules_describe_themselves() -> None:
    assert parse_renames(None).describe() == "none"
    assert parse_renames([r"^enc\.=backbone.", "auto"]).describe() == r"^enc\.=backbone., auto"


def test_a_second_saved_tensor_renamed_onto_a_loaded_one_is_dropped_and_strict_refuses_it() -> None:
    saved = sig([t("a", 4), t("b", 4)], opt=None)
    for policy in ("strict", "partial"):
        plan = reconcile(saved, Signature(tensors=(t("x", 4),)), policy, {"^a$": "x", "^b$": "x"})
        drop = plan.entry(Section.MODEL, "b")
        assert (drop.action, drop.reason) == (Action.DROP, "'x' is already loaded from another saved tensor")
        assert drop.refused is (policy == "strict")
        assert any(r.subject == "model 'b'" for r in plan.refusals) is (policy == "strict")


def test_nothing_matching_under_partial_is_refused_for_the_model() -> None:
    plan = reconcile(SAVED, current([t("a", 1), t("b", 2)]), "partial")
    assert [(r.subject, r.problem) for r in plan.refusals] == [
        ("model", "nothing in the checkpoint matches the current model by name and shape, so nothing would load")]


def test_model_entries_say_what_becomes_of_each_tensor() -> None:
    cur = current([*BASE[:3], t("2.bias", 3), t("new", 5)])
    partial = reconcile(SAVED, cur, "partial")
    assert partial.entry(Section.MODEL, "2.bias").reason == "shape differs: keeps the code's init"
    assert partial.entry(Section.MODEL, "new").reason == "missing in checkpoint; keeps the code's init"
    strict = reconcile(SAVED, cur, "strict")
    assert strict.entry(Section.MODEL, "2.bias").reason == "shape differs: cannot be loaded"
    assert strict.entry(Section.MODEL, "new").reason == "missing in checkpoint"  # nothing is kept: it refuses


def test_tied_entries_record_the_layout_and_whether_the_tensor_loads() -> None:
    saved = Signature(tensors=(TensorSpec(name="embed.weight", shape=(10, 6), dtype="float32",
                                          aliases=("head.weight",)),), step=1)
    untied = Signature(tensors=(t("embed.weight", 10, 6), t("head.weight", 10, 6)))
    head = reconcile(saved, untied, "partial").entry(Section.MODEL, "head.weight")
    assert (head.action, head.source, head.saved, head.current) == (
        Action.LOAD, "embed.weight", "float32[10, 6]", "float32[10, 6]")
    # Tied now, but the tensor does not load (another shape): the alias shares that fate and says so.
    tied_now = Signature(tensors=(TensorSpec(name="embed.weight", shape=(12, 6), dtype="float32",
                                             aliases=("head.weight",)),))
    alias = reconcile(saved, tied_now, "partial").entry(Section.MODEL, "head.weight")
    assert (alias.action, alias.source) == (Action.TIED, None)
    assert alias.reason == "tied to 'embed.weight' (the same tensor): not loaded: keeps the code's init with it"


def test_optimizer_entries_give_their_reasons_and_counts() -> None:
    plan = reconcile(SAVED, current(BASE), "strict")
    opt = plan.entry(Section.OPTIMIZER, "optimizer")
    assert (opt.action, opt.reason) == (Action.CARRY, "Adam state carried by name for 4/4 parameters")
    assert plan.entry(Section.OPTIMIZER_STATE, "0.weight").reason == "state carried by name"
    partial = reconcile(SAVED, current([*BASE[:3], t("2.bias", 3)]), "partial")
    assert partial.entry(Section.OPTIMIZER, "optimizer").reason == "Adam state carried by name for 3/4 parameters"
    reset = reconcile(SAVED, current(BASE), "reset-optimizer").entry(Section.OPTIMIZER, "optimizer")
    assert reset.reason == "policy reset-optimizer: fresh Adam state from the code"
    sgd = reconcile(SAVED, current(BASE, opt="torch.optim.sgd.SGD"), "partial").entry(Section.OPTIMIZER, "optimizer")
    assert (sgd.action, sgd.reason) == (Action.RESET, "Adam saved, SGD now: fresh state from the code")


def test_a_loaded_parameter_the_saved_optimizer_did_not_hold_starts_fresh_and_strict_refuses() -> None:
    saved = sig(BASE, groups=[["0.weight", "0.bias", "2.weight"]])
    for policy in ("strict", "partial"):
        plan = reconcile(saved, current(BASE), policy)
        e = plan.entry(Section.OPTIMIZER_STATE, "2.bias")
        assert (e.action, e.reason) == (Action.FRESH, "parameter was not in the saved optimizer")
        assert e.refused is (policy == "strict")
        assert any(r.subject == "optimizer-state '2.bias'" for r in plan.refusals) is (policy == "strict")


def test_saved_optimizer_state_left_over_is_dropped_with_why() -> None:
    # Loaded into the model but no longer optimized: strict refuses (state would be lost).
    cur = current(BASE, groups=[["0.weight", "0.bias", "2.weight"]])
    for policy in ("strict", "partial"):
        plan = reconcile(SAVED, cur, policy)
        e = plan.entry(Section.OPTIMIZER_STATE, "2.bias")
        assert (e.action, e.reason, e.refused) == (Action.DROP, "parameter no longer optimized", policy == "strict")
    # Not loaded into the model at all: the model section refuses it already, the state drop does not again.
    plan = reconcile(SAVED, current(BASE[:3]), "strict")
    e = plan.entry(Section.OPTIMIZER_STATE, "2.bias")
    assert (e.action, e.reason, e.refused) == (Action.DROP, "parameter not loaded into the model", False)


def test_a_saved_param_group_without_counterpart_is_dropped_by_name_with_why() -> None:
    saved = sig(BASE, groups=[["0.weight", "0.bias"], ["2.weight", "2.bias"]], scheduler="StepLR")
    plan = reconcile(saved, current(BASE, groups=[["0.weight", "0.bias"]]), "partial")
    e = plan.entry(Section.OPTIMIZER_GROUP, "saved group 1")
    assert (e.action, e.source) == (Action.DROP, "group 1")
    assert e.reason == "saved param group has no counterpart in the current optimizer"
    sched = plan.entry(Section.SCHEDULER, "scheduler")
    assert (sched.action, sched.reason) == (Action.FRESH, "drives 2 param groups saved, 1 now: fresh from the code")


def test_the_scheduler_resets_with_an_optimizer_whose_positional_state_cannot_be_mapped() -> None:
    saved_tensors = [t("a.weight", 4, 4), t("b.weight", 4)]
    groups = (ParamGroupSpec(params=("#0", "#1")),)
    state = tuple(ParamState(param=k, entries=(StateEntry(key="exp_avg", shape=s),))
                  for k, s in (("#0", (4, 4)), ("#1", (4,))))
    saved = Signature(tensors=tuple(saved_tensors), optimizer=OptimizerSpec(cls=ADAM, groups=groups, state=state,
                                                                            positional=True),
                      scheduler=SchedulerSpec(cls="StepLR", num_groups=1))
    plan = reconcile(saved, sig([t("a.weight", 4, 4), t("c.weight", 4)], scheduler="StepLR"), "partial")
    assert plan.optimizer_action() is Action.RESET
    assert plan.entry(Section.SCHEDULER, "scheduler").action is Action.RESET


def test_the_step_entry_says_where_training_continues() -> None:
    e = reconcile(SAVED, current(BASE)).entry(Section.STEP, "step")
    assert (e.action, e.reason) == (Action.KEEP, "training continues after step 100")
