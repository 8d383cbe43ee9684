"""Checks of a merge request, all done before any work so that a bad request leaves the model untouched."""

from __future__ import annotations

import math

from peft import PeftModel
from peft.tuners.lora import LoraModel

from .combinations import Combination, get_combination
from .sites import Site, find_sites


def resolve_lora_model(model) -> LoraModel:
    """The ``LoraModel`` of a ``PeftModel`` (or ``model`` itself)."""
    if isinstance(model, PeftModel):
        model = model.base_model
    if not isinstance(model, LoraModel):
        raise TypeError(f"Expected a PeftModel holding LoRA adapters, got {type(model).__name__}.")
    return model


def check_request(
    lora_model: LoraModel,
    adapters: list[str],
    weights: list[float] | None,
    adapter_name: str | None,
    combination_type: str,
    density: float | None,
    reference: str | None,
    shared: bool,
) -> tuple[Combination, list[Site]]:
    """Validate names, weights, density, combination, targets and ranks; return the combination and the sites."""
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}.")
    known = list(lora_model.peft_config)
    unknown = [adapter for adapter in adapters if adapter not in known]
    if reference is not None and reference not in known:
        unknown.append(reference)
    if unknown:
        raise ValueError(f"Unknown adapter name(s) {unknown}; this model holds {known}.")
    for adapter in adapters + ([reference] if reference else []):
        config = lora_model.peft_config[adapter]
        if getattr(config, "use_dora", False) or getattr(config, "target_parameters", None):
            raise ValueError(f"Adapter {adapter!r} uses DoRA or target_parameters, which SOMF cannot fuse.")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters contains duplicates: {adapters}.")
    if reference is not None and reference in adapters:
        raise ValueError(f"The reference adapter {reference!r} cannot also be one of the adapters to fuse.")
    if weights is not None and len(weights) != len(adapters):
        raise ValueError(f"weights has {len(weights)} entries for {len(adapters)} adapters {adapters}.")
    if weights is not None:
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
        if bad:
            raise ValueError(
                f"weights must be finite numbers, got {list(weights)}: {bad[0]!r} would give a NaN adapter."
            )
    if adapter_name is not None and adapter_name in known:
        raise ValueError(
            f"An adapter named {adapter_name!r} already exists; choose another adapter_name or delete it first "
            "(peft's add_weighted_adapter would silently keep the old one)."
        )
    combination = get_combination(combination_type)
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}.")
    if combination.needs_density and density is None:
        raise ValueError(f"combination_type={combination_type!r} needs a density in (0, 1].")
    if combination.name == "cat" and reference is not None:
        raise ValueError("combination_type='cat' cannot be used with a reference adapter (the ranks would differ).")

    names = adapters + ([reference] if reference else [])
    sites, per_adapter = find_sites(lora_model.model, names)
    expected = set(per_adapter[adapters[0]])
    for adapter in names:
        if not per_adapter[adapter]:
            raise ValueError(f"Adapter {adapter!r} has no linear LoRA layer to merge.")
        if set(per_adapter[adapter]) != expected:
            difference = sorted(set(per_adapter[adapter]) ^ expected)[:3]
            raise ValueError(
                f"Adapters {adapters[0]!r} and {adapter!r} target different modules (e.g. {difference}); "
                "SOMF needs the same target modules for every adapter."
            )
    needs_equal = combination.equal_ranks or shared or reference is not None
    if needs_equal:
        for site in sites:
            shapes = {adapter: tuple(factors.lora_A.shape) for adapter, factors in site.factors.items()}
            if len(set(shapes.values())) > 1:
                ranks = {adapter: shape[0] for adapter, shape in shapes.items()}
                raise ValueError(
                    f"Adapters have different ranks at {site.name}: {ranks}. combination_type={combination_type!r}"
                    + (" with a shared mask" if shared else "")
                    + " needs equal ranks; use combination_type='cat' with SOMFConfig(shared_mask=False)."
                )
    return combination, sites
