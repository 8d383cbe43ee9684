"""Resolving ``target_modules`` against a model, the way PEFT does it."""

from __future__ import annotations

from collections.abc import Iterable

from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear or GPT-2 ``Conv1D`` layer (quantised layers included)."""
    base = _base_layer(module)
    if isinstance(base, Conv1D):
        return base.nf, base.weight.shape[0]
    return base.out_features, base.in_features


def resolve_target_modules(
    model: nn.Module,
    target_modules: str | Iterable[str] | None,
    exclude_modules: str | Iterable[str] | None = None,
    layers_to_transform: int | list[int] | None = None,
    layers_pattern: str | list[str] | None = None,
) -> list[str]:
    """Names of the linear layers of ``model`` that PEFT would target with ``target_modules``.

    Matching is PEFT's own (suffix match for a list, full match for a regex string, ``"all-linear"`` expanded to
    the linear layers' name suffixes as PEFT does), including ``exclude_modules``, ``layers_to_transform`` and
    ``layers_pattern``: a layer PEFT leaves alone is not returned.

    Raises:
        ValueError: when nothing matches, or when a matched module is not a linear layer.
    """
    if target_modules is None:
        raise ValueError("`target_modules` is required: name the linear layers to adapt, e.g. ['q_proj', 'v_proj'].")
    if isinstance(target_modules, str) and target_modules == "all-linear":
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [
            name
            for name, module in model.named_modules()
            if isinstance(_base_layer(module), LINEAR_TYPES)
            and module is not output_layer
            and not _is_inside_tuner_layer(model, name)
        ]
        if not names:
            raise ValueError("`target_modules='all-linear'` matched no linear layer in the model.")
        # PEFT replaces "all-linear" by the set of these layers' last name segments, then matches as for a list
        target_modules = sorted({name.rsplit(".", 1)[-1] for name in names})
        candidates = set(names)
    else:
        candidates = None

    probe = LoraConfig(
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    matched = [
        name
        for name, _ in model.named_modules()
        if name
        and (candidates is None or name in candidates)
        and not _is_inside_tuner_layer(model, name)
        and check_target_module_exists(probe, name)
    ]
    if not matched:
        layers = "" if layers_to_transform is None else f" in layers {layers_to_transform!r}"
        raise ValueError(
            f"`target_modules={target_modules!r}` matched no module of {type(model).__name__}{layers}. "
            "Use names as they appear in `model.named_modules()`, e.g. ['q_proj', 'v_proj'] or 'all-linear'"
            + (", and layer indices the model has." if layers else ".")
        )
    modules = dict(model.named_modules())
    not_linear = [name for name in matched if not isinstance(_base_layer(modules[name]), LINEAR_TYPES)]
    if not_linear:
        raise ValueError(
            f"GuardSpace adapts linear layers only, but `target_modules` matched {not_linear[:3]} "
            f"({type(modules[not_linear[0]]).__name__}). Narrow `target_modules` to nn.Linear / Conv1D layers."
        )
    return matched


def _is_inside_tuner_layer(model: nn.Module, name: str) -> bool:
    """True for the sub-modules of a PEFT layer (``...q_proj.base_layer``, ``...q_proj.lora_A.default``)."""
    return ".base_layer" in name or ".lora_" in name


def config_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """`resolve_target_modules()` with the target options of ``config`` (exclusions and layer indices)."""
    return resolve_target_modules(
        model,
        config.target_modules,
        config.exclude_modules,
        getattr(config, "layers_to_transform", None),
        getattr(config, "layers_pattern", None),
    )
