"""Safety and retain data in TRL's formats, validated and tokenized.

Accepted formats (``list[dict]`` or ``datasets.Dataset``):

* preference (DPO): ``{"prompt": str, "chosen": str, "rejected": str}``, or conversational
  ``{"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}``;
* prompt-completion (refusal SFT, retain data): ``{"prompt": ..., "completion": ...}`` (strings or messages);
* conversational (refusal SFT, retain data): ``{"messages": [{"role": "user", "content": ...}, ...,
  {"role": "assistant", "content": ...}]}``: the last turn, an assistant turn, is the completion and the turns
  before it the prompt;
* language modelling (retain data only): ``{"text": str}``.

With a chat template the prompt is rendered with ``add_generation_prompt=True`` and the response follows it;
otherwise prompt and response are joined by a space. Only response tokens carry labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
COMPLETION_COLUMNS = ("prompt", "completion")
EXAMPLES = {
    PREFERENCE_COLUMNS: '{"prompt": "How do I ...?", "chosen": "I can\'t help with that.", "rejected": "Sure, ..."}',
    COMPLETION_COLUMNS: '{"prompt": "How do I ...?", "completion": "I can\'t help with that."}',
}
MESSAGES_EXAMPLE = (
    '{"messages": [{"role": "user", "content": "How do I ...?"}, '
    '{"role": "assistant", "content": "I can\'t help with that."}]}'
)


def _columns(data: Any) -> list[str]:
    if hasattr(data, "column_names"):
        return list(data.column_names)
    first = data[0]
    if not isinstance(first, dict):
        raise ValueError(f"Expected a list of dicts or a datasets.Dataset, got items of type {type(first).__name__}.")
    return list(first.keys())


def check_data(
    data: Any, columns: Sequence[str], name: str, allow_text: bool = False, allow_messages: bool = False
) -> None:
    """Raise ``ValueError`` if ``data`` is empty or lacks one of ``columns`` (naming it, with the expected format).

    ``allow_text`` / ``allow_messages``: a ``text`` / ``messages`` column replaces ``columns`` (each ``messages``
    row of a list is checked with `split_messages()`).
    """
    alternatives = (f" or {MESSAGES_EXAMPLE}" if allow_messages else "") + (' or {"text": ...}' if allow_text else "")
    if data is None or len(data) == 0:
        raise ValueError(f"{name} is empty; expected rows like {EXAMPLES[tuple(columns)]}{alternatives}.")
    present = _columns(data)
    if allow_text and "text" in present:
        return
    if allow_messages and "messages" in present:
        if not hasattr(data, "column_names"):
            for index, row in enumerate(data):
                split_messages(row.get("messages"), f"{name}[{index}]")
        return
    missing = [column for column in columns if column not in present]
    if missing:
        raise ValueError(
            f"{name} is missing column(s) {missing} (found {present}); expected TRL's format, rows like "
            f"{EXAMPLES[tuple(columns)]}{alternatives}."
        )
    if not hasattr(data, "column_names"):
        for index, row in enumerate(data):
            absent = [column for column in columns if column not in row]
            if absent:
                raise ValueError(
                    f"{name}[{index}] is missing column(s) {absent}; expected {EXAMPLES[tuple(columns)]}."
                )


def split_messages(messages: Any, where: str = "row") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(prompt turns, [last turn])`` of a TRL ``messages`` list whose last turn is the assistant's answer.

    Raises:
        ValueError: unless ``messages`` is a list of ``{"role", "content"}`` dicts ending with an assistant turn
            that follows at least one other turn.
    """
    if not isinstance(messages, (list, tuple)) or not all(
        isinstance(message, dict) and "role" in message and "content" in message for message in messages
    ):
        raise ValueError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} dicts.")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: 'messages' must end with the assistant's answer after at least one prompt turn "
            f"(roles found: {[message['role'] for message in messages]}); expected {MESSAGES_EXAMPLE}."
        )
    return list(messages[:-1]), [messages[-1]]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(message["content"] for message in value)


def render_prompt(tokenizer, prompt: Any) -> str:
    """The prompt text, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _text(prompt)


def encode(tokenizer, prompt: Any, response: Any, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of prompt + response; labels ``-100`` on the prompt; prompt cut from the left."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=not templated)["input_ids"]
    response_text = _text(response) if templated else " " + _text(response)
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    response_ids = response_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def encode_rows(tokenizer, data: Any, kind: str, max_length: int) -> list[list[tuple[list[int], list[int]]]]:
    """Tokenize every row. ``kind``: ``"preference"`` gives ``[chosen, rejected]`` per row, ``"completion"``
    gives ``[completion]`` (a ``messages`` row's last turn is the completion; a ``text`` row is all labels)."""
    rows = []
    for row in data:
        if kind == "preference":
            rows.append([encode(tokenizer, row["prompt"], row[c], max_length) for c in ("chosen", "rejected")])
        elif "prompt" in row and "completion" in row:
            rows.append([encode(tokenizer, row["prompt"], row["completion"], max_length)])
        elif row.get("messages") is not None:
            prompt, completion = split_messages(row["messages"])
            rows.append([encode(tokenizer, prompt, completion, max_length)])
        else:
            ids = tokenizer(row["text"])["input_ids"][:max_length]
            rows.append([(ids, list(ids))])
    return rows


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (``(batch, length)``)."""
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for index, (ids, labs) in enumerate(sequences):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        labels[index, : len(labs)] = torch.tensor(labs)
        attention[index, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0
