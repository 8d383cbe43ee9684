"""Batched greedy generation with left padding, shared by the metrics and the guard-model judge.

Prompts are wrapped as a user turn with the tokenizer's chat template when it has one; the batched output equals
the one-prompt-at-a-time output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from .._device import input_device
from .._prompts import uses_chat_template


def format_prompts(
    tokenizer: Any, prompts: Sequence[str], chat_template: bool | None = None, system_prompt: str | None = None
) -> list[list[int]]:
    """Token ids of each prompt: a user turn plus the generation prompt in the chat template, or the raw text."""
    templated = uses_chat_template(tokenizer, chat_template)
    encoded = []
    for prompt in prompts:
        if templated:
            chat = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": prompt}
            ]
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
            ids = tokenizer(text)["input_ids"]
        if not ids:
            raise ValueError(f"Prompt {prompt!r} tokenises to no token.")
        encoded.append(list(ids))
    return encoded


def _pad_id(tokenizer: Any) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


@contextmanager
def _pad_token(tokenizer: Any, pad_id: int) -> Iterator[None]:
    """Give ``tokenizer`` the pad token ``pad_id`` for the block if it has none (``tokenizer.pad`` needs one).

    The tokenizer is left as it was: a missing pad token is removed again, an existing one never touched.
    """
    if tokenizer.pad_token_id is not None:
        yield
        return
    tokenizer.pad_token_id = pad_id
    try:
        yield
    finally:
        tokenizer.pad_token = None


def _left_padded(tokenizer: Any, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``rows`` left-padded to the longest, by the tokenizer's own ``pad``."""
    batch = tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    show_progress: bool = True,
    desc: str = "Generating",
) -> list[str]:
    """Greedy answers to ``prompts``, generated ``batch_size`` at a time with left padding.

    Prompts are grouped by length (less padding) and answers returned in the input order. The model is put in
    eval mode for the call and its training mode restored afterwards, so this is safe inside a training loop.
    The tokenizer is not modified: its ``pad`` left-pads each batch (with the pad token, else EOS, given to it for
    the call only and removed again; its ``padding_side`` is passed per call, not set).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"`max_new_tokens` and `batch_size` must be positive, got {max_new_tokens}, {batch_size}.")
    encoded = format_prompts(tokenizer, prompts, chat_template, system_prompt)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = _pad_id(tokenizer)
    device = input_device(model)  # the embedding's device, also for ``device_map`` models
    was_training = model.training
    model.eval()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    answers: list[str] = [""] * len(encoded)
    try:
        bar = tqdm(total=len(encoded), desc=desc, disable=not show_progress, leave=False)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            with _pad_token(tokenizer, pad_id):
                batch = _left_padded(tokenizer, [encoded[i] for i in rows])
            width = batch["input_ids"].shape[1]
            output = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=eos,
            )
            new_tokens = output[:, width:].cpu()
            for row, index in enumerate(rows):
                answers[index] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
            bar.update(len(rows))
        bar.close()
    finally:
        model.train(was_training)
    return answers
