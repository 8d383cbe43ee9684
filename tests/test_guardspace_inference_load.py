"""Inference-only loading: ``PeftModel.from_pretrained(..., is_trainable=False)`` (PEFT's default) of a GuardSpace
adapter allocates no projector basis and no leak vectors, yet gives the trainable load's logits, merge, export and
certificate; training, re-projecting or saving it again raises."""

from __future__ import annotations

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, logits_of, make_llama, train_steps
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_safety import GuardSpaceConfig, collect_safety_statistics, export_to_lora, guardspace_report

TEXTS = BENIGN_TEXTS + HARMFUL_PROMPTS
# the fold runs the trainable forward's float32 operations once, on fresh copies of the checkpoint's tensors: the
# results are bit-identical (on the file's unaligned memory-mapped tensors CPU GEMM kernels rounded differently,
# ~5e-5 in the logits under the leakage bound)
ATOL = 0.0
# "auto": exact null spaces, nothing leaks; 1e-2: near-null directions leak, and the bound scales them down
SETTINGS = {"exact": {}, "bounded leakage": {"null_space_threshold": 1e-2, "max_calibration_leakage": 1e-9}}


def guard_buffer_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the GuardSpace buffers."""
    storages = {
        buffer.untyped_storage().data_ptr(): buffer.untyped_storage().nbytes()
        for name, buffer in model.named_buffers(remove_duplicate=False)
        if ".lora_guard." in name
    }
    return sum(storages.values())


@pytest.fixture(scope="module", params=list(SETTINGS))
def saved(request, tokenizer, tmp_path_factory):
    statistics = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=statistics, **SETTINGS[request.param]
    )
    model = get_peft_model(make_llama(tokenizer), config)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=3, lr=1e-2)
    if request.param == "bounded leakage":
        report = guardspace_report(model)
        assert any(layer.leaking_dims for layer in report.layers)  # the bound acts on leaking directions
    path = tmp_path_factory.mktemp("inference") / "adapter"
    model.save_pretrained(path)
    return path


def test_inference_load_gives_the_trainable_logits_without_bases(tokenizer, saved, tmp_path):
    trainable = PeftModel.from_pretrained(make_llama(tokenizer), saved, is_trainable=True).eval()
    inference = PeftModel.from_pretrained(make_llama(tokenizer), saved).eval()

    names = [name for name, _ in inference.named_buffers() if ".lora_guard." in name]
    assert names and not [name for name in names if name.endswith((".basis", ".leak_vectors"))]
    assert any(name.endswith(".basis") for name, _ in trainable.named_buffers())
    assert guard_buffer_bytes(inference) < guard_buffer_bytes(trainable)

    expected_logits = logits_of(trainable, tokenizer, TEXTS)
    torch.testing.assert_close(logits_of(inference, tokenizer, TEXTS), expected_logits, rtol=0, atol=ATOL)
    expected, got = guardspace_report(trainable), guardspace_report(inference)
    assert got.total_leakage == pytest.approx(expected.total_leakage, rel=1e-5, abs=1e-12)
    assert [layer.null_dim for layer in got.layers] == [layer.null_dim for layer in expected.layers]

    export_to_lora(trainable, tmp_path / "trainable")
    export_to_lora(inference, tmp_path / "inference")
    exported = load_file(tmp_path / "inference" / "adapter_model.safetensors")
    for key, value in load_file(tmp_path / "trainable" / "adapter_model.safetensors").items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=ATOL, msg=key)

    merged = logits_of(trainable.merge_and_unload(), tokenizer, TEXTS)
    torch.testing.assert_close(logits_of(inference.merge_and_unload(), tokenizer, TEXTS), merged, rtol=0, atol=ATOL)


def test_inference_load_refuses_training_saving_and_reprojection(tokenizer, saved, tmp_path):
    model = PeftModel.from_pretrained(make_llama(tokenizer), saved)
    assert not [name for name, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="loaded for inference only"):
        model.save_pretrained(tmp_path / "again")
    with pytest.raises(RuntimeError, match="loaded for inference only"):
        model.add_weighted_adapter(["default"], [1.0], "merged", combination_type="linear")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    with pytest.raises(RuntimeError, match="loaded for inference only"):
        train_steps(model, tokenizer, BENIGN_TEXTS, steps=1)
