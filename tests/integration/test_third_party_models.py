"""Real third-party model code: GPT-2's tied head (transformers) and peft's LoRA, which wraps twice at once.

Both are built from configs (no downloads). What is pinned: every tied alias is in the plan with its fate;
``auto`` infers LoRA's nested wrapping, so the frozen base weights load instead of staying at random init; and
a refused plan never suggests a policy that would drop saved weights a rename could keep.
"""

from __future__ import annotations

import os

import pytest
import torch

import resumer
from resumer.core.plan import Action, Section

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    root = str(tmp_path_factory.mktemp("gpt2"))
    resumer.save_checkpoint(root, 1, model, opt)
    return root, {k: v.detach().clone() for k, v in model.state_dict().items()}


def lora(model: torch.nn.Module) -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    return peft.get_peft_model(model, config)


def test_gpt2_tied_head_is_in_the_plan(saved: tuple[str, dict[str, torch.Tensor]]) -> None:
    root, _ = saved
    model = gpt2()
    plan = resumer.plan(root, model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert plan.ok
    head = plan.entry(Section.MODEL, "lm_head.weight")
    assert head.action is Action.TIED
    assert head.reason == ("tied to 'transformer.wte.weight' (the same tensor): loaded with it from "
                           "'transformer.wte.weight'")
    assert plan.counts()["tied"] == 1


def test_lora_nested_wrapping_is_inferred_and_base_weights_load(saved: tuple[str, dict[str, torch.Tensor]]) -> None:
    root, weights = saved
    model = lora(gpt2())
    trainable = [p for p in model.parameters() if p.requires_grad]
    strict = resumer.plan(root, model, torch.optim.AdamW(trainable, lr=1e-3))
    assert not strict.ok
    # partial alone would drop the base attention weights while same-shape ones start fresh: never suggested
    assert strict.suggestion == "--rename auto --policy partial"
    lossy = resumer.plan(root, model, policy="partial")
    assert any("dropped while a current tensor of the same shape starts fresh" in n for n in lossy.notes)

    res = resumer.resume(root, model, torch.optim.AdamW(trainable, lr=1e-3), policy="partial", renames="auto")
    wrapped = {r.source: r for r in res.plan.renames}
    rule = wrapped["transformer.h.0.attn.c_attn.weight"]
    assert rule.target == "base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"
    assert rule.rule == "auto: wrapped 'base_model.model' at the front, then 'base_layer' after 'c_attn'"
    assert res.plan.counts()["dropped"] == 0
    live = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, value in weights.items():
        target = next((r.target for r in res.plan.renames if r.source == name), None)
        if target is None:
            continue  # the tied lm_head alias: checked through wte
        assert torch.equal(live[target], value), name
    fresh = [e.name for e in res.plan.section(Section.MODEL) if e.action is Action.INIT_FRESH]
    assert fresh and all(".lora_" in n for n in fresh)


def test_never_suggests_dropping_what_a_rename_keeps(saved: tuple[str, dict[str, torch.Tensor]]) -> None:
    """LoRA injected in place (no PeftModel prefix): ``partial`` alone would resume, but would drop every saved
    c_attn weight while its same-shape ``base_layer`` starts fresh, so the rename is what gets suggested."""
    root, weights = saved
    model = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True), gpt2())
    partial = resumer.plan(root, model, policy="partial")
    assert partial.ok and partial.counts()["dropped"] == 4  # c_attn weight and bias in 2 layers
    strict = resumer.plan(root, model)
    assert strict.suggestion == "--rename auto --policy partial"
    res = resumer.resume(root, model, policy="partial", renames="auto")
    assert res.plan.counts()["dropped"] == 0
    assert torch.equal(model.transformer.h[1].attn.c_attn.base_layer.weight,
                       weights["transformer.h.1.attn.c_attn.weight"])
