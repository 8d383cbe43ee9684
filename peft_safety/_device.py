"""Where a model's inputs go, and moving batches there.

A model loaded with ``device_map`` spreads its layers over several devices; its inputs belong on the device of its
input embedding, not on the device of whichever parameter ``model.parameters()`` yields first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s input embedding (``device_map`` models included), else of its first parameter,
    else the CPU."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            embeddings = get_embeddings()
        except (AttributeError, NotImplementedError):
            embeddings = None
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A copy of ``batch`` with every tensor moved to ``device`` (other values kept)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the default generators of the CPU and of ``device`` seeded with ``seed``; both states are
    restored afterwards (other GPUs' generators are left alone)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
