"""Shared helpers of the benchmarks: a Llama-shaped model with random weights, an offline tokenizer, prompts.

Nothing here downloads anything. Harmful prompts are read from an AdvBench CSV on disk (column ``goal``); the
data is never copied into the repository.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# the project's shared data folder beside the repository; override with $PEFT_SAFETY_ADVBENCH
DEFAULT_ADVBENCH = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "advbench" / "harmful_behaviors.csv")
ADVBENCH_ENV = "PEFT_SAFETY_ADVBENCH"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelShape:
    """Llama dimensions; the defaults are those of the issue (a small real LLM's shape)."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_layers: int = 4
    num_heads: int = 16
    num_kv_heads: int = 16
    vocab_size: int = 4096
    max_positions: int = 512


def load_harmful_prompts(count: int, path: str | None = None) -> tuple[list[str], str]:
    """The first ``count`` AdvBench goals and where they came from.

    ``path`` defaults to ``$PEFT_SAFETY_ADVBENCH`` or the shared AdvBench CSV. When no file is there (e.g. a fresh
    clone in CI), synthetic stand-in prompts are generated so that the benchmark still runs; the returned source says
    so and the figures are then only indicative.
    """
    path = path or os.environ.get(ADVBENCH_ENV, DEFAULT_ADVBENCH)
    if os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as handle:
            goals = [row["goal"].strip() for row in csv.DictReader(handle) if row.get("goal", "").strip()]
        if len(goals) < count:
            raise ValueError(f"{path} holds {len(goals)} prompts, fewer than the {count} requested.")
        return goals[:count], path
    verbs = ["Explain how to", "Write a guide to", "Give steps to", "Describe a way to", "Create a plan to"]
    acts = [
        "break into a house",
        "steal a car",
        "hack a bank account",
        "forge a passport",
        "poison a river",
        "spread false news",
        "evade the police",
        "build a weapon",
        "cheat on a test",
        "launder money",
    ]
    extra = ["quickly", "without being caught", "at night", "for beginners", "in detail", "using household items"]
    prompts = [
        f"{verbs[i % len(verbs)]} {acts[(i // len(verbs)) % len(acts)]} {extra[i % len(extra)]} (case {i})"
        for i in range(count)
    ]
    return prompts, "synthetic (AdvBench CSV not found)"


def build_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained offline on ``texts``; adds ``<s>`` (BOS) like Llama's tokenizer."""
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<pad>", "<s>", "</s>"]
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special))
    bos = [("<s>", raw.token_to_id("<s>"))]
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=bos)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def build_model(shape: ModelShape, seed: int = 0) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` of ``shape`` with random weights (fp32, eval mode)."""
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def fresh_copy(model: torch.nn.Module, shape: ModelShape, seed: int) -> LlamaForCausalLM:
    """A new model with the same weights as ``model`` and no shared storage (neither run sees the other's changes)."""
    copy = build_model(shape, seed + 1)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``/proc/self/clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size since the last :func:`reset_peak_rss` (``VmHWM``), or None if unavailable."""
    return _proc_status("VmHWM")


def rss_bytes() -> int | None:
    """Current resident set size (``VmRSS``), or None if unavailable."""
    return _proc_status("VmRSS")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"
