"""SOMF: learned safety masks over LoRA adapters, trained through PEFT's combinations (Yi et al., 2024).

The public names load on first access, so ``peft_safety.somf.config`` (``SOMFConfig``, which the command line's
parser reads for its ``--somf-*`` flags) is importable without torch, transformers or peft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .combinations import COMBINATIONS, Combination, register_combination
    from .config import SOMFConfig
    from .masks import SafetyMasks
    from .merger import SOMFMerger, merge_with_safety_mask

# public name -> submodule defining it (imported on first access)
_LAZY = {
    "COMBINATIONS": ".combinations",
    "Combination": ".combinations",
    "register_combination": ".combinations",
    "SOMFConfig": ".config",
    "SafetyMasks": ".masks",
    "SOMFMerger": ".merger",
    "merge_with_safety_mask": ".merger",
}

__all__ = [
    "COMBINATIONS",
    "Combination",
    "SOMFConfig",
    "SOMFMerger",
    "SafetyMasks",
    "merge_with_safety_mask",
    "register_combination",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
