"""Bad requests fail with a clear message before any work, and leave every adapter weight unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_TARGETS
from peft import LoraConfig
from somf_testbed import (  # noqa: F401 (one_thread is an autouse fixture)
    TRAIN_HARMFUL,
    adapter_state,
    assert_unchanged,
    make_adapters,
    one_thread,
    pairs,
)

from peft_safety import SafetyMasks, SOMFConfig, SOMFMerger


@pytest.fixture(scope="module")
def peft_model(tokenizer):
    model = make_adapters(tokenizer)
    model.add_adapter("rank8", LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS))
    model.add_adapter("attn_only", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


CASES = [
    (dict(adapters=["poisoned", "nope"]), r"Unknown adapter name\(s\) \['nope'\]"),
    (dict(adapters=["poisoned", "attn_only"]), "target different modules"),
    (dict(adapters=["poisoned", "rank8"]), "different ranks at .*needs equal ranks"),
    (dict(adapter_name="task"), "adapter named 'task' already exists"),
    (dict(weights=[1.0]), "weights has 1 entries for 2 adapters"),
    (dict(combination_type="ties", density=0.0), r"density must be in \(0, 1\]"),
    (dict(combination_type="ties", density=1.5), r"density must be in \(0, 1\]"),
    (dict(combination_type="dare_linear"), "needs a density"),
    (dict(combination_type="svd"), "Unknown combination_type 'svd'"),
    (dict(safety_data=[]), "safety_data is empty"),
    (dict(safety_data=[{"prompt": "p", "chosen": "c"}]), r"missing column\(s\) \['rejected'\].*\"rejected\""),
    (dict(retain_data=[{"question": "q"}]), r"retain_data is missing column\(s\) \['prompt', 'completion'\]"),
    (dict(config=SOMFConfig(reference_adapter="task")), "reference adapter 'task' cannot also be"),
    (dict(config=SOMFConfig(objective="sft")), r"missing column\(s\) \['completion'\]"),
    (dict(weights=[float("nan"), 1.0]), "weights must be finite numbers.*nan would give a NaN adapter"),
    (dict(weights=[1.0, float("inf")]), "weights must be finite numbers.*inf would give a NaN adapter"),
    (dict(weights=[-float("inf"), 1.0]), "weights must be finite numbers"),
    (dict(weights=["1", 1.0]), "weights must be finite numbers"),
    (dict(combination_type="ties", density=float("nan")), r"density must be in \(0, 1\]"),
    (dict(adapters="poisoned"), "adapters must be a non-empty list"),
    (dict(adapters=[]), "adapters must be a non-empty list"),
    (dict(adapters=["poisoned", "poisoned"]), "adapters contains duplicates"),
]


@pytest.mark.parametrize("override, message", CASES)
def test_bad_request_fails_before_any_work(peft_model, tokenizer, override, message):
    before = adapter_state(peft_model)
    names = set(peft_model.peft_config)
    kwargs = dict(
        adapters=["poisoned", "task"],
        weights=[1.0, 1.0],
        adapter_name="merged",
        safety_data=pairs(TRAIN_HARMFUL),
        tokenizer=tokenizer,
        config=SOMFConfig(progress_bar=False, max_steps=1),
    )
    kwargs.update(override)
    with pytest.raises(ValueError, match=message):
        peft_model.merge_with_safety_mask(**kwargs)
    assert set(peft_model.peft_config) == names
    assert_unchanged(peft_model, before)


def test_masks_for_other_adapters_or_shapes_are_refused(peft_model, tmp_path):
    before = adapter_state(peft_model)
    names = set(peft_model.peft_config)
    config = {**SOMFConfig().to_dict(), "combination_type": "linear"}
    shapes = {"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 64)}
    masks = SafetyMasks(logits=shapes, adapters=["poisoned", "task"], config=config)
    masks.save(tmp_path / "m.safetensors")
    masks = SafetyMasks.load(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="do not match the adapters' layers"):
        SOMFMerger().merge(peft_model, ["poisoned", "task"], [1.0, 1.0], "merged", masks=masks)
    other = SafetyMasks(logits=shapes, adapters=["a", "b"], config=config)
    with pytest.raises(ValueError, match=r"learned for adapters \['a', 'b'\]"):
        SOMFMerger().merge(peft_model, ["poisoned", "task"], [1.0, 1.0], "merged", masks=other)
    good = SafetyMasks(
        logits={k: torch.zeros(1) for k in _keys(peft_model)}, adapters=["poisoned", "task"], config=config
    )
    with pytest.raises(ValueError, match="Mask shape mismatch at model.layers.0"):
        SOMFMerger().merge(peft_model, ["poisoned", "task"], [1.0, 1.0], "merged", masks=good)
    assert set(peft_model.peft_config) == names
    assert_unchanged(peft_model, before)


def test_not_a_masks_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a SOMF masks file"):
        SafetyMasks.load(tmp_path / "x.safetensors")


def test_config_validation():
    with pytest.raises(ValueError, match="final_mask must be one of"):
        SOMFConfig(final_mask="random")
    with pytest.raises(ValueError, match="revert_budget must be in"):
        SOMFConfig(revert_budget=1.0)


def _keys(peft_model) -> list[str]:
    names = [
        name for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A") and "task" in m.lora_A
    ]
    return [f"{name}.lora_{side}" for name in names for side in ("A", "B")]
