"""A minimal supervised fine-tuning loop for prompt -> response pairs (chat template, loss on the response only).

Kept deliberately small and deterministic (fixed seed, fixed batch order) so that every method of the testbed
sees the same data, the same steps and the same learning rate.
"""

from __future__ import annotations

import math
import random
import time

import torch

from peft_safety.somf.data import collate


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: chat-templated prompt + response + EOS; labels -100 on the prompt."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        response_ids = response_ids[: max_length // 2]
    prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def sft(
    model,
    tokenizer,
    pairs,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 2e-4,
    max_length: int = 128,
    seed: int = 0,
    warmup: int = 2,
    log_every: int = 10,
    desc: str = "sft",
    on_step=None,
) -> dict:
    """Train the trainable parameters of ``model`` (e.g. a ``PeftModel``) on ``pairs`` (dicts with ``prompt`` and
    ``response``) for ``steps`` AdamW steps of ``batch_size``; cosine schedule after a short warm-up.

    ``on_step(step)``, if given, is called after each step (``step`` counts from 1), e.g. to measure the model
    along the run; it must leave the model's parameters and the global random state alone."""
    encoded = [encode_pair(tokenizer, p["prompt"], p["response"], max_length) for p in pairs]
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        block = list(range(len(encoded)))
        rng.shuffle(block)
        order += block
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        batch = [encoded[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        collated = collate(batch, pad_id)
        ids, mask, labels = collated["input_ids"], collated["attention_mask"], collated["labels"]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
        if log_every and (step + 1) % log_every == 0:
            print(
                f"  [{desc}] step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    model.eval()
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "seconds": round(time.perf_counter() - start, 1),
    }
