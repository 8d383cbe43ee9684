"""Loading models and adapters for the CLI (torch, transformers and peft are imported here, on use only)."""

from __future__ import annotations

import argparse
import json
import os

from .errors import UsageError


def _resolve_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: str | None) -> None:
    """Refuse a ``--device`` that is not a torch device, or one this machine does not have, before any work."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps): {err}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name!r}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps") and not hasattr(torch, device.type):
        raise UsageError(f"--device {name!r}: device type {device.type!r} is not available here")


def check_safetensors(path: str, flag: str) -> None:
    """Raise ``UsageError`` unless ``path`` is a complete safetensors file (header readable, every tensor's bytes
    present): a file cut short by an interrupted copy or download fails here, before anything is loaded."""
    size = os.path.getsize(path)
    problem = None
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0 or 8 + length > size:
                problem = "its header is cut short"
            else:
                header = json.loads(handle.read(length))
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                if 8 + length + max(ends, default=0) > size:
                    problem = f"it holds {size} bytes of the {8 + length + max(ends)} its header announces"
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        problem = f"its header cannot be read ({err})"
    if problem:
        raise UsageError(f"{flag}: {path!r} is truncated or corrupt: {problem}; copy or save the file again")


def _check_weights(folder: str, flag: str) -> None:
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            check_safetensors(os.path.join(folder, name), flag)


def _check_model_dir(path: str, flag: str = "--model") -> None:
    config = os.path.join(path, "config.json")
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(config):
        raise UsageError(f"{flag} {path!r} is a PEFT adapter folder: give the base model as {flag}, it as --adapter")
    if not os.path.isfile(config):
        raise UsageError(f"{flag} {path!r} is not a local model folder (no config.json; see save_pretrained)")
    _check_weights(path, flag)


def _check_adapter_dir(path: str, flag: str = "--adapter") -> None:
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise UsageError(f"{flag} {path!r} is not a PEFT adapter folder (no adapter_config.json)")
    _check_weights(path, flag)


def load_causal_lm(path: str, args: argparse.Namespace):
    """The causal LM in folder ``path`` with ``--dtype`` on ``--device``, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our bars and one-line errors
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_resolve_dtype(args.dtype))
    except Exception as err:  # transformers and safetensors raise many types for broken folders
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise UsageError(f"model {path!r} could not be loaded ({message}); save the model again") from err
    return model.to(_device(args.device)).eval()


def load_model(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``--model`` (and ``--dtype``, ``--device``), in eval mode."""
    from transformers import AutoTokenizer

    model = load_causal_lm(args.model, args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as err:  # a missing or broken tokenizer
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise UsageError(f"--model {args.model!r}: its tokenizer could not be loaded ({message})") from err
    return model, tokenizer


def _load_adapter(model, path: str, adapter_name: str = "default", is_trainable: bool = False):
    """``PeftModel.from_pretrained`` with usage errors. ``is_trainable=True`` keeps a GuardSpace adapter's projector
    basis (needed to re-project it in a merge); otherwise it is loaded for inference only, without the basis."""
    from peft import PeftModel  # importing peft registers GuardSpace with it (see peft_safety/__init__.py)

    from .. import _register_with_peft

    _register_with_peft()  # idempotent: explicit, so that loading never depends on import order

    try:
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable).eval()
    except Exception as err:  # PEFT and safetensors raise many types for broken or foreign adapters
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise UsageError(f"adapter {path!r} could not be loaded on this model ({message})") from err
