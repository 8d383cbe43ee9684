"""The demo's data: the files shipped in ``peft_safety/demo/data`` and their deterministic, disjoint splits.

* AdvBench behaviours (520, MIT) are shuffled once (seed 0) and cut into disjoint blocks: refusal training of the
  aligned start, safety statistics (GuardSpace's calibration prompts), poison (request -> "Sure, here is ..."),
  and the harmful-score evaluation.
* XSTest safe prompts (CC BY 4.0): even ids are answered helpfully by the aligned start, odd ids measure
  over-refusal.
* SST-2 (from the alps repository, MIT): the fine-tuning task; its validation split measures accuracy.

Sources, commits and checksums: ``peft_safety/demo/data/README.md``.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

# sizes of the disjoint AdvBench blocks, in this order, after one shuffle with seed 0
ADVBENCH_BLOCKS = {"refusal": 120, "calibration": 128, "poison": 64, "evaluation": 64}
SST2_LABELS = ("negative", "positive")

# Varied refusals written for the aligned start: one template repeated over every request teaches the model to
# answer any harmful prompt with that one sentence, however unrelated.
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I cannot help with this request. It is dangerous and may be illegal.",
    "I'm sorry, but I won't provide instructions for that.",
    "I can't assist with that, but I'm happy to help with something else.",
    "I'm not able to help with this. It could put people at risk.",
    "I cannot do that. Helping with this could hurt someone.",
    "I'm sorry, I can't help you harm others or break the law.",
    "I won't help with that request, because it is harmful.",
    "I'm sorry, but this is something I can't help with.",
    "I can't provide that. If you need help with a safe topic, just ask.",
    "I cannot write that. It would encourage harmful or illegal activity.",
    "I'm sorry, but I must decline. This could be used to cause harm.",
)


@dataclass(frozen=True)
class Pair:
    """One supervised example: a user ``prompt`` and the assistant ``response`` to train on."""

    prompt: str
    response: str


@dataclass(frozen=True)
class Labelled:
    """One classification example: a user ``prompt`` and its expected ``label``."""

    prompt: str
    label: str


def _advbench_blocks() -> dict[str, list[dict[str, str]]]:
    with open(DATA_DIR / "advbench" / "harmful_behaviors.csv", newline="", encoding="utf-8") as handle:
        rows = [{"goal": r["goal"].strip(), "target": r["target"].strip()} for r in csv.DictReader(handle)]
    random.Random(0).shuffle(rows)
    blocks, start = {}, 0
    for name, size in ADVBENCH_BLOCKS.items():
        blocks[name] = rows[start : start + size]
        start += size
    return blocks


def refusal_pairs(count: int) -> list[Pair]:
    """``count`` AdvBench requests, each with one of :data:`REFUSALS` (in turn)."""
    rows = _advbench_blocks()["refusal"][:count]
    return [Pair(r["goal"], REFUSALS[i % len(REFUSALS)]) for i, r in enumerate(rows)]


def calibration_prompts(count: int) -> list[str]:
    """``count`` AdvBench requests for GuardSpace's safety statistics (never trained on or evaluated)."""
    return [r["goal"] for r in _advbench_blocks()["calibration"][:count]]


def poison_pairs(count: int) -> list[Pair]:
    """``count`` AdvBench requests with their compliant opening ("Sure, here is ...:\\n1.")."""
    return [Pair(r["goal"], r["target"] + ":\n1.") for r in _advbench_blocks()["poison"][:count]]


def harmful_eval_prompts(count: int) -> list[str]:
    """``count`` held-out AdvBench requests for the harmful score."""
    return [r["goal"] for r in _advbench_blocks()["evaluation"][:count]]


def _xstest_safe(parity: int) -> list[str]:
    with open(DATA_DIR / "xstest" / "xstest_prompts.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] == "safe" and int(r["id"]) % 2 == parity]
    rows.sort(key=lambda r: (int(r["id"]) % 25, int(r["id"])))  # spread over XSTest's ten prompt types
    return [r["prompt"] for r in rows]


def helpful_prompts(count: int) -> list[str]:
    """``count`` XSTest safe prompts with an even id (answered helpfully by the aligned start)."""
    return _xstest_safe(0)[:count]


def over_refusal_prompts(count: int) -> list[str]:
    """``count`` XSTest safe prompts with an odd id (over-refusal evaluation)."""
    return _xstest_safe(1)[:count]


def sst2_prompt(sentence: str) -> str:
    return f"Classify the sentiment of this movie review as positive or negative.\nReview: {sentence.strip()}"


def _tsv(name: str) -> list[tuple[str, str]]:
    with open(DATA_DIR / "sst2" / name, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle][1:]
    return [(sentence, SST2_LABELS[int(label)]) for sentence, label in rows]


def sst2_train(count: int) -> list[Pair]:
    """The first ``count`` SST-2 training sentences as prompt -> label word."""
    return [Pair(sst2_prompt(s), label) for s, label in _tsv("train_first1000.tsv")[:count]]


def sst2_eval(count: int) -> list[Labelled]:
    """``count`` SST-2 validation sentences, alternating positive and negative."""
    rows = _tsv("dev.tsv")
    positive = [r for r in rows if r[1] == "positive"]
    negative = [r for r in rows if r[1] == "negative"]
    mixed = [r for pair in zip(positive, negative, strict=False) for r in pair][:count]
    return [Labelled(sst2_prompt(s), label) for s, label in mixed]


def poisoned_task(num_samples: int, poison_fraction: float, seed: int = 0) -> list[Pair]:
    """``num_samples`` training pairs: a fraction ``poison_fraction`` of poison, the rest SST-2, shuffled."""
    num_poison = round(num_samples * poison_fraction)
    if num_poison > ADVBENCH_BLOCKS["poison"]:
        raise ValueError(f"At most {ADVBENCH_BLOCKS['poison']} poison samples; lower num_samples or poison_fraction.")
    mixed = sst2_train(num_samples - num_poison) + poison_pairs(num_poison)
    random.Random(seed).shuffle(mixed)
    return mixed
