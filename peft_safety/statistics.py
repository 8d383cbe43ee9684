"""Collecting and storing the input covariances of target layers on harmful prompts.

For every *input site* (a tensor read by one or more target layers: q/k/v read the same normed hidden state,
gate/up another) the collector accumulates the uncentered second moment

    S = sum_t x_t x_t^T        (n x n, one per site, not per module)

over the valid tokens ``t`` of all prompts: padding excluded, every other token (BOS included, see
``EXCLUDE_BOS_REASON``) counted. ``covariance`` returns ``C = S / T`` with ``T`` the token count. Accumulation
is in float64 by default: a float32 sum of ``T`` terms has a worst-case relative error of about ``T * 2**-24`` per
entry (6e-3 at 1e5 tokens), which is larger than the 1e-6 relative eigenvalue threshold GuardSpace applies, so
float32 is offered for memory only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ._bnb_cpu import disable_bnb_cpu_packing
from ._device import input_device
from ._files import atomic_save_file
from ._prompts import prompt_texts, uses_chat_template
from ._targets import resolve_target_modules, weight_shape

STATISTICS_FORMAT = "peft_safety.safety_statistics/1"
Normalization = Literal["none", "prompt_max"]
NORMALIZATIONS = ("none", "prompt_max")
EXCLUDE_BOS_REASON = (
    "statistics without the BOS token let the adapter change BOS's layer outputs, and attention carries that change "
    "to every later position, so the guarantee is lost on all tokens of the calibration prompts, not only at BOS. "
    "Keep BOS in the statistics (the default): its massive activations are part of the inputs the guarantee covers."
)


@dataclass
class SafetyStatistics:
    """Uncentered input covariances of target layers on a set of (harmful) calibration prompts.

    Attributes:
        covariance_sums: site name -> ``(n, n)`` tensor, ``sum_t x_t x_t^T`` over all valid tokens.
        site_of: target module name -> name of the site (the first module reading that input).
        num_tokens: number of tokens ``T`` accumulated (the same for every site).
        num_prompts: number of prompts.
        metadata: model class, hidden size, module shapes, prompt hash and collection options.
        source: the file the statistics were loaded from (``None`` otherwise), named in error messages; not saved.
    """

    covariance_sums: dict[str, torch.Tensor]
    site_of: dict[str, str]
    num_tokens: int
    num_prompts: int
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, repr=False, compare=False)  # the file it was loaded from

    @property
    def module_names(self) -> list[str]:
        return list(self.site_of)

    def covariance(self, module_name: str) -> torch.Tensor:
        """``C = S / T`` (float64, ``(n, n)``) for the site read by ``module_name``."""
        return self.covariance_sums[self.site_of[module_name]].double() / self.num_tokens

    def modules_of_site(self, site: str) -> list[str]:
        return [name for name, s in self.site_of.items() if s == site]

    def validate(self, sites: Sequence[str] | None = None, require_scale: bool = True) -> None:
        """Raise a ``ValueError`` naming the file (when loaded from one) and the site for statistics no adapter can
        be built from: no tokens, a missing site, a covariance sum that is not square, holds NaN/Inf or (with
        ``require_scale``) is all zero (no scale to damp: a NaN adapter). ``sites``: the sites to check (all)."""
        source = f"The safety statistics in '{self.source}'" if self.source else "The safety statistics"
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 1:
            raise ValueError(f"{source} count {self.num_tokens!r} tokens; collect them again on non-empty prompts.")
        unknown = sorted(set(self.site_of.values()) - set(self.covariance_sums))
        if unknown:
            raise ValueError(f"{source} have no covariance for site(s) {unknown[:3]}; collect them again.")
        for site in self.covariance_sums if sites is None else dict.fromkeys(sites):
            value = self.covariance_sums[site]
            if value.ndim != 2 or value.shape[0] != value.shape[1]:
                raise ValueError(f"{source}: the covariance of '{site}' has shape {tuple(value.shape)}, not (n, n).")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"{source}: the covariance of '{site}' holds NaN or Inf (the model produced non-finite "
                    "activations, or the file is damaged). Collect the statistics again with the model in float32 "
                    "or bfloat16 (float16 activations overflow)."
                )
            if require_scale and not bool(value.diagonal().gt(0).any()):
                raise ValueError(
                    f"{source}: the covariance of '{site}' is all zeros (no calibration input reached this layer, "
                    "or its inputs are all zero), so it defines no null space. Collect the statistics again on "
                    "this model, or leave this layer out of `target_modules`."
                )

    def check_matches(self, model: nn.Module, module_names: Sequence[str]) -> None:
        """Raise a ``ValueError`` unless these statistics cover ``module_names`` of ``model`` with matching shapes.

        Statistics saved by older versions with ``exclude_bos=True`` still load, but cannot create an adapter.
        """
        if self.metadata.get("exclude_bos"):
            raise ValueError(
                "These safety statistics were collected with `exclude_bos=True` (an option of earlier versions): "
                f"{EXCLUDE_BOS_REASON} Collect them again."
            )
        missing = [name for name in module_names if name not in self.site_of]
        if missing:
            raise ValueError(
                f"The safety statistics do not cover {len(missing)} target module(s), e.g. {missing[:3]}; they hold "
                f"{len(self.site_of)} modules such as {self.module_names[:3]}. Collect statistics with the same "
                "`target_modules` (collect_safety_statistics(..., target_modules=...)) on this model."
            )
        self.validate(sites=[self.site_of[name] for name in module_names])
        modules = dict(model.named_modules())
        for name in module_names:
            n_in = weight_shape(modules[name])[1]
            n_stat = self.covariance_sums[self.site_of[name]].shape[0]
            if n_in != n_stat:
                raise ValueError(
                    f"The safety statistics for '{name}' are {n_stat}x{n_stat} but the layer reads {n_in} features: "
                    f"they were collected on another model ({self.metadata.get('model_class', 'unknown')}). "
                    "Collect them again on this model."
                )

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``.safetensors`` file (tensors per site, everything else as JSON metadata).

        Under ``torch.distributed`` only rank 0 writes; every rank holds the same statistics. The file is written to a
        temporary file next to ``path`` and renamed over it: an interrupted save leaves the previous file intact.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        tensors = {f"site.{site}": s.contiguous() for site, s in self.covariance_sums.items()}
        header = {
            "format": STATISTICS_FORMAT,
            "site_of": self.site_of,
            "num_tokens": self.num_tokens,
            "num_prompts": self.num_prompts,
            "metadata": self.metadata,
        }
        atomic_save_file(tensors, path, {"peft_safety": json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SafetyStatistics:
        """Read statistics written by [`save()`][peft_safety.SafetyStatistics.save].

        Only safetensors files are accepted (nothing is unpickled).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Safety statistics file '{path}' does not exist. Create it with "
                "`collect_safety_statistics(...).save(path)` or `peft-safety stats`."
            )
        try:
            with safe_open(path, framework="pt") as handle:
                raw_header = (handle.metadata() or {}).get("peft_safety")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # safetensors raises several error types for foreign files
            raise ValueError(f"'{path}' is not a safetensors file written by peft_safety ({err}).") from err
        if raw_header is None:
            raise ValueError(f"'{path}' is a safetensors file but holds no peft_safety statistics header.")
        try:
            header = json.loads(raw_header)
            if header.get("format") != STATISTICS_FORMAT:
                raise ValueError(
                    f"'{path}' has statistics format {header.get('format')!r}, expected {STATISTICS_FORMAT}."
                )
            sums = {key.removeprefix("site."): value for key, value in tensors.items()}
            statistics = cls(sums, header["site_of"], header["num_tokens"], header["num_prompts"], header["metadata"])
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"'{path}' holds a damaged peft_safety statistics header ({err!r}).") from err
        statistics.source = path
        statistics.validate(require_scale=False)  # an all-zero site is refused only where an adapter uses it
        return statistics

    def fingerprint(self) -> str:
        """SHA-256 over the covariance sums and counts: equal statistics give equal fingerprints on every rank."""
        digest = hashlib.sha256(f"{self.num_tokens}:{self.num_prompts}".encode())
        for site in sorted(self.covariance_sums):
            digest.update(site.encode())
            digest.update(self.covariance_sums[site].detach().cpu().double().numpy().tobytes())
        return digest.hexdigest()


def _tokenize(
    tokenizer: Any, texts: list[str], max_length: int, chat_template: bool
) -> list[tuple[list[int], list[bool]]]:
    """Token ids of each prompt and, per token, whether it enters the covariance (every token does)."""
    encoded = []
    for text in texts:
        if chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        ids = list(ids[:max_length])
        encoded.append((ids, [True] * len(ids)))
    empty = [i for i, (_, counted) in enumerate(encoded) if not any(counted)]
    if empty:
        raise ValueError(
            f"{len(empty)} prompt(s) tokenise to no usable token (e.g. index {empty[0]}: {texts[empty[0]]!r}). "
            "Remove empty prompts."
        )
    return encoded


def batch_count(num_prompts: int, world: int, batch_size: int) -> int:
    """Forward passes every rank runs for ``num_prompts`` prompts sharded round-robin over ``world`` ranks.

    Rank 0 holds the most prompts (``ceil(num_prompts / world)``); the other ranks pad up to its batch count with
    uncounted forwards, because under a sharded model (FSDP, DeepSpeed ZeRO-3) every forward is a collective and
    a rank that stops early would leave the others waiting forever.
    """
    return math.ceil(math.ceil(num_prompts / world) / batch_size)


def _batches(encoded, batch_size: int, device: torch.device, count: int | None = None):
    """``(input_ids, attention_mask, counted)`` batches of ``encoded``; with ``count``, padded with copies of the
    first batch whose tokens are not counted, up to ``count`` batches."""
    starts = list(range(0, len(encoded), batch_size))
    for index in range(max(len(starts), count or 0)):
        padding = index >= len(starts)
        start = 0 if padding else starts[index]
        chunk = encoded[start : start + batch_size]
        if padding:
            chunk = [(ids, [False] * len(ids)) for ids, _ in chunk]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        counted = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, (ids, keep) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            counted[row, : len(ids)] = torch.tensor(keep)
        yield input_ids.to(device), attention.to(device), counted.to(device)


GATHERED_ROWS = 512  # tokens per site behind one ``X^T X`` product: products of ~100 rows run at half the speed


class _SecondMoments:
    """``S = sum_t x_t x_t^T`` per site over counted tokens, in ``dtype`` on ``device``.

    Each batch's counted rows (``(tokens, n)``, in the activations' dtype, on their device) are gathered per site and
    multiplied once at least `GATHERED_ROWS` are waiting, so that the ``n x n`` products are long enough to run at
    full speed. Between batches fewer than `GATHERED_ROWS` rows per site wait (on the model's device also when the
    sums are offloaded: about 0.75 GiB for a bf16 Llama-2-7B); a product briefly holds its rows once more in
    ``dtype``. ``"prompt_max"`` divides each prompt's rows by their largest absolute entry (in ``dtype``, as the
    products).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, normalization: Normalization) -> None:
        self.dtype, self.device, self.normalization = dtype, device, normalization
        self.sums: dict[str, torch.Tensor] = {}
        self._waiting: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def add(self, site: str, x: torch.Tensor, counted: torch.Tensor) -> None:
        """Gather the counted rows of a ``(batch, seq, n)`` input (``counted``: ``(batch, seq)`` booleans)."""
        peaks = None
        if self.normalization == "prompt_max":
            peak = x.abs().masked_fill(~counted.unsqueeze(-1), 0).amax(dim=(1, 2)).to(self.dtype)
            peaks = peak.clamp_min(torch.finfo(self.dtype).tiny).repeat_interleave(counted.sum(dim=1))
        waiting = self._waiting.setdefault(site, [])
        waiting.append((x[counted], peaks))
        if sum(rows.shape[0] for rows, _ in waiting) >= GATHERED_ROWS:
            self._multiply(site)

    def finish(self) -> dict[str, torch.Tensor]:
        """Multiply what is still waiting and return the sums."""
        for site in list(self._waiting):
            self._multiply(site)
        return self.sums

    def _multiply(self, site: str) -> None:
        waiting = self._waiting.pop(site, [])
        if not waiting:
            return
        rows = torch.cat([rows for rows, _ in waiting]).to(self.dtype)
        if self.normalization == "prompt_max":
            rows = rows / torch.cat([peaks for _, peaks in waiting]).unsqueeze(1)
        moment = (rows.T @ rows).to(self.device)
        if site in self.sums:
            self.sums[site] += moment
        else:
            self.sums[site] = moment


@torch.no_grad()
def collect_safety_statistics(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | Any,
    target_modules: str | Sequence[str],
    batch_size: int = 8,
    max_length: int = 256,
    *,
    text_column: str = "prompt",
    chat_template: bool | None = None,
    exclude_bos: bool = False,
    normalization: Normalization = "none",
    accumulate_dtype: torch.dtype = torch.float64,
    accumulate_device: str | torch.device | None = None,
    show_progress: bool = True,
) -> SafetyStatistics:
    """Run ``model`` on ``prompts`` and collect the input covariance of every target layer, one per input site.

    Args:
        model: the aligned model (plain ``transformers`` model, before ``get_peft_model``).
        tokenizer: its tokenizer; no pad token is needed (batches are padded here, padding is masked).
        prompts: list of strings or a ``datasets.Dataset`` with a ``text_column`` column.
        target_modules: as in ``LoraConfig`` (list of names, regex, or ``"all-linear"``).
        batch_size: prompts per forward pass.
        max_length: prompts are truncated to this many tokens.
        text_column: column of a ``datasets.Dataset`` holding the prompts.
        chat_template: wrap each prompt as a user turn with the tokenizer's chat template. ``None`` (default):
            when the tokenizer has one, as [`harmful_score()`][peft_safety.evaluation.harmful_score] does; the
            covariance should describe the inputs the model sees at inference.
        exclude_bos: deprecated, must stay ``False``. ``True`` raises a ``ValueError``: without BOS in the
            covariance the adapter may change BOS's outputs, and through attention every later position's.
        normalization: ``"none"`` or ``"prompt_max"`` (the paper's code: divide each prompt's inputs by their
            largest absolute entry before accumulating).
        accumulate_dtype: ``torch.float64`` (default) or ``torch.float32`` (see module docstring for the bound).
        accumulate_device: where the ``n x n`` sums live (default: the device of the model's input embedding;
            ``"cpu"`` to offload).
        show_progress: show a tqdm bar.

    Under ``torch.distributed`` the prompts are sharded across ranks and the sums and counts all-reduced, so every
    rank returns identical statistics.
    """
    if exclude_bos:
        raise ValueError(f"`exclude_bos=True` is no longer supported: {EXCLUDE_BOS_REASON}")
    texts = prompt_texts(prompts, text_column, "GuardSpace needs harmful calibration prompts (e.g. AdvBench).")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}, got {normalization!r}.")
    if accumulate_dtype not in (torch.float64, torch.float32):
        raise ValueError(
            f"`accumulate_dtype` must be torch.float64 (default) or torch.float32, got {accumulate_dtype!r}."
        )
    if accumulate_device is not None:
        try:
            torch.device(accumulate_device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"`accumulate_device={accumulate_device!r}` is not a torch device ({err}).") from err
    module_names = resolve_target_modules(model, target_modules)
    chat_template = uses_chat_template(tokenizer, chat_template)
    encoded = _tokenize(tokenizer, texts, max_length, chat_template)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if len(encoded) < world:
        raise ValueError(f"{len(encoded)} prompt(s) for {world} processes: every rank needs at least one prompt.")
    local = encoded[rank::world]

    disable_bnb_cpu_packing(model)  # 4-bit layers on CPU: compute in their compute dtype (see peft_safety._bnb_cpu)
    device = input_device(model)  # the embedding's device: ``device_map`` models spread their layers
    sum_device = torch.device(accumulate_device) if accumulate_device is not None else device
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    site_of: dict[str, str] = {}
    moments = _SecondMoments(accumulate_dtype, sum_device, normalization)
    state: dict[str, Any] = {}

    def capture(name: str):
        def hook(_module, args, _output):
            x = args[0] if args else None
            if x is None:
                raise RuntimeError(f"Could not read the input of '{name}' (it was called without positional input).")
            if not site_of:  # first batch: remember inputs to group modules reading the same tensor
                captured[name] = x
            elif site_of[name] == name:
                _accumulate(name, x)

        return hook

    def _accumulate(site: str, x: torch.Tensor) -> None:
        counted = state["counted"]
        if counted.device != x.device:  # a layer of a ``device_map`` model on another device than the embedding
            counted = counted.to(x.device)
        if not torch.isfinite(x[counted]).all():
            raise ValueError(
                f"NaN or Inf in the input of '{site}' on prompt batch {state['batch']}: the model produces "
                "non-finite activations (check its dtype, e.g. load fp16 models in bf16/fp32 for calibration)."
            )
        moments.add(site, x, counted)

    handles = [modules[name].register_forward_hook(capture(name)) for name in module_names]
    was_training = model.training
    model.eval()
    num_tokens = 0
    try:
        for index, (input_ids, attention, counted) in enumerate(
            tqdm(
                list(_batches(local, batch_size, device, batch_count(len(encoded), world, batch_size))),
                desc="Collecting safety statistics",
                disable=not show_progress or rank != 0,
            )
        ):
            state.update(counted=counted, batch=index)
            model(input_ids=input_ids, attention_mask=attention)
            num_tokens += int(counted.sum())
            if not site_of:
                site_of.update(_group_by_input(captured, module_names))
                for site in dict.fromkeys(site_of.values()):
                    _accumulate(site, captured[site])
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    sums = moments.finish()
    counts = torch.tensor([num_tokens, len(local)], dtype=torch.float64, device=sum_device)
    if distributed:
        for site in dict.fromkeys(site_of[name] for name in module_names):
            dist.all_reduce(sums[site])
        dist.all_reduce(counts)
    metadata = {
        "model_class": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "hidden_size": getattr(getattr(model, "config", None), "hidden_size", None),
        "module_shapes": {name: list(weight_shape(modules[name])) for name in module_names},
        "prompts_sha256": hashlib.sha256("\x1e".join(texts).encode()).hexdigest(),
        "normalization": normalization,
        "exclude_bos": False,  # kept for readers of older files, where it could be True
        "chat_template": chat_template,
        "max_length": max_length,
        "accumulate_dtype": str(accumulate_dtype).removeprefix("torch."),
    }
    return SafetyStatistics(sums, site_of, int(counts[0]), int(counts[1]), metadata)


def _group_by_input(captured: dict[str, torch.Tensor], module_names: list[str]) -> dict[str, str]:
    """Map each module to the first module (in model order) that read the very same input tensor."""
    site_of: dict[str, str] = {}
    leaders: list[tuple[torch.Tensor, str]] = []
    for name in module_names:
        x = captured[name]
        leader = next((site for tensor, site in leaders if tensor is x), None)
        if leader is None:
            leaders.append((x, name))
            leader = name
        site_of[name] = leader
    return site_of
