"""SOMF over GuardSpace adapters keeps their guarantee: a merged adapter does not move the calibration logits more
than the GuardSpace adapters it was fused from, whatever the learned mask; plain LoRA merges are untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, logits_of, make_llama, train_steps
from peft import LoraConfig, get_peft_model
from somf_testbed import TASK_ROWS, TRAIN_HARMFUL, make_adapters, one_thread, pairs  # noqa: F401 (autouse)

from peft_safety import GuardSpaceConfig, SOMFConfig, SOMFMerger, collect_safety_statistics
from peft_safety.somf.sites import AdapterFactors

FLOOR = 1e-5  # float32 rounding of logits of size O(1)


def build(tokenizer, **options):
    """Two GuardSpace adapters ``g`` and ``h`` (same statistics, exact null space) trained 10 AdamW steps each on
    different texts, a plain LoRA adapter ``p``; the base logits on the calibration prompts and on benign texts, and
    each adapter's own calibration-logit drift."""
    stats = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )
    config = GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats, **options)
    peft_model = get_peft_model(make_llama(tokenizer), config, adapter_name="g")
    train_steps(peft_model, tokenizer, BENIGN_TEXTS, steps=10, lr=5e-3, seed=0)
    peft_model.add_adapter("h", config)
    peft_model.add_adapter("p", LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS))
    for adapter, texts in (("h", BENIGN_TEXTS[:2]), ("p", BENIGN_TEXTS)):  # g and h share their (SVD) init
        peft_model.set_adapter(adapter)
        train_steps(peft_model, tokenizer, texts, steps=10, lr=5e-3)
    for param in peft_model.parameters():
        param.requires_grad_(False)
    base = make_llama(tokenizer)
    reference = logits_of(base, tokenizer, HARMFUL_PROMPTS), logits_of(base, tokenizer, BENIGN_TEXTS)
    drifts = {adapter: drift(peft_model, tokenizer, adapter, reference[0]) for adapter in ("g", "h", "p")}
    return peft_model, reference, drifts


@pytest.fixture(scope="module")
def guarded(tokenizer):
    """GuardSpace's default options."""
    return build(tokenizer)


@pytest.fixture(scope="module")
def unbalanced(tokenizer):
    """The paper's factors on the exact null space: ``A0`` reaches norms ~1e3 on this model, and the cross terms of a
    linear (or DARE) merge then amplify the float32 rounding of ``A' P x`` ~100x, although exact in real arithmetic;
    the merges checked with them are those that stay at rounding."""
    return build(tokenizer, factor_scale="paper", null_space_threshold=1e-10)


def drift(peft_model, tokenizer, adapter: str, reference: torch.Tensor, texts: list[str] = HARMFUL_PROMPTS) -> float:
    """Largest logit change of ``adapter`` vs the base on ``texts`` (the calibration prompts by default)."""
    peft_model.set_adapter(adapter)
    return float((logits_of(peft_model, tokenizer, texts) - reference).abs().max())


@pytest.mark.parametrize(
    "adapters, combination_type, density, extra",
    [
        (["g"], "linear", None, {}),
        (["g", "h"], "linear", None, {}),
        (["g", "h"], "cat", None, {"shared_mask": False}),
        (["g", "h"], "ties", 0.5, {}),
        (["g", "h"], "dare_linear", 0.7, {"shared_mask": False}),
        (["g"], "linear", None, {"reference_adapter": "h", "final_mask": "threshold"}),
    ],
)
def test_merged_guardspace_adapters_keep_the_calibration_logits(
    tokenizer, guarded, adapters, combination_type, density, extra
):
    peft_model, (calibration, benign), drifts = guarded
    config = SOMFConfig(progress_bar=False, max_steps=3, learning_rate=0.5, **extra)
    masks = peft_model.merge_with_safety_mask(
        adapters=adapters, weights=[1.0] * len(adapters), adapter_name="merged", safety_data=pairs(TRAIN_HARMFUL),
        tokenizer=tokenizer, combination_type=combination_type, density=density, retain_data=TASK_ROWS,
        config=config,
    )  # fmt: skip
    try:
        moved = max(float((value - config.init_logit).abs().max()) for value in masks.logits.values())
        assert moved > 0.05, "no gradient reached the mask logits through the projection"
        reference = [extra["reference_adapter"]] if "reference_adapter" in extra else []
        inputs = max(drifts[adapter] for adapter in adapters + reference)
        merged = drift(peft_model, tokenizer, "merged", calibration)
        assert merged <= 10 * inputs + FLOOR, (merged, inputs)
        assert drift(peft_model, tokenizer, "merged", benign, BENIGN_TEXTS) > 1e-3  # it still adapts off the span
    finally:
        peft_model.delete_adapter("merged")


@pytest.mark.parametrize("adapters, combination_type, density", [(["g"], "linear", None), (["g", "h"], "ties", 0.5)])
def test_merges_with_the_paper_s_factors_keep_the_calibration_logits(
    tokenizer, unbalanced, adapters, combination_type, density
):
    peft_model, (calibration, _), drifts = unbalanced
    config = SOMFConfig(progress_bar=False, max_steps=3, learning_rate=0.5)
    peft_model.merge_with_safety_mask(
        adapters=adapters, weights=[1.0] * len(adapters), adapter_name="merged", safety_data=pairs(TRAIN_HARMFUL),
        tokenizer=tokenizer, combination_type=combination_type, density=density, config=config,
    )  # fmt: skip
    try:
        inputs = max(drifts[adapter] for adapter in adapters)
        merged = drift(peft_model, tokenizer, "merged", calibration)
        assert merged <= 10 * inputs + FLOOR, (merged, inputs)
    finally:
        peft_model.delete_adapter("merged")


def test_unmasked_cat_merge_of_guardspace_adapters_is_both_adapters(tokenizer, guarded):
    """With an all-ones mask the projection changes nothing: ``cat`` reproduces ``g`` and ``h`` active together."""
    peft_model, (calibration, benign), _ = guarded
    SOMFMerger().merge(peft_model, ["g", "h"], [1.0, 1.0], "cat", combination_type="cat")
    try:
        peft_model.base_model.set_adapter(["g", "h"])
        both = logits_of(peft_model, tokenizer, BENIGN_TEXTS)
        peft_model.set_adapter("cat")
        torch.testing.assert_close(logits_of(peft_model, tokenizer, BENIGN_TEXTS), both, rtol=0, atol=1e-4)
    finally:
        peft_model.delete_adapter("cat")


def test_plain_lora_merges_take_no_projection(tokenizer, monkeypatch):
    """A merge of plain LoRA adapters never reaches the GuardSpace projection (it stays bit-identical)."""

    def forbidden(self, matrix):
        raise AssertionError("a plain LoRA merge projected a factor")

    monkeypatch.setattr(AdapterFactors, "project", forbidden)
    peft_model = make_adapters(tokenizer)
    config = SOMFConfig(progress_bar=False, max_steps=2)
    for combination_type, density in (("linear", None), ("ties", 0.5)):
        peft_model.merge_with_safety_mask(
            adapters=["poisoned", "task"], weights=[1.0, 1.0], adapter_name=combination_type,
            safety_data=pairs(TRAIN_HARMFUL), tokenizer=tokenizer, combination_type=combination_type,
            density=density, config=config,
        )  # fmt: skip


@pytest.mark.parametrize("combination_type, density", [("linear", None), ("ties", 0.5)])
def test_recomputed_projected_factors_give_the_stored_graph_gradients(
    tokenizer, guarded, monkeypatch, combination_type, density
):
    """Mask learning recomputes the projected fused factors in the backward pass (``torch.utils.checkpoint``); the
    learnt logits equal those of a run that keeps the whole graph."""
    import peft_safety.somf.fusion as fusion

    peft_model, _, _ = guarded
    config = SOMFConfig(progress_bar=False, max_steps=3, learning_rate=0.5, shared_mask=False)
    runs = []
    for keep_graph in (False, True):
        if keep_graph:
            monkeypatch.setattr(fusion, "checkpoint", lambda function, *args, use_reentrant: function(*args))
        masks = SOMFMerger(config).fit(
            peft_model, ["g", "h"], pairs(TRAIN_HARMFUL), tokenizer, combination_type=combination_type, density=density
        )
        runs.append(masks.logits)
    recomputed, stored = runs
    assert any(float((value - config.init_logit).abs().max()) > 0.1 for value in stored.values())
    for key, value in stored.items():
        torch.testing.assert_close(recomputed[key], value, rtol=0, atol=1e-5)
