"""Bad input: a clear error before any work, and the model's state dict unchanged (same keys, equal tensors)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import HARMFUL_PROMPTS, LLAMA_TARGETS, llama_config, make_llama
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from peft_safety import GuardSpaceConfig, SafetyStatistics, collect_safety_statistics


@pytest.fixture(scope="module")
def stats(tokenizer):
    return collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )


@pytest.fixture
def model(tokenizer):
    return make_llama(tokenizer)


@contextlib.contextmanager
def untouched(model):
    """Assert that the block leaves ``model.state_dict()`` exactly as it was (and no PEFT layer behind)."""
    before = {key: value.clone() for key, value in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    yield
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        same = (after[key] == value) | (after[key].isnan() & value.isnan()) if value.is_floating_point() else None
        assert bool(same.all()) if same is not None else torch.equal(after[key], value), key
    assert [type(m) for m in model.modules()] == modules_before


def guard_config(stats, **kwargs) -> GuardSpaceConfig:
    kwargs.setdefault("target_modules", LLAMA_TARGETS)
    return GuardSpaceConfig(r=4, lora_alpha=8, safety_statistics=stats, **kwargs)


def collect(model, tokenizer, prompts, **kwargs):
    return collect_safety_statistics(model, tokenizer, prompts, LLAMA_TARGETS, show_progress=False, **kwargs)


def test_empty_prompt_list(model, tokenizer):
    with untouched(model), pytest.raises(ValueError, match="`prompts` is empty"):
        collect(model, tokenizer, [])
    with untouched(model), pytest.raises(ValueError, match="`prompts` is empty"):
        GuardSpaceConfig.from_prompts(model, tokenizer, [], r=4, target_modules=LLAMA_TARGETS)


@pytest.mark.parametrize("prompts", [["", "   "], HARMFUL_PROMPTS + ["\n"]])
def test_prompts_that_tokenise_to_nothing(model, tokenizer, prompts):
    with untouched(model), pytest.raises(ValueError, match="tokenise to no usable token"):
        collect(model, tokenizer, prompts)


def test_statistics_saved_without_bos_load_but_cannot_create_an_adapter(model, stats, tmp_path):
    """Files of earlier versions collected with ``exclude_bos=True`` stay readable; an adapter built on them would
    not keep the guarantee at any position, so creating one fails before the model is touched."""
    metadata = {**stats.metadata, "exclude_bos": True}
    old = SafetyStatistics(stats.covariance_sums, stats.site_of, stats.num_tokens, stats.num_prompts, metadata)
    old.save(tmp_path / "old.safetensors")
    loaded = SafetyStatistics.load(tmp_path / "old.safetensors")
    assert loaded.metadata["exclude_bos"] is True and loaded.fingerprint() == stats.fingerprint()
    with untouched(model), pytest.raises(ValueError, match="collected with `exclude_bos=True`.*every later position"):
        get_peft_model(model, guard_config(str(tmp_path / "old.safetensors")))


def test_collection_checks_target_modules(model, tokenizer):
    with untouched(model), pytest.raises(ValueError, match="matched no module"):
        collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, ["nope_proj"], show_progress=False)
    with untouched(model), pytest.raises(ValueError, match="linear layers only"):
        collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, ["embed_tokens"], show_progress=False)


@pytest.mark.parametrize(
    "target_modules, message",
    [
        (["nope_proj"], "matched no module"),
        (r".*\.nothing_here", "matched no module"),
        (["embed_tokens"], "linear layers only"),
        (["q_proj", "input_layernorm"], "linear layers only"),
    ],
)
def test_target_modules_that_do_not_fit(model, stats, target_modules, message):
    with untouched(model), pytest.raises(ValueError, match=message):
        get_peft_model(model, guard_config(stats, target_modules=target_modules))


def test_statistics_from_another_model(tokenizer, stats):
    config = llama_config(len(tokenizer))
    config.hidden_size, config.intermediate_size = 32, 64
    torch.manual_seed(0)
    other = LlamaForCausalLM(config).eval()
    with untouched(other), pytest.raises(ValueError, match="collected on another model.*LlamaForCausalLM"):
        get_peft_model(other, guard_config(stats))


def test_statistics_for_other_modules(model, tokenizer):
    partial = collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, ["q_proj"], show_progress=False)
    with untouched(model), pytest.raises(ValueError, match="do not cover 2 target module"):
        get_peft_model(model, guard_config(partial, target_modules=["q_proj", "v_proj"]))


def test_statistics_file_missing(model, tmp_path):
    with untouched(model), pytest.raises(FileNotFoundError, match="does not exist"):
        get_peft_model(model, guard_config(str(tmp_path / "missing.safetensors")))


def test_statistics_file_not_safetensors(model, tmp_path, stats):
    pickle_like = tmp_path / "stats.bin"
    torch.save({"x": torch.zeros(2)}, pickle_like)
    with untouched(model), pytest.raises(ValueError, match="not a safetensors file"):
        get_peft_model(model, guard_config(str(pickle_like)))
    text = tmp_path / "stats.safetensors"
    text.write_text("not a tensor file")
    with untouched(model), pytest.raises(ValueError, match="not a safetensors file"):
        get_peft_model(model, guard_config(text))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, foreign)
    with untouched(model), pytest.raises(ValueError, match="holds no peft_safety statistics header"):
        get_peft_model(model, guard_config(str(foreign)))


def test_rank_larger_than_the_layer(model, stats):
    # k_proj is 64 -> 32: r = 40 fits q_proj but not k_proj
    with untouched(model), pytest.raises(ValueError, match=r"r=40 for 'model\.layers\.0\.self_attn\.k_proj' exceeds"):
        get_peft_model(model, GuardSpaceConfig(r=40, target_modules=LLAMA_TARGETS, safety_statistics=stats))
    with untouched(model), pytest.raises(ValueError, match="r=65 .* exceeds min"):
        get_peft_model(model, guard_config(stats, rank_pattern={"q_proj": 65}))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations(tokenizer, bad):
    model = make_llama(tokenizer)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids("bomb")] = bad
    with (
        untouched(model),
        pytest.raises(ValueError, match="NaN or Inf in the input of 'model.layers.0.self_attn.q_proj'"),
    ):
        GuardSpaceConfig.from_prompts(model, tokenizer, HARMFUL_PROMPTS, r=4, target_modules=LLAMA_TARGETS)


@pytest.mark.parametrize(
    "patterns, message",
    [
        ({"rank_pattern": {"nope_proj": 2}}, "rank_pattern key 'nope_proj' matches none of the 14 target modules"),
        ({"alpha_pattern": {"lm_head": 2}}, "alpha_pattern key 'lm_head' matches none"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive number"),
        ({"rank_pattern": {"q_proj": -2}}, r"rank_pattern\['q_proj'\] must be a positive number"),
        ({"alpha_pattern": {"v_proj": -1.0}}, r"alpha_pattern\['v_proj'\] must be a positive number"),
        ({"rank_pattern": {"q_proj": "8"}}, r"rank_pattern\['q_proj'\] must be a positive number"),
    ],
)
def test_rank_and_alpha_patterns_that_do_not_fit(model, stats, patterns, message):
    with untouched(model), pytest.raises(ValueError, match=message):
        get_peft_model(model, guard_config(stats, **patterns))


def test_bad_config_values():
    with pytest.raises(ValueError, match="null_space_threshold"):
        GuardSpaceConfig(r=4, target_modules=["q_proj"], null_space_threshold=0.0)
    with pytest.raises(ValueError, match="rank_allocation"):
        GuardSpaceConfig(r=4, target_modules=["q_proj"], rank_allocation="greedy")
    with pytest.raises(ValueError, match="always initialises with 'guardspace'"):
        GuardSpaceConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="use_dora"):
        GuardSpaceConfig(r=4, target_modules=["q_proj"], use_dora=True)


def test_no_statistics_at_all(model):
    with untouched(model), pytest.raises(ValueError, match="needs `safety_statistics`"):
        get_peft_model(model, GuardSpaceConfig(r=4, target_modules=LLAMA_TARGETS))


def test_statistics_object_is_accepted_after_errors(model, stats, tmp_path):
    """After the refusals above, the same model still takes a valid adapter (nothing was left half-injected)."""
    stats.save(tmp_path / "ok.safetensors")
    assert SafetyStatistics.load(tmp_path / "ok.safetensors").num_tokens == stats.num_tokens
    with pytest.raises(ValueError):
        get_peft_model(model, guard_config(stats, target_modules=["nope_proj"]))
    peft_model = get_peft_model(model, guard_config(str(tmp_path / "ok.safetensors")))
    assert len(peft_model.peft_config["default"].null_space_dims) == 14
