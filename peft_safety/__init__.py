"""peft-safety: keep aligned LLMs safe while they are fine-tuned (GuardSpace) and merged (SOMF) with PEFT;
Safe LoRA (``apply_safe_lora``) projects a trained LoRA adapter onto the alignment direction.

``import peft_safety`` is all the registration needed: ``peft.get_peft_model(model, GuardSpaceConfig(...))``
and ``PeftModel.from_pretrained`` then handle GuardSpace adapters, and every ``PeftModel`` holding LoRA adapters
gains ``merge_with_safety_mask`` (SOMF). Evaluation lives in ``peft_safety.evaluation``.
"""

from ._bnb_cpu import disable_bnb_cpu_packing  # first: it quiets a bitsandbytes import-time hint (see there)

from . import _peft_compat  # isort: skip
from .distributed import verify_statistics_across_ranks
from .guardspace import GuardSpaceConfig, GuardSpaceReport, export_to_lora, guardspace_report
from .safe_lora import SafeLoRAReport, apply_safe_lora
from .somf import SafetyMasks, SOMFConfig, SOMFMerger
from .statistics import SafetyStatistics, collect_safety_statistics

__version__ = "0.1.0"

_peft_compat.install()

__all__ = [
    "GuardSpaceConfig",
    "GuardSpaceReport",
    "SOMFConfig",
    "SOMFMerger",
    "SafeLoRAReport",
    "SafetyMasks",
    "SafetyStatistics",
    "apply_safe_lora",
    "collect_safety_statistics",
    "disable_bnb_cpu_packing",
    "export_to_lora",
    "guardspace_report",
    "verify_statistics_across_ranks",
]
