"""Loading models and adapters for the CLI (torch, transformers and peft are imported here, on use only)."""

from __future__ import annotations

import argparse
import os

from .errors import UsageError


def _resolve_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_model_dir(path: str, flag: str = "--model") -> None:
    config = os.path.join(path, "config.json")
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(config):
        raise UsageError(f"{flag} {path!r} is a PEFT adapter folder: give the base model as {flag}, it as --adapter")
    if not os.path.isfile(config):
        raise UsageError(f"{flag} {path!r} is not a local model folder (no config.json; see save_pretrained)")


def _check_adapter_dir(path: str, flag: str = "--adapter") -> None:
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise UsageError(f"{flag} {path!r} is not a PEFT adapter folder (no adapter_config.json)")


def load_causal_lm(path: str, args: argparse.Namespace):
    """The causal LM in folder ``path`` with ``--dtype`` on ``--device``, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our bars and one-line errors
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_resolve_dtype(args.dtype))
    return model.to(_device(args.device)).eval()


def load_model(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``--model`` (and ``--dtype``, ``--device``), in eval mode."""
    from transformers import AutoTokenizer

    model = load_causal_lm(args.model, args)
    return model, AutoTokenizer.from_pretrained(args.model)


def _load_adapter(model, path: str, adapter_name: str = "default"):
    from peft import PeftModel  # importing peft registers GuardSpace with it (see peft_safety/__init__.py)

    from .. import _register_with_peft

    _register_with_peft()  # idempotent: explicit, so that loading never depends on import order

    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name).eval()
