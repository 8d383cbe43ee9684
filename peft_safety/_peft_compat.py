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
    """Make PEFT build :class:`GuardSpaceLinear` for the linear layers targeted by ``config``."""
    from .guardspace.layer import GuardSpaceLinear

    config._register_custom_module({nn.Linear: GuardSpaceLinear, Conv1D: GuardSpaceLinear})


def _wrap_inject_adapter(inject_adapter):
    @functools.wraps(inject_adapter)
    def wrapper(self, model: nn.Module, adapter_name: str, *args, **kwargs):
        from .guardspace.config import GuardSpaceConfig
        from .guardspace.initialization import finish_injection, prepare_injection

        config = self.peft_config[adapter_name]
        if not isinstance(config, GuardSpaceConfig):
            return inject_adapter(self, model, adapter_name, *args, **kwargs)
        prepare_injection(config, model)
        try:
            result = inject_adapter(self, model, adapter_name, *args, **kwargs)
        except BaseException:
            config._guardspace_session = None
            raise
        finish_injection(config, model, adapter_name)
        return result

    return wrapper


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


def install() -> None:
    """Install the wrappers once per process."""
    check_peft_version()
    if getattr(LoraModel, _INSTALLED_FLAG, False):
        return
    LoraModel.inject_adapter = _wrap_inject_adapter(LoraModel.inject_adapter)
    PeftConfigMixin.from_peft_type = _wrap_from_peft_type(PeftConfigMixin.from_peft_type.__func__)
    setattr(LoraModel, _INSTALLED_FLAG, True)
