"""SOMF: learned safety masks over LoRA adapters, trained through PEFT's combinations (Yi et al., 2024)."""

from .combinations import COMBINATIONS, Combination, register_combination
from .config import SOMFConfig
from .masks import SafetyMasks
from .merger import SOMFMerger, merge_with_safety_mask

__all__ = [
    "COMBINATIONS",
    "Combination",
    "SOMFConfig",
    "SOMFMerger",
    "SafetyMasks",
    "merge_with_safety_mask",
    "register_combination",
]
