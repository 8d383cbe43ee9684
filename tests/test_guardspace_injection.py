"""Creating GuardSpace adapters: per-layer ``fan_in_fan_out`` as PEFT sets it, and failed injections undone."""

from __future__ import annotations

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, logits_of, make_gpt2, make_llama, train_steps
from peft import get_peft_model
from torch import nn

from peft_safety import GuardSpaceConfig, collect_safety_statistics
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
    ``W^T`` and the merge to add the transposed update, silently (0.6 relative difference in the logits)."""
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
