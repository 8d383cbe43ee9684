"""GuardSpace inside PEFT: save/load, plain-peft refusal, export to vanilla LoRA, Trainer, and PEFT's common checks."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    BENIGN_TEXTS,
    GPT2_TARGETS,
    HARMFUL_PROMPTS,
    LLAMA_TARGETS,
    encode,
    layer_outputs,
    logits_of,
    make_gpt2,
    make_llama,
    train_steps,
)
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_safety import GuardSpaceConfig, collect_safety_statistics, export_to_lora
from peft_safety.guardspace.layer import GuardSpaceLinear

TEXTS = BENIGN_TEXTS + HARMFUL_PROMPTS
EXACT = 1e-10
# merging adds s (B A - B0 A0) P to W in float32: the trained model's logits then differ from the unmerged forward by
# float32 rounding, measured ~3e-5 (both are ~1.5e-5 away from a float64 evaluation of the same model)
MERGE_ATOL = 1e-4
SUBPROCESS_ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def adapted_names(model) -> list[str]:
    return [
        name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, GuardSpaceLinear)
    ]


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def stats(tokenizer):
    return collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False
    )


@pytest.fixture(scope="module")
def base_reference(tokenizer):
    base = make_llama(tokenizer)
    names = [n for n, m in base.named_modules() if n.split(".")[-1] in LLAMA_TARGETS]
    return logits_of(base, tokenizer, TEXTS), layer_outputs(base, tokenizer, HARMFUL_PROMPTS, names)


@pytest.fixture(scope="module")
def trained(tokenizer, stats):
    """A trained GuardSpace model (exact threshold) and its logits on TEXTS."""
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats, null_space_threshold=EXACT
    )
    model = get_peft_model(make_llama(tokenizer), config)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=3, lr=5e-3)
    return model, logits_of(model, tokenizer, TEXTS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer, stats, trained):
    """The trained adapter saved with save_pretrained; the statistics file it was created from is deleted."""
    root = tmp_path_factory.mktemp("guardspace_saved")
    stats_path = root / "stats.safetensors"
    stats.save(stats_path)
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=str(stats_path), null_space_threshold=EXACT
    )
    model = get_peft_model(make_llama(tokenizer), config)
    model.load_state_dict(trained[0].state_dict())  # the same trained weights, created from the file
    model.save_pretrained(root / "adapter")
    os.remove(stats_path)
    return root / "adapter"


def assert_guarantee(model, tokenizer, base_reference, atol=1e-5):
    _, reference = base_reference
    outputs = layer_outputs(model, tokenizer, HARMFUL_PROMPTS, list(reference))
    for name, value in reference.items():
        torch.testing.assert_close(outputs[name], value, rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------------- save / load


def test_saved_adapter_holds_no_statistics(saved):
    files = sorted(os.listdir(saved))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = PeftConfig.from_pretrained(saved)
    assert isinstance(config, GuardSpaceConfig)
    assert config.safety_statistics is None
    assert set(config.null_space_dims) == {n for n in config.null_space_dims if n.startswith("model.layers.")}
    assert len(config.null_space_dims) == 14


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_load_reproduces_logits_without_svd_or_statistics(
    tokenizer, trained, saved, base_reference, monkeypatch, low_cpu_mem_usage
):
    def forbidden(*args, **kwargs):
        raise AssertionError("loading a GuardSpace adapter must not decompose anything")

    for name in ("svd", "eigh", "eigvalsh", "inv"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    loaded = PeftModel.from_pretrained(make_llama(tokenizer), saved, low_cpu_mem_usage=low_cpu_mem_usage)
    monkeypatch.undo()
    assert isinstance(loaded.peft_config["default"], GuardSpaceConfig)
    assert all(not p.is_meta for p in loaded.parameters()) and all(not b.is_meta for b in loaded.buffers())
    torch.testing.assert_close(logits_of(loaded, tokenizer, TEXTS), trained[1], rtol=0, atol=1e-5)
    assert_guarantee(loaded, tokenizer, base_reference)
    # loaded buffers equal the trained model's
    expected = trained[0].state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    if not low_cpu_mem_usage:  # as at creation, a trainable load gives q/k/v (and gate/up) one basis per input site
        trainable = PeftModel.from_pretrained(make_llama(tokenizer), saved, is_trainable=True)
        for model in (trained[0], trainable):
            layer = model.base_model.model.model.layers[0]
            bases = [getattr(layer.self_attn, p).lora_guard["default"].basis for p in ("q_proj", "k_proj", "v_proj")]
            assert len({b.data_ptr() for b in bases}) == 1
            mlp = [getattr(layer.mlp, p).lora_guard["default"].basis for p in ("gate_proj", "up_proj", "down_proj")]
            assert len({b.data_ptr() for b in mlp}) == 2


def test_loaded_adapter_can_keep_training_with_the_guarantee(tokenizer, saved, base_reference):
    loaded = PeftModel.from_pretrained(make_llama(tokenizer), saved, is_trainable=True)
    assert trainable_names(loaded) and all(".lora_A." in n or ".lora_B." in n for n in trainable_names(loaded))
    train_steps(loaded, tokenizer, BENIGN_TEXTS, steps=2, lr=5e-3)
    assert_guarantee(loaded, tokenizer, base_reference)


def test_plain_peft_refuses_a_guardspace_adapter(tmp_path, tokenizer, saved):
    make_llama(tokenizer).save_pretrained(tmp_path / "base")
    code = textwrap.dedent(
        f"""
        import sys
        import peft, transformers
        base = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        peft.PeftModel.from_pretrained(base, {str(saved)!r})
        assert "peft_safety" not in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120
    )
    assert result.returncode != 0
    assert "guardspace" in result.stderr.lower()
    assert "peft_safety" not in result.stderr.split("Traceback")[0]


# --------------------------------------------------------------------------------------------------- export


EXPORT_CHECK = """
import json, sys, torch, transformers, peft
for base_dir, adapter_dir, inputs, out in json.loads(sys.argv[1]):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir)
    assert type(model.peft_config["default"]) is peft.LoraConfig
    with torch.no_grad():
        torch.save(model(**torch.load(inputs)).logits, out)
assert "peft_safety" not in sys.modules
"""


@pytest.fixture(scope="module")
def gpt2_trained(tokenizer):
    """A GPT-2 (Conv1D) GuardSpace model: (model, logits at init, base logits), trained after the init logits."""
    base_logits = logits_of(make_gpt2(tokenizer), tokenizer, TEXTS)
    stats = collect_safety_statistics(
        make_gpt2(tokenizer), tokenizer, HARMFUL_PROMPTS, GPT2_TARGETS, show_progress=False
    )
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=GPT2_TARGETS, safety_statistics=stats, null_space_threshold=EXACT
    )
    model = get_peft_model(make_gpt2(tokenizer), config)
    init_logits = logits_of(model, tokenizer, TEXTS)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=3, lr=5e-3)
    return model, init_logits, base_logits


@pytest.fixture(scope="module")
def pattern_trained(tokenizer, stats):
    config = GuardSpaceConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats, use_rslora=True,
        rank_pattern={"down_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"o_proj": 3},
        null_space_threshold=EXACT,
    )  # fmt: skip
    model = get_peft_model(make_llama(tokenizer), config)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=2, lr=5e-3)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer, trained, pattern_trained, gpt2_trained):
    """Export three adapters and load each with plain peft on its saved original base in ONE fresh interpreter.

    Returns ``case -> (export dir, LoraConfig returned, logits from plain peft at valid positions)``.
    """
    root = tmp_path_factory.mktemp("exports")
    batch = encode(tokenizer, TEXTS)
    mask = batch["attention_mask"].bool()
    torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, root / "inputs.pt")
    make_llama(tokenizer).save_pretrained(root / "llama_base")
    make_gpt2(tokenizer).save_pretrained(root / "gpt2_base")
    cases = {"default": (trained[0], "llama_base"), "pattern": (pattern_trained, "llama_base"),
             "gpt2": (gpt2_trained[0], "gpt2_base")}  # fmt: skip
    configs, jobs = {}, []
    for case, (model, base) in cases.items():
        configs[case] = export_to_lora(model, root / case)
        jobs.append([str(root / base), str(root / case), str(root / "inputs.pt"), str(root / f"{case}.pt")])
    script = root / "check.py"
    script.write_text(EXPORT_CHECK)
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {case: (root / case, configs[case], torch.load(root / f"{case}.pt")[mask]) for case in cases}


def test_export_loads_in_plain_peft_with_the_same_logits(tokenizer, trained, exports):
    model, _ = trained
    path, config, logits = exports["default"]
    assert type(config) is LoraConfig and config.r == 8 and config.lora_alpha == 16
    torch.testing.assert_close(logits, logits_of(model, tokenizer, TEXTS), rtol=0, atol=1e-5)
    state = load_file(path / "adapter_model.safetensors")
    assert not any("lora_guard" in key for key in state)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert state["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 8)
    assert json.loads((path / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_export_with_rank_pattern_and_rslora(tokenizer, pattern_trained, exports):
    model = pattern_trained
    layers = model.base_model.model.model.layers
    assert layers[0].mlp.down_proj.r["default"] == 2 and layers[1].self_attn.q_proj.r["default"] == 6
    path, config, logits = exports["pattern"]
    expected = logits_of(model, tokenizer, TEXTS)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    exported = LoraConfig.from_pretrained(path)
    assert exported.use_rslora and exported.r == 8
    assert exported.rank_pattern == {"down_proj": 4, r"model\.layers\.1\.self_attn\.q_proj": 12}
    # in-process too: the same function with plain LoRA layers, and the same per-layer scalings
    plain = PeftModel.from_pretrained(make_llama(tokenizer), path)
    torch.testing.assert_close(logits_of(plain, tokenizer, TEXTS), expected, rtol=0, atol=1e-5)
    theirs = dict(plain.named_modules())
    for name, mine in model.named_modules():
        if isinstance(mine, GuardSpaceLinear):
            assert mine.scaling["default"] == pytest.approx(theirs[name].scaling["default"]), name


def test_merge_and_unload_gives_the_same_function(tokenizer, trained):
    model, expected = trained
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, GuardSpaceLinear) for m in merged.modules())
    torch.testing.assert_close(logits_of(merged, tokenizer, TEXTS), expected, rtol=0, atol=MERGE_ATOL)
    safe = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    torch.testing.assert_close(logits_of(safe, tokenizer, TEXTS), expected, rtol=0, atol=MERGE_ATOL)


# --------------------------------------------------------------------------------------------------- PEFT common


def test_disable_adapter_gives_base_outputs(tokenizer, trained, base_reference):
    model, expected = trained
    base_logits, _ = base_reference
    assert float((expected - base_logits).abs().max()) > 1e-2  # training changed the function
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, tokenizer, TEXTS), base_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model, tokenizer, TEXTS), expected, rtol=0, atol=0)


def test_merge_unmerge_idempotent(tokenizer, trained):
    model = copy.deepcopy(trained[0])
    expected = trained[1]
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    for safe in (False, True):
        model.merge_adapter(safe_merge=safe)
        torch.testing.assert_close(logits_of(model, tokenizer, TEXTS), expected, rtol=0, atol=MERGE_ATOL)
        model.merge_adapter(safe_merge=safe)  # merging twice is a no-op (peft warns)
        torch.testing.assert_close(logits_of(model, tokenizer, TEXTS), expected, rtol=0, atol=MERGE_ATOL)
        model.unmerge_adapter()
        model.unmerge_adapter()
        torch.testing.assert_close(logits_of(model, tokenizer, TEXTS), expected, rtol=0, atol=MERGE_ATOL)
        for name, value in model.named_parameters():
            if name in original:
                torch.testing.assert_close(value, original[name], rtol=0, atol=1e-6)


def test_only_adapter_parameters_train(tokenizer, trained):
    model, _ = trained
    names = trainable_names(model)
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    assert not any("lora_guard" in name for name, _ in model.named_parameters())
    buffers = [name for name, _ in model.named_buffers(remove_duplicate=False) if "lora_guard" in name]
    assert len(buffers) == 14 * 8  # basis, input_scale, frozen A/B, singular values, leak vectors/values, energy
    expected = 0
    for module in model.modules():
        if isinstance(module, GuardSpaceLinear):
            expected += 4 * (module.in_features + module.out_features)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert model.get_nb_trainable_parameters()[0] == expected


def test_guardspace_and_plain_lora_side_by_side(tokenizer, trained, base_reference):
    model = copy.deepcopy(trained[0])
    guarded = trained[1]
    torch.manual_seed(3)
    model.add_adapter(
        "plain", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert set(q_proj.lora_guard) == {"default"} and set(q_proj.lora_A) == {"default", "plain"}
    assert "plain" not in q_proj.lora_variant
    torch.testing.assert_close(logits_of(model, tokenizer, TEXTS), guarded, rtol=0, atol=0)  # still 'default'
    model.set_adapter("plain")
    plain = logits_of(model, tokenizer, TEXTS)
    assert float((plain - guarded).abs().max()) > 1e-2
    assert float((plain - base_reference[0]).abs().max()) > 1e-2
    # the plain adapter is peft's LoRA: W x + s B A x
    x = torch.randn(3, 64)
    layer = q_proj
    manual = (
        layer.base_layer(x)
        + layer.scaling["plain"] * x @ layer.lora_A["plain"].weight.T @ layer.lora_B["plain"].weight.T
    )
    torch.testing.assert_close(layer(x), manual, rtol=1e-5, atol=1e-6)
    model.set_adapter("default")
    torch.testing.assert_close(logits_of(model, tokenizer, TEXTS), guarded, rtol=0, atol=0)
    model.set_adapter("plain")
    model.delete_adapter("default")
    assert list(model.peft_config) == ["plain"]
    for module in model.modules():
        if isinstance(module, GuardSpaceLinear):
            assert len(module.lora_guard) == 0 and "default" not in module.lora_A
    assert not any("lora_guard" in key for key in model.state_dict())
    torch.testing.assert_close(logits_of(model, tokenizer, TEXTS), plain, rtol=0, atol=0)


def test_plain_lora_first_then_guardspace(tokenizer, stats, base_reference):
    model = get_peft_model(make_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter(
        "guard",
        GuardSpaceConfig(
            r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, safety_statistics=stats, null_space_threshold=EXACT
        ),
    )
    model.set_adapter("guard")
    torch.testing.assert_close(logits_of(model, tokenizer, TEXTS), base_reference[0], rtol=0, atol=1e-5)
    train_steps(model, tokenizer, BENIGN_TEXTS, steps=2, lr=5e-3)
    assert_guarantee(model, tokenizer, base_reference)


def test_gpt2_conv1d_init_exact_guarantee_merge_and_export(tokenizer, gpt2_trained, exports):
    model, init_logits, base_logits = gpt2_trained
    assert sum(isinstance(m, GuardSpaceLinear) for m in model.modules()) == 8
    assert model.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    torch.testing.assert_close(init_logits, base_logits, rtol=0, atol=1e-6)
    # the guarantee on Conv1D (weights stored transposed)
    names = adapted_names(model)
    reference = layer_outputs(make_gpt2(tokenizer), tokenizer, HARMFUL_PROMPTS, names)
    outputs = layer_outputs(model, tokenizer, HARMFUL_PROMPTS, names)
    for name in names:
        torch.testing.assert_close(outputs[name], reference[name], rtol=0, atol=1e-5)
    trained_logits = logits_of(model, tokenizer, TEXTS)
    assert float((trained_logits - base_logits).abs().max()) > 1e-2
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(logits_of(merged, tokenizer, TEXTS), trained_logits, rtol=0, atol=MERGE_ATOL)
    torch.testing.assert_close(exports["gpt2"][2], trained_logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------- Trainer


def test_trainer_end_to_end_and_resume(tmp_path, tokenizer, stats, base_reference):
    datasets = pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    data = datasets.Dataset.from_dict({"text": BENIGN_TEXTS * 2}).map(
        lambda row: tokenizer(row["text"]), remove_columns=["text"]
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def run(output_dir, resume=None):
        config = GuardSpaceConfig(
            r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, safety_statistics=stats, null_space_threshold=EXACT
        )
        model = get_peft_model(make_llama(tokenizer), config)
        args = TrainingArguments(
            output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-3,
            weight_decay=0.1, max_grad_norm=1.0, save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
            seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
        result = trainer.train(resume_from_checkpoint=resume)
        return model.eval(), result

    model, result = run(tmp_path / "run")
    assert result.global_step == 3
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert isinstance(PeftConfig.from_pretrained(checkpoint), GuardSpaceConfig)
    assert_guarantee(model, tokenizer, base_reference)

    resumed, result = run(tmp_path / "resumed", resume=str(checkpoint))
    assert result.global_step == 3
    expected = model.state_dict()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert_guarantee(resumed, tokenizer, base_reference)


def test_one_step_route_from_prompts(tokenizer, base_reference):
    model = make_llama(tokenizer)
    config = GuardSpaceConfig.from_prompts(
        model,
        tokenizer,
        HARMFUL_PROMPTS,
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_TARGETS,
        null_space_threshold=EXACT,
        statistics_kwargs={"batch_size": 4, "show_progress": False},
    )
    assert config.safety_statistics.num_prompts == len(HARMFUL_PROMPTS)
    peft_model = get_peft_model(model, config)
    torch.testing.assert_close(logits_of(peft_model, tokenizer, TEXTS), base_reference[0], rtol=0, atol=0)
    train_steps(peft_model, tokenizer, BENIGN_TEXTS, steps=2, lr=5e-3)
    assert_guarantee(peft_model, tokenizer, base_reference)
