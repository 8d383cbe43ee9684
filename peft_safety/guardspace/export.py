"""Export a GuardSpace adapter as a vanilla LoRA adapter of rank ``2r`` (exact, on the original base weights).

``W + s (B A P - B0 A0 P) = W + s [B, B0] [A P ; -A0 P]``: ``lora_B' = [B, B0]`` (``m x 2r``),
``lora_A' = [A P ; -A0 P]`` (``2r x n``), same scaling ``s`` (``lora_alpha`` doubled, or scaled by ``sqrt 2``
with rsLoRA). Plain ``peft`` loads the result without ``peft_safety``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields

import torch
from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict

from .._files import atomic_save_file, check_output_dir
from .config import GuardSpaceConfig
from .layer import GuardSpaceLinear, GuardSpaceVariant
from .report import guardspace_report


def lora_factors(layer: GuardSpaceLinear, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A', lora_B')`` of rank ``2r`` reproducing the GuardSpace adapter with the layer's scaling.

    ``lora_A' = [A_eff P; -A0_eff P]`` (``(2r, n)``), ``lora_B' = [B, B0]`` (``(m, 2r)``), float32.
    """
    trained_A, frozen_A, lora_B, frozen_B = GuardSpaceVariant.factors(layer, adapter_name)
    return torch.cat([trained_A, -frozen_A]), torch.cat([lora_B, frozen_B], dim=1)


def lora_config_of(config: GuardSpaceConfig) -> LoraConfig:
    """The vanilla ``LoraConfig`` of the exported adapter (ranks doubled, scalings unchanged)."""
    lora_fields = {f.name for f in fields(LoraConfig)}
    kwargs = {key: value for key, value in config.to_dict().items() if key in lora_fields}
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    kwargs.update(
        init_lora_weights=True,
        r=2 * config.r,
        lora_alpha=alpha_factor * config.lora_alpha,
        rank_pattern={key: 2 * value for key, value in config.rank_pattern.items()},
        alpha_pattern={key: alpha_factor * value for key, value in config.alpha_pattern.items()},
    )
    kwargs.pop("peft_type", None)
    return LoraConfig(**kwargs)


def export_to_lora(peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default") -> LoraConfig:
    """Write ``adapter_name`` of ``peft_model`` to ``path`` as a vanilla LoRA adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``) that plain ``peft`` loads on the original base model with the same function.

    The safetensors metadata key ``peft_safety.calibration_leakage`` records the adapter's leakage certificate
    (``{"total": ..., "layers": {module: relative leakage}}``, see
    [`guardspace_report()`][peft_safety.guardspace_report]).

    Returns:
        The ``LoraConfig`` written.
    """
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ValueError(
            f"export_to_lora needs a PeftModel holding a GuardSpace adapter, got {type(peft_model).__name__}."
        )
    config = configs.get(adapter_name)
    if config is None:
        raise ValueError(
            f"The model has no adapter named '{adapter_name}'; its adapters are {list(configs)}. "
            "Pass adapter_name=<one of them>."
        )
    if not isinstance(config, GuardSpaceConfig):
        guarded = [name for name, value in configs.items() if isinstance(value, GuardSpaceConfig)]
        raise ValueError(
            f"'{adapter_name}' is not a GuardSpace adapter (it is a {type(config).__name__}); "
            f"the GuardSpace adapters of this model are {guarded}."
        )
    check_output_dir(path, "export folder")
    state_dict = {
        key: value
        for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()
        if ".lora_guard." not in key
    }
    for name, module in peft_model.named_modules():
        if adapter_name in getattr(module, "lora_guard", ()):
            stacked_A, stacked_B = lora_factors(module, adapter_name)
            dtype = module.lora_A[adapter_name].weight.dtype
            state_dict[f"{name}.lora_A.weight"] = stacked_A.to(dtype).contiguous()
            state_dict[f"{name}.lora_B.weight"] = stacked_B.to(dtype).contiguous()
    lora_config = lora_config_of(config)
    os.makedirs(path, exist_ok=True)
    certificate = guardspace_report(peft_model, adapter_name).certificate()
    metadata = {"format": "pt", "peft_safety.calibration_leakage": json.dumps(certificate)}
    atomic_save_file(state_dict, os.path.join(path, SAFETENSORS_WEIGHTS_NAME), metadata)
    lora_config.save_pretrained(os.fspath(path))
    return lora_config
