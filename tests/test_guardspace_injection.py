"""Creating GuardSpace adapters: per-layer ``fan_in_fan_out`` as PEFT sets it, and failed injections undone."""

from __future__ import annotations

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, logits_of, make_gpt2, make_llama, train_steps
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_safety import GuardSpaceConfig, collect_safety_statistics
from peft_safety.guardspace import initialization
from peft_safety.guardspace.layer import GuardSpaceLinear

TEXTS = BENIGN_TEXTS + HARMFUL_PROMPTS
# merging adds s (B A - B0 A0) P to W in float32: merged and unmerged logits differ by float32 rounding only
MERGE_RTOL = 1e-5
SQUARE_TARGETS = ["q_proj", "o_proj"]  # 64 x 64 in the test Llama


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def guard_layers(model: nn.Module) -> dict[str, GuardSpaceLinear]:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, GuardSpaceLinear)
    }


def assert_merge_keeps_the_function(model: nn.Module, tokenizer) -> None:
    """Train a few steps (so that the adapter's update is not zero), then compare merged with unmerged logits."""
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=3, lr=5e-3)
    unmerged = logits_of(model, tokenizer, TEXTS)
    model.merge_adapter()
    merged = logits_of(model, tokenizer, TEXTS)
    model.unmerge_adapter()
    assert relative_difference(merged, unmerged) <= MERGE_RTOL
    assert relative_difference(logits_of(model, tokenizer, TEXTS), unmerged) <= MERGE_RTOL


def test_fan_in_fan_out_on_nn_linear_is_turned_off_as_peft_does(tokenizer):
    """``fan_in_fan_out=True`` on ``nn.Linear`` targets: PEFT's warning, the flag set to False on every layer, and a
    merge that gives the unmerged function. Square layers, where the transposed weight fits: the init used to read
    ``W^T`` and the merge to add the transposed update, silently (merged logits 1.0 away from the unmerged ones,
    relative; 3e-7 now)."""
    model = make_llama(tokenizer)
    stats = collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, SQUARE_TARGETS, show_progress=False)
    config = GuardSpaceConfig(r=4, lora_alpha=8, target_modules=SQUARE_TARGETS, safety_statistics=stats)
    config.fan_in_fan_out = True
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        model = get_peft_model(model, config)
    layers = guard_layers(model)
    assert len(layers) == 2 * len(SQUARE_TARGETS)
    assert not any(layer.fan_in_fan_out for layer in layers.values())
    assert_merge_keeps_the_function(model, tokenizer)


def untied_gpt2(tokenizer) -> nn.Module:
    """The test GPT-2 with its own ``lm_head`` weight: an ``nn.Linear`` after the ``Conv1D`` layers."""
    model = make_gpt2(tokenizer)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def test_conv1d_targets_do_not_turn_fan_in_fan_out_on_for_a_later_nn_linear(tokenizer):
    """GPT-2 ``c_attn`` (``Conv1D``, weight stored ``(in, out)``) and ``lm_head`` (``nn.Linear``) in one adapter: the
    ``Conv1D`` layers switch the shared config's flag on, and ``lm_head`` must switch it off again, as PEFT does."""
    targets = ["c_attn", "lm_head"]
    model = untied_gpt2(tokenizer)
    stats = collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, targets, show_progress=False)
    config = GuardSpaceConfig(r=4, lora_alpha=8, target_modules=targets, safety_statistics=stats)
    model = get_peft_model(model, config)
    layers = guard_layers(model)
    assert {name: layer.fan_in_fan_out for name, layer in layers.items()} == {
        "transformer.h.0.attn.c_attn": True,
        "transformer.h.1.attn.c_attn": True,
        "lm_head": False,
    }
    assert_merge_keeps_the_function(model, tokenizer)


# --- a failed injection leaves nothing behind -----------------------------------------------------------------------


class InjectedFailure(RuntimeError):
    pass


class FailAtThirdLayer:
    """Make the GuardSpace init of the third layer raise, as a bad layer (e.g. a non-finite weight) would."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.armed = True
        self.original = initialization.initialize_layer

    def __call__(self, layer: nn.Module, adapter_name: str, config: GuardSpaceConfig, target_name: str) -> None:
        self.calls.append(target_name)
        if self.armed and len(self.calls) == 3:
            raise InjectedFailure(f"injected failure at '{target_name}'")
        self.original(layer, adapter_name, config, target_name)


@pytest.fixture
def fail_at_third_layer(monkeypatch) -> FailAtThirdLayer:
    failure = FailAtThirdLayer()
    monkeypatch.setattr(initialization, "initialize_layer", failure)
    return failure


def model_state(model: nn.Module, tokenizer) -> dict[str, object]:
    """Module classes, a copy of the state dict, ``requires_grad`` flags and the forward's logits."""
    return {
        "classes": [(name, type(module)) for name, module in model.named_modules()],
        "tensors": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "logits": logits_of(model, tokenizer, TEXTS),
    }


def assert_same_state(before: dict[str, object], after: dict[str, object]) -> None:
    assert after["classes"] == before["classes"]
    assert list(after["tensors"]) == list(before["tensors"])
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key
    assert after["requires_grad"] == before["requires_grad"]
    assert torch.equal(after["logits"], before["logits"])


@pytest.fixture
def llama_stats(tokenizer):
    model = make_llama(tokenizer)
    return collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False)


def test_failed_get_peft_model_leaves_config_and_model_as_before(tokenizer, llama_stats, fail_at_third_layer):
    """``rank_allocation="null_dim"`` rewrites ``rank_pattern`` and the init records ``null_space_dims`` /
    ``null_space_sites`` and replaces modules one by one: a failure at the third layer undoes all of it, and the
    same config then creates the adapter a fresh config would."""
    model = make_llama(tokenizer)
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=llama_stats, rank_allocation="null_dim"
    )
    config_before, model_before = config.to_dict(), model_state(model, tokenizer)
    with pytest.raises(InjectedFailure):
        get_peft_model(model, config)
    assert len(fail_at_third_layer.calls) == 3
    assert config.to_dict() == config_before
    assert config.rank_pattern == {} and config.null_space_dims is None and config.null_space_sites is None
    assert_same_state(model_before, model_state(model, tokenizer))
    assert not hasattr(model, "peft_config")

    fail_at_third_layer.armed = False
    peft_model = get_peft_model(model, config)
    fresh_config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=llama_stats, rank_allocation="null_dim"
    )
    fresh = get_peft_model(make_llama(tokenizer), fresh_config)
    assert config.to_dict() == fresh_config.to_dict()
    assert len(guard_layers(peft_model)) == 2 * len(LLAMA_TARGETS)
    fresh_state = fresh.state_dict()
    for key, value in peft_model.state_dict().items():
        assert torch.equal(value, fresh_state[key]), key


def test_failed_add_adapter_next_to_plain_lora_leaves_everything_as_before(
    tokenizer, llama_stats, fail_at_third_layer
):
    """The plain LoRA layers are re-classed to hold GuardSpace adapters before PEFT adds any: a failure at the third
    layer puts the classes back, removes the half-created adapter and leaves both configs untouched."""
    plain = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    model = get_peft_model(make_llama(tokenizer), plain)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=2, lr=5e-3)
    guard = GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=llama_stats)
    plain_before, guard_before, model_before = plain.to_dict(), guard.to_dict(), model_state(model, tokenizer)
    with pytest.raises(InjectedFailure):
        model.add_adapter("guard", guard)
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert plain.to_dict() == plain_before and guard.to_dict() == guard_before
    assert not guard_layers(model)
    assert_same_state(model_before, model_state(model, tokenizer))

    fail_at_third_layer.armed = False
    model.add_adapter("guard", guard)
    assert len(guard_layers(model)) == 2 * len(LLAMA_TARGETS)
    assert list(model.peft_config) == ["default", "guard"]
