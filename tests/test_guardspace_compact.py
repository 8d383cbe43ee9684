"""``GuardSpaceConfig(compact_bases=True)``: the null basis holds the leak vectors as columns. Same projector and
certificate as the default storage (float32 rounding apart), fewer bytes, and it saves and loads (trainable and
inference-only)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, logits_of, make_llama, train_steps
from peft import PeftModel, get_peft_model

from peft_safety import GuardSpaceConfig, collect_safety_statistics, guardspace_report

TEXTS = BENIGN_TEXTS + HARMFUL_PROMPTS
# more calibration tokens than features: no exact null space, every kept direction leaks (j = k), the case where
# the default storage holds up to n^2 floats per site
LEAKING = {"null_space_threshold": 1e-2}


def guard_buffer_bytes(model: torch.nn.Module) -> int:
    storages = {
        b.untyped_storage().data_ptr(): b.untyped_storage().nbytes()
        for name, b in model.named_buffers(remove_duplicate=False)
        if ".lora_guard." in name
    }
    return sum(storages.values())


@pytest.fixture(scope="module")
def statistics(tokenizer):
    words = sorted(word for word in tokenizer.get_vocab() if not word.startswith("<"))
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(words, k=12)) for _ in range(48)]  # ~600 tokens for 64 or 128 features
    return collect_safety_statistics(make_llama(tokenizer), tokenizer, prompts, LLAMA_TARGETS, show_progress=False)


def trained(tokenizer, statistics, compact: bool, **options) -> PeftModel:
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=statistics, compact_bases=compact,
        **{**LEAKING, **options},
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(make_llama(tokenizer), config)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=3, lr=1e-2)
    return model


@pytest.mark.parametrize("options", [{}, {"max_calibration_leakage": 1e-9}], ids=["report only", "bounded"])
def test_compact_bases_keep_the_function_and_certificate_in_fewer_bytes(tokenizer, statistics, options):
    default, compact = (
        trained(tokenizer, statistics, False, **options),
        trained(tokenizer, statistics, True, **options),
    )
    report, compact_report = guardspace_report(default), guardspace_report(compact)
    assert [layer.leaking_dims for layer in compact_report.layers] == [layer.leaking_dims for layer in report.layers]
    assert all(layer.leaking_dims == layer.null_dim for layer in report.layers)  # no exact null space
    assert any(layer.null_dim > layer.in_features / 2 for layer in report.layers)  # default: R plus the leak vectors
    assert guard_buffer_bytes(compact) < guard_buffer_bytes(default)
    assert not any(name.endswith(".leak_vectors") for name, _ in compact.named_buffers())
    assert compact_report.total_leakage == pytest.approx(report.total_leakage, rel=1e-3)
    assert compact_report.max_leakage == pytest.approx(report.max_leakage, rel=1e-3)
    reference = logits_of(default, tokenizer, TEXTS)
    assert float((logits_of(compact, tokenizer, TEXTS) - reference).norm() / reference.norm()) < 1e-5


def test_compact_adapter_saves_and_loads(tokenizer, statistics, tmp_path):
    model = trained(tokenizer, statistics, True, max_calibration_leakage=1e-9)
    expected, certificate = logits_of(model, tokenizer, TEXTS), guardspace_report(model).total_leakage
    model.save_pretrained(tmp_path)
    for is_trainable in (True, False):
        loaded = PeftModel.from_pretrained(make_llama(tokenizer), tmp_path, is_trainable=is_trainable).eval()
        assert loaded.peft_config["default"].compact_bases
        torch.testing.assert_close(logits_of(loaded, tokenizer, TEXTS), expected, rtol=0, atol=1e-4)
        assert guardspace_report(loaded).total_leakage == pytest.approx(certificate, rel=1e-5)
