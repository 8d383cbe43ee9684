"""peft-safety: keep aligned LLMs safe while they are fine-tuned (GuardSpace) and merged (SOMF) with PEFT;
Safe LoRA (``apply_safe_lora``) projects a trained LoRA adapter onto the alignment direction.

``import peft_safety`` is all the registration needed: ``peft.get_peft_model(model, GuardSpaceConfig(...))``
and ``PeftModel.from_pretrained`` then handle GuardSpace adapters, and every ``PeftModel`` holding LoRA adapters
gains ``merge_with_safety_mask`` (SOMF). Evaluation lives in ``peft_safety.evaluation``.

Importing the package is cheap (no torch, transformers or peft): the public names load on first access, and the
registration with PEFT runs as soon as ``peft`` is imported (at once when it already is), which every use of it
requires.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._bnb_cpu import demote_bnb_cpu_kernel_hint  # first: it quiets a bitsandbytes import-time hint (see there)

if TYPE_CHECKING:
    from ._bnb_cpu import disable_bnb_cpu_packing
    from .distributed import verify_statistics_across_ranks
    from .guardspace import GuardSpaceConfig, GuardSpaceReport, export_to_lora, guardspace_report
    from .safe_lora import SafeLoRAReport, apply_safe_lora
    from .somf import SafetyMasks, SOMFConfig, SOMFMerger
    from .statistics import SafetyStatistics, collect_safety_statistics

DISTRIBUTION = "peft-safety"


def _version() -> str:
    """The installed distribution's version: ``pyproject.toml`` is the only place the number is written."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree on sys.path without an installed distribution
        return "0+unknown"


__version__ = _version()
demote_bnb_cpu_kernel_hint()

# public name -> submodule defining it (imported on first access)
_LAZY = {
    "GuardSpaceConfig": ".guardspace",
    "GuardSpaceReport": ".guardspace",
    "export_to_lora": ".guardspace",
    "guardspace_report": ".guardspace",
    "SOMFConfig": ".somf",
    "SOMFMerger": ".somf",
    "SafetyMasks": ".somf",
    "SafeLoRAReport": ".safe_lora",
    "apply_safe_lora": ".safe_lora",
    "SafetyStatistics": ".statistics",
    "collect_safety_statistics": ".statistics",
    "disable_bnb_cpu_packing": "._bnb_cpu",
    "verify_statistics_across_ranks": ".distributed",
}
_SUBMODULES = ("distributed", "evaluation", "guardspace", "safe_lora", "somf", "statistics")

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


def _register_with_peft() -> None:
    """Install the GuardSpace/SOMF wrappers into PEFT (`peft_safety._peft_compat.install()`); idempotent."""
    from . import _peft_compat

    _peft_compat.install()


class _RegisterOnPeftImport(importlib.abc.MetaPathFinder):
    """Runs `_register_with_peft()` right after ``peft`` has been imported, then leaves ``sys.meta_path``.

    It finds nothing itself: it asks the other finders for ``peft``'s spec and wraps that spec's loader. A spec
    looked up without an import (``importlib.util.find_spec("peft")``, as ``transformers`` does to see whether PEFT
    is installed) runs nothing, and the finder stays for the real import.
    """

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if fullname != "peft" or self._searching:
            return None
        self._searching = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        exec_module = loader.exec_module

        def exec_and_register(module: ModuleType) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_with_peft()

        loader.exec_module = exec_and_register
        return spec


if "peft" in sys.modules:
    _register_with_peft()
elif not any(isinstance(finder, _RegisterOnPeftImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnPeftImport())
