"""SOMF end to end on the tiny Llama: safety improves on held-out pairs, the task is retained, the deployed mask
matches training, and the unmasked merge equals PEFT's add_weighted_adapter."""

from __future__ import annotations

import pytest
import torch
from somf_testbed import (  # noqa: F401 (one_thread is an autouse fixture)
    HELDOUT_HARMFUL,
    TASK_ROWS,
    TRAIN_HARMFUL,
    adapter_state,
    assert_unchanged,
    make_adapters,
    one_thread,
    pair_logps,
    pairs,
    sequence_margins,
    task_logits,
)

from peft_safety import SafetyMasks, SOMFConfig, SOMFMerger

ADAPTERS = ["poisoned", "task"]


@pytest.fixture(scope="module")
def fitted(tokenizer):
    peft_model = make_adapters(tokenizer)
    before = adapter_state(peft_model)
    masks = peft_model.merge_with_safety_mask(
        adapters=ADAPTERS,
        weights=[1.0, 1.0],
        adapter_name="safe_merged",
        safety_data=pairs(TRAIN_HARMFUL),
        tokenizer=tokenizer,
        retain_data=TASK_ROWS,
        config=SOMFConfig(progress_bar=False),
    )
    SOMFMerger().merge(peft_model, ADAPTERS, [1.0, 1.0], "unmasked")
    return peft_model, masks, before


def test_fit_and_merge_leave_base_and_adapters_unchanged(fitted):
    peft_model, _, before = fitted
    after = {k: v for k, v in adapter_state(peft_model).items() if "safe_merged" not in k and "unmasked" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "safe_merged" in n)
    assert peft_model.peft_config["safe_merged"].lora_alpha == peft_model.peft_config["safe_merged"].r


def test_safety_improves_on_heldout_pairs_and_task_is_retained(fitted, tokenizer):
    peft_model, _, _ = fitted
    peft_model.set_adapter("unmasked")
    unmasked_margin, unmasked_task = (
        sequence_margins(peft_model, tokenizer, HELDOUT_HARMFUL),
        task_logits(peft_model, tokenizer),
    )
    peft_model.set_adapter("safe_merged")
    safe_margin, safe_task = (
        sequence_margins(peft_model, tokenizer, HELDOUT_HARMFUL),
        task_logits(peft_model, tokenizer),
    )
    with peft_model.disable_adapter():
        base_task = task_logits(peft_model, tokenizer)
    peft_model.set_adapter("poisoned")
    assert safe_margin > unmasked_margin + 1.0, (safe_margin, unmasked_margin)
    assert (safe_task - unmasked_task).norm() < 0.75 * (base_task - unmasked_task).norm()


def test_deployed_mask_matches_relaxed_masks_of_training(fitted):
    _, masks, _ = fitted
    history = masks.history
    assert history["safety_loss_relaxed"] < history["safety_loss_before"] - 0.05
    assert abs(history["safety_loss_deployed"] - history["safety_loss_relaxed"]) < 0.05
    summary = masks.summary()
    assert "kept fraction per adapter" in summary and "model.layers.1.mlp.down_proj" in summary
    assert "safety_loss_deployed" in summary
    kept = masks.kept_fraction()
    assert 0.5 < kept["per_adapter"]["task"] < 1.0 and len(kept["per_layer"]) == 14


def test_masks_save_load_and_reuse(fitted, tmp_path):
    peft_model, masks, _ = fitted
    path = tmp_path / "masks.safetensors"
    masks.save(path)
    loaded = SafetyMasks.load(path)
    assert loaded.adapters == ADAPTERS and loaded.config == masks.config and loaded.history == masks.history
    assert all(torch.equal(loaded.logits[k], v) for k, v in masks.logits.items())
    SOMFMerger().merge(peft_model, ADAPTERS, [1.0, 1.0], "reloaded", masks=loaded)
    for name, param in peft_model.named_parameters():
        if ".reloaded." in name:
            assert torch.equal(param, dict(peft_model.named_parameters())[name.replace("reloaded", "safe_merged")])
    peft_model.delete_adapter("reloaded")


def test_fit_is_reproducible(tokenizer):
    config = SOMFConfig(progress_bar=False, max_steps=5, final_mask="budget")
    results = []
    for _ in range(2):
        peft_model = make_adapters(tokenizer)
        masks = SOMFMerger(config).fit(peft_model, ADAPTERS, pairs(TRAIN_HARMFUL), tokenizer, retain_data=TASK_ROWS)
        SOMFMerger(config).merge(peft_model, ADAPTERS, [1.0, 1.0], "safe", masks=masks)
        results.append((masks, {n: p for n, p in peft_model.named_parameters() if ".safe." in n}))
    (masks_a, fused_a), (masks_b, fused_b) = results
    assert all(torch.equal(masks_a.logits[k], masks_b.logits[k]) for k in masks_a.logits)
    final = masks_a.final()
    reverted = sum(int((m == 0).sum()) for m in final.values())
    assert reverted == int(config.revert_budget * sum(m.numel() for m in final.values()))
    assert fused_a.keys() == fused_b.keys() and all(torch.equal(fused_a[k], fused_b[k]) for k in fused_a)


@pytest.mark.parametrize("combination_type", ["linear", "ties", "magnitude_prune", "cat"])
def test_unmasked_merge_equals_add_weighted_adapter(tokenizer, combination_type):
    peft_model = make_adapters(tokenizer)
    density = None if combination_type in ("linear", "cat") else 0.5
    kwargs = dict(combination_type=combination_type, density=density)
    peft_model.add_weighted_adapter(ADAPTERS, [0.7, -0.4], "peft", **kwargs)
    SOMFMerger().merge(peft_model, ADAPTERS, [0.7, -0.4], "ours", **kwargs)
    params = dict(peft_model.named_parameters())
    compared = 0
    for name, param in params.items():
        if ".ours." in name:
            torch.testing.assert_close(param, params[name.replace(".ours.", ".peft.")])
            compared += 1
    assert compared == 28


@pytest.mark.parametrize(
    "combination_type, density, extra",
    [
        ("ties", 0.5, {}),
        ("dare_linear", 0.7, {}),
        ("dare_ties", 0.7, {"gradient_accumulation_steps": 2}),
        ("magnitude_prune", 0.5, {"objective": "sft"}),
        ("cat", None, {"shared_mask": False}),
        ("linear", None, {"reference_adapter": "task", "final_mask": "bernoulli"}),
    ],
)
def test_every_combination_trains_and_merges(tokenizer, combination_type, density, extra):
    peft_model = make_adapters(tokenizer)
    before = adapter_state(peft_model)
    objective = extra.get("objective", "dpo")
    data = pairs(TRAIN_HARMFUL)
    if objective == "sft":
        data = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in data]
    adapters = ["poisoned"] if "reference_adapter" in extra else ADAPTERS
    config = SOMFConfig(progress_bar=False, max_steps=4, **extra)
    masks = peft_model.merge_with_safety_mask(
        adapters=adapters,
        weights=[1.0] * len(adapters),
        adapter_name="merged",
        safety_data=data,
        tokenizer=tokenizer,
        combination_type=combination_type,
        density=density,
        retain_data=TASK_ROWS,
        config=config,
    )
    moved = [float((v - 3.0).abs().max()) for v in masks.logits.values()]
    assert max(moved) > 0.05, "the logits did not train through the combination"
    assert len(masks.history["loss"]) == 4 and all(torch.isfinite(torch.tensor(masks.history["loss"])))
    assert_unchanged_except(peft_model, before, "merged")
    peft_model.set_adapter("merged")
    batch = tokenizer(["The movie was wonderful"], return_tensors="pt")
    assert torch.isfinite(peft_model(**batch).logits).all()


def assert_unchanged_except(peft_model, before, new_adapter: str) -> None:
    after = {k: v for k, v in adapter_state(peft_model).items() if f".{new_adapter}." not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_assert_unchanged_helper_detects_changes(tokenizer):
    peft_model = make_adapters(tokenizer)
    before = adapter_state(peft_model)
    assert_unchanged(peft_model, before)
    next(p for n, p in peft_model.named_parameters() if "lora_A.task" in n).data.add_(1.0)
    with pytest.raises(AssertionError):
        assert_unchanged(peft_model, before)


def test_rpo_alpha_keeps_the_chosen_answers_likely(tokenizer):
    """DPO alone may lower both answers' likelihood; the chosen-answer NLL term (rpo_alpha) keeps the refusals
    more likely under the deployed merge, on held-out prompts too."""
    chosen = {}
    for rpo_alpha in (0.0, 2.0):
        peft_model = make_adapters(tokenizer)
        config = SOMFConfig(progress_bar=False, max_steps=20, rpo_alpha=rpo_alpha)
        peft_model.merge_with_safety_mask(
            adapters=ADAPTERS, weights=[1.0, 1.0], adapter_name="safe", safety_data=pairs(TRAIN_HARMFUL),
            tokenizer=tokenizer, retain_data=TASK_ROWS, config=config,
        )  # fmt: skip
        peft_model.set_adapter("safe")
        chosen[rpo_alpha] = float(pair_logps(peft_model, tokenizer, HELDOUT_HARMFUL)[0].mean())
    assert chosen[2.0] > chosen[0.0] + 0.1, chosen


def test_recomputed_fused_factors_give_the_stored_graph_gradients(tokenizer, monkeypatch):
    """Mask learning recomputes each layer's fused factors (and redraws the Concrete noise from its seed) in the
    backward pass; the learnt logits equal those of a run that keeps the whole graph."""
    import peft_safety.somf.fusion as fusion

    config = SOMFConfig(progress_bar=False, max_steps=3)
    runs = []
    for keep_graph in (False, True):
        if keep_graph:
            monkeypatch.setattr(fusion, "checkpoint", lambda function, *args, use_reentrant: function(*args))
        masks = SOMFMerger(config).fit(make_adapters(tokenizer), ADAPTERS, pairs(TRAIN_HARMFUL), tokenizer)
        runs.append(masks.logits)
    recomputed, stored = runs
    assert any(float((value - config.init_logit).abs().max()) > 0.1 for value in stored.values())  # it trained
    for key, value in stored.items():
        torch.testing.assert_close(recomputed[key], value, rtol=0, atol=1e-5)
