"""``SOMFMerger``: learn safety masks over LoRA adapters (``fit``) and write the masked merge as a LoRA adapter
(``merge``); ``merge_with_safety_mask`` does both and is what ``PeftModel.merge_with_safety_mask`` calls."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraModel
from tqdm.auto import tqdm

from .._device import input_device, to_device
from ..distributed import rank_and_world
from .combinations import Combination
from .config import SOMFConfig
from .data import COMPLETION_COLUMNS, PREFERENCE_COLUMNS, check_data, collate, encode_rows, pad_id
from .fusion import MaskedFusion
from .masks import SafetyMasks
from .objectives import budget_penalty, dpo_loss, retention_kl, sequence_logps, sft_loss
from .sites import Site
from .validation import check_request, resolve_lora_model


class SOMFMerger:
    """Subspace-oriented model fusion with utility retention (see ``docs/somf.md``).

    Example::

        merger = SOMFMerger(SOMFConfig(max_steps=60))
        masks = merger.fit(peft_model, ["math", "code"], pairs, tokenizer, retain_data=task_rows)
        merger.merge(peft_model, ["math", "code"], [1.0, 1.0], "safe_merged", masks=masks)
    """

    def __init__(self, config: SOMFConfig | None = None) -> None:
        self.config = config or SOMFConfig()

    # ------------------------------------------------------------------------------------------------ checks
    def check(
        self,
        model,
        adapters: list[str],
        weights: list[float] | None,
        adapter_name: str | None,
        combination_type: str,
        density: float | None,
        safety_data: Any = None,
        retain_data: Any = None,
    ) -> tuple[LoraModel, Combination, list[Site]]:
        """Every check of a request (names, weights, density, targets, ranks, data columns); touches nothing."""
        lora_model = resolve_lora_model(model)
        combination, sites = check_request(
            lora_model,
            list(adapters) if not isinstance(adapters, str) else adapters,
            weights,
            adapter_name,
            combination_type,
            density,
            self.config.reference_adapter,
            self.config.shared_mask,
        )
        if safety_data is not None or adapter_name is None:
            columns = PREFERENCE_COLUMNS if self.config.objective == "dpo" else COMPLETION_COLUMNS
            check_data(safety_data, columns, "safety_data", allow_messages=self.config.objective == "sft")
        if retain_data is not None:
            check_data(retain_data, COMPLETION_COLUMNS, "retain_data", allow_text=True, allow_messages=True)
        return lora_model, combination, sites

    def _fusion(self, sites, adapters, weights, combination, density, majority, config: dict) -> MaskedFusion:
        return MaskedFusion(
            sites,
            list(adapters),
            [1.0] * len(adapters) if weights is None else [float(w) for w in weights],
            combination,
            density,
            majority,
            config["reference_adapter"],
            config["shared_mask"],
            config["temperature"],
            config["rescale"],
            config["seed"],
        )

    # --------------------------------------------------------------------------------------------------- fit
    def fit(
        self,
        model,
        adapters: list[str],
        safety_data: Any,
        tokenizer,
        retain_data: Any = None,
        weights: list[float] | None = None,
        combination_type: str = "linear",
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> SafetyMasks:
        """Learn the mask logits; base and adapters stay frozen and unchanged.

        Returns:
            ``SafetyMasks`` with the logits and, in ``history``, the safety loss of the unmasked merge
            (``before``), of relaxed masks and of the deployed mask after training, and the per-step losses.
        """
        cfg = self.config
        lora_model, combination, sites = self.check(
            model, adapters, weights, None, combination_type, density, safety_data, retain_data
        )
        fusion = self._fusion(sites, adapters, weights, combination, density, majority_sign_method, cfg.to_dict())
        logits = fusion.init_logits(cfg.init_logit)
        optimizer = torch.optim.Adam(list(logits.values()), lr=cfg.learning_rate)
        kind = "preference" if cfg.objective == "dpo" else "completion"
        safety_rows = encode_rows(tokenizer, safety_data, kind, cfg.max_length)
        retain_rows = encode_rows(tokenizer, retain_data, "completion", cfg.max_length) if retain_data else []
        rank, world = rank_and_world()
        batches = _BatchSampler(safety_rows, retain_rows, cfg.batch_size, pad_id(tokenizer), cfg.seed + rank)

        losses: list[float] = []
        with _frozen(lora_model), fusion.hooked(lora_model):
            bar = tqdm(range(cfg.max_steps), desc="SOMF masks", disable=not cfg.progress_bar)
            for step in bar:
                total = 0.0
                for micro in range(cfg.gradient_accumulation_steps):
                    fusion.noise_seed = cfg.seed + 1 + step * cfg.gradient_accumulation_steps + micro
                    loss, _ = self._loss(lora_model, fusion, batches.next(), "relaxed")
                    (loss / cfg.gradient_accumulation_steps).backward()
                    total += float(loss.detach()) / cfg.gradient_accumulation_steps
                penalty = cfg.budget_weight * budget_penalty(list(logits.values()), cfg.revert_budget)
                if penalty.requires_grad and float(penalty.detach()) > 0:
                    penalty.backward()
                _average_gradients(list(logits.values()), world)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total + float(penalty.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            masks = SafetyMasks(
                logits={key: value.detach().to("cpu", copy=True) for key, value in logits.items()},
                adapters=list(adapters),
                config={
                    **cfg.to_dict(),
                    "combination_type": combination.name,
                    "density": density,
                    "weights": None if weights is None else [float(w) for w in weights],
                },
            )
            masks.history = {"loss": losses, **self._evaluate(lora_model, fusion, batches, masks)}
        return masks

    def _loss(self, lora_model: LoraModel, fusion: MaskedFusion, batch: dict, mode: str) -> tuple[torch.Tensor, float]:
        """Safety loss (+ weighted retention) of one micro-batch under ``mode``; also the safety loss alone."""
        cfg, network = self.config, lora_model.model
        device = input_device(network)
        inputs = to_device({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, device)
        labels, n_safety = batch["labels"], batch["n_safety"]
        has_retain = labels.shape[0] > n_safety and cfg.retain_weight > 0
        ref_logps = ref_retain = None
        if cfg.objective == "dpo" or has_retain:  # reference = unmasked merge, same model, no graph kept
            fusion.mode = "unmasked"
            with torch.no_grad():
                reference = network(**inputs).logits
                if cfg.objective == "dpo":
                    ref_logps = sequence_logps(reference[:n_safety], labels[:n_safety].to(reference.device))
                if has_retain:
                    ref_retain = reference[n_safety:].clone()
                del reference
        fusion.mode = mode
        logits = network(**inputs).logits
        labels = labels.to(logits.device)  # the output device of a ``device_map`` model may differ from its input's
        if ref_logps is not None:
            ref_logps = ref_logps.to(logits.device)
        if ref_retain is not None:
            ref_retain = ref_retain.to(logits.device)
        if cfg.objective == "dpo":
            pairs = n_safety // 2
            policy = sequence_logps(logits[:n_safety], labels[:n_safety])
            safety, _ = dpo_loss(policy[:pairs], policy[pairs:], ref_logps[:pairs], ref_logps[pairs:], cfg.beta)
        else:
            safety = sft_loss(logits[:n_safety], labels[:n_safety])
        loss = safety
        if cfg.objective == "dpo" and cfg.rpo_alpha > 0:  # NLL of the chosen answers (TRL's rpo_alpha)
            loss = loss + cfg.rpo_alpha * sft_loss(logits[:pairs], labels[:pairs])
        if has_retain:
            retain = retention_kl(logits[n_safety:], ref_retain, labels[n_safety:])
            loss = loss + cfg.retain_weight * retain
        return loss, float(safety.detach())

    @torch.no_grad()
    def _evaluate(self, lora_model: LoraModel, fusion: MaskedFusion, batches, masks: SafetyMasks) -> dict:
        """Safety loss of the unmasked merge, of relaxed masks and of the deployed mask, on the same batches."""
        fusion.set_deployed(masks.final())
        results: dict[str, list[float]] = {"before": [], "relaxed": [], "deployed": []}
        for index in range(self.config.eval_batches):
            batch = batches.eval_batch(index)
            fusion.noise_seed = self.config.seed
            for mode, name in (("unmasked", "before"), ("relaxed", "relaxed"), ("deployed", "deployed")):
                if name == "before" and self.config.objective == "dpo":
                    results[name].append(math.log(2.0))  # policy == reference
                    continue
                results[name].append(self._loss(lora_model, fusion, batch, mode)[1])
        return {f"safety_loss_{name}": sum(values) / len(values) for name, values in results.items()}

    # ------------------------------------------------------------------------------------------------- merge
    def merge(
        self,
        model,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "linear",
        masks: SafetyMasks | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Write the masked merge of ``adapters`` as a new standard LoRA adapter ``adapter_name`` (not activated).

        With ``masks=None`` the merge is unmasked (equal to ``add_weighted_adapter`` without reference).
        The adapter has scaling 1 (``lora_alpha = r``) and loads with plain ``peft``.
        """
        mask_config = self.config.to_dict() if masks is None else {**self.config.to_dict(), **masks.config}
        merger = SOMFMerger(replace(self.config, **{k: mask_config[k] for k in ("reference_adapter", "shared_mask")}))
        lora_model, combination, sites = merger.check(
            model, adapters, weights, adapter_name, combination_type, density
        )
        fusion = self._fusion(sites, adapters, weights, combination, density, majority_sign_method, mask_config)
        if masks is not None:
            masks.check_compatible(list(adapters), fusion.logit_shapes())
            trained = masks.config.get("combination_type")
            if trained and trained != combination.name:
                warnings.warn(
                    f"These masks were learned through combination_type={trained!r}; merging with "
                    f"{combination.name!r} deploys them through a merge they were not trained for.",
                    stacklevel=2,
                )
            fusion.set_deployed(masks.final())
            fusion.mode = "deployed"
        with torch.no_grad():
            fused = [fusion.fused_factors(site, index) for index, site in enumerate(sites)]
        _write_adapter(lora_model, list(adapters), adapter_name, sites, fused)


def _write_adapter(lora_model: LoraModel, adapters, adapter_name, sites: list[Site], fused) -> None:
    """Create ``adapter_name`` as ``add_weighted_adapter`` does (config of the first adapter, scaling 1, plain
    LoRA init) and copy the fused factors in. Removes it again if anything fails."""
    from ..guardspace.config import GuardSpaceConfig
    from ..guardspace.export import lora_config_of

    base = lora_model.peft_config[adapters[0]]
    if isinstance(base, GuardSpaceConfig):
        base = lora_config_of(base)
    ranks = {site.name: factors[0].shape[0] for site, factors in zip(sites, fused, strict=True)}
    rank = max(ranks.values())
    pattern = {name: value for name, value in ranks.items() if value != rank}
    lora_model.peft_config[adapter_name] = replace(
        base,
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        init_lora_weights=True,
        use_rslora=False,
        use_dora=False,
    )
    # PEFT draws a random init for the new adapter, overwritten below: keep the caller's random state untouched
    devices = sorted({param.device.index or 0 for param in lora_model.parameters() if param.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            lora_model.inject_adapter(lora_model.model, adapter_name)
        for site, (lora_A, lora_B) in zip(sites, fused, strict=True):
            module = site.module
            if adapter_name not in module.lora_A:
                raise RuntimeError(f"The merged adapter was not injected at {site.name}.")
            weight_A, weight_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            weight_A.data = (lora_A / module.scaling[adapter_name]).to(weight_A.device, weight_A.dtype).contiguous()
            weight_B.data = lora_B.to(weight_B.device, weight_B.dtype).contiguous()
            weight_A.requires_grad_(False)
            weight_B.requires_grad_(False)
    except BaseException:
        if adapter_name in lora_model.peft_config:
            lora_model.delete_adapter(adapter_name)
        raise


class _frozen:
    """Context: every model parameter frozen and the model in eval mode; flags restored on exit."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.flags = {param: param.requires_grad for param in self.model.parameters()}
        self.training = self.model.training
        for param in self.flags:
            param.requires_grad_(False)
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for param, flag in self.flags.items():
            param.requires_grad_(flag)
        self.model.train(self.training)


def _average_gradients(logits: list[torch.Tensor], world: int) -> None:
    """Data parallelism for the mask: each rank draws its own batches, logit gradients are averaged (as DDP does
    for parameters), so every rank takes the same Adam step and keeps identical logits."""
    if world == 1:
        return
    for tensor in logits:
        if tensor.grad is None:
            tensor.grad = torch.zeros_like(tensor)
        dist.all_reduce(tensor.grad)
        tensor.grad /= world


class _BatchSampler:
    """Cycles through shuffled safety rows (and retain rows); a batch is ``[chosen..., rejected..., retain...]``."""

    def __init__(self, safety: list, retain: list, batch_size: int, pad: int, seed: int) -> None:
        self.safety, self.retain, self.batch_size, self.pad = safety, retain, batch_size, pad
        self.generator = torch.Generator().manual_seed(seed)
        self.orders: dict[str, list[int]] = {"safety": [], "retain": []}

    def _take(self, name: str, rows: list) -> list:
        taken = []
        while len(taken) < min(self.batch_size, len(rows)):
            if not self.orders[name]:
                self.orders[name] = torch.randperm(len(rows), generator=self.generator).tolist()
            taken.append(rows[self.orders[name].pop()])
        return taken

    def _build(self, safety: list, retain: list) -> dict:
        sequences = [row[j] for j in range(len(safety[0])) for row in safety]
        batch = collate(sequences + [row[0] for row in retain], self.pad)
        batch["n_safety"] = len(sequences)
        return batch

    def next(self) -> dict:
        return self._build(self._take("safety", self.safety), self._take("retain", self.retain) if self.retain else [])

    def eval_batch(self, index: int) -> dict:
        """A fixed batch (rows ``index * batch_size ...``), the same for every evaluated mode."""
        start = (index * self.batch_size) % len(self.safety)
        safety = [self.safety[(start + j) % len(self.safety)] for j in range(min(self.batch_size, len(self.safety)))]
        retain = [self.retain[(start + j) % len(self.retain)] for j in range(min(self.batch_size, len(self.retain)))]
        return self._build(safety, retain)


def merge_with_safety_mask(
    model,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    safety_data: Any,
    tokenizer,
    combination_type: str = "linear",
    density: float | None = None,
    config: SOMFConfig | None = None,
    retain_data: Any = None,
    majority_sign_method: str = "total",
) -> SafetyMasks:
    """Fit SOMF masks and write the masked merge as LoRA adapter ``adapter_name``; returns the masks.

    Every check (names, weights, density, ranks, targets, ``adapter_name``, data columns) runs before any work.
    """
    merger = SOMFMerger(config)
    merger.check(model, adapters, weights, adapter_name, combination_type, density, safety_data, retain_data)
    masks = merger.fit(
        model, adapters, safety_data, tokenizer, retain_data, weights, combination_type, density, majority_sign_method
    )
    merger.merge(model, adapters, weights, adapter_name, combination_type, masks, density, majority_sign_method)
    return masks
