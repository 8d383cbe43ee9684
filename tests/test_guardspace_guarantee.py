"""The GuardSpace guarantee on the whole model, with the default options a user gets.

Stress setting: a tiny random Llama and GPT-2 (hidden 128), 8 calibration prompts, 30 AdamW steps at lr 1e-2 with
weight decay 0.1 and gradient clipping. Plain LoRA under the same training moves the calibration logits by O(1)
(relative). GuardSpace must keep them: to float rounding in fp32 (1/100 of LoRA's drift is the bar), and within
1/20 of LoRA's drift with a bf16 base or after casting the trained model to bf16; merged equals unmerged; with an
exact null space (fewer calibration tokens than features) the drift stays at float rounding. Meanwhile the adapter
must still learn off the calibration span.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import (
    BENIGN_TEXTS,
    CORPUS,
    GPT2_TARGETS,
    HARMFUL_PROMPTS,
    LLAMA_TARGETS,
    encode,
    layer_outputs,
    logits_of,
    make_llama,
    train_steps,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peft_safety import GuardSpaceConfig, collect_safety_statistics, export_to_lora, guardspace_report

CALIBRATION = HARMFUL_PROMPTS + CORPUS[10:12]  # 8 prompts, 73 tokens
STRESS = {"steps": 30, "lr": 1e-2, "weight_decay": 0.1, "max_grad_norm": 1.0}


def stress_llama(tokenizer, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def stress_gpt2(tokenizer, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).to(dtype).eval()


ARCHITECTURES = {"llama": (stress_llama, LLAMA_TARGETS), "gpt2": (stress_gpt2, GPT2_TARGETS)}


def relative_change(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.float() - reference.float()).norm() / reference.float().norm())


def trained(tokenizer, arch: str, method: str, dtype=torch.float32, prompts=CALIBRATION, mode="plain", **training):
    """A model trained on benign texts with plain LoRA or GuardSpace at its defaults (r 8, alpha 16)."""
    make, targets = ARCHITECTURES[arch]
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    else:
        statistics = collect_safety_statistics(
            make(tokenizer, dtype), tokenizer, prompts, targets, show_progress=False
        )
        config = GuardSpaceConfig(r=8, lora_alpha=16, target_modules=targets, safety_statistics=statistics)
    torch.manual_seed(0)
    model = get_peft_model(make(tokenizer, dtype), config)
    if mode == "gradient_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    autocast = torch.bfloat16 if mode == "bf16_autocast" else None
    losses = train_steps(model, tokenizer, BENIGN_TEXTS, autocast_dtype=autocast, **{**STRESS, **training})
    assert losses[-1] < losses[0]
    return model


@functools.cache
def drift(arch: str, method: str, setting: str) -> dict[str, float]:
    """Calibration-logit drift (and benign-logit change) of one stress run, cached across tests."""
    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    make, _ = ARCHITECTURES[arch]
    prompts = CALIBRATION if setting != "few_prompts" else HARMFUL_PROMPTS[:4]
    dtype = torch.bfloat16 if setting == "bf16_base" else torch.float32
    training = {"lr": 5e-3} if setting == "few_prompts" else {}
    mode = setting if setting in ("bf16_autocast", "gradient_checkpointing") else "plain"
    model = trained(tokenizer, arch, method, dtype, prompts, mode, **training)
    reference_model = make(tokenizer, dtype)
    if setting == "cast_bf16":
        model, reference_model = model.to(torch.bfloat16), make(tokenizer, torch.bfloat16)
    return {
        name: relative_change(logits_of(model, tokenizer, texts), logits_of(reference_model, tokenizer, texts))
        for name, texts in (("calibration", prompts), ("benign", BENIGN_TEXTS))
    }


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "setting, factor",
    [("fp32", 100), ("bf16_base", 20), ("cast_bf16", 20), ("bf16_autocast", 20), ("gradient_checkpointing", 100)],
)
def test_calibration_logits_held_under_stress_training(arch, setting, factor):
    lora, guarded = drift(arch, "lora", setting), drift(arch, "guardspace", setting)
    assert lora["calibration"] > 0.3, lora  # the stress training really moves an unprotected model
    assert guarded["calibration"] <= lora["calibration"] / factor, (guarded, lora)
    assert guarded["benign"] > 1e-2, guarded  # and GuardSpace still learns off the calibration span


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_null_space_keeps_calibration_logits_at_float_rounding(arch):
    """4 calibration prompts leave an exact null space at every site: the defaults use only it (no leakage)."""
    assert drift(arch, "guardspace", "few_prompts")["calibration"] <= 1e-4
    assert drift(arch, "lora", "few_prompts")["calibration"] > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_save_load_and_export_keep_the_trained_function(tokenizer, arch, tmp_path):
    make, _ = ARCHITECTURES[arch]
    model = trained(tokenizer, arch, "guardspace")
    texts = CALIBRATION + BENIGN_TEXTS
    unmerged = logits_of(model, tokenizer, texts)
    certificate = guardspace_report(model).total_leakage
    assert certificate <= 1e-12  # exact null spaces: nothing leaks

    model.save_pretrained(tmp_path / "adapter")
    export_to_lora(model, tmp_path / "export")
    reloaded = PeftModel.from_pretrained(make(tokenizer), tmp_path / "adapter")
    assert relative_change(logits_of(reloaded, tokenizer, texts), unmerged) <= 1e-6
    assert guardspace_report(reloaded).total_leakage == pytest.approx(certificate, abs=1e-12)
    exported = PeftModel.from_pretrained(make(tokenizer), tmp_path / "export")  # plain LoRA config
    assert relative_change(logits_of(exported, tokenizer, texts), unmerged) <= 1e-5
    merged = model.merge_and_unload()
    assert relative_change(logits_of(merged, tokenizer, texts), unmerged) <= 1e-4
    base = logits_of(make(tokenizer), tokenizer, CALIBRATION)
    assert relative_change(logits_of(merged, tokenizer, CALIBRATION), base) <= 1e-4


def test_guarantee_holds_at_every_step(tokenizer):
    adapted = [f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn.o_proj", "mlp.down_proj")]
    stats = small_statistics(tokenizer)
    reference = layer_outputs(make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, adapted)
    config = GuardSpaceConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, safety_statistics=stats)
    model = get_peft_model(make_llama(tokenizer), config)
    outputs = layer_outputs(model, tokenizer, HARMFUL_PROMPTS, adapted)
    assert all(torch.equal(outputs[name], reference[name]) for name in adapted)  # init: exactly the base
    for step in range(3):
        train_steps(model, tokenizer, BENIGN_TEXTS, steps=1, lr=1e-2, seed=step)
        outputs = layer_outputs(model, tokenizer, HARMFUL_PROMPTS, adapted)
        changes = [float((outputs[name] - reference[name]).norm() / reference[name].norm()) for name in adapted]
        assert max(changes) < 1e-5, changes


def small_statistics(tokenizer):
    return collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )


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


def test_buffers_and_factors_keep_their_dtype_when_the_model_is_cast(tokenizer):
    """A bf16-rounded basis is no longer a projector, and bf16-rounded ``A``, ``B`` no longer cancel the frozen
    offset: casting the model moves GuardSpace's tensors but keeps their dtype, so the cast model at init is exactly
    the cast base."""
    stats = small_statistics(tokenizer)
    config = GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats)
    model = get_peft_model(make_llama(tokenizer), config).to(torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert {buffer.dtype for buffer in layer.lora_guard["default"].buffers()} == {torch.float32}
    assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    texts = HARMFUL_PROMPTS + BENIGN_TEXTS
    assert torch.equal(logits_of(model, tokenizer, texts), logits_of(make_llama(tokenizer, dtype=torch.bfloat16), tokenizer, texts))  # noqa: E501  # fmt: skip


def test_init_equals_base_in_training_mode_with_lora_dropout(tokenizer):
    """The frozen offset sees the same dropped-out input as the trained term: dW dropout(x) = 0 at init."""
    stats = small_statistics(tokenizer)
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


# ------------------------------------------------------------------------------------------------------ CUDA
def _cuda_stress_run(tokenizer, arch: str, method: str) -> float:
    """Calibration-logit drift of a bf16 base on CUDA after the stress training (AdamW under bf16 autocast)."""
    from peft_safety._device import to_device

    device = torch.device("cuda")
    make, targets = ARCHITECTURES[arch]
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    else:
        statistics = collect_safety_statistics(
            make(tokenizer, torch.bfloat16).to(device), tokenizer, CALIBRATION, targets, show_progress=False
        )
        config = GuardSpaceConfig(r=8, lora_alpha=16, target_modules=targets, safety_statistics=statistics)
    torch.manual_seed(0)
    model = get_peft_model(make(tokenizer, torch.bfloat16).to(device), config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=STRESS["lr"], weight_decay=STRESS["weight_decay"])
    batch = to_device(encode(tokenizer, BENIGN_TEXTS), device)
    model.train()
    for _ in range(STRESS["steps"]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, STRESS["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    calibration = to_device(encode(tokenizer, CALIBRATION), device)
    reference = make(tokenizer, torch.bfloat16).to(device).eval()
    with torch.no_grad():
        mask = calibration["attention_mask"].bool()
        inputs = {"input_ids": calibration["input_ids"], "attention_mask": calibration["attention_mask"]}
        logits, base = model(**inputs).logits[mask], reference(**inputs).logits[mask]
    return relative_change(logits, base)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_bf16_calibration_logits_held_under_stress_training(tokenizer, arch):
    """The bf16-base setting of the stress test on CUDA (cuBLAS bf16 kernels, CUDA autocast)."""
    lora = _cuda_stress_run(tokenizer, arch, "lora")
    guarded = _cuda_stress_run(tokenizer, arch, "guardspace")
    assert lora > 0.3, lora
    assert guarded <= lora / 20, (guarded, lora)
