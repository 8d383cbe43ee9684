"""SafetyMonitorCallback inside a real (tiny) transformers Trainer run."""

from __future__ import annotations

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, make_llama
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_safety import GuardSpaceConfig, collect_safety_statistics, guardspace_report
from peft_safety.evaluation import SafetyMonitorCallback


class _Recorder(TrainerCallback):
    """Stands in for a reporter (TensorBoard, W&B): records what on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


class _AlwaysHarmful:
    threshold = 0.5
    name = "always"

    def __call__(self, prompts, responses):
        return [1.0] * len(prompts)


def _trainer(tmp_path, tokenizer, llama, max_steps, callbacks=(), config=None):
    config = config or LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(llama, config)
    rows = [tokenizer(text)["input_ids"][:5] for text in HARMFUL_PROMPTS]
    data = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)} for ids in rows if len(ids) == 5]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=list(callbacks))


def test_monitor_logs_through_trainer_reporters(tmp_path, tokenizer, llama):
    recorder = _Recorder()
    trainer = _trainer(tmp_path, tokenizer, llama, max_steps=3, callbacks=[recorder])
    monitor = SafetyMonitorCallback(
        HARMFUL_PROMPTS[:3], benign_prompts=["What is the capital of France"], every_n_steps=2, max_new_tokens=2
    ).attach(trainer)
    trainer.train()
    assert [h["step"] for h in monitor.history] == [0, 2, 3]  # start, every 2 steps, last step
    logged = [logs for logs in recorder.logs if "safety/harmful_score" in logs]
    assert len(logged) == 3 and all("safety/over_refusal_rate" in logs for logs in logged)
    assert sum("safety/harmful_score" in entry for entry in trainer.state.log_history) == 3
    assert monitor.stopped_at is None and trainer.state.global_step == 3
    assert trainer.model.training  # generation restored the training mode


def test_monitor_stops_training_past_threshold_without_attach(tmp_path, tokenizer, llama):
    monitor = SafetyMonitorCallback(
        HARMFUL_PROMPTS[:2], every_n_steps=2, judge=_AlwaysHarmful(), stop_threshold=0.5, max_new_tokens=1,
        measure_at_start=False,
    )  # fmt: skip
    trainer = _trainer(tmp_path, tokenizer, llama, max_steps=6, callbacks=[monitor])
    trainer.train()
    assert monitor.stopped_at == 2 and trainer.state.global_step == 2
    assert {"safety/harmful_score": 1.0, "step": 2} in trainer.state.log_history


def test_monitor_validates_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        SafetyMonitorCallback(["x"], every_n_steps=0)
    with pytest.raises(ValueError, match="stop_threshold"):
        SafetyMonitorCallback(["x"], stop_threshold=2.0)
    with pytest.raises(ValueError, match="empty"):
        SafetyMonitorCallback([])


def test_monitor_logs_the_guardspace_leakage_certificate(tmp_path, tokenizer, llama):
    """Without generation (``harmful_prompts=None``): calibration leakage (here on a wide 1e-3 threshold, so that
    it is nonzero) and the output change on held-out statistics, equal to ``guardspace_report``'s figures."""
    targets = ["q_proj", "v_proj", "down_proj"]
    stats = collect_safety_statistics(make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, targets, show_progress=False)
    heldout = collect_safety_statistics(make_llama(tokenizer), tokenizer, BENIGN_TEXTS, targets, show_progress=False)
    config = GuardSpaceConfig(
        r=2, lora_alpha=4, target_modules=targets, safety_statistics=stats, null_space_threshold=1e-3
    )
    recorder = _Recorder()
    trainer = _trainer(tmp_path, tokenizer, llama, max_steps=3, callbacks=[recorder], config=config)
    monitor = SafetyMonitorCallback(None, every_n_steps=1, heldout_statistics=heldout).attach(trainer)
    trainer.train()
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3]
    assert monitor.history[0]["safety/calibration_leakage"] == 0.0  # at init the update is zero
    final = monitor.history[-1]
    report = guardspace_report(trainer.model, heldout_statistics=heldout)
    assert final["safety/calibration_leakage"] == pytest.approx(report.total_leakage) and report.total_leakage > 0
    assert final["safety/max_layer_calibration_leakage"] == pytest.approx(report.max_leakage)
    assert final["safety/max_layer_heldout_leakage"] == pytest.approx(report.max_heldout_leakage)
    assert report.max_heldout_leakage > 0
    assert "safety/harmful_score" not in final
    assert sum("safety/calibration_leakage" in logs for logs in recorder.logs) == 4
