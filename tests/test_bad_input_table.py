"""A table of bad inputs across the API: each raises a clear error before any work (nothing silent, no NaN)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import HARMFUL_PROMPTS, LLAMA_TARGETS, make_llama
from peft import LoraConfig, get_peft_model
from test_guardspace_bad_input import untouched

from peft_safety import GuardSpaceConfig, SafetyMasks, SafetyStatistics, SOMFConfig, collect_safety_statistics
from peft_safety._files import TEMP_SUFFIX
from peft_safety.guardspace import export_to_lora
from peft_safety.statistics import _batches, batch_count

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def stats(tokenizer) -> SafetyStatistics:
    return collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )


@pytest.fixture
def model(tokenizer):
    return make_llama(tokenizer)


def _with(stats: SafetyStatistics, change) -> SafetyStatistics:
    """A copy of ``stats`` whose covariance sums are ``change(site, sum)``."""
    sums = {site: change(site, value.clone()) for site, value in stats.covariance_sums.items()}
    return SafetyStatistics(sums, dict(stats.site_of), stats.num_tokens, stats.num_prompts, dict(stats.metadata))


# ------------------------------------------------------------------------------------------ GuardSpaceConfig

GUARD_CONFIG_CASES = [
    (dict(lora_alpha=NAN), "`lora_alpha` must be a finite positive number"),
    (dict(lora_alpha=INF), "`lora_alpha` must be a finite positive number"),
    (dict(lora_alpha=-8), "`lora_alpha` must be a finite positive number.*lora_alpha=2 \\* r"),
    (dict(lora_alpha=0), "`lora_alpha` must be a finite positive number"),
    (dict(lora_alpha="8"), "`lora_alpha` must be a finite positive number"),
    (dict(lora_alpha=True), "`lora_alpha` must be a finite positive number"),
    (dict(r=0), "`r` must be a positive integer"),
    (dict(r=-4), "`r` must be a positive integer"),
    (dict(r=2.5), "`r` must be a positive integer"),
    (dict(r="4"), "`r` must be a positive integer"),
    (dict(damping_start=0.0), "`damping_start` must be a finite positive number"),
    (dict(damping_start=NAN), "`damping_start` must be a finite positive number"),
    (dict(damping_start=-0.01), "`damping_start` must be a finite positive number"),
    (dict(damping_tolerance=0.0), "`damping_tolerance` must be a finite positive number"),
    (dict(damping_tolerance=INF), "`damping_tolerance` must be a finite positive number"),
    (dict(null_space_threshold=NAN), "`null_space_threshold` must be 'auto' or a number in"),
    (dict(null_space_threshold=1.0), "`null_space_threshold` must be 'auto' or a number in"),
    (dict(null_space_threshold=-1e-6), "`null_space_threshold` must be 'auto' or a number in"),
    (dict(null_space_threshold="exact"), "`null_space_threshold` must be 'auto' or a number in"),
    (dict(max_calibration_leakage=NAN), "`max_calibration_leakage` must be None or a number in"),
    (dict(max_calibration_leakage=1.0), "`max_calibration_leakage` must be None or a number in"),
    (dict(max_calibration_leakage=-0.1), "`max_calibration_leakage` must be None or a number in"),
    (dict(factor_scale="huge"), "`factor_scale` must be 'auto', 'bounded', 'paper' or 'balanced'"),
    (dict(rank_allocation="greedy"), "`rank_allocation` must be 'uniform' or 'null_dim'"),
    (dict(modules_to_save=["lm_head"]), r"\['modules_to_save'\]: they train parameters outside the null-space"),
    (dict(trainable_token_indices=[0, 1]), r"\['trainable_token_indices'\]: they train parameters outside"),
    (dict(alora_invocation_tokens=[5, 6]), r"\['alora_invocation_tokens'\]: they train parameters outside"),
    (dict(use_dora=True), "cannot be combined with \\['use_dora'\\]"),
    (dict(init_lora_weights="gaussian"), "always initialises with 'guardspace'"),
    (dict(safety_statistics=5), "`safety_statistics` must be a SafetyStatistics object .*got int"),
    (dict(safety_statistics={"q_proj": torch.eye(2)}), "`safety_statistics` must be a SafetyStatistics object"),
]


@pytest.mark.parametrize("kwargs, message", GUARD_CONFIG_CASES)
def test_guardspace_config_refuses(kwargs, message):
    kwargs = {"r": 4, "target_modules": LLAMA_TARGETS, **kwargs}
    with pytest.raises(ValueError, match=message):
        GuardSpaceConfig(**kwargs)


@pytest.mark.parametrize(
    "patterns, message",
    [
        ({"alpha_pattern": {"q_proj": NAN}}, r"alpha_pattern\['q_proj'\] must be a positive number"),
        ({"alpha_pattern": {"q_proj": INF}}, r"alpha_pattern\['q_proj'\] must be a positive number"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] must be a positive number"),
        ({"rank_pattern": {"q_proj": True}}, r"rank_pattern\['q_proj'\] must be a positive number"),
    ],
)
def test_non_finite_patterns(model, stats, patterns, message):
    config = GuardSpaceConfig(r=4, target_modules=LLAMA_TARGETS, safety_statistics=stats, **patterns)
    with untouched(model), pytest.raises(ValueError, match=message):
        get_peft_model(model, config)


# ------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda site, s: s.zero_(), "is all zeros .*defines no null space"),
        (lambda site, s: s.fill_(NAN), "holds NaN or Inf"),
        (
            lambda site, s: s.fill_(INF) if site.endswith("down_proj") else s,
            "'model.layers.0.mlp.down_proj' holds NaN",
        ),
        (lambda site, s: s.zero_() if "layers.1" in site else s, r"'model\.layers\.1\.[a-z_.]+' is all zeros"),
    ],
)
def test_statistics_no_adapter_can_be_built_from(model, stats, tmp_path, change, message):
    bad = _with(stats, change)
    with untouched(model), pytest.raises(ValueError, match=message):
        get_peft_model(model, GuardSpaceConfig(r=4, target_modules=LLAMA_TARGETS, safety_statistics=bad))
    # saved to a file (as a damaged or hand-made file would be): the error names the file
    path = tmp_path / "bad.safetensors"
    bad.save(path)
    with untouched(model), pytest.raises(ValueError, match=f"'{path}'.*{message}"):
        get_peft_model(model, GuardSpaceConfig(r=4, target_modules=LLAMA_TARGETS, safety_statistics=str(path)))
    if "NaN" in message:  # non-finite sums are refused on loading already
        with pytest.raises(ValueError, match=f"'{path}'.*{message}"):
            SafetyStatistics.load(path)


def test_a_zero_site_the_adapter_does_not_use_is_accepted(tokenizer, stats, tmp_path):
    bad = _with(stats, lambda site, s: s.zero_() if "layers.1" in site else s)
    bad.save(tmp_path / "stats.safetensors")
    config = GuardSpaceConfig(
        r=4,
        target_modules=LLAMA_TARGETS,
        layers_to_transform=[0],
        safety_statistics=str(tmp_path / "stats.safetensors"),
    )
    peft_model = get_peft_model(make_llama(tokenizer), config)
    assert len(peft_model.peft_config["default"].null_space_dims) == 7


def test_statistics_without_tokens(model, stats):
    empty = SafetyStatistics(stats.covariance_sums, stats.site_of, 0, 0, stats.metadata)
    with untouched(model), pytest.raises(ValueError, match="count 0 tokens"):
        get_peft_model(model, GuardSpaceConfig(r=4, target_modules=LLAMA_TARGETS, safety_statistics=empty))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(normalization="bogus"), r"`normalization` must be one of \('none', 'prompt_max'\), got 'bogus'"),
        (dict(normalization=None), "`normalization` must be one of"),
        (dict(accumulate_dtype=torch.float16), "`accumulate_dtype` must be torch.float64"),
        (dict(accumulate_dtype="float64"), "`accumulate_dtype` must be torch.float64"),
        (dict(accumulate_device="bogus"), "`accumulate_device='bogus'` is not a torch device"),
        (dict(batch_size=0), "`batch_size` must be a positive integer"),
        (dict(batch_size=2.5), "`batch_size` must be a positive integer"),
        (dict(batch_size=True), "`batch_size` must be a positive integer"),
        (dict(max_length=0), "`max_length` must be a positive integer"),
        (dict(max_length="8"), "`max_length` must be a positive integer"),
    ],
)
def test_collection_options(model, tokenizer, kwargs, message):
    with untouched(model), pytest.raises(ValueError, match=message):
        collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False, **kwargs)


def test_statistics_save_into_a_missing_folder_or_a_folder(stats, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create"):
        stats.save(tmp_path / "missing" / "stats.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        stats.save(tmp_path)
    assert os.listdir(tmp_path) == []


def test_interrupted_save_keeps_the_old_file_and_leaves_no_temporary(stats, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "stats.safetensors"
    stats.save(path)
    before = path.read_bytes()

    def fail_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 100)  # a partly written file, then the failure (disk full, Ctrl-C, ...)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_halfway)
    with pytest.raises(OSError, match="No space left"):
        _with(stats, lambda site, s: s * 2).save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["stats.safetensors"]


def test_save_removes_temporaries_of_killed_saves(stats, tmp_path):
    path = tmp_path / "stats.safetensors"
    dead = tmp_path / f".stats.safetensors.999999999.abcd{TEMP_SUFFIX}"  # no process has this id
    alive = tmp_path / f".stats.safetensors.{os.getpid()}.abcd{TEMP_SUFFIX}"  # a save in progress: kept
    dead.write_bytes(b"partial")
    alive.write_bytes(b"partial")
    stats.save(path)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, "stats.safetensors"])
    assert SafetyStatistics.load(path).fingerprint() == stats.fingerprint()


def test_truncated_statistics_file(stats, tmp_path):
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"'{path}' is not a safetensors file written by peft_safety"):
        SafetyStatistics.load(path)


# ------------------------------------------------------------------------------------------ targets and ranks


def test_layers_to_transform_needs_statistics_of_the_adapted_layers_only(tokenizer, model):
    layer0 = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    partial = collect_safety_statistics(make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, layer0, show_progress=False)
    for options in ({"layers_to_transform": [0]}, {"layers_to_transform": 0, "layers_pattern": "layers"}):
        config = GuardSpaceConfig(r=4, target_modules=["q_proj", "v_proj"], safety_statistics=partial, **options)
        peft_model = get_peft_model(make_llama(tokenizer), config)
        adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_guard")]
        assert [name.removeprefix("base_model.model.") for name in adapted] == layer0
    config = GuardSpaceConfig(r=4, target_modules=["q_proj"], layers_to_transform=[7], safety_statistics=partial)
    with untouched(model), pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM in layers \[7\]"):
        get_peft_model(model, config)


def test_all_linear_honours_exclude_modules(tokenizer, stats):
    config = GuardSpaceConfig(
        r=4,
        target_modules="all-linear",
        exclude_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        safety_statistics=stats,
    )
    peft_model = get_peft_model(make_llama(tokenizer), config)
    assert sorted(peft_model.peft_config["default"].null_space_dims) == [
        f"model.layers.{i}.self_attn.{name}" for i in (0, 1) for name in ("q_proj", "v_proj")
    ]


def test_rank_above_the_null_space_dimension_warns_with_the_fix(tokenizer, stats):
    config = GuardSpaceConfig(r=20, target_modules=LLAMA_TARGETS, safety_statistics=stats)
    message = (
        r"rank exceeds the null-space dimension k of \d+ of 14 layers, e\.g\. model\.layers\.\d\.[a-z_.]+ "
        r"\(r=20, k=\d+\).*Lower `r`.*rank_allocation='null_dim'"
    )
    with pytest.warns(UserWarning, match=message):
        get_peft_model(make_llama(tokenizer), config)


# ------------------------------------------------------------------------------------------ SOMF


SOMF_CONFIG_CASES = [
    *[(dict(temperature=value), "temperature must be") for value in (NAN, INF, 0.0, -1.0)],
    *[(dict(init_logit=value), "init_logit must be a finite number") for value in (NAN, INF, -INF)],
    *[(dict(beta=value), "beta must be") for value in (NAN, 0.0, -0.1)],
    *[(dict(rpo_alpha=value), "rpo_alpha must be") for value in (NAN, INF, -1.0)],
    *[(dict(retain_weight=value), "retain_weight must be") for value in (NAN, -1.0)],
    *[(dict(revert_budget=value), "revert_budget must be") for value in (NAN, 1.0, -0.1)],
    *[(dict(budget_weight=value), "budget_weight must be") for value in (NAN, -1.0)],
    *[(dict(learning_rate=value), "learning_rate must be") for value in (NAN, INF, 0.0, -0.25)],
    *[(dict(max_steps=value), "max_steps must be") for value in ("abc", 0, 2.5, True)],
    *[(dict(batch_size=value), "batch_size must be") for value in ("4", 0)],
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be >= 1"),
    (dict(max_length=0), "max_length must be >= 1"),
    (dict(eval_batches=0), "eval_batches must be >= 1"),
    *[(dict(seed=value), "seed must be") for value in (-1, "0", 1.5)],
    (dict(rescale="yes"), "rescale must be true or false"),
    (dict(shared_mask=1), "shared_mask must be true or false"),
    (dict(progress_bar="false"), "progress_bar must be true or false"),
    (dict(reference_adapter=3), "reference_adapter must be an adapter name or None"),
    (dict(reference_adapter=""), "reference_adapter must be an adapter name or None"),
    (dict(objective="ppo"), "objective must be one of"),
    (dict(final_mask="random"), "final_mask must be one of"),
    (dict(beta="0.1"), "beta must be a finite number"),
]


@pytest.mark.parametrize("kwargs, message", SOMF_CONFIG_CASES)
def test_somf_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SOMFConfig(**kwargs)


def _masks(keys: list[str], seed: int = 3) -> SafetyMasks:
    generator = torch.Generator().manual_seed(0)
    logits = {key: torch.randn(4, 6, generator=generator) for key in keys}
    config = {
        **SOMFConfig(final_mask="bernoulli", seed=seed, revert_budget=0.5).to_dict(),
        "combination_type": "linear",
    }
    return SafetyMasks(logits=logits, adapters=["a", "b"], config=config)


@pytest.mark.parametrize("mode", ["bernoulli", "budget"])
def test_deployed_mask_survives_save_and_load(tmp_path, mode):
    keys = ["z.layers.1.q.lora_B", "a.layers.0.q.lora_A", "m.layers.0.v.lora_A"]  # not in sorted order
    masks = _masks(keys)
    if mode == "budget":  # ties everywhere: resolved by position, which must not depend on the key order
        masks.logits = {key: torch.zeros_like(value) for key, value in masks.logits.items()}
    masks.save(tmp_path / "m.safetensors")
    loaded = SafetyMasks.load(tmp_path / "m.safetensors")
    assert list(loaded.logits) != keys  # reloaded in another (sorted) order
    before, after = masks.final(mode), loaded.final(mode)
    assert all(torch.equal(before[key], after[key]) for key in keys)


def test_masks_file_errors_name_the_file(tmp_path):
    masks = _masks(["s.lora_A", "s.lora_B"])
    path = tmp_path / "m.safetensors"
    masks.save(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=f"'{path}' is not a safetensors file written by peft_safety"):
        SafetyMasks.load(path)
    path.write_text("not a tensor file")
    with pytest.raises(ValueError, match=f"'{path}' is not a safetensors file written by peft_safety"):
        SafetyMasks.load(path)
    with pytest.raises(FileNotFoundError, match="masks file .*missing.safetensors' does not exist"):
        SafetyMasks.load(tmp_path / "missing.safetensors")
    masks.logits["s.lora_A"][0, 0] = NAN
    masks.save(path)
    with pytest.raises(ValueError, match="holds NaN or Inf mask logits"):
        SafetyMasks.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist; create"):
        masks.save(tmp_path / "missing" / "m.safetensors")


def test_dare_leaves_the_global_random_state_alone(tokenizer):
    from somf_testbed import TRAIN_HARMFUL, make_adapters, pairs

    ADAPTERS = ["poisoned", "task"]

    peft_model = make_adapters(tokenizer)
    torch.manual_seed(1234)
    cpu_state = torch.get_rng_state()
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)  # CUDA seeding queued until CUDA starts
    queued = tracker.get_calls() if tracker is not None else None
    config = SOMFConfig(progress_bar=False, max_steps=1, eval_batches=1)
    for combination in ("dare_linear", "dare_ties"):
        peft_model.merge_with_safety_mask(
            adapters=ADAPTERS, weights=[1.0, 1.0], adapter_name=combination, safety_data=pairs(TRAIN_HARMFUL),
            tokenizer=tokenizer, combination_type=combination, density=0.5, config=config,
        )  # fmt: skip
    assert torch.equal(torch.get_rng_state(), cpu_state) and torch.initial_seed() == 1234
    if tracker is not None:
        assert tracker.get_calls() == queued, "the merge (re)seeded the CUDA generators"
    if torch.cuda.is_available():
        cuda_state = torch.cuda.get_rng_state()
        peft_model.delete_adapter("dare_linear")
        peft_model.merge_with_safety_mask(
            adapters=ADAPTERS, weights=[1.0, 1.0], adapter_name="dare_linear", safety_data=pairs(TRAIN_HARMFUL),
            tokenizer=tokenizer, combination_type="dare_linear", density=0.5, config=config,
        )  # fmt: skip
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


# ------------------------------------------------------------------------------------------ export


def test_export_of_an_unknown_or_plain_adapter(tokenizer, stats, tmp_path):
    peft_model = get_peft_model(
        make_llama(tokenizer), GuardSpaceConfig(r=2, target_modules=["q_proj"], safety_statistics=stats)
    )
    peft_model.add_adapter("plain", LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; its adapters are \['default', 'plain'\]"):
        export_to_lora(peft_model, tmp_path / "out", adapter_name="nope")
    with pytest.raises(ValueError, match=r"'plain' is not a GuardSpace adapter .*GuardSpace adapters .*\['default'\]"):
        export_to_lora(peft_model, tmp_path / "out", adapter_name="plain")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file; give a folder"):
        export_to_lora(peft_model, tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["file"]


# ------------------------------------------------------------------------------------------ sharded collection


@pytest.mark.parametrize("num_prompts, world, batch_size", [(7, 2, 1), (7, 2, 2), (5, 4, 1), (9, 3, 2), (2, 2, 8)])
def test_every_rank_runs_the_same_number_of_forwards(tokenizer, num_prompts, world, batch_size):
    """Sharded models (FSDP, ZeRO-3) make every forward a collective: uneven shards must not leave a rank behind."""
    encoded = [([2, 5 + i], [True, True]) for i in range(num_prompts)]
    count = batch_count(num_prompts, world, batch_size)
    counted_tokens = 0
    for rank in range(world):
        batches = list(_batches(encoded[rank::world], batch_size, torch.device("cpu"), count))
        assert len(batches) == count
        counted_tokens += sum(int(counted.sum()) for _, _, counted in batches)
    assert counted_tokens == 2 * num_prompts  # the padding forwards count no token
    assert math.ceil(math.ceil(num_prompts / world) / batch_size) == count


def test_saved_files_get_the_usual_permissions(stats, tmp_path):
    stats.save(tmp_path / "stats.safetensors")
    (tmp_path / "plain").write_text("x")
    assert (tmp_path / "stats.safetensors").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
