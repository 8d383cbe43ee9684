"""Creating GuardSpace adapters: checks before injection, per-layer init during it, the report after it.

``prepare_injection`` runs before PEFT touches the model (bad input fails there, model untouched). It does all the
linear algebra, one input site at a time: one eigen-decomposition of the site's covariance gives the projector basis
and the damped inverse, and each module of the site gets its smallest components. It attaches them to the config as
an `InitSession`. PEFT then creates each layer and ``GuardSpaceVariant.init`` calls `initialize_layer()`, which only
scales and places the factors. ``finish_injection`` records the null-space
dimensions in the config, logs the report and drops the session.

Without statistics (``PeftModel.from_pretrained`` of a saved adapter), layers are allocated from the recorded
``null_space_dims`` and filled from the checkpoint: no SVD, no statistics file.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from peft.utils.other import get_pattern_key
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .._bnb_cpu import disable_bnb_cpu_packing
from .._targets import _base_layer, config_targets, weight_shape
from ..distributed import full_weight, rank_and_world
from ..statistics import SafetyStatistics
from .config import GuardSpaceConfig
from .decomposition import (
    DampedCovariance,
    NullDimensions,
    ProjectorBasis,
    SmallestComponents,
    bounded_input_scale,
    component_factors,
    covariance_spectrum,
    damp_covariance_spectral,
    null_dimensions,
    null_space_basis,
    output_energy_from_product,
    smallest_components,
    symmetric_part,
)
from .layer import GuardState

logger = logging.getLogger("peft_safety")


@dataclass
class ModuleInit:
    """The init of one module before adapter scaling: its smallest components and ``tr(W C W^T)``."""

    components: SmallestComponents
    output_energy: torch.Tensor


@dataclass
class InitSession:
    """What the layer initialisations of one ``get_peft_model`` / ``add_adapter`` call share."""

    statistics: SafetyStatistics
    bases: dict[str, ProjectorBasis]  # site -> projector basis, shared by the modules of the site
    modules: dict[str, ModuleInit]  # target name -> its init
    initialised: list[str] = field(default_factory=list)


def _module_rank(config: GuardSpaceConfig, name: str) -> int:
    return config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)


def prepare_injection(config: GuardSpaceConfig, model: nn.Module) -> None:
    """Validate everything against ``model`` and set up the init session. Raises before any change to ``model``."""
    from .bnb import check_quantization  # bitsandbytes only; other quantisation backends get a clear error

    check_quantization(model)
    names = config_targets(model, config)
    _check_patterns(config, names)
    statistics = config.load_statistics()
    if statistics is None:
        recorded = config.null_space_dims or {}
        missing = [name for name in names if name not in recorded]
        if missing:
            raise ValueError(
                "GuardSpaceConfig needs `safety_statistics` to create an adapter (it has none, and no recorded "
                f"null-space dimensions for {missing[:3]}). Pass safety_statistics=collect_safety_statistics(...)."
            )
        config._guardspace_session = None
        config._guardspace_restored_bases = {}
        return
    statistics.check_matches(model, names)
    modules = dict(model.named_modules())
    for name in names:
        m, n = weight_shape(modules[name])
        r = _module_rank(config, name)
        if r > min(m, n):
            raise ValueError(f"r={r} for '{name}' exceeds min(out, in)={min(m, n)} of its {m}x{n} weight; lower `r`.")
    site_ranks: dict[str, int] = {}
    for name in names:
        site = statistics.site_of[name]
        site_ranks[site] = max(site_ranks.get(site, 0), _module_rank(config, name))
    site_dims = None
    if config.rank_allocation == "null_dim":  # the ranks need every site's null dimension: eigenvalues first
        site_dims = {site: _null_dims_from_values(statistics, site, rank, config) for site, rank in site_ranks.items()}
        shapes = {name: weight_shape(modules[name]) for name in names}
        null_dims = {name: site_dims[statistics.site_of[name]].null_dim for name in names}
        config.rank_pattern = {**config.rank_pattern, **allocate_ranks(null_dims, shapes, config)}
    disable_bnb_cpu_packing(model)  # 4-bit weights on CPU: dequantise the plain (unpacked) layout
    bases, inits = _decompose_sites(config, statistics, modules, names, site_ranks, site_dims)
    _warn_rank_above_null_dim(config, names, {name: bases[statistics.site_of[name]].null_dim for name in names})
    config.null_space_dims = {}
    config.near_null_dims = {}
    config.null_space_sites = {}
    config._guardspace_session = InitSession(statistics, bases, inits)


def _null_dims_from_values(
    statistics: SafetyStatistics, site: str, rank: int, config: GuardSpaceConfig
) -> NullDimensions:
    """The null dimensions of ``site`` from its eigenvalues alone (``syevd`` without vectors: 0.4x the cost)."""
    covariance = statistics.covariance_sums[site].double() / statistics.num_tokens
    values = torch.linalg.eigvalsh(symmetric_part(covariance))
    return null_dimensions(values, config.null_space_threshold, rank, statistics.covariance_sums[site].dtype)


def _decompose_sites(
    config: GuardSpaceConfig,
    statistics: SafetyStatistics,
    modules: dict[str, nn.Module],
    names: list[str],
    site_ranks: dict[str, int],
    site_dims: dict[str, NullDimensions] | None,
) -> tuple[dict[str, ProjectorBasis], dict[str, ModuleInit]]:
    """The projector basis of every site and the `ModuleInit` of every target, one site at a time.

    Per site, one eigen-decomposition of ``C`` gives the basis (with the null dimensions ``site_dims`` when the
    ranks were allocated from them, so that both agree) and the damped inverse; only that site's ``n x n`` matrices
    are alive at a time.
    """
    bases: dict[str, ProjectorBasis] = {}
    inits: dict[str, ModuleInit] = {}
    quiet = True if rank_and_world()[0] != 0 else None  # None: a bar in a terminal, none in logs
    sites = tqdm(site_ranks.items(), desc="GuardSpace init", unit="site", disable=quiet)
    for site, rank in sites:
        covariance = statistics.covariance_sums[site].double() / statistics.num_tokens
        spectrum = covariance_spectrum(covariance)
        bases[site] = null_space_basis(
            threshold=config.null_space_threshold,
            min_exact_dim=rank,
            accumulation_dtype=statistics.covariance_sums[site].dtype,
            compact=config.compact_bases,
            spectrum=spectrum,
            dims=None if site_dims is None else site_dims[site],
        )
        damped = damp_covariance_spectral(
            covariance, spectrum, config.damping_start, config.damping_tolerance, site=f"site '{site}'"
        )
        del covariance, spectrum
        on_device: dict[torch.device, DampedCovariance] = {}  # C~ and its spectrum where the weights are
        for name in (name for name in names if statistics.site_of[name] == site):
            weight = _float_weight(modules[name])
            if weight.device not in on_device:
                on_device[weight.device] = damped.to(weight.device)
            inits[name] = _module_init(weight, on_device[weight.device], _module_rank(config, name))
        del damped, on_device
    return bases, inits


def _module_init(weight: torch.Tensor, damped: DampedCovariance, r: int) -> ModuleInit:
    """`ModuleInit` of one ``(m, n)`` float32 weight, on its device: ``M = W C~`` serves the SVD and the energy.

    The components are kept in float32 until PEFT creates the layer (``r (m + n)`` floats per module).
    """
    product = weight.double() @ damped.damped
    components = smallest_components(weight, damped.damped, damped.solve_rows, r, product)
    energy = output_energy_from_product(weight, product, damped.shift)
    return ModuleInit(components.to(torch.float32), energy)


def _warn_rank_above_null_dim(config: GuardSpaceConfig, names: list[str], null_dims: dict[str, int]) -> None:
    """Warn, naming the layers, where the rank exceeds the null-space dimension ``k`` (only ``k`` of the ``r``
    directions can learn). Layers without null space (``k = 0``) are legitimate and reported after injection."""
    over = {
        name: (_module_rank(config, name), k) for name, k in null_dims.items() if 0 < k < _module_rank(config, name)
    }
    if not over:
        return
    examples = ", ".join(f"{name} (r={r}, k={k})" for name, (r, k) in list(over.items())[:3])
    warnings.warn(
        f"GuardSpace: the rank exceeds the null-space dimension k of {len(over)} of {len(names)} layers, e.g. "
        f"{examples}: only k of the r directions of their adapters can learn, the rest is wasted. Lower `r` (or "
        "set `rank_pattern` for these layers), or use rank_allocation='null_dim'.",
        UserWarning,
        stacklevel=2,
    )


def _check_patterns(config: GuardSpaceConfig, names: list[str]) -> None:
    for label, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key, value in pattern.items():
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value <= 0
                or (label == "rank_pattern" and not float(value).is_integer())
            ):
                raise ValueError(f"{label}[{key!r}] must be a positive number, got {value!r}.")
            if not any(get_pattern_key([key], name) == key for name in names):
                raise ValueError(f"{label} key {key!r} matches none of the {len(names)} target modules.")


def allocate_ranks(
    null_dims: dict[str, int], shapes: dict[str, tuple[int, int]], config: GuardSpaceConfig
) -> dict[str, int]:
    """Ranks proportional to the null-space dimension ``k`` at (at most) the uniform parameter budget.

    Budget ``sum_i r (m_i + n_i)``; dead layers (``k = 0``) keep rank 1; a live layer gets
    ``min(k_i, m_i, n_i, max(1, floor(c k_i)))`` with the largest ``c`` that fits the budget (bisection).
    Keys are regex-escaped module names, as ``rank_pattern`` matches patterns.
    """
    budget = sum(_module_rank(config, name) * (m + n) for name, (m, n) in shapes.items())

    def ranks(scale: float) -> dict[str, int]:
        return {
            name: 1 if k == 0 else min(k, *shapes[name], max(1, math.floor(scale * k)))
            for name, k in null_dims.items()
        }

    def cost(allocation: dict[str, int]) -> int:
        return sum(r * sum(shapes[name]) for name, r in allocation.items())

    low, high = 0.0, float(max(shapes[name][0] + shapes[name][1] for name in shapes))
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(ranks(middle)) <= budget else (low, middle)
    return {_escape(name): r for name, r in ranks(low).items()}


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def _float_weight(module: nn.Module) -> torch.Tensor:
    """The base weight of a target (plain or already adapted) as ``(out, in)`` float32, dequantised for
    bitsandbytes layers and gathered when sharded. GPT-2 ``Conv1D`` stores it ``(in, out)`` (``fan_in_fan_out``)."""
    base = _base_layer(module)
    with full_weight(base) as weight:
        weight = weight.detach().float().clone()
    return weight.T if isinstance(base, Conv1D) else weight


@torch.no_grad()
def initialize_layer(layer: nn.Module, adapter_name: str, config: GuardSpaceConfig, target_name: str) -> None:
    """Create ``layer.lora_guard[adapter_name]``; with a session, also compute ``A0``, ``B0`` and ``A0_eff P``."""
    session: InitSession | None = getattr(config, "_guardspace_session", None)
    device = layer.lora_A[adapter_name].weight.device
    r = layer.r[adapter_name]
    if session is None:
        if device.type == "meta":
            # `low_cpu_mem_usage=True` loading: lora_A/B are meta until the checkpoint is assigned, but PEFT then
            # calls `.to(base device)` on every `lora_*` submodule without meta *parameters*, which fails for meta
            # buffers. GuardState has buffers only: allocate them on the base layer's device (the checkpoint
            # overwrites them).
            device = layer.get_base_layer().weight.device
        null_dim = (config.null_space_dims or {})[target_name]
        if config.near_null_dims is None and config.max_calibration_leakage is not None:
            raise ValueError(
                "max_calibration_leakage cannot be enforced on this GuardSpace adapter: it was saved by peft-safety "
                "0.1, without the leaking eigenpairs. Load it without max_calibration_leakage, or re-create it from "
                "its statistics."
            )
        leak_dim = (config.near_null_dims or {}).get(target_name, 0)
        inference_only = bool(config.inference_mode)  # is_trainable=False: fold at load, allocate no basis
        scaling = layer.scaling[adapter_name]
        state = GuardState(
            layer.in_features, layer.out_features, r, null_dim, leak_dim, device, inference_only, scaling,
            config.compact_bases,
        )  # fmt: skip
        state.leakage_bound = config.max_calibration_leakage
        if not inference_only:
            _share_restored_basis(config, target_name, state)
        layer.lora_guard[adapter_name] = state
        return
    site = session.statistics.site_of[target_name]
    basis = session.bases[site]
    init = session.modules.pop(target_name, None)
    if init is None or init.components.left.shape[1] != r:
        raise RuntimeError(
            f"GuardSpace prepared no rank-{r} init for '{target_name}' (PEFT created a layer the preparation did not "
            "plan for). Please report this with your PEFT version and target_modules."
        )
    b0, a0, singular_values = component_factors(
        init.components, layer.scaling[adapter_name], balance=config.factor_scale == "balanced"
    )
    lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    lora_A.data = a0.to(lora_A.dtype).contiguous()
    state = GuardState(
        layer.in_features, layer.out_features, r, basis.null_dim, basis.leak_values.numel(), device,
        compact=config.compact_bases,
    )  # fmt: skip
    state.basis = basis.basis.to(device)  # one tensor per site, shared by its modules
    if "leak_vectors" in state._buffers:  # compact null basis: the leak vectors are its columns
        state.leak_vectors = basis.leak_vectors.to(device)
    state.leak_values = basis.leak_values.to(device)
    if config.factor_scale == "bounded" or (config.factor_scale == "auto" and basis.rule == "exact"):
        state.input_scale = bounded_input_scale(state.project(lora_A.float())).to(device)
    # B0 / g keeps the product: s (B0 / g) (g A0 P) = s B0 A0 P
    lora_B.data = (b0.to(device) / state.input_scale).to(lora_B.dtype).contiguous()
    # frozen copies of the *stored* A and B (after any cast), so that the init is exactly the base function
    state.frozen_A = state.effective_A(lora_A)
    state.frozen_B = lora_B.float().clone()
    state.singular_values = singular_values.to(device)
    state.output_energy = init.output_energy.float().to(device)
    state.leakage_bound = config.max_calibration_leakage
    layer.lora_guard[adapter_name] = state
    config.null_space_dims[target_name] = basis.null_dim
    config.near_null_dims[target_name] = basis.leak_values.numel()
    config.null_space_sites[target_name] = site
    session.initialised.append(target_name)


SITE_BUFFERS = ("basis", "leak_vectors", "leak_values")  # the same for every module reading one input site


def _share_restored_basis(config: GuardSpaceConfig, target_name: str, state: GuardState) -> None:
    """When loading, give the modules of one input site single basis and leak tensors, as at creation.

    The checkpoint holds one copy per module; ``load_state_dict`` copies each into the shared tensor in place (the
    copies are equal), so a reloaded adapter keeps the memory of a fresh one. Loading with ``assign=True``
    (``low_cpu_mem_usage``) replaces the tensors and the modules then hold separate copies.
    """
    site = (config.null_space_sites or {}).get(target_name)
    shared = getattr(config, "_guardspace_restored_bases", None)
    if site is None or shared is None:
        return
    names = [name for name in SITE_BUFFERS if name in state._buffers]  # compact: no separate leak vectors
    tensors = shared.setdefault(site, {name: getattr(state, name) for name in names})
    for name in names:
        tensor, own = tensors[name], getattr(state, name)
        if tensor.shape == own.shape and tensor.device == own.device:
            setattr(state, name, tensor)


def reset_injection_state(config: GuardSpaceConfig) -> None:
    """Drop what one injection call attached to ``config`` (after success or failure)."""
    config._guardspace_session = None
    config._guardspace_restored_bases = None


def finish_injection(config: GuardSpaceConfig, model: nn.Module, adapter_name: str) -> None:
    """Log the per-layer report of a freshly initialised adapter and release the session's tensors."""
    session: InitSession | None = getattr(config, "_guardspace_session", None)
    reset_injection_state(config)
    if session is None:
        return
    from .report import guardspace_report

    report = guardspace_report(model, adapter_name)
    logger.info("%s", report)
    if report.dead_layers:
        logger.warning(
            "GuardSpace adapter '%s': %d of %d layers have no null space at threshold %s; their adapters cannot "
            "learn (see guardspace_report()). This is expected at the paper's threshold; rank_allocation='null_dim' "
            "moves their rank budget to layers that can learn.",
            adapter_name,
            len(report.dead_layers),
            len(report.layers),
            config.null_space_threshold,
        )
