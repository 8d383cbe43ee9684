"""Every use of PEFT's private API, in one place (pinned to ``peft>=0.21,<0.22``).

Four pass-through wrappers are installed once, on ``import peft_safety``; each leaves every non-GuardSpace
config exactly to PEFT:

* ``LoraModel.inject_adapter``: for a ``GuardSpaceConfig``, validate against the model and prepare the
  per-site projectors *before* PEFT modifies anything, and log the report after. A failure anywhere in between
  leaves the config and the model as they were before the call.
* ``PeftConfigMixin.from_peft_type``: a saved adapter with ``init_lora_weights="guardspace"`` is loaded as a
  ``GuardSpaceConfig`` (plain ``peft`` without ``peft_safety`` refuses it: "Unknown initialization").
* ``LoraModel.add_weighted_adapter``: PEFT reads ``lora_A``/``lora_B`` directly and would ignore a GuardSpace
  adapter's projector and frozen offset (a wrong adapter, NaN after save/reload). When a named adapter is a
  GuardSpace adapter, the merge goes through SOMF's unmasked merge of the exact exported factors (re-projected, see
  `peft_safety.somf.fusion`) for the combinations SOMF implements, and the SVD ones are refused before the
  model is touched.
* ``PeftModel.save_pretrained``: records each saved GuardSpace adapter's leakage certificate in its config
  (``calibration_leakage`` in ``adapter_config.json``), and refuses adapters loaded for inference only (they hold
  no projector basis to save).

GuardSpace layers reach PEFT through ``LoraConfig._register_custom_module``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from typing import Any

import peft
from packaging.version import Version
from peft import PeftModel
from peft.config import PeftConfigMixin
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger("peft_safety")
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
        snapshot = _InjectionSnapshot(config, self, model)
        try:
            prepare_injection(config, model)
            _upgrade_plain_lora_layers(model, config)
            disable_bnb_cpu_packing(model)  # exact compute dtype, and a weight the init and merges can dequantise
            result = inject_adapter(self, model, adapter_name, *args, **kwargs)
            finish_injection(config, model, adapter_name)
        except BaseException:
            snapshot.restore()
            reset_injection_state(config)
            raise
        return result

    return wrapper


def _shallow_state(obj: object) -> dict[str, Any]:
    """``vars(obj)`` with every dict / list / set value copied one level deep (the containers PEFT edits in place)."""
    return {key: copy.copy(v) if isinstance(v, (dict, list, set)) else v for key, v in vars(obj).items()}


class _InjectionSnapshot:
    """The config and every module as they were before an injection, to undo a failed one completely.

    A GuardSpace injection edits the config (``rank_pattern`` under ``rank_allocation="null_dim"``,
    ``null_space_dims``, ``null_space_sites``, ``fan_in_fan_out``, PEFT's own ``target_modules`` rewrites), re-classes
    layers holding plain LoRA adapters, adds adapters to existing layers and replaces target modules one by one: a
    failure at the n-th layer would leave all of that behind. Each module keeps its class and a shallow copy of its
    attributes (its ``_modules`` / ``_parameters`` / ``_buffers`` and PEFT's per-adapter dicts such as ``r`` and
    ``scaling``), each parameter its ``requires_grad``; tensors are neither copied nor changed.
    """

    def __init__(self, config: Any, *roots: nn.Module) -> None:
        self.config = config
        self.config_state = _shallow_state(config)
        modules = {id(module): module for root in roots for module in root.modules()}
        self.modules = [(module, type(module), _shallow_state(module)) for module in modules.values()]
        parameters = {id(p): p for root in roots for p in root.parameters()}
        self.requires_grad = [(parameter, parameter.requires_grad) for parameter in parameters.values()]

    def restore(self) -> None:
        vars(self.config).clear()
        vars(self.config).update(self.config_state)
        for module, cls, state in self.modules:
            module.__class__ = cls
            vars(module).clear()
            vars(module).update(state)
        for parameter, requires_grad in self.requires_grad:
            parameter.requires_grad_(requires_grad)


def _upgrade_plain_lora_layers(model: nn.Module, config) -> None:
    """Let target layers that already hold plain LoRA adapters also hold GuardSpace ones.

    The GuardSpace layer classes only add methods to PEFT's (``lora_guard`` is created on first use), so an exact
    ``lora.Linear`` / bnb ``Linear4bit`` / ``Linear8bitLt`` is re-classed in place; its adapters behave as before.
    Every target is checked before any is re-classed.
    """
    from ._targets import config_targets
    from .guardspace.bnb import BNB_LAYERS
    from .guardspace.layer import GuardSpaceLayerMixin, GuardSpaceLinear

    upgrades = {cls.__bases__[-1]: cls for cls in (GuardSpaceLinear, *BNB_LAYERS.values())}
    modules = dict(model.named_modules())
    wrapped = [
        modules[name]
        for name in config_targets(model, config)
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


def _wrap_add_weighted_adapter(add_weighted_adapter):
    @functools.wraps(add_weighted_adapter)
    def wrapper(self, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs):
        from .guardspace.config import GuardSpaceConfig

        guarded = [
            name for name in adapters if isinstance(getattr(self, "peft_config", {}).get(name), GuardSpaceConfig)
        ]
        if not guarded:
            return add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs)
        return _add_weighted_guardspace_adapter(self, list(adapters), weights, adapter_name, guarded, *args, **kwargs)

    return wrapper


def _add_weighted_guardspace_adapter(
    lora_model: LoraModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    guarded: list[str],
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """``add_weighted_adapter`` for a merge naming GuardSpace adapters: SOMF's unmasked merge of their exact rank-2r
    export (``A' = [A P; -A0 P]``, ``B' = [B, B0]``), every part formed from ``A'`` re-projected by ``P``; for plain
    LoRA adapters it equals PEFT's ``add_weighted_adapter``. Raises ``ValueError`` (model untouched) otherwise."""
    from .somf.combinations import COMBINATIONS
    from .somf.merger import SOMFMerger

    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"add_weighted_adapter(combination_type={combination_type!r}) cannot merge the GuardSpace adapter(s) "
            f"{guarded}: PEFT's {combination_type!r} merge ignores their null-space projector and frozen offset. "
            f"Use one of {sorted(COMBINATIONS)} (merged exactly through the GuardSpace export), or export first with "
            "peft_safety.export_to_lora(peft_model, path, adapter_name) and load that as a plain LoRA adapter, or "
            "use peft_model.merge_with_safety_mask(...), which handles GuardSpace adapters exactly."
        )
    SOMFMerger().merge(
        lora_model,
        adapters,
        weights,
        adapter_name,
        combination_type=combination_type,
        density=density,
        majority_sign_method=majority_sign_method,
    )


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


def _wrap_save_pretrained(save_pretrained):
    signature = inspect.signature(save_pretrained)

    @functools.wraps(save_pretrained)
    def wrapper(self, *args, **kwargs):
        from .guardspace.config import GuardSpaceConfig
        from .guardspace.layer import INFERENCE_ONLY_MESSAGE
        from .guardspace.report import guardspace_report, is_sharded

        selected = signature.bind(self, *args, **kwargs).arguments.get("selected_adapters")
        for name in selected or list(self.peft_config):
            config = self.peft_config.get(name)
            if not isinstance(config, GuardSpaceConfig):
                continue
            guarded = [module.lora_guard[name] for module in _guarded(self) if name in module.lora_guard]
            if any(state.inference_only for state in guarded):
                raise ValueError(f"Cannot save GuardSpace adapter '{name}'. {INFERENCE_ONLY_MESSAGE}")
            if is_sharded(self, name):
                # ZeRO-3 / FSDP: the live adapter weights are shards; the trainer saves a gathered state_dict
                logger.warning(
                    "GuardSpace adapter '%s' is sharded: its leakage certificate is not recorded in "
                    "adapter_config.json (guardspace_report() on the unwrapped, gathered model gives it).",
                    name,
                )
                config.calibration_leakage = None
                continue
            config.calibration_leakage = guardspace_report(self, name).certificate()
        return save_pretrained(self, *args, **kwargs)

    return wrapper


def _guarded(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that hold GuardSpace adapters."""
    return [module for module in model.modules() if "lora_guard" in getattr(module, "_modules", {})]


def attach_merge_with_safety_mask() -> None:
    """Add ``LoraModel.merge_with_safety_mask`` (a new method, no PEFT class replaced; ``PeftModel.__getattr__``
    forwards to it). The SOMF code is imported on first call only."""
    if hasattr(LoraModel, "merge_with_safety_mask"):
        return

    def merge_with_safety_mask(self, *args, **kwargs):
        from .somf.merger import merge_with_safety_mask as merge

        return merge(self, *args, **kwargs)

    merge_with_safety_mask.__doc__ = "See `peft_safety.somf.merge_with_safety_mask()`."
    LoraModel.merge_with_safety_mask = merge_with_safety_mask


def install() -> None:
    """Install the wrappers once per process."""
    check_peft_version()
    attach_merge_with_safety_mask()
    if getattr(LoraModel, _INSTALLED_FLAG, False):
        return
    LoraModel.inject_adapter = _wrap_inject_adapter(LoraModel.inject_adapter)
    LoraModel.add_weighted_adapter = _wrap_add_weighted_adapter(LoraModel.add_weighted_adapter)
    PeftConfigMixin.from_peft_type = _wrap_from_peft_type(PeftConfigMixin.from_peft_type.__func__)
    PeftModel.save_pretrained = _wrap_save_pretrained(PeftModel.save_pretrained)
    setattr(LoraModel, _INSTALLED_FLAG, True)
