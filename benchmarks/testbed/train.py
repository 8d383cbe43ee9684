"""The testbed's fine-tuning loop: the demo's (``peft_safety.demo.sft``) on ``{"prompt", "response"}`` dicts.

Deterministic (fixed seed, fixed batch order) so that every method of the testbed sees the same data, the same
steps and the same learning rate: AdamW without weight decay, gradient norm clipped to 1, linear warm-up then
cosine decay, loss on the chat-templated response only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from peft_safety.demo.sft import supervised_fine_tune
from peft_safety.demo.splits import Pair


def sft(
    model,
    tokenizer,
    pairs: list[dict[str, str]],
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 2e-4,
    max_length: int = 128,
    seed: int = 0,
    desc: str = "sft",
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train the trainable parameters of ``model`` on ``pairs``; returns the run's settings, first and last loss
    and wall time (the record ``run.py`` stores). ``on_step`` as in ``supervised_fine_tune``."""
    start = time.perf_counter()
    log = supervised_fine_tune(
        model, tokenizer, [Pair(p["prompt"], p["response"]) for p in pairs], steps=steps, batch_size=batch_size,
        learning_rate=lr, max_length=max_length, seed=seed, desc=desc, on_step=on_step,
    )  # fmt: skip
    return {
        "steps": log.steps,
        "batch_size": log.batch_size,
        "lr": log.learning_rate,
        "first_loss": log.first_loss,
        "last_loss": log.last_loss,
        "seconds": round(time.perf_counter() - start, 1),
    }
