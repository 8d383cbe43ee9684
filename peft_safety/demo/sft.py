"""A small supervised fine-tuning loop: prompt -> response pairs, loss on the response only.

Deterministic (seeded batch order) so that LoRA and GuardSpace see the same data, steps and learning rate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..somf.data import collate, encode, pad_id
from .splits import Pair


@dataclass(frozen=True)
class TrainingLog:
    """What one run did: its settings and the loss of its first and last batch."""

    steps: int
    batch_size: int
    learning_rate: float
    first_loss: float
    last_loss: float


def _cosine_with_warmup(warmup: int, steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def supervised_fine_tune(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[Pair],
    *,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    max_length: int = 96,
    seed: int = 0,
    warmup: int = 2,
    desc: str = "fine-tune",
    on_step: Callable[[int], None] | None = None,
) -> TrainingLog:
    """Train ``model``'s trainable parameters (e.g. a ``PeftModel``'s adapter) on ``pairs``.

    ``steps`` AdamW steps (no weight decay) of ``batch_size`` pairs each, drawn in a seeded order that walks the
    whole set before repeating; gradient norm clipped to 1; linear warm-up over ``warmup`` steps then cosine decay
    to 0. Prompts go through the tokenizer's chat template when it has one; the loss covers the response + EOS.
    ``on_step(step)``, if given, runs after every step (``step`` counts from 1), e.g. to measure the model along
    the run; it must leave the parameters and the global random state alone.
    """
    if not pairs:
        raise ValueError("No training pairs.")
    encoded = [encode(tokenizer, pair.prompt, pair.response, max_length) for pair in pairs]
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        block = list(range(len(encoded)))
        rng.shuffle(block)
        order += block
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(warmup, steps))
    padding = pad_id(tokenizer)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    progress = tqdm(range(steps), desc=desc, unit="step")
    for step in progress:
        batch = collate([encoded[i] for i in order[step * batch_size : (step + 1) * batch_size]], padding)
        loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return TrainingLog(steps, batch_size, learning_rate, losses[0], losses[-1])
