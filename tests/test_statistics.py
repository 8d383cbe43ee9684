"""collect_safety_statistics / SafetyStatistics: sites, masking, normalisation, dtypes, inputs, storage."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from conftest import GPT2_TARGETS, HARMFUL_PROMPTS, LLAMA_TARGETS, make_gpt2, make_llama

from peft_safety import SafetyStatistics, collect_safety_statistics

# prompts of different lengths, so that batches need padding
PROMPTS = HARMFUL_PROMPTS + ["What is the capital of France", "Add seven"]


def collect(model, tok, prompts=PROMPTS, targets=LLAMA_TARGETS, **kwargs):
    kwargs.setdefault("show_progress", False)
    return collect_safety_statistics(model, tok, prompts, targets, **kwargs)


@torch.no_grad()
def reference_inputs(model, tok, prompts, module_name) -> list[torch.Tensor]:
    """Inputs of ``module_name`` per prompt, one prompt at a time (no padding at all), float64."""
    module = dict(model.named_modules())[module_name]
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _o: seen.append(args[0][0].double()))
    try:
        for prompt in prompts:
            model(**tok(prompt, return_tensors="pt"))
    finally:
        handle.remove()
    return seen


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_llama(tokenizer, seed=1)


@pytest.fixture(scope="module")
def stats(model, tokenizer):
    return collect(model, tokenizer, batch_size=1)


def test_sites_are_shared_by_modules_reading_the_same_input(stats):
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        q = prefix + "self_attn.q_proj"
        gate = prefix + "mlp.gate_proj"
        assert stats.site_of[prefix + "self_attn.k_proj"] == q
        assert stats.site_of[prefix + "self_attn.v_proj"] == q
        assert stats.site_of[prefix + "mlp.up_proj"] == gate
        assert stats.site_of[prefix + "self_attn.o_proj"] == prefix + "self_attn.o_proj"
        assert stats.site_of[prefix + "mlp.down_proj"] == prefix + "mlp.down_proj"
    assert len(stats.covariance_sums) == 2 * 4  # one per site, not one per module
    assert len(stats.module_names) == 2 * 7
    assert torch.equal(
        stats.covariance("model.layers.0.self_attn.k_proj"), stats.covariance("model.layers.0.self_attn.q_proj")
    )


def test_sums_equal_per_prompt_reference(model, tokenizer, stats):
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        xs = reference_inputs(model, tokenizer, PROMPTS, name)
        expected = sum(x.T @ x for x in xs)
        torch.testing.assert_close(stats.covariance_sums[name], expected, rtol=1e-6, atol=1e-6)
    assert stats.num_tokens == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert stats.num_prompts == len(PROMPTS)
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(stats.covariance(name), stats.covariance_sums[name].double() / stats.num_tokens)


def test_padded_batches_equal_batch_size_one(model, tokenizer, stats):
    batched = collect(model, tokenizer, batch_size=3)
    assert batched.num_tokens == stats.num_tokens
    assert batched.site_of == stats.site_of
    for site, value in stats.covariance_sums.items():
        # padded rows would add O(1) entries; batched attention kernels differ from batch 1 by float32 rounding
        torch.testing.assert_close(
            batched.covariance_sums[site], value, rtol=1e-5, atol=1e-6 * float(value.abs().max())
        )


def test_bos_rows_are_counted_and_exclude_bos_is_refused(model, tokenizer):
    """BOS enters the covariance: leaving it out would let the adapter change BOS's outputs and, through attention,
    every later position. ``exclude_bos=True`` is refused; new files record ``exclude_bos: False``."""
    prompts = ["<s> " + p for p in PROMPTS]
    assert all(tokenizer(p)["input_ids"][0] == tokenizer.bos_token_id for p in prompts)
    with pytest.raises(ValueError, match="every later position"):
        collect(model, tokenizer, prompts, batch_size=4, exclude_bos=True)
    with_bos = collect(model, tokenizer, prompts, batch_size=4, exclude_bos=False)
    assert with_bos.num_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert with_bos.metadata["exclude_bos"] is False
    name = "model.layers.1.self_attn.q_proj"
    rows = torch.cat(reference_inputs(model, tokenizer, prompts, name))
    torch.testing.assert_close(with_bos.covariance_sums[name], rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_prompt_max_normalisation(model, tokenizer):
    stats = collect(model, tokenizer, batch_size=3, normalization="prompt_max")
    assert stats.metadata["normalization"] == "prompt_max"
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        xs = reference_inputs(model, tokenizer, PROMPTS, name)
        expected = sum((x / x.abs().max()).T @ (x / x.abs().max()) for x in xs)
        torch.testing.assert_close(
            stats.covariance_sums[name], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
        )
        assert not torch.allclose(stats.covariance_sums[name], sum(x.T @ x for x in xs), rtol=0.1)


@pytest.mark.parametrize("normalization", ["none", "prompt_max"])
def test_rows_gathered_across_batches_give_the_same_sums(model, tokenizer, monkeypatch, normalization):
    """Rows wait per site until enough are gathered for one product; products over rows of several batches and
    prompts (here once 23 rows wait: two or three batches of two prompts) sum to the per-prompt reference."""
    from peft_safety import statistics

    monkeypatch.setattr(statistics, "GATHERED_ROWS", 23)
    gathered = collect(model, tokenizer, batch_size=2, normalization=normalization)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        xs = reference_inputs(model, tokenizer, PROMPTS, name)
        if normalization == "prompt_max":
            xs = [x / x.abs().max() for x in xs]
        expected = sum(x.T @ x for x in xs)
        torch.testing.assert_close(
            gathered.covariance_sums[name], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
        )


def test_float32_accumulation_is_close_to_float64(model, tokenizer, stats):
    single = collect(model, tokenizer, batch_size=1, accumulate_dtype=torch.float32)
    assert single.metadata["accumulate_dtype"] == "float32"
    for site, value in stats.covariance_sums.items():
        assert single.covariance_sums[site].dtype == torch.float32
        assert value.dtype == torch.float64
        # the stated bound: relative error about T * 2**-24 of the entries' scale
        bound = stats.num_tokens * 2.0**-24 * float(value.abs().max())
        assert float((single.covariance_sums[site].double() - value).abs().max()) <= bound


def test_dataset_input_with_text_column(model, tokenizer, stats):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"goal": PROMPTS, "target": ["x"] * len(PROMPTS)})
    from_dataset = collect(model, tokenizer, dataset, batch_size=1, text_column="goal")
    for site, value in stats.covariance_sums.items():
        torch.testing.assert_close(from_dataset.covariance_sums[site], value, rtol=0, atol=0)
    assert from_dataset.metadata["prompts_sha256"] == stats.metadata["prompts_sha256"]
    with pytest.raises(ValueError, match="no 'prompt' column"):
        collect(model, tokenizer, dataset)


def test_save_load_round_trip_with_metadata(stats, tmp_path):
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = SafetyStatistics.load(path)
    assert loaded.site_of == stats.site_of
    assert (loaded.num_tokens, loaded.num_prompts) == (stats.num_tokens, stats.num_prompts)
    assert set(loaded.covariance_sums) == set(stats.covariance_sums)
    for site, value in stats.covariance_sums.items():
        assert torch.equal(loaded.covariance_sums[site], value)
    meta = loaded.metadata
    assert meta == stats.metadata
    assert meta["model_class"] == "LlamaForCausalLM"
    assert meta["hidden_size"] == 64
    assert meta["module_shapes"]["model.layers.0.self_attn.k_proj"] == [32, 64]
    assert meta["module_shapes"]["model.layers.1.mlp.down_proj"] == [64, 128]
    assert meta["prompts_sha256"] == hashlib.sha256("\x1e".join(PROMPTS).encode()).hexdigest()
    assert loaded.fingerprint() == stats.fingerprint()


def test_prompt_hash_depends_on_prompts(model, tokenizer, stats):
    other = collect(model, tokenizer, PROMPTS[::-1], batch_size=8)
    assert other.metadata["prompts_sha256"] != stats.metadata["prompts_sha256"]
    for site, value in stats.covariance_sums.items():
        torch.testing.assert_close(other.covariance_sums[site], value, rtol=1e-5, atol=1e-6 * float(value.abs().max()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_raise(tokenizer, bad):
    model = make_llama(tokenizer, seed=1)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf in the input of 'model.layers.1.mlp.gate_proj'"):
        collect(model, tokenizer, batch_size=4)


def test_gpt2_conv1d(tokenizer):
    model = make_gpt2(tokenizer)
    stats = collect(model, tokenizer, targets=GPT2_TARGETS, batch_size=3)
    shapes = stats.metadata["module_shapes"]
    assert shapes["transformer.h.0.attn.c_attn"] == [192, 64]
    assert shapes["transformer.h.0.mlp.c_fc"] == [256, 64]
    assert shapes["transformer.h.0.mlp.c_proj"] == [64, 256]
    assert shapes["transformer.h.0.attn.c_proj"] == [64, 64]
    assert stats.metadata["model_class"] == "GPT2LMHeadModel"
    assert len(stats.covariance_sums) == 2 * 4  # every GPT-2 target reads its own input
    name = "transformer.h.1.mlp.c_proj"
    xs = reference_inputs(model, tokenizer, PROMPTS, name)
    torch.testing.assert_close(stats.covariance_sums[name], sum(x.T @ x for x in xs), rtol=1e-5, atol=1e-6)


def test_max_length_truncates(model, tokenizer):
    short = collect(model, tokenizer, batch_size=4, max_length=3)
    assert short.num_tokens == sum(min(3, len(tokenizer(p)["input_ids"])) for p in PROMPTS)
    assert short.metadata["max_length"] == 3


def test_chat_template_wraps_each_prompt(model, tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}<s> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} Sure{% endif %}"
    )
    templated = collect(model, chat, batch_size=4, chat_template=True)
    rendered = collect(model, tokenizer, ["<s> " + p + " Sure" for p in PROMPTS], batch_size=4)
    assert templated.metadata["chat_template"] is True
    assert templated.num_tokens == rendered.num_tokens == stats_tokens(tokenizer, PROMPTS) + 2 * len(PROMPTS)
    for site, value in rendered.covariance_sums.items():
        torch.testing.assert_close(templated.covariance_sums[site], value, rtol=0, atol=0)
    # default: the template when the tokenizer has one (as the evaluation does), raw text otherwise
    assert collect(model, chat, batch_size=4).num_tokens == templated.num_tokens
    assert collect(model, chat, batch_size=4, chat_template=False).num_tokens == stats_tokens(tokenizer, PROMPTS)
    assert collect(model, tokenizer, batch_size=4).metadata["chat_template"] is False
    with pytest.raises(ValueError, match="no chat template"):
        collect(model, tokenizer, batch_size=4, chat_template=True)


def stats_tokens(tokenizer, prompts) -> int:
    return sum(len(tokenizer(p)["input_ids"]) for p in prompts)
