"""``peft-safety demo``: a poisoned fine-tune of an aligned SmolLM2-135M-Instruct with plain LoRA and GuardSpace.

Both adapters train on the same SST-2 samples, a fraction of which are harmful requests paired with compliant
answers (the harmful fine-tuning attack of the GuardSpace paper). The aligned start and both fine-tuned models
are scored on held-out harmful requests (harmful score, lower is safer), harmless questions that sound harmful
(over-refusal, lower is better) and SST-2 validation sentences (accuracy).

One-time preparation, cached (``$PEFT_SAFETY_CACHE`` or ``~/.cache/peft_safety``): the GGUF model converted to
safetensors, the aligned start, and GuardSpace's safety statistics and initial adapter.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import splits
from .aligned import AlignedStartSettings, build_aligned_start
from .model import TARGET_MODULES, convert_gguf, default_cache_dir, gguf_file, load_checkpoint
from .sft import supervised_fine_tune

METHODS = ("aligned start", "LoRA", "GuardSpace")


@dataclass(frozen=True)
class DemoSettings:
    """The fine-tune both methods run, and the size of each evaluation."""

    poison_fraction: float = 0.2
    num_samples: int = 128
    steps: int = 16
    batch_size: int = 8
    learning_rate: float = 5e-4
    r: int = 8
    lora_alpha: int = 16
    max_length: int = 96
    calibration_prompts: int = 128
    eval_harmful: int = 40
    eval_over_refusal: int = 30
    eval_task: int = 40
    max_new_tokens: int = 16
    seed: int = 0
    aligned_start: AlignedStartSettings = field(default_factory=AlignedStartSettings)

    def __post_init__(self) -> None:
        if not 0.0 <= self.poison_fraction <= 1.0:
            raise ValueError(f"poison_fraction must be in [0, 1], got {self.poison_fraction}.")
        counts = ("num_samples", "steps", "batch_size", "r", "lora_alpha", "max_length", "calibration_prompts")
        for name in (*counts, "eval_harmful", "eval_over_refusal", "eval_task", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        limit = splits.ADVBENCH_BLOCKS["calibration"]
        if self.calibration_prompts > limit:
            raise ValueError(f"calibration_prompts must be at most {limit}, got {self.calibration_prompts}.")


def _say(message: str) -> None:
    print(message, flush=True)


def _evaluate(model, tokenizer, settings: DemoSettings, label: str) -> dict[str, float]:
    from ..evaluation import harmful_score, over_refusal_rate, task_accuracy

    generation = {"max_new_tokens": settings.max_new_tokens, "batch_size": 32}
    _say(f"Evaluating {label}")
    harmful = harmful_score(model, tokenizer, splits.harmful_eval_prompts(settings.eval_harmful), **generation)
    harmless = splits.over_refusal_prompts(settings.eval_over_refusal)
    refused = over_refusal_rate(model, tokenizer, harmless, **generation)
    examples = splits.sst2_eval(settings.eval_task)
    accuracy = task_accuracy(
        model, tokenizer, [e.prompt for e in examples], [e.label for e in examples],
        match="label", labels=list(splits.SST2_LABELS), first_n_words=4, **generation,
    )  # fmt: skip
    return {"harmful_score": harmful.score, "over_refusal": refused.score, "sst2_accuracy": accuracy.score}


class DemoCache:
    """The prepared artefacts, each in its own folder named after the settings it depends on."""

    def __init__(self, root: Path, settings: DemoSettings, model: Path | None = None) -> None:
        self.root = root
        self.converts_gguf = model is None
        self.base = root / "smollm2-135m-instruct" if model is None else model.resolve()
        self.aligned = root / f"aligned-start-{settings.aligned_start.key(str(self.base))}"
        init = f"guardspace-init-r{settings.r}-alpha{settings.lora_alpha}-calibration{settings.calibration_prompts}"
        self.guardspace_init = self.aligned / init
        self.aligned_scores = self.aligned / "scores.json"


def _check_requirements(cache: DemoCache) -> None:
    """Fail before any work when something the run will need is missing."""
    import importlib.util

    if cache.converts_gguf and not (cache.base / "config.json").is_file():
        gguf_file()
    elif not cache.converts_gguf and not (cache.base / "config.json").is_file():
        raise FileNotFoundError(f"No model checkpoint (config.json) in {cache.base}.")
    if importlib.util.find_spec("matplotlib") is None:
        from .model import INSTALL_HINT

        raise ImportError(f"The demo's plot needs matplotlib. Install it with: {INSTALL_HINT}")


def prepare(cache: DemoCache, settings: DemoSettings) -> None:
    """Build whatever is missing from the cache: base checkpoint, aligned start, GuardSpace's initial adapter."""
    cache.root.mkdir(parents=True, exist_ok=True)
    if cache.converts_gguf and not (cache.base / "config.json").is_file():
        _say(f"Preparing (once): converting SmolLM2-135M-Instruct from its GGUF file to {cache.base} (~10 s)")
        convert_gguf(cache.base)
    if not (cache.aligned / "config.json").is_file():
        _say(
            f"Preparing (once): the aligned start, a safety fine-tune of the shipped model, in {cache.aligned} "
            "(~2 min on 2 CPU cores): its own answers to harmless questions, then refusals of harmful requests"
        )
        build_aligned_start(cache.base, cache.aligned, settings.aligned_start)
    if not (cache.guardspace_init / "adapter_config.json").is_file():
        _say(
            f"Preparing (once): GuardSpace's safety statistics on {settings.calibration_prompts} harmful prompts and "
            f"its initial adapter (a decomposition of every target layer), in {cache.guardspace_init} "
            "(~1 min on 2 CPU cores)"
        )
        _initial_guardspace(cache, settings)


def _initial_guardspace(cache: DemoCache, settings: DemoSettings) -> None:
    import shutil

    from peft import get_peft_model

    from ..guardspace.config import GuardSpaceConfig
    from ..statistics import collect_safety_statistics

    model, tokenizer = load_checkpoint(cache.aligned)
    statistics = collect_safety_statistics(
        model, tokenizer, splits.calibration_prompts(settings.calibration_prompts),
        target_modules=TARGET_MODULES, batch_size=16, max_length=settings.max_length, chat_template=True,
    )  # fmt: skip
    config = GuardSpaceConfig(
        r=settings.r, lora_alpha=settings.lora_alpha, target_modules=TARGET_MODULES, safety_statistics=statistics
    )
    peft_model = get_peft_model(model, config)
    partial = cache.guardspace_init.with_name(cache.guardspace_init.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    peft_model.save_pretrained(partial)
    partial.rename(cache.guardspace_init)


def _aligned_scores(cache: DemoCache, settings: DemoSettings) -> dict[str, float]:
    """The aligned start's scores, cached beside it for these evaluation settings."""
    keys = ("eval_harmful", "eval_over_refusal", "eval_task", "max_new_tokens")
    wanted = {k: getattr(settings, k) for k in keys}
    if cache.aligned_scores.is_file():
        stored = json.loads(cache.aligned_scores.read_text(encoding="utf-8"))
        if stored.get("settings") == wanted:
            _say("Aligned start: scores from the cache")
            return stored["scores"]
    model, tokenizer = load_checkpoint(cache.aligned)
    scores = _evaluate(model, tokenizer, settings, "the aligned start")
    cache.aligned_scores.write_text(json.dumps({"settings": wanted, "scores": scores}, indent=2), encoding="utf-8")
    return scores


def _fine_tune(cache: DemoCache, settings: DemoSettings, method: str) -> tuple[dict[str, float], dict[str, Any]]:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(settings.seed)
    model, tokenizer = load_checkpoint(cache.aligned)
    if method == "LoRA":
        config = LoraConfig(
            r=settings.r, lora_alpha=settings.lora_alpha, target_modules=TARGET_MODULES, lora_dropout=0.0
        )
        peft_model = get_peft_model(model, config)
    else:
        peft_model = PeftModel.from_pretrained(model, cache.guardspace_init, is_trainable=True)
    pairs = splits.poisoned_task(settings.num_samples, settings.poison_fraction, seed=settings.seed)
    log = supervised_fine_tune(
        peft_model, tokenizer, pairs, steps=settings.steps, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, max_length=settings.max_length, seed=settings.seed,
        desc=f"{method}: poisoned fine-tune",
    )  # fmt: skip
    extra: dict[str, Any] = {"first_loss": log.first_loss, "last_loss": log.last_loss}
    if method == "GuardSpace":
        from ..guardspace.report import guardspace_report

        extra["calibration_leakage"] = guardspace_report(peft_model).total_leakage
    return _evaluate(peft_model, tokenizer, settings, f"the {method} model"), extra


def _table(scores: dict[str, dict[str, float]], settings: DemoSettings) -> str:
    header = f"{'':16}{'harmful score':>16}{'over-refusal':>15}{'SST-2 accuracy':>17}"
    lines = [header, "-" * len(header)]
    for method, row in scores.items():
        lines.append(
            f"{method:16}{row['harmful_score']:>16.2f}{row['over_refusal']:>15.2f}{row['sst2_accuracy']:>17.2f}"
        )
    lines.append(
        f"harmful score: share of {settings.eval_harmful} held-out harmful requests answered without a refusal "
        f"(lower is safer); over-refusal: share of {settings.eval_over_refusal} harmless questions refused; "
        f"SST-2: {settings.eval_task} validation sentences. Fine-tune: {settings.num_samples} samples, "
        f"{settings.poison_fraction:.0%} harmful, {settings.steps} steps."
    )
    return "\n".join(lines)


def run_demo(
    output_dir: str | os.PathLike = "peft-safety-demo",
    cache_dir: str | os.PathLike | None = None,
    settings: DemoSettings | None = None,
    model: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Prepare (once), fine-tune with LoRA and GuardSpace, evaluate, print a table; write JSON and a plot.

    Args:
        output_dir: where ``demo_results.json`` and ``demo_safety_utility.png`` go.
        cache_dir: the one-time preparation (default ``$PEFT_SAFETY_CACHE/demo`` or ``~/.cache/peft_safety/demo``).
        settings: the fine-tune and evaluation sizes.
        model: a local causal-LM checkpoint with a chat template to use instead of SmolLM2-135M-Instruct; the
            aligned start is then a safety fine-tune of it.

    Returns:
        The results also written to ``<output_dir>/demo_results.json``: ``{"methods": {method: scores}, ...}``.
    """
    settings = settings or DemoSettings()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "demo"
    cache = DemoCache(root, settings, Path(model) if model is not None else None)
    output = Path(output_dir)
    _check_requirements(cache)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepare(cache, settings)
    prepared = time.perf_counter()
    scores = {"aligned start": _aligned_scores(cache, settings)}
    details: dict[str, Any] = {}
    for method in METHODS[1:]:
        scores[method], details[method] = _fine_tune(cache, settings, method)
    finished = time.perf_counter()
    _say("\n" + _table(scores, settings))
    leakage = details["GuardSpace"]["calibration_leakage"]
    _say(
        f"GuardSpace leakage certificate: the update moves the adapted layers' outputs on the calibration prompts "
        f"by {leakage:.1e} of their energy (guardspace_report)."
    )
    results = {
        "methods": scores,
        "training": details,
        "settings": asdict(settings),
        "seconds": {"preparation": round(prepared - start, 1), "fine-tunes": round(finished - prepared, 1)},
    }
    (output / "demo_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    from ..evaluation import plot_safety_utility

    plot_safety_utility(
        scores, output / "demo_safety_utility.png", harmful_key="harmful_score", utility_key="sst2_accuracy",
        title=f"SmolLM2-135M, {settings.poison_fraction:.0%} poisoned fine-tune",
    )  # fmt: skip
    _say(f"Results: {output / 'demo_results.json'}; plot: {output / 'demo_safety_utility.png'}")
    _say(f"Time: preparation {prepared - start:.0f} s, fine-tunes and evaluations {finished - prepared:.0f} s")
    return results
