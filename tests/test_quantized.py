"""GuardSpace on bitsandbytes 4-bit (nf4/fp4, double quantisation on/off) and 8-bit bases, on CPU.

Calibration: the 6 harmful prompts (48 tokens) are fewer than the hidden size (64); GuardSpace's default options
use the exact null space wherever it has at least ``r`` directions, and the guarantee holds to float32 rounding.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from conftest import (  # noqa: E402
    BENIGN_TEXTS,
    HARMFUL_PROMPTS,
    layer_outputs,
    logits_of,
    make_llama,
    train_steps,
)
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402
from peft.utils.integrations import dequantize_module_weight  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from peft_safety import (  # noqa: E402
    GuardSpaceConfig,
    collect_safety_statistics,
    disable_bnb_cpu_packing,
    export_to_lora,
)
from peft_safety.guardspace.bnb import GuardSpaceLinear4bit, GuardSpaceLinear8bitLt  # noqa: E402

QUANT = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]  # attention and MLP input sites; fewer layers keep the test short
PROBED = [f"model.layers.{i}.{name}" for i in range(2) for name in ("self_attn.q_proj", "mlp.down_proj")]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bnb's "inputs will be cast", PEFT's "merge ... rounding errors"
        yield


@pytest.fixture(scope="module")
def saved_base(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_llama(tokenizer).save_pretrained(path)
    return path


def load_quantized(path, kind: str):
    kwargs = dict(QUANT[kind])
    if kwargs.get("load_in_4bit"):
        kwargs["bnb_4bit_compute_dtype"] = torch.float32
    config = BitsAndBytesConfig(**kwargs)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()


def guard_config(statistics, target_modules=TARGETS, **kwargs) -> GuardSpaceConfig:
    return GuardSpaceConfig(
        r=4,
        lora_alpha=8,
        target_modules=target_modules,
        safety_statistics=statistics,
        **kwargs,
    )


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", list(QUANT))
def test_guardspace_on_quantized_base(kind, tokenizer, saved_base, tmp_path):
    expected_cls = GuardSpaceLinear8bitLt if kind == "int8" else GuardSpaceLinear4bit
    fp_weights = {
        name: module.weight.detach()
        for name, module in make_llama(tokenizer).named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    model = load_quantized(saved_base, kind)
    statistics = collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, TARGETS, show_progress=False)
    statistics.save(tmp_path / "stats.safetensors")
    peft_model = get_peft_model(model, guard_config(str(tmp_path / "stats.safetensors")))
    layers = [m for m in peft_model.modules() if isinstance(m, lora_bnb.LoraLayer) and "default" in m.lora_A]
    assert len(layers) == 2 * len(TARGETS)
    assert all(type(layer) is expected_cls for layer in layers)
    assert all("default" in layer.lora_variant and "default" in layer.lora_guard for layer in layers)

    with peft_model.disable_adapter():
        base_outputs = layer_outputs(peft_model, tokenizer, HARMFUL_PROMPTS, PROBED)
        base_benign = logits_of(peft_model, tokenizer, BENIGN_TEXTS)
        base_harmful = logits_of(peft_model, tokenizer, HARMFUL_PROMPTS)
    # function at init equals the quantised base
    assert (logits_of(peft_model, tokenizer, BENIGN_TEXTS) - base_benign).abs().max() < 1e-5

    losses = train_steps(peft_model, tokenizer, BENIGN_TEXTS, steps=10, lr=1e-2)  # AdamW, weight decay, clipping
    assert all(torch.isfinite(torch.tensor(losses)))
    trained_outputs = layer_outputs(peft_model, tokenizer, HARMFUL_PROMPTS, PROBED)
    for name in PROBED:  # guarantee on the quantised model (fp32 rounding)
        assert _max_rel(trained_outputs[name], base_outputs[name]) < 1e-4, name
    assert _max_rel(logits_of(peft_model, tokenizer, HARMFUL_PROMPTS), base_harmful) < 1e-4  # the whole model
    trained_benign = logits_of(peft_model, tokenizer, BENIGN_TEXTS)
    assert (trained_benign - base_benign).abs().max() > 1e-3  # it did learn off the calibration span

    # save / load on a fresh quantised base: same function, no statistics needed
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_quantized(saved_base, kind), tmp_path / "adapter")
    assert all(type(m) is expected_cls for m in reloaded.modules() if isinstance(m, lora_bnb.LoraLayer))
    assert (logits_of(reloaded, tokenizer, BENIGN_TEXTS) - trained_benign).abs().max() < 1e-5

    # export to vanilla LoRA, loaded by PEFT's own bnb LoRA layers on a fresh quantised base
    # (plain PEFT never calls peft_safety: on AVX512-BF16 CPUs bitsandbytes would compute this base in bfloat16)
    export_to_lora(peft_model, tmp_path / "lora")
    plain_base = load_quantized(saved_base, kind)
    disable_bnb_cpu_packing(plain_base)
    plain = PeftModel.from_pretrained(plain_base, tmp_path / "lora")
    plain_layers = [m for m in plain.modules() if isinstance(m, lora_bnb.LoraLayer)]
    assert plain_layers and not any(hasattr(m, "lora_guard") for m in plain_layers)
    assert (logits_of(plain, tokenizer, BENIGN_TEXTS) - trained_benign).abs().max() < 1e-4

    # merge re-quantises W_q + dW: the merged weight carries one quantisation error, no more than the base's own
    # (measured: nf4 0.09 / int8 0.006 relative Frobenius, before and after the merge)
    expected, base_errors = {}, {}
    for layer_name, layer in peft_model.named_modules():
        if type(layer) is expected_cls:
            quantised = dequantize_module_weight(layer.get_base_layer()).float().clone()
            expected[layer_name] = quantised + layer.get_delta_weight("default").float()
            fp = fp_weights[layer_name.removeprefix("base_model.model.")]
            base_errors[layer_name] = float((quantised - fp).norm() / fp.norm())
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, lora_bnb.LoraLayer) for m in merged.modules())
    assert torch.isfinite(logits_of(merged, tokenizer, BENIGN_TEXTS)).all()
    for layer_name, target in expected.items():
        base = merged.get_submodule(layer_name.removeprefix("base_model.model."))
        assert base.weight.dtype in (torch.uint8, torch.int8)  # still quantised
        weight = dequantize_module_weight(base).float()
        assert float((weight - target).norm() / target.norm()) <= 1.25 * base_errors[layer_name] + 1e-4, layer_name


def test_merge_unmerge_roundtrip_each_bnb_layer(tokenizer, saved_base):
    for kind in ("nf4-dq", "int8"):
        model = load_quantized(saved_base, kind)
        statistics = collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, ["q_proj"], show_progress=False)
        peft_model = get_peft_model(model, guard_config(statistics, target_modules=["q_proj"]))
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            layer.lora_B["default"].weight.add_(0.05)  # a trained-looking adapter
        x = torch.randn(5, 64)
        expected = layer(x)
        delta = layer.get_delta_weight("default")
        before = layer.get_base_layer().weight
        layer.merge()
        assert layer.merged and layer.get_base_layer().weight is not before
        assert type(layer.get_base_layer().weight) is type(before)  # re-quantised, not a float weight
        merged = layer(x)
        layer.unmerge()
        unmerged = layer(x)
        scale = float(expected.abs().max())
        assert _max_rel(merged, expected) < 0.25 and _max_rel(unmerged, expected) < 0.25, kind
        assert float((delta @ x.T).abs().max()) > 0.01 * scale  # the delta is not negligible


def test_plain_lora_keeps_peft_bnb_layers(tokenizer, saved_base):
    model = get_peft_model(load_quantized(saved_base, "nf4"), LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is lora_bnb.Linear4bit


def _init_products(model, statistics) -> dict[str, torch.Tensor]:
    peft_model = get_peft_model(model, guard_config(statistics))
    return {
        name: (layer.lora_guard["default"].frozen_B @ layer.lora_guard["default"].frozen_A) * layer.scaling["default"]
        for name, layer in peft_model.named_modules()
        if hasattr(layer, "lora_guard") and "default" in layer.lora_guard
    }


def test_init_on_quantized_base_vs_full_precision(tokenizer, saved_base):
    """Same statistics (from the fp32 model), init on the fp32 weight vs on the dequantised weight.

    The init keeps the r SMALLEST components of ``W C~``: they are the most sensitive to the weight error, so on
    these random tiny weights the 4-bit init differs a lot (measured: nf4 median 0.43 / max 0.80, fp4 median 0.57 /
    max 1.12 relative Frobenius difference of ``s B0 A0``; int8 median 0.03 / max 0.06). This never affects the
    guarantee: the offset form subtracts exactly what the adapter starts with, on the quantised weight.
    """
    statistics = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, TARGETS, show_progress=False
    )
    reference = _init_products(make_llama(tokenizer), statistics)
    bounds = {"nf4-dq": 1.5, "int8": 0.15}
    for kind, bound in bounds.items():
        products = _init_products(load_quantized(saved_base, kind), statistics)
        assert products.keys() == reference.keys()
        diffs = sorted(float((products[k] - reference[k]).norm() / reference[k].norm()) for k in reference)
        print(f"{kind}: init difference vs fp32, median {diffs[len(diffs) // 2]:.3f}, max {diffs[-1]:.3f}")
        assert diffs[-1] < bound, (kind, diffs)


def test_unsupported_quantization_backends_fail_before_touching_the_model(tokenizer):
    statistics = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, ["q_proj"], show_progress=False
    )
    for method in ("gptq", "awq", "hqq", "torchao", "eetq"):
        model = make_llama(tokenizer)
        model.config.quantization_config = {"quant_method": method}
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=rf"does not support {method}.*Supported: .*bitsandbytes 4-bit"):
            get_peft_model(model, guard_config(statistics, target_modules=["q_proj"]))
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    class HQQLinear(torch.nn.Module):  # a foreign quantised layer found by the module scan
        W_q = None

    model = make_llama(tokenizer)
    model.model.layers[0].mlp.add_module("quantised", HQQLinear())
    with pytest.raises(ValueError, match="does not support HQQ"):
        get_peft_model(model, guard_config(statistics, target_modules=["q_proj"]))


def _dequantised(model) -> dict[str, torch.Tensor]:
    return {
        name: dequantize_module_weight(module).float().clone()
        for name, module in model.named_modules()
        if type(module).__name__ == "Linear4bit"
    }


@pytest.mark.parametrize("kind", ["nf4-dq", "nf4"])
def test_disable_bnb_cpu_packing_keeps_save_pretrained_exact(kind, tokenizer, saved_base, tmp_path):
    """Plain LoRA on a 4-bit CPU base: with the packed bf16 path off, ``save_pretrained`` leaves the model alone."""
    model = load_quantized(saved_base, kind)
    disable_bnb_cpu_packing(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    before = logits_of(peft_model, tokenizer, BENIGN_TEXTS)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert torch.equal(logits_of(peft_model, tokenizer, BENIGN_TEXTS), before)
    fresh = load_quantized(saved_base, kind)
    disable_bnb_cpu_packing(fresh)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.equal(logits_of(reloaded, tokenizer, BENIGN_TEXTS), before)


@pytest.mark.parametrize("kind", ["nf4-dq", "nf4"])
def test_disable_bnb_cpu_packing_undoes_a_packed_weight(kind, tokenizer, saved_base):
    """On AVX512-BF16 CPUs an eval forward packs the 4-bit weights (scales rounded to bf16); undoing it gives the
    loaded weight back up to that rounding, for in_features above the block size too (``down_proj``: 128 > 64)."""
    model = load_quantized(saved_base, kind)
    reference = _dequantised(model)
    logits_of(model, tokenizer, BENIGN_TEXTS)
    states = [module.weight.quant_state for module in model.modules() if type(module).__name__ == "Linear4bit"]
    if not any(getattr(state, "packing_format_for_cpu", False) for state in states):
        pytest.skip("this bitsandbytes / CPU has no packed 4-bit CPU path")
    assert disable_bnb_cpu_packing(model) == len(reference)
    restored = _dequantised(model)
    for name, weight in reference.items():
        assert _max_rel(restored[name], weight) < 1e-2, name  # bf16 scales: ~4e-3
    assert disable_bnb_cpu_packing(model) == 0  # idempotent


@pytest.mark.parametrize("kind", ["nf4"])
def test_guardspace_init_reads_the_unpacked_weight_of_a_packed_layer(kind, tokenizer, saved_base, tmp_path):
    """A 4-bit model that already ran in eval mode holds packed CPU weights; the init must read the plain weight
    (up to the packing's bf16 scales), not the packed bytes, for its factors and its output energy."""
    fresh = load_quantized(saved_base, kind)
    statistics = collect_safety_statistics(fresh, tokenizer, HARMFUL_PROMPTS, TARGETS, show_progress=False)
    statistics.save(tmp_path / "stats.safetensors")
    expected = get_peft_model(fresh, guard_config(str(tmp_path / "stats.safetensors")))
    packed = load_quantized(saved_base, kind)
    logits_of(packed, tokenizer, BENIGN_TEXTS)
    states = [module.weight.quant_state for module in packed.modules() if type(module).__name__ == "Linear4bit"]
    if not any(getattr(state, "packing_format_for_cpu", False) for state in states):
        pytest.skip("this bitsandbytes / CPU has no packed 4-bit CPU path")
    created = get_peft_model(packed, guard_config(str(tmp_path / "stats.safetensors")))
    energies = {
        name: module.lora_guard["default"].output_energy
        for name, module in expected.named_modules()
        if hasattr(module, "lora_guard")
    }
    assert energies
    for name, module in created.named_modules():
        if hasattr(module, "lora_guard"):
            assert _max_rel(module.lora_guard["default"].output_energy, energies[name]) < 2e-2, name
