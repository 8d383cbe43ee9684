"""The leakage certificate: per-layer ``tr(dW C dW^T) / tr(W C W^T)`` from stored eigenpairs, equal to the output
change measured on the calibration activations; the opt-in hard bound; the same figure on held-out statistics."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, encode, logits_of, make_llama, train_steps
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_safety import GuardSpaceConfig, collect_safety_statistics, export_to_lora, guardspace_report
from peft_safety.guardspace.layer import LEGACY_BUFFERS

THRESHOLD = 1e-3  # wide: many kept directions carry nonzero eigenvalues, so the update can leak through them


@pytest.fixture(scope="module")
def stats(tokenizer):
    return collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )


def guardspace_layers(model) -> dict[str, torch.nn.Module]:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if "default" in getattr(module, "lora_guard", ())
    }


@torch.no_grad()
def measured_leakage(model, tokenizer, texts: list[str]) -> dict[str, float]:
    """Mean squared adapter output per token on the *base model's* activations of ``texts``, captured with hooks."""
    base = make_llama(tokenizer)
    layers = guardspace_layers(model)
    modules = dict(base.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    batch = encode(tokenizer, texts)
    mask = batch["attention_mask"].bool()
    handles = [
        modules[name].register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0][mask]))
        for name in layers
    ]
    base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return {
        name: float((layer(inputs[name]) - layer.base_layer(inputs[name])).double().pow(2).sum(-1).mean())
        for name, layer in layers.items()
    }


def train(tokenizer, stats, **options):
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats, null_space_threshold=THRESHOLD,
        **options,
    )  # fmt: skip
    torch.manual_seed(0)
    return get_peft_model(make_llama(tokenizer), config)


def test_certificate_equals_the_leakage_measured_on_calibration_activations(tokenizer, stats):
    model = train(tokenizer, stats)
    assert guardspace_report(model).total_leakage == 0.0  # init: the update is zero
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=10, lr=1e-2, weight_decay=0.1)
    report = guardspace_report(model)
    measured = measured_leakage(model, tokenizer, HARMFUL_PROMPTS)
    leaking = [layer for layer in report.layers if layer.leaking_dims > 0]
    assert len(leaking) >= 4
    for layer in leaking:
        assert layer.leakage_energy > 0
        assert layer.leakage_energy == pytest.approx(measured[layer.name], rel=1e-2), layer.name
        assert layer.output_energy > 0
    assert report.total_leakage == pytest.approx(
        sum(layer.leakage_energy for layer in report.layers) / sum(layer.output_energy for layer in report.layers)
    )
    assert "calibration leakage" in str(report)


def test_exact_null_space_has_no_leaking_directions(tokenizer, stats):
    config = GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats)
    model = get_peft_model(make_llama(tokenizer), config)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=5, lr=1e-2)
    report = guardspace_report(model)
    exact = [layer for layer in report.layers if layer.leaking_dims == 0 and not layer.dead]
    assert exact and all(layer.leakage_energy == 0.0 for layer in exact)
    measured = measured_leakage(model, tokenizer, HARMFUL_PROMPTS)
    assert all(measured[layer.name] < 1e-10 * layer.output_energy for layer in exact)


@pytest.mark.slow
def test_hard_bound_holds_at_every_adamw_step(tokenizer, stats):
    bound = 1e-6
    unbounded = train(tokenizer, stats)
    train_steps(unbounded, tokenizer, BENIGN_TEXTS, steps=20, lr=1e-2, weight_decay=0.1)
    assert guardspace_report(unbounded).max_leakage > 10 * bound  # the bound binds on this training

    model = train(tokenizer, stats, max_calibration_leakage=bound)
    losses = []
    for step in range(20):
        losses += train_steps(model, tokenizer, BENIGN_TEXTS, steps=1, lr=1e-2, weight_decay=0.1, seed=step)
        report = guardspace_report(model)
        assert report.max_leakage <= bound * (1 + 1e-3), (step, report.max_leakage)
    measured = measured_leakage(model, tokenizer, HARMFUL_PROMPTS)
    for layer in report.layers:
        assert measured[layer.name] <= bound * layer.output_energy * 1.01 + 1e-12, layer.name
    assert losses[-1] < 0.9 * losses[0]  # it still learns
    # merges apply the same bounded update
    for name, module in guardspace_layers(model).items():
        state, delta = module.lora_guard["default"], module.get_delta_weight("default").double()
        leaked = float(((delta @ state.leak_vectors.double()) ** 2).sum(0) @ state.leak_values.double())
        assert leaked <= bound * float(state.output_energy) * (1 + 1e-3) + 1e-12, name


def test_heldout_statistics_give_the_exact_output_change_on_other_inputs(tokenizer, stats):
    model = train(tokenizer, stats)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=5, lr=1e-2)
    same = guardspace_report(model, heldout_statistics=stats)
    for layer in same.layers:  # on the calibration statistics themselves the two figures agree
        assert layer.heldout_leakage == pytest.approx(layer.leakage, rel=1e-3, abs=1e-9), layer.name
    benign = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, BENIGN_TEXTS, LLAMA_TARGETS, show_progress=False
    )
    report = guardspace_report(model, heldout_statistics=benign)
    measured = measured_leakage(model, tokenizer, BENIGN_TEXTS)
    layers = guardspace_layers(model)
    for layer in report.layers:
        weight = layers[layer.name].base_layer.weight.double()
        energy = float(((weight @ benign.covariance(layer.name)) * weight).sum())
        assert layer.heldout_leakage * energy == pytest.approx(measured[layer.name], rel=1e-2), layer.name
        assert layer.dead or layer.heldout_leakage > 100 * layer.leakage  # the update acts off the calibration span
    assert "held-out" in str(report)


def test_saved_adapter_and_export_record_the_certificate(tokenizer, stats, tmp_path):
    model = train(tokenizer, stats)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=3, lr=1e-2)
    report = guardspace_report(model)
    expected = {"total": report.total_leakage, "layers": {layer.name: layer.leakage for layer in report.layers}}
    assert report.total_leakage > 0
    export_to_lora(model, tmp_path / "export")
    with safe_open(tmp_path / "export" / "adapter_model.safetensors", framework="pt") as handle:
        exported = json.loads(handle.metadata()["peft_safety.calibration_leakage"])
    model.save_pretrained(tmp_path / "adapter", True, ["default"])  # PEFT's positional arguments still work
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["calibration_leakage"]
    for recorded in (exported, saved):
        assert recorded["total"] == pytest.approx(expected["total"])
        assert recorded["layers"] == pytest.approx(expected["layers"])
    reloaded = PeftModel.from_pretrained(make_llama(tokenizer), tmp_path / "adapter")
    assert guardspace_report(reloaded).total_leakage == pytest.approx(report.total_leakage, rel=1e-6)
    # the tuner and the adapted model give the same report (names relative to the adapted model)
    for root in (reloaded.base_model, reloaded.base_model.model):
        assert guardspace_report(root, heldout_statistics=stats).certificate() == report.certificate()


def test_adapter_saved_without_certificate_loads_with_one_warning(tokenizer, stats, tmp_path):
    """An adapter in the previous on-disk format (no input scale, no leak eigenpairs): same function, a clear
    warning instead of PEFT's missing-key list, NaN certificate, and the bound refused rather than not enforced."""
    model = train(tokenizer, stats, factor_scale="paper")
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=3, lr=1e-2)
    expected = logits_of(model, tokenizer, BENIGN_TEXTS)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if k.rsplit(".", 1)[-1] not in LEGACY_BUFFERS}, tmp_path / "adapter_model.safetensors")  # noqa: E501  # fmt: skip
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("near_null_dims", "calibration_leakage", "factor_scale", "max_calibration_leakage"):
        config.pop(key)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    with pytest.warns(UserWarning, match="saved by peft-safety 0.1") as caught:
        reloaded = PeftModel.from_pretrained(make_llama(tokenizer), tmp_path)
    assert not any("missing adapter keys" in str(w.message) for w in caught)
    torch.testing.assert_close(logits_of(reloaded, tokenizer, BENIGN_TEXTS), expected, rtol=0, atol=1e-5)
    report = guardspace_report(reloaded)
    assert math.isnan(report.total_leakage) and report.certificate()["total"] is None
    with pytest.raises(ValueError, match="cannot be enforced"):
        PeftModel.from_pretrained(make_llama(tokenizer), tmp_path, config=GuardSpaceConfig(**{**config, "max_calibration_leakage": 1e-6}))  # noqa: E501  # fmt: skip


def test_one_heldout_statistics_object_serves_two_models(tokenizer, stats):
    """The cached base energies belong to a layer, not to a module name: a second model (other base weights) reusing
    the same statistics object gets its own figures, equal to those from a fresh statistics object."""
    heldout = collect_safety_statistics(make_llama(tokenizer), tokenizer, BENIGN_TEXTS, LLAMA_TARGETS, show_progress=False)  # noqa: E501  # fmt: skip
    first, second = train(tokenizer, stats), train(tokenizer, stats)
    for layer in (m for m in second.modules() if "default" in getattr(m, "lora_B", {})):
        layer.base_layer.weight.data.mul_(2.0)  # another base model at the same module names
    for model in (first, second):
        train_steps(model, tokenizer, BENIGN_TEXTS, steps=3, lr=1e-2)
    guardspace_report(first, heldout_statistics=heldout)  # fills the cache with the first model's energies
    cached = guardspace_report(second, heldout_statistics=heldout)
    fresh = guardspace_report(second, heldout_statistics=dataclasses.replace(heldout))
    assert [layer.heldout_leakage for layer in cached.layers] == [layer.heldout_leakage for layer in fresh.layers]
