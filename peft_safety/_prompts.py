"""Reading a prompt list from user input (a list of strings or a ``datasets.Dataset`` column), and whether to wrap
prompts in the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def prompt_texts(prompts: Sequence[str] | Any, text_column: str = "prompt", empty_hint: str = "") -> list[str]:
    """The prompts as a list of strings.

    Raises:
        ValueError: for a dataset without ``text_column`` or an empty input (message ends with ``empty_hint``).
        TypeError: for a single string or non-string entries.
    """
    if hasattr(prompts, "column_names"):  # datasets.Dataset
        if text_column not in prompts.column_names:
            raise ValueError(
                f"The dataset has no '{text_column}' column (columns: {prompts.column_names}). "
                "Pass `text_column=` naming the column that holds the prompts."
            )
        prompts = prompts[text_column]
    if isinstance(prompts, str):
        raise TypeError("`prompts` must be a list of strings or a datasets.Dataset, not a single string.")
    texts = list(prompts)
    if not texts:
        raise ValueError(f"`prompts` is empty{': ' + empty_hint if empty_hint else '.'}")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise TypeError(f"`prompts` must hold strings; entry {bad[0]} is {type(texts[bad[0]]).__name__}.")
    return texts


def uses_chat_template(tokenizer: Any, chat_template: bool | None = None) -> bool:
    """``chat_template`` if given, else whether the tokenizer has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        return has_template
    if chat_template and not has_template:
        raise ValueError("`chat_template=True` but the tokenizer has no chat template; pass chat_template=False.")
    return bool(chat_template)
