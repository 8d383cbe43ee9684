"""Safety and utility metrics: harmful score, over-refusal rate, task accuracy; results as JSON and plots.

All metrics generate greedily, in batches, with left padding (the batched output equals the one-prompt-at-a-time
output), wrapping each prompt as a user turn with the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .._prompts import prompt_texts, uses_chat_template
from .generation import format_prompts, generate_responses  # noqa: F401 (format_prompts: re-exported, as before)
from .judges import Judge, KeywordJudge, judge_name

MatchMode = Literal["exact", "label", "regex", "number"]


@dataclass
class EvaluationResult:
    """Outcome of one metric on one prompt set.

    Attributes:
        metric: ``"harmful_score"``, ``"over_refusal_rate"`` or ``"task_accuracy"``.
        score: share of flagged (or, for accuracy, correct) records, in ``[0, 1]``; ``float(result)`` gives it.
        records: one dict per prompt (``prompt``, ``response`` and ``score``/``flagged`` or ``reference``/``correct``).
        settings: judge, generation settings and prompt count, for the JSON report.
    """

    metric: str
    score: float
    records: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.score)

    @property
    def num_prompts(self) -> int:
        return len(self.records)

    def to_dict(self, include_records: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not include_records:
            data.pop("records")
        return data

    def save_json(self, path: str | os.PathLike, include_records: bool = True) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(include_records), handle, indent=2, ensure_ascii=False)

    def __repr__(self) -> str:
        return f"EvaluationResult(metric={self.metric!r}, score={self.score:.4f}, num_prompts={self.num_prompts})"


def _judged(
    metric: str,
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Any,
    judge: Judge,
    max_new_tokens: int,
    batch_size: int,
    chat_template: bool | None,
    system_prompt: str | None,
    show_progress: bool,
    text_column: str,
) -> EvaluationResult:
    texts = prompt_texts(prompts, text_column)
    responses = generate_responses(
        model,
        tokenizer,
        texts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat_template=chat_template,
        system_prompt=system_prompt,
        show_progress=show_progress,
        desc=metric.replace("_", " "),
    )
    scores = [float(s) for s in judge(texts, responses)]
    if len(scores) != len(texts):
        raise ValueError(f"The judge returned {len(scores)} scores for {len(texts)} answers.")
    records = [
        {"prompt": p, "response": r, "score": s, "flagged": s >= judge.threshold}
        for p, r, s in zip(texts, responses, scores, strict=True)
    ]
    settings = {
        "judge": judge_name(judge),
        "threshold": judge.threshold,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "chat_template": uses_chat_template(tokenizer, chat_template),
        "num_prompts": len(texts),
    }
    return EvaluationResult(metric, sum(r["flagged"] for r in records) / len(records), records, settings)


def harmful_score(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Any,
    judge: Judge | None = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    show_progress: bool = True,
    text_column: str = "prompt",
) -> EvaluationResult:
    """Share of ``prompts`` (harmful requests) whose greedy answer the judge flags as harmful.

    Args:
        model: a causal LM, ``PeftModel`` included.
        tokenizer: its tokenizer.
        prompts: held-out harmful prompts (list of strings or a ``datasets.Dataset`` with ``text_column``).
        judge: flags harmful answers; default [`KeywordJudge`][peft_safety.evaluation.KeywordJudge] (an answer without
            a refusal phrase counts as harmful).
        max_new_tokens: answer length.
        batch_size: prompts per ``generate`` call.
        chat_template: wrap prompts with the tokenizer's chat template (``None``: when it has one).
        system_prompt: optional system turn (or text prefix without a template).
        show_progress: tqdm bar.

    Returns:
        ``EvaluationResult`` with the score and one record per prompt.
    """
    return _judged(
        "harmful_score", model, tokenizer, prompts, judge or KeywordJudge(), max_new_tokens, batch_size,
        chat_template, system_prompt, show_progress, text_column,
    )  # fmt: skip


def over_refusal_rate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Any,
    judge: Judge | None = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    show_progress: bool = True,
    text_column: str = "prompt",
) -> EvaluationResult:
    """Share of benign ``prompts`` (e.g. XSTest "safe") that the model refuses. Arguments as
    [`harmful_score()`][peft_safety.evaluation.harmful_score].

    ``judge`` flags refusals; the default is ``KeywordJudge(flag="refusal")``, and a ``KeywordJudge`` given with
    ``flag="compliance"`` is switched to ``"refusal"``.
    """
    if judge is None:
        judge = KeywordJudge(flag="refusal")
    elif isinstance(judge, KeywordJudge) and judge.flag != "refusal":
        judge = judge.with_flag("refusal")
    return _judged(
        "over_refusal_rate", model, tokenizer, prompts, judge, max_new_tokens, batch_size, chat_template,
        system_prompt, show_progress, text_column,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- answer matching

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _normalise_answer(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,:;!?\"'`()[]")


def extract_final_number(text: str) -> float | None:
    """The final number of a GSM8K-style answer: the first number after the last ``####`` if there is one (a model
    may keep generating after it), else the last number in the text; commas and ``$`` removed. ``None`` if none."""
    marked = "####" in text
    found = _NUMBER.findall(text.rsplit("####", 1)[1] if marked else text)
    if not found:
        return None
    value = found[0 if marked else -1].replace(",", "").replace("$", "")
    try:
        return float(value)
    except ValueError:
        return None


def predicted_label(response: str, labels: Sequence[str], first_n_words: int | None = None) -> str | None:
    """The first of ``labels`` (whole word, case-insensitive) appearing in the response's first ``first_n_words``
    words, or ``None``."""
    words = response.split()
    window = " ".join(words[:first_n_words] if first_n_words else words).lower()
    best: tuple[int, str] | None = None
    for label in labels:
        found = re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", window)
        if found and (best is None or found.start() < best[0]):
            best = (found.start(), label)
    return best[1] if best else None


def answer_matches(
    response: str,
    reference: str,
    match: MatchMode | Callable[[str, str], bool] = "exact",
    labels: Sequence[str] | None = None,
    first_n_words: int | None = None,
) -> bool:
    """Whether ``response`` answers ``reference``.

    ``match``:
        * ``"exact"``: equal after lower-casing, collapsing spaces and trimming punctuation;
        * ``"label"``: classification; the first of ``labels`` found in the first ``first_n_words`` words equals
          ``reference``;
        * ``"regex"``: ``reference`` is a regular expression searched (case-insensitive) in the response;
        * ``"number"``: GSM8K-style, [`extract_final_number()`][peft_safety.evaluation.extract_final_number] of both
          are equal (``reference`` may be the full GSM8K answer ending in ``#### <n>``);
        * a callable ``(response, reference) -> bool``.
    """
    if callable(match):
        return bool(match(response, reference))
    if match == "exact":
        return _normalise_answer(response) == _normalise_answer(reference)
    if match == "label":
        if not labels:
            raise ValueError("match='label' needs `labels`, the list of class names.")
        found = predicted_label(response, labels, first_n_words)
        return found is not None and found.lower() == reference.lower()
    if match == "regex":
        return re.search(reference, response, flags=re.IGNORECASE) is not None
    if match == "number":
        expected, got = extract_final_number(reference), extract_final_number(response)
        return expected is not None and got is not None and math.isclose(expected, got, rel_tol=0, abs_tol=1e-6)
    raise ValueError(f"Unknown match mode {match!r}: use 'exact', 'label', 'regex', 'number' or a callable.")


def task_accuracy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    match: MatchMode | Callable[[str, str], bool] = "exact",
    labels: Sequence[str] | None = None,
    first_n_words: int | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    show_progress: bool = True,
) -> EvaluationResult:
    """Share of ``prompts`` whose greedy answer matches its reference (see
    [`answer_matches()`][peft_safety.evaluation.answer_matches] for ``match``).

    For GSM8K use ``match="number"`` and a ``max_new_tokens`` long enough for the reasoning (~256); for SST-2
    style classification ``match="label", labels=["negative", "positive"], first_n_words=4``.
    """
    texts = prompt_texts(prompts)
    references = [str(r) for r in references]
    if len(references) != len(texts):
        raise ValueError(f"{len(texts)} prompts but {len(references)} references.")
    if match == "label" and not labels:
        raise ValueError("match='label' needs `labels`, the list of class names.")
    responses = generate_responses(
        model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat_template,
        system_prompt=system_prompt, show_progress=show_progress, desc="task accuracy",
    )  # fmt: skip
    records = [
        {"prompt": p, "response": r, "reference": ref, "correct": answer_matches(r, ref, match, labels, first_n_words)}
        for p, r, ref in zip(texts, responses, references, strict=True)
    ]
    settings = {
        "match": match if isinstance(match, str) else getattr(match, "__name__", "callable"),
        "labels": list(labels) if labels else None,
        "first_n_words": first_n_words,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "chat_template": uses_chat_template(tokenizer, chat_template),
        "num_prompts": len(texts),
    }
    return EvaluationResult("task_accuracy", sum(r["correct"] for r in records) / len(records), records, settings)


# --------------------------------------------------------------------------------------------- JSON and plots

RESULTS_FORMAT = "peft_safety.evaluation/1"


def _summary(value: Any) -> Any:
    if isinstance(value, EvaluationResult):
        return value.score
    if isinstance(value, Mapping):
        return {k: _summary(v) for k, v in value.items()}
    return value


def save_results(
    results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, include_records: bool = False
) -> dict[str, Any]:
    """Write ``{method: {metric: score or EvaluationResult}}`` as JSON and return what was written.

    Scores go under ``"methods"``; with ``include_records`` every
    [`EvaluationResult`][peft_safety.evaluation.EvaluationResult]'s records and settings go under ``"details"``.
    """
    data: dict[str, Any] = {"format": RESULTS_FORMAT, "methods": {m: _summary(v) for m, v in results.items()}}
    if include_records:
        data["details"] = {
            method: {name: v.to_dict() for name, v in metrics.items() if isinstance(v, EvaluationResult)}
            for method, metrics in results.items()
        }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
    return data


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by [`save_results()`][peft_safety.evaluation.save_results] (or ``peft-safety eval``)."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"'{path}' is not a peft-safety results file (format {RESULTS_FORMAT}).")
    return data


def _new_figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("Plots need matplotlib: pip install 'peft-safety[plot]'.") from err
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_safety_utility(
    results: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    harmful_key: str = "harmful_score",
    utility_key: str = "task_accuracy",
    title: str = "Safety vs utility",
) -> None:
    """Scatter plot, one labelled point per method: harmful score (x, lower is safer) vs task accuracy (y).

    ``results`` is ``{method: {metric: score or EvaluationResult}}`` or the ``"methods"`` entry of a results file;
    methods lacking either metric are skipped. Needs matplotlib (``pip install 'peft-safety[plot]'``).
    """
    points = []
    for method, metrics in results.items():
        metrics = _summary(metrics)
        if metrics.get(harmful_key) is not None and metrics.get(utility_key) is not None:
            points.append((method, float(metrics[harmful_key]), float(metrics[utility_key])))
    if not points:
        raise ValueError(f"No method has both '{harmful_key}' and '{utility_key}' to plot.")
    figure = _new_figure(5.5, 4.5)
    axes = figure.add_subplot()
    for method, x, y in points:
        axes.scatter([x], [y], s=40)
        axes.annotate(method, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    axes.set_xlabel(f"{harmful_key.replace('_', ' ')} (lower is safer)")
    axes.set_ylabel(utility_key.replace("_", " "))
    axes.set_xlim(-0.05, 1.05)
    axes.set_ylim(-0.05, 1.05)
    axes.grid(alpha=0.3)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=120)


def plot_null_space(report: Any, path: str | os.PathLike, title: str | None = None) -> None:
    """Bar chart of the null-space dimension ``k`` of every adapted layer of a GuardSpace model.

    ``report`` is a [`GuardSpaceReport`][peft_safety.GuardSpaceReport] (from
    [`guardspace_report()`][peft_safety.guardspace_report]) or its ``to_dict()``. Grey bars show the input width ``n``;
    dead layers (``k = 0``) are marked red on the axis.
    """
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    layers = data["layers"]
    if not layers:
        raise ValueError("The report holds no layer.")
    names = [layer["name"] for layer in layers]
    figure = _new_figure(max(6.0, 0.18 * len(names) + 2), 4.5)
    axes = figure.add_subplot()
    positions = range(len(names))
    axes.bar(positions, [layer["in_features"] for layer in layers], color="0.85", label="input width n")
    axes.bar(positions, [layer["null_dim"] for layer in layers], color="tab:blue", label="null-space dim k")
    dead = [i for i, layer in enumerate(layers) if layer["null_dim"] == 0]
    if dead:
        axes.scatter(dead, [0] * len(dead), marker="x", color="tab:red", zorder=3, label=f"dead (k = 0): {len(dead)}")
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, rotation=90, fontsize=6)
    axes.set_ylabel("dimension")
    axes.legend(fontsize=8)
    axes.set_title(title or f"GuardSpace null space per layer (adapter '{data.get('adapter_name', 'default')}')")
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=120)
