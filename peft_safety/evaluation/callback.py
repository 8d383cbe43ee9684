"""``SafetyMonitorCallback``: harmful score and over-refusal every N steps of a ``transformers``/TRL trainer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from .._prompts import prompt_texts
from ..statistics import SafetyStatistics
from .judges import Judge
from .metrics import harmful_score, over_refusal_rate

logger = logging.getLogger(__name__)


class SafetyMonitorCallback(TrainerCallback):
    """Measure safety drift while a model trains, and optionally stop when it becomes unsafe.

    Every ``every_n_steps`` optimizer steps (and at the last step) the callback answers ``harmful_prompts``
    greedily and reports the harmful score, plus the over-refusal rate on ``benign_prompts`` when given.

    On a model with GuardSpace adapters it also logs their leakage certificate, which needs no generation:
    ``calibration_leakage`` (``sum tr(dW C dW^T) / sum tr(W C W^T)`` over the layers: the relative mean squared
    change of the adapted layers' outputs on the calibration inputs), ``max_layer_calibration_leakage``, and, with
    ``heldout_statistics``, ``max_layer_heldout_leakage``: the same change on the inputs those statistics were
    collected on (e.g. held-out harmful prompts). Names get the adapter as a suffix when there are several.

    Logging: call ``callback.attach(trainer)`` (instead of ``Trainer(callbacks=[...])``); the metrics then go
    through ``trainer.log`` like the loss, hence to every reporter of ``report_to`` (TensorBoard, W&B, ...) and to
    ``trainer.state.log_history``. A callback passed through ``callbacks=[...]`` cannot reach the reporters
    (``transformers`` hands callbacks no trainer) and writes to ``state.log_history`` and the Python logger only.
    ``history`` always holds every measurement.

    Args:
        harmful_prompts: small set of held-out harmful prompts (10-50 keeps the overhead low); ``None`` to log the
            GuardSpace leakage alone (no generation).
        benign_prompts: optional benign prompts for the over-refusal rate (e.g. XSTest "safe").
        tokenizer: the model's tokenizer; defaults to the trainer's ``processing_class``.
        every_n_steps: measurement interval in optimizer steps.
        judge: harmful-answer judge (default keyword judge).
        refusal_judge: refusal judge for benign prompts.
        stop_threshold: stop training (``control.should_training_stop``) once the harmful score is ``>=`` this.
        measure_at_start: also measure before the first step (step 0), the reference point.
        max_new_tokens: generation setting (see ``harmful_score``).
        batch_size: generation setting (see ``harmful_score``).
        chat_template: generation setting (see ``harmful_score``).
        system_prompt: generation setting (see ``harmful_score``).
        prefix: metric name prefix, e.g. ``"safety/harmful_score"``.
        heldout_statistics: [`SafetyStatistics`][peft_safety.SafetyStatistics] of the model on other inputs, for the
            held-out leakage of GuardSpace adapters.
    """

    def __init__(
        self,
        harmful_prompts: Sequence[str] | None,
        benign_prompts: Sequence[str] | None = None,
        tokenizer: Any = None,
        every_n_steps: int = 50,
        judge: Judge | None = None,
        refusal_judge: Judge | None = None,
        stop_threshold: float | None = None,
        measure_at_start: bool = True,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        prefix: str = "safety/",
        heldout_statistics: SafetyStatistics | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be positive, got {every_n_steps}.")
        if stop_threshold is not None and not 0.0 <= stop_threshold <= 1.0:
            raise ValueError(f"`stop_threshold` must be in [0, 1], got {stop_threshold}.")
        self.harmful_prompts = prompt_texts(harmful_prompts) if harmful_prompts is not None else None
        self.heldout_statistics = heldout_statistics
        self.benign_prompts = prompt_texts(benign_prompts) if benign_prompts is not None else None
        self.tokenizer = tokenizer
        self.every_n_steps = every_n_steps
        self.judge = judge
        self.refusal_judge = refusal_judge
        self.stop_threshold = stop_threshold
        self.measure_at_start = measure_at_start
        self.generation = {
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "chat_template": chat_template,
            "system_prompt": system_prompt,
            "show_progress": False,
        }
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self.stopped_at: int | None = None
        self._trainer: Any = None
        self._last_step: int | None = None

    def attach(self, trainer: Any) -> SafetyMonitorCallback:
        """Add this callback to ``trainer`` so that its metrics reach the trainer's reporters. Returns ``self``."""
        trainer.add_callback(self)
        self._trainer = trainer
        return self

    def measure(self, model: Any, tokenizer: Any) -> dict[str, float]:
        """Harmful score (and over-refusal rate) of ``model`` now, as ``{prefixed name: value}``."""
        metrics = self.leakage(model)
        if self.harmful_prompts:
            metrics[f"{self.prefix}harmful_score"] = harmful_score(
                model, tokenizer, self.harmful_prompts, self.judge, **self.generation
            ).score
        if self.benign_prompts:
            metrics[f"{self.prefix}over_refusal_rate"] = over_refusal_rate(
                model, tokenizer, self.benign_prompts, self.refusal_judge, **self.generation
            ).score
        return metrics

    def leakage(self, model: Any) -> dict[str, float]:
        """The leakage certificate of every GuardSpace adapter of ``model`` (empty without one)."""
        from ..guardspace.report import guardspace_report, is_sharded

        adapters = sorted({name for module in model.modules() for name in getattr(module, "lora_guard", ())})
        metrics = {}
        for adapter in adapters:
            if is_sharded(model, adapter):  # ZeRO-3 / FSDP shards: nothing to read between gathers
                continue
            report = guardspace_report(model, adapter, self.heldout_statistics)
            suffix = f"/{adapter}" if len(adapters) > 1 else ""
            metrics[f"{self.prefix}calibration_leakage{suffix}"] = report.total_leakage
            metrics[f"{self.prefix}max_layer_calibration_leakage{suffix}"] = report.max_leakage
            if report.max_heldout_leakage is not None:
                metrics[f"{self.prefix}max_layer_heldout_leakage{suffix}"] = report.max_heldout_leakage
        return metrics

    def _run(self, args: Any, state: Any, control: Any, model: Any, tokenizer: Any) -> None:
        step = state.global_step
        if step == self._last_step:
            return
        self._last_step = step
        tokenizer = self.tokenizer or tokenizer
        if tokenizer is None:
            raise ValueError("SafetyMonitorCallback needs a tokenizer: pass `tokenizer=` or the trainer's one.")
        if model is None:
            return
        metrics = self.measure(model, tokenizer)
        self.history.append({"step": step, **metrics})
        if self._trainer is not None:
            self._trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": step})
        logger.info("step %d: %s", step, ", ".join(f"{k}={v:.3g}" for k, v in metrics.items()))
        score = metrics.get(f"{self.prefix}harmful_score")
        if self.stop_threshold is not None and score is not None and score >= self.stop_threshold and step > 0:
            logger.warning(
                "Harmful score %.3f >= %.3f at step %d: stopping training.", score, self.stop_threshold, step
            )
            self.stopped_at = step
            control.should_training_stop = True

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.measure_at_start:
            self._run(args, state, control, model, processing_class)
        return control

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if state.global_step % self.every_n_steps == 0 or last:
            self._run(args, state, control, model, processing_class)
        return control
