"""Every use of PEFT's private API, in one place (pinned to ``peft>=0.21,<0.22``).

Two pass-through wrappers are installed once, on ``import peft_safety``; both leave every non-GuardSpace config
exactly to PEFT:

* ``LoraModel.inject_adapter``: for a ``GuardSpaceConfig``, validate against the model and prepare the
  per-site projectors *before* PEFT modifies anything, and log the report after.
* ``PeftConfigMixin.from_peft_type``: a saved adapter with ``init_lora_weights="guardspace"`` is loaded as a
  ``GuardSpaceConfig`` (plain ``peft`` without ``peft_safety`` refuses it: "Unknown initialization").

GuardSpace layers reach PEFT through ``LoraConfig._register_custom_module``.
"""

from __future__ import annotations

import functools

import peft
from packaging.version import Version
from peft.config import PeftConfigMixin
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

SUPPORTED_PEFT = (Version("0.21"), Version("0.22"))
_INSTALLED_FLAG = "_peft_safety_installed"


def check_peft_version() -> None:
    version = Version(peft.__version__)
    if not SUPPORTED_PEFT[0] <= version < SUPPORTED_PEFT[1]:
        raise ImportError(
            f"peft_safety supports peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]} (it uses PEFT's LoRA variant API), "
            f"found peft {peft.__version__}. Install a supported version: pip install 'peft>=0.21,<0.22'."
        )


def register_guardspace_layers(config) -> None:
    """Make PEFT build GuardSpace layers for the linear layers targeted by ``config``.

    PEFT tries custom modules first, in insertion order, with ``isinstance``: bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt`` subclass ``nn.Linear``, so they are mapped first (only when bitsandbytes is importable).
    """
    from .guardspace.bnb import BNB_LAYERS  # empty when bitsandbytes is not importable
    from .guardspace.layer import GuardSpaceLinear

    mapping = {**BNB_LAYERS, nn.Linear: GuardSpaceLinear, Conv1D: GuardSpaceLinear}
    if config._custom_modules:  # keep the bnb classes ahead of nn.Linear on a re-registration
        config._custom_modules = {key: value for key, value in config._custom_modules.items() if key not in mapping}
    config._register_custom_module(mapping)


def _wrap_inject_adapter(inject_adapter):
    @functools.wraps(inject_adapter)
    def wrapper(self, model: nn.Module, adapter_name: str, *args, **kwargs):
        from ._bnb_cpu import disable_bnb_cpu_packing
        from .guardspace.config import GuardSpaceConfig
        from .guardspace.initialization import finish_injection, prepare_injection, reset_injection_state

        config = self.peft_config[adapter_name]
        if not isinstance(config, GuardSpaceConfig):
            return inject_adapter(self, model, adapter_name, *args, **kwargs)
        prepare_injection(config, model)
        _upgrade_plain_lora_layers(model, config)
        disable_bnb_cpu_packing(model)  # exact compute dtype, and a weight the init and merges can dequantise
        try:
            result = inject_adapter(self, model, adapter_name, *args, **kwargs)
        except BaseException:
            reset_injection_state(config)
            raise
        finish_injection(config, model, adapter_name)
        return result

    return wrapper


def _upgrade_plain_lora_layers(model: nn.Module, config) -> None:
    """Let target layers that already hold plain LoRA adapters also hold GuardSpace ones.

    The GuardSpace layer classes only add methods to PEFT's (``lora_guard`` is created on first use), so an exact
    ``lora.Linear`` / bnb ``Linear4bit`` / ``Linear8bitLt`` is re-classed in place; its adapters behave as before.
    Every target is checked before any is re-classed.
    """
    from ._targets import resolve_target_modules
    from .guardspace.bnb import BNB_LAYERS
    from .guardspace.layer import GuardSpaceLayerMixin, GuardSpaceLinear

    upgrades = {cls.__bases__[-1]: cls for cls in (GuardSpaceLinear, *BNB_LAYERS.values())}
    modules = dict(model.named_modules())
    wrapped = [
        modules[name]
        for name in resolve_target_modules(model, config.target_modules, config.exclude_modules)
        if isinstance(modules[name], BaseTunerLayer) and not isinstance(modules[name], GuardSpaceLayerMixin)
    ]
    unsupported = [module for module in wrapped if type(module) not in upgrades]
    if unsupported:
        raise ValueError(
            f"A target layer already holds adapters of type {type(unsupported[0]).__name__}; GuardSpace adapters can "
            "be added next to plain LoRA adapters on nn.Linear / Conv1D / bitsandbytes layers only."
        )
    for module in wrapped:
        module.__class__ = upgrades[type(module)]


def _wrap_from_peft_type(from_peft_type):
    @functools.wraps(from_peft_type)
    def wrapper(cls, **kwargs):
        from .guardspace.config import GuardSpaceConfig
        from .guardspace.layer import GUARDSPACE_INIT

        if kwargs.get("init_lora_weights") == GUARDSPACE_INIT and str(kwargs.get("peft_type", "LORA")).endswith(
            "LORA"
        ):
            kwargs.pop("peft_type", None)
            return from_peft_type(GuardSpaceConfig, **kwargs)
        return from_peft_type(cls, **kwargs)

    return classmethod(wrapper)


def attach_merge_with_safety_mask() -> None:
    """Add ``LoraModel.merge_with_safety_mask`` (a new method, no PEFT class replaced; ``PeftModel.__getattr__``
    forwards to it). The SOMF code is imported on first call only."""
    if hasattr(LoraModel, "merge_with_safety_mask"):
        return

    def merge_with_safety_mask(self, *args, **kwargs):
        from .somf.merger import merge_with_safety_mask as merge

        return merge(self, *args, **kwargs)

    merge_with_safety_mask.__doc__ = "See :func:`peft_safety.somf.merge_with_safety_mask`."
    LoraModel.merge_with_safety_mask = merge_with_safety_mask


def install() -> None:
    """Install the wrappers once per process."""
    check_peft_version()
    attach_merge_with_safety_mask()
    if getattr(LoraModel, _INSTALLED_FLAG, False):
        return
    LoraModel.inject_adapter = _wrap_inject_adapter(LoraModel.inject_adapter)
    PeftConfigMixin.from_peft_type = _wrap_from_peft_type(PeftConfigMixin.from_peft_type.__func__)
    setattr(LoraModel, _INSTALLED_FLAG, True)
