"""The GuardSpace guarantee: after real training, adapted layers still reproduce the base on calibration inputs.

With an exactly rank-deficient calibration covariance (48 tokens, hidden 64) and a threshold that keeps only the
exact null directions, every adapted layer's output on the calibration prompts equals the base's up to float
rounding, whatever the optimizer did; plain LoRA under the same training moves those outputs by orders of
magnitude more. At the default threshold the null space is approximate and the per-layer bound
``calibration_error_bound`` is what holds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BENIGN_TEXTS,
    HARMFUL_PROMPTS,
    LLAMA_TARGETS,
    encode,
    layer_outputs,
    logits_of,
    make_llama,
    train_steps,
)
from peft import LoraConfig, get_peft_model

from peft_safety import GuardSpaceConfig, collect_safety_statistics
from peft_safety.guardspace.decomposition import calibration_error_bound
from peft_safety.guardspace.layer import GuardSpaceLinear

EXACT_THRESHOLD = 1e-10
ADAPTED = [f"model.layers.{i}.{part}" for i in range(2) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)]  # fmt: skip
MODES = ["adamw", "bf16_autocast", "gradient_checkpointing"]


@pytest.fixture(scope="module")
def stats(tokenizer):
    return collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )


@pytest.fixture(scope="module")
def base_outputs(tokenizer):
    base = make_llama(tokenizer)
    return layer_outputs(base, tokenizer, HARMFUL_PROMPTS, ADAPTED), logits_of(base, tokenizer, HARMFUL_PROMPTS)


def train(tokenizer, config, mode: str):
    model = get_peft_model(make_llama(tokenizer), config)
    if mode == "gradient_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    losses = train_steps(
        model, tokenizer, BENIGN_TEXTS, steps=4, lr=5e-3, weight_decay=0.1, max_grad_norm=1.0,
        autocast_dtype=torch.bfloat16 if mode == "bf16_autocast" else None,
    )  # fmt: skip
    assert losses[-1] < losses[0]
    moved = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert len(moved) == len(before)  # every lora_A / lora_B really trained
    return model


def max_layer_change(model, tokenizer, reference) -> dict[str, float]:
    outputs = layer_outputs(model, tokenizer, HARMFUL_PROMPTS, ADAPTED)
    return {name: float((outputs[name] - reference[name]).abs().max()) for name in ADAPTED}


@pytest.mark.parametrize("mode", MODES)
def test_calibration_outputs_preserved_after_training(tokenizer, stats, base_outputs, mode):
    reference, reference_logits = base_outputs
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats, null_space_threshold=EXACT_THRESHOLD
    )
    model = train(tokenizer, config, mode)
    assert all(0 < k < 64 or 0 < k < 128 for k in config.null_space_dims.values())
    guarded = max_layer_change(model, tokenizer, reference)
    guarded_logits = float((logits_of(model, tokenizer, HARMFUL_PROMPTS) - reference_logits).abs().max())
    # outputs are O(1): float32 rounding of an exact-zero update
    assert max(guarded.values()) < 1e-5, guarded
    assert guarded_logits < 1e-4

    torch.manual_seed(0)
    lora = train(tokenizer, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), mode)
    plain = max_layer_change(lora, tokenizer, reference)
    plain_logits = float((logits_of(lora, tokenizer, HARMFUL_PROMPTS) - reference_logits).abs().max())
    assert min(plain.values()) > 1e-3, plain
    assert max(plain.values()) > 1e4 * max(guarded.values())
    assert plain_logits > 1e3 * guarded_logits

    # the model still learnt something off the calibration span
    base_benign = logits_of(make_llama(tokenizer), tokenizer, BENIGN_TEXTS)
    assert float((logits_of(model, tokenizer, BENIGN_TEXTS) - base_benign).abs().max()) > 1e-2


def test_guarantee_holds_at_every_step(tokenizer, stats, base_outputs):
    reference, _ = base_outputs
    config = GuardSpaceConfig(
        r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, safety_statistics=stats, null_space_threshold=EXACT_THRESHOLD
    )
    model = get_peft_model(make_llama(tokenizer), config)
    assert max(max_layer_change(model, tokenizer, reference).values()) == 0.0  # init: exactly the base
    for step in range(3):
        train_steps(model, tokenizer, BENIGN_TEXTS, steps=1, lr=1e-2, seed=step)
        assert max(max_layer_change(model, tokenizer, reference).values()) < 1e-5


@pytest.mark.parametrize("balance_factors", [False, True])
def test_guarantee_holds_at_a_high_learning_rate(tokenizer, stats, base_outputs, balance_factors):
    """10 AdamW steps at lr 1e-2 move plain LoRA's layers by O(1) or more (up to 10x relative). GuardSpace's stay
    within float rounding amplified by the paper's unbalanced factors (measured 3.3e-3 relative), or at rounding
    (1.2e-6) with balanced factors."""
    reference, _ = base_outputs
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats,
        null_space_threshold=EXACT_THRESHOLD, balance_factors=balance_factors,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(make_llama(tokenizer), config)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=10, lr=1e-2, weight_decay=0.1)
    scale = {name: float(value.abs().max()) for name, value in reference.items()}
    changes = max_layer_change(model, tokenizer, reference)
    relative = max(change / scale[name] for name, change in changes.items())
    assert relative < (1e-5 if balance_factors else 2e-2), relative


@pytest.mark.parametrize("balance_factors", [True, False])
def test_calibration_logits_under_bf16_inference(tokenizer, stats, balance_factors):
    """Evaluated under bf16 autocast, the trained GuardSpace model stays at the bf16 noise of the base model on the
    calibration prompts with balanced factors; the paper's unbalanced factors (the default) amplify that noise
    ~100x on this model (not measurably on the SmolLM2 testbed, docs/guardspace.md)."""

    def bf16_logits(model):
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return logits_of(model, tokenizer, HARMFUL_PROMPTS).float()

    base = make_llama(tokenizer)
    base_bf16 = bf16_logits(base)
    bf16_noise = float((base_bf16 - logits_of(base, tokenizer, HARMFUL_PROMPTS)).abs().max())
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats,
        null_space_threshold=EXACT_THRESHOLD, balance_factors=balance_factors,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(make_llama(tokenizer), config)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=4, lr=5e-3, autocast_dtype=torch.bfloat16)
    moved = float((bf16_logits(model) - base_bf16).abs().max())
    if balance_factors:
        assert moved < 3 * bf16_noise, (moved, bf16_noise)
    else:
        assert moved > 20 * bf16_noise, (moved, bf16_noise)  # what balance_factors=True is for


def test_default_threshold_obeys_the_per_layer_bound(tokenizer, stats):
    threshold = 1e-3  # wide enough that many kept directions carry small nonzero eigenvalues
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats, null_space_threshold=threshold
    )
    model = get_peft_model(make_llama(tokenizer), config)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=4, lr=1e-2)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, GuardSpaceLinear):
            target = name.removeprefix("base_model.model.")
            covariance = stats.covariance(target)
            delta = module.get_delta_weight("default").double()  # (out, in)
            rms_change = float(torch.trace(delta @ covariance @ delta.T).clamp_min(0).sqrt())
            bound = calibration_error_bound(float(torch.linalg.matrix_norm(delta, ord=2)), covariance, threshold)
            assert rms_change <= bound * (1 + 1e-4) + 1e-7, (target, rms_change, bound)
            checked += 1
    assert checked == len(ADAPTED)


def test_paper_threshold_bound(tokenizer, stats):
    """The same bound at the paper's default threshold (1e-6)."""
    config = GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats)
    assert config.null_space_threshold == 1e-6
    model = get_peft_model(make_llama(tokenizer), config)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=3, lr=1e-2)
    for name, module in model.named_modules():
        if isinstance(module, GuardSpaceLinear):
            covariance = stats.covariance(name.removeprefix("base_model.model."))
            delta = module.get_delta_weight("default").double()
            rms_change = float(torch.trace(delta @ covariance @ delta.T).clamp_min(0).sqrt())
            bound = calibration_error_bound(float(torch.linalg.matrix_norm(delta, ord=2)), covariance, 1e-6)
            assert rms_change <= bound * (1 + 1e-4) + 1e-7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_init_equals_base(tokenizer, dtype):
    stats = collect_safety_statistics(
        make_llama(tokenizer, dtype=dtype), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )
    base_logits = logits_of(make_llama(tokenizer, dtype=dtype), tokenizer, BENIGN_TEXTS + HARMFUL_PROMPTS)
    model = get_peft_model(
        make_llama(tokenizer, dtype=dtype),
        GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats),
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == dtype
    assert layer.lora_A["default"].weight.dtype == torch.float32  # peft's autocast_adapter_dtype
    assert torch.equal(logits_of(model, tokenizer, BENIGN_TEXTS + HARMFUL_PROMPTS), base_logits)
    # and it trains in that dtype without breaking the base function on calibration prompts
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=2, lr=5e-3)
    assert torch.isfinite(logits_of(model, tokenizer, BENIGN_TEXTS)).all()


def test_bf16_adapters_without_upcast_init_equals_base(tokenizer):
    dtype = torch.bfloat16
    stats = collect_safety_statistics(
        make_llama(tokenizer, dtype=dtype), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )
    base_logits = logits_of(make_llama(tokenizer, dtype=dtype), tokenizer, BENIGN_TEXTS + HARMFUL_PROMPTS)
    config = GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats)
    model = get_peft_model(make_llama(tokenizer, dtype=dtype), config, autocast_adapter_dtype=False)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == dtype
    assert torch.equal(logits_of(model, tokenizer, BENIGN_TEXTS + HARMFUL_PROMPTS), base_logits)


def test_init_equals_base_in_training_mode_with_lora_dropout(tokenizer, stats):
    """The frozen offset sees the same dropped-out input as the trained term: dW dropout(x) = 0 at init."""
    base = make_llama(tokenizer).train()
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, lora_dropout=0.5, target_modules=LLAMA_TARGETS, safety_statistics=stats
    )
    model = get_peft_model(make_llama(tokenizer), config).train()
    batch = {k: v for k, v in encode(tokenizer, BENIGN_TEXTS).items() if k != "labels"}
    torch.manual_seed(0)
    with torch.no_grad():
        expected = base(**batch).logits
        assert torch.equal(model(**batch).logits, expected)
