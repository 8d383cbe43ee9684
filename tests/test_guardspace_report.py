"""guardspace_report: null-space dimensions, kept singular values, dead layers; logged at init; rank allocation."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from conftest import BENIGN_TEXTS, LLAMA_TARGETS, make_llama, train_steps
from peft import get_peft_model

from peft_safety import GuardSpaceConfig, collect_safety_statistics, guardspace_report
from peft_safety.guardspace.decomposition import damp_covariance, exact_null_floor


@pytest.fixture(scope="module")
def stats(tokenizer):
    """90 tokens of random word sequences: the 64-dim gate/up inputs are full rank at 1e-6, down_proj (128) is not."""
    words = sorted(w for w in tokenizer.get_vocab() if not w.startswith("<"))
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(15)]
    return collect_safety_statistics(make_llama(tokenizer), tokenizer, prompts, LLAMA_TARGETS, show_progress=False)


def expected_null_dim(stats, name: str, r: int = 4) -> int:
    """The default rule: the exact null space if it has at least ``r`` directions, else ``lambda <= 1e-6 max``."""
    eigenvalues = torch.linalg.eigvalsh(stats.covariance(name))
    exact = int((eigenvalues <= exact_null_floor(len(eigenvalues), torch.float64) * eigenvalues[-1]).sum())
    return exact if exact >= r else int((eigenvalues <= 1e-6 * eigenvalues[-1]).sum())


@pytest.fixture(scope="module")
def uniform(tokenizer, stats):
    model = get_peft_model(
        make_llama(tokenizer),
        GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats),
    )
    return model, guardspace_report(model)


def test_null_dims_match_the_eigendecomposition(uniform, stats):
    model, report = uniform
    assert report.adapter_name == "default" and len(report.layers) == 14
    config = model.peft_config["default"]
    for layer in report.layers:
        assert layer.null_dim == expected_null_dim(stats, layer.name), layer.name
        assert config.null_space_dims[layer.name] == layer.null_dim
        assert layer.r == 4
    assert {layer.name for layer in report.layers} == set(stats.module_names)


def test_kept_singular_values_are_the_smallest_of_w_c(uniform, stats):
    model, report = uniform
    modules = dict(model.base_model.model.named_modules())
    for layer in report.layers:
        weight = modules[layer.name].base_layer.weight.double()
        damped, _, _ = damp_covariance(stats.covariance(layer.name))
        singular = torch.linalg.svdvals(weight @ damped)
        torch.testing.assert_close(
            torch.tensor(layer.singular_values, dtype=torch.float64), singular[-4:], rtol=1e-5, atol=0
        )
        assert (layer.in_features, layer.out_features) == (weight.shape[1], weight.shape[0])


def test_dead_layers_are_listed(uniform):
    _, report = uniform
    dead = report.dead_layers
    assert "model.layers.0.mlp.gate_proj" in dead and "model.layers.0.mlp.up_proj" in dead
    assert "model.layers.0.mlp.down_proj" not in dead
    assert 0 < len(dead) < len(report.layers)
    assert dead == [layer.name for layer in report.layers if layer.null_dim == 0]
    as_dict = report.to_dict()
    assert as_dict["dead_layers"] == dead and len(as_dict["layers"]) == 14
    text = str(report)
    assert f"{len(dead)} dead" in text and "model.layers.0.mlp.down_proj" in text


def test_dead_layer_cannot_learn_but_live_ones_do(tokenizer, stats):
    model = get_peft_model(
        make_llama(tokenizer),
        GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats),
    )
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=2, lr=1e-2)
    layers = model.base_model.model.model.layers
    assert float(layers[0].mlp.gate_proj.get_delta_weight("default").abs().max()) == 0.0  # dead: P = 0
    assert float(layers[0].mlp.down_proj.get_delta_weight("default").abs().max()) > 1e-4


def test_report_is_logged_at_init(tokenizer, stats, caplog):
    with caplog.at_level(logging.INFO, logger="peft_safety"):
        get_peft_model(
            make_llama(tokenizer),
            GuardSpaceConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats),
        )
    messages = [record.getMessage() for record in caplog.records if record.name == "peft_safety"]
    assert any(
        "GuardSpace adapter 'default': 14 layers" in m and "model.layers.1.mlp.down_proj" in m for m in messages
    )
    warnings = [r for r in caplog.records if r.name == "peft_safety" and r.levelno == logging.WARNING]
    assert warnings and "have no null space at threshold auto" in warnings[0].getMessage()


def test_report_rejects_unknown_adapter(uniform):
    with pytest.raises(ValueError, match="no GuardSpace adapter named 'other'"):
        guardspace_report(uniform[0], "other")


def test_null_dim_rank_allocation(tokenizer, stats, uniform):
    uniform_model, report = uniform
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats, rank_allocation="null_dim"
    )
    model = get_peft_model(make_llama(tokenizer), config)
    allocated = guardspace_report(model)
    null_dims = {layer.name: layer.null_dim for layer in report.layers}
    ranks = {layer.name: layer.r for layer in allocated.layers}
    assert {layer.name: layer.null_dim for layer in allocated.layers} == null_dims
    for name, k in null_dims.items():
        if k == 0:
            assert ranks[name] == 1, name
        else:
            assert 1 <= ranks[name] <= k
    live = [name for name, k in null_dims.items() if k > 0]
    assert max(ranks[name] for name in live) > 4  # live layers get more than the uniform rank
    # larger null space, at least as much rank
    ordered = sorted(live, key=null_dims.get)
    assert [ranks[n] for n in ordered] == sorted(ranks[n] for n in ordered)
    budget = uniform_model.get_nb_trainable_parameters()[0]
    spent = model.get_nb_trainable_parameters()[0]
    assert spent <= budget
    assert spent > budget // 2  # the freed budget is actually reused
    # the allocation goes through PEFT's rank_pattern and is saved with the adapter config
    assert config.rank_pattern and all(isinstance(v, int) for v in config.rank_pattern.values())
    assert model.base_model.model.model.layers[0].mlp.down_proj.r["default"] == ranks["model.layers.0.mlp.down_proj"]


def test_null_dim_rank_allocation_keeps_the_init_exact(tokenizer, stats):
    from conftest import logits_of

    texts = BENIGN_TEXTS
    base = logits_of(make_llama(tokenizer), tokenizer, texts)
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats, rank_allocation="null_dim"
    )
    model = get_peft_model(make_llama(tokenizer), config)
    torch.testing.assert_close(logits_of(model, tokenizer, texts), base, rtol=0, atol=1e-6)
