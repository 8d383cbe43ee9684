"""``add_weighted_adapter`` with GuardSpace adapters: exact through the GuardSpace export (cat reproduces the adapters
active together, also after save/reload), refused for PEFT's SVD merges before the model is touched; plain LoRA
merges are PEFT's own, unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, logits_of, make_llama, train_steps
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from somf_testbed import adapter_state, assert_unchanged, one_thread  # noqa: F401 (one_thread is autouse)

from peft_safety import GuardSpaceConfig, collect_safety_statistics

TEXTS = HARMFUL_PROMPTS + BENIGN_TEXTS


@pytest.fixture(scope="module")
def model(tokenizer):
    """GuardSpace adapters ``default`` and ``g2`` (same statistics, default options) and a plain
    LoRA adapter ``y``, each trained 10 AdamW steps; base logits on the calibration prompts."""
    stats = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats,
    )  # fmt: skip
    peft_model = get_peft_model(make_llama(tokenizer), config)
    train_steps(peft_model, tokenizer, BENIGN_TEXTS, steps=10, lr=5e-3)
    peft_model.add_adapter("g2", config)
    peft_model.add_adapter("y", LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS))
    for adapter, texts in (("g2", BENIGN_TEXTS[:2]), ("y", BENIGN_TEXTS)):
        peft_model.set_adapter(adapter)
        train_steps(peft_model, tokenizer, texts, steps=10, lr=5e-3)
    for param in peft_model.parameters():
        param.requires_grad_(False)
    return peft_model, logits_of(make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS)


def active_logits(peft_model, tokenizer, adapters: str | list[str], texts: list[str] = TEXTS) -> torch.Tensor:
    peft_model.base_model.set_adapter(adapters)
    return logits_of(peft_model, tokenizer, texts)


def test_cat_with_a_guardspace_adapter_is_both_adapters_active(model, tokenizer, tmp_path):
    peft_model, _ = model
    peft_model.add_weighted_adapter(["default", "y"], [1.0, 1.0], "c", combination_type="cat")
    try:
        both = active_logits(peft_model, tokenizer, ["default", "y"])
        merged = active_logits(peft_model, tokenizer, "c")
        torch.testing.assert_close(merged, both, rtol=0, atol=1e-4)
        assert type(peft_model.peft_config["c"]) is LoraConfig  # a plain LoRA adapter
        peft_model.save_pretrained(tmp_path, selected_adapters=["c"])
        reloaded = PeftModel.from_pretrained(make_llama(tokenizer), tmp_path / "c")
        torch.testing.assert_close(logits_of(reloaded, tokenizer, TEXTS), merged, rtol=0, atol=1e-5)
    finally:
        peft_model.delete_adapter("c")


@pytest.mark.parametrize("combination_type, density", [("linear", None), ("ties", 0.5)])
def test_merged_guardspace_adapters_keep_the_calibration_logits(model, tokenizer, combination_type, density):
    peft_model, base = model
    own = max(
        float((active_logits(peft_model, tokenizer, a, HARMFUL_PROMPTS) - base).abs().max()) for a in ("default", "g2")
    )
    peft_model.add_weighted_adapter(["default", "g2"], [1.0, 1.0], "m", combination_type, density=density)
    try:
        assert type(peft_model.peft_config["m"]) is LoraConfig  # not a GuardSpace config with a fresh offset
        merged = float((active_logits(peft_model, tokenizer, "m", HARMFUL_PROMPTS) - base).abs().max())
        assert merged <= 10 * own + 1e-5, (merged, own)
    finally:
        peft_model.delete_adapter("m")


@pytest.mark.parametrize("combination_type", ["svd", "ties_svd", "dare_linear_svd"])
def test_svd_merges_of_a_guardspace_adapter_are_refused_before_touching_the_model(model, combination_type):
    peft_model, _ = model
    before = adapter_state(peft_model)
    with pytest.raises(ValueError, match="GuardSpace.*export_to_lora.*merge_with_safety_mask"):
        peft_model.add_weighted_adapter(
            ["y", "default"], [1.0, 1.0], "s", combination_type=combination_type, density=0.5
        )
    assert "s" not in peft_model.peft_config
    assert_unchanged(peft_model, before)


@pytest.mark.parametrize("combination_type, density", [("svd", None), ("linear", None), ("cat", None), ("ties", 0.5)])
def test_plain_lora_add_weighted_adapter_is_peft_s_own(tokenizer, combination_type, density):
    peft_model = get_peft_model(make_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    peft_model.add_adapter("y", LoraConfig(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    assert LoraModel.add_weighted_adapter.__wrapped__ is not LoraModel.add_weighted_adapter
    kwargs = dict(combination_type=combination_type, density=density)
    peft_model.add_weighted_adapter(["default", "y"], [0.7, -0.4], "ours", **kwargs)
    LoraModel.add_weighted_adapter.__wrapped__(peft_model.base_model, ["default", "y"], [0.7, -0.4], "peft", **kwargs)
    params = dict(peft_model.named_parameters())
    compared = [name for name in params if ".ours." in name]
    assert len(compared) == 28
    assert all(torch.equal(params[name], params[name.replace(".ours.", ".peft.")]) for name in compared)
    assert peft_model.peft_config["ours"] == peft_model.peft_config["peft"]
