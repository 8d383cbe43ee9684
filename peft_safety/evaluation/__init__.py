"""Safety and utility evaluation: judges, harmful score, over-refusal, task accuracy, a training monitor.

``SafetyMonitorCallback`` needs ``transformers``' Trainer machinery and is imported lazily.
"""

from .generation import format_prompts, generate_responses
from .judges import (
    DEFAULT_REFUSAL_PHRASES,
    ClassifierJudge,
    GuardModelJudge,
    Judge,
    KeywordJudge,
    load_judge,
    parse_guard_verdict,
)
from .metrics import (
    EvaluationResult,
    answer_matches,
    extract_final_number,
    harmful_score,
    load_results,
    over_refusal_rate,
    plot_null_space,
    plot_safety_utility,
    predicted_label,
    save_results,
    task_accuracy,
)

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "ClassifierJudge",
    "EvaluationResult",
    "GuardModelJudge",
    "Judge",
    "KeywordJudge",
    "SafetyMonitorCallback",
    "answer_matches",
    "extract_final_number",
    "format_prompts",
    "generate_responses",
    "harmful_score",
    "load_judge",
    "load_results",
    "over_refusal_rate",
    "parse_guard_verdict",
    "plot_null_space",
    "plot_safety_utility",
    "predicted_label",
    "save_results",
    "task_accuracy",
]


def __getattr__(name: str):
    if name == "SafetyMonitorCallback":
        from .callback import SafetyMonitorCallback

        return SafetyMonitorCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
