"""GuardSpace: safety-preserving LoRA fine-tuning (covariance-preconditioned init + harmful-input null space)."""

from .config import GuardSpaceConfig
from .export import export_to_lora
from .layer import GuardSpaceLinear
from .report import GuardSpaceReport, guardspace_report

__all__ = ["GuardSpaceConfig", "GuardSpaceLinear", "GuardSpaceReport", "export_to_lora", "guardspace_report"]
