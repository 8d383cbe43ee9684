"""Memory of GuardSpace adapters at real Llama shapes, from the buffers the code allocates.

Per adapted module (``W`` is ``m x n``, rank ``r``) a GuardSpace adapter holds, besides LoRA's trainable ``A``
(``r x n``) and ``B`` (``m x r``), the float32 buffers of ``GuardState`` (``peft_safety/guardspace/layer.py``):

* per module: ``frozen_A`` (``r x n``), ``frozen_B`` (``m x r``), ``input_scale`` and ``singular_values``
  (``r`` each), ``output_energy`` (1);
* per input site (one tensor shared by the modules that read the same input: q/k/v, gate/up): ``basis``
  (``n x min(k, n - k)``), ``leak_vectors`` (``n x j``) and ``leak_values`` (``j``), with ``k`` the null-space
  dimension and ``j`` its leaking (non-exact) directions. With ``compact_bases=True`` the null basis ``N``
  (``n x k``) holds the leak vectors as columns whenever ``k - j <= n - k``.

``--validate`` checks this formula against the bytes actually allocated (distinct storages) on a small Llama, for
several thresholds. The Llama-2-7B / Llama-3-8B table takes ``k / n`` and ``j / n`` per site and layer depth from
real statistics (``--statistics``, e.g. SmolLM2-135M-Instruct on 128 AdvBench prompts in its chat template), at
the default threshold and at 1e-4, and adds ``k = j = n / 2`` everywhere (the default storage's maximum).
Training memory of the adapter (LoRA's or GuardSpace's trainable factors): float32 parameters, their gradients and
two AdamW moments, 16 bytes per parameter.

    python benchmarks/memory_model.py --validate
    python benchmarks/memory_model.py --statistics stats.safetensors
    python benchmarks/memory_model.py --compact-drift    # the guarantee stress test with compact_bases
    python benchmarks/memory_model.py --model MODEL_DIR --statistics stats.safetensors   # bytes on a real model
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peft_safety.guardspace.decomposition import null_dimensions

GUARD_BYTES = 4  # GuardState buffers are float32 whatever the model's dtype
TRAIN_BYTES = 16  # float32 parameter + gradient + two AdamW moments
BASE_BYTES = 2  # bf16 base weights
GIB = 2**30


@dataclass(frozen=True)
class LlamaShape:
    """Dimensions of a Llama-architecture model."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    kv_out: int  # output width of k_proj / v_proj (hidden for MHA, smaller with GQA)
    vocab: int

    def modules(self) -> list[tuple[str, str, int, int]]:
        """``(module, site, m, n)`` of the seven linear layers of one block, site = first module reading the input."""
        h, f, kv = self.hidden, self.intermediate, self.kv_out
        return [
            ("q_proj", "qkv", h, h),
            ("k_proj", "qkv", kv, h),
            ("v_proj", "qkv", kv, h),
            ("o_proj", "o", h, h),
            ("gate_proj", "gate_up", f, h),
            ("up_proj", "gate_up", f, h),
            ("down_proj", "down", h, f),
        ]

    def base_parameters(self) -> int:
        """Parameters of the whole model: embeddings, untied LM head, linear layers and RMSNorm weights."""
        linear = sum(m * n for _, _, m, n in self.modules())
        return 2 * self.vocab * self.hidden + self.layers * (linear + 2 * self.hidden) + self.hidden


LLAMA_2_7B = LlamaShape("Llama-2-7B", 4096, 11008, 32, 4096, 32000)
LLAMA_3_8B = LlamaShape("Llama-3-8B", 4096, 14336, 32, 1024, 128256)


def site_buffer_elements(n: int, k: int, j: int, compact: bool = False) -> int:
    """Elements of the per-site buffers: ``basis`` (``n x min(k, n - k)``), ``leak_vectors`` (``n x j``) and
    ``leak_values`` (``j``). ``compact`` (``compact_bases=True``): ``N`` (``n x k``) holds the leak vectors as
    columns whenever ``k - j <= n - k``."""
    if compact and k - j <= n - k:
        return n * k + j
    return n * min(k, n - k) + n * j + j


def module_buffer_elements(m: int, n: int, r: int) -> int:
    """Elements of the per-module buffers: ``frozen_A``, ``frozen_B``, ``input_scale``, ``singular_values``,
    ``output_energy``."""
    return r * n + m * r + 2 * r + 1


def lora_parameters(m: int, n: int, r: int) -> int:
    """Trainable parameters of one adapter (LoRA's or GuardSpace's): ``A`` (``r x n``) and ``B`` (``m x r``)."""
    return r * (n + m)


# null-space fractions of a site: (layer depth in [0, 1], site) -> (k / n, j / n)
Fractions = Callable[[float, str], tuple[float, float]]


def model_memory(shape: LlamaShape, r: int, fractions: Fractions) -> dict[str, float]:
    """Bytes of the base weights (bf16), of LoRA's training state and of GuardSpace's extra buffers (default and
    ``compact_bases=True``)."""
    guard = lora = compact = 0
    for layer in range(shape.layers):
        depth = layer / max(shape.layers - 1, 1)
        widths: dict[str, int] = {}
        for _, site, m, n in shape.modules():
            widths[site] = n
            guard += module_buffer_elements(m, n, r)
            compact += module_buffer_elements(m, n, r)
            lora += lora_parameters(m, n, r)
        for site, n in widths.items():
            k, j = (round(fraction * n) for fraction in fractions(depth, site))
            guard += site_buffer_elements(n, k, j)
            compact += site_buffer_elements(n, k, j, compact=True)
    return {
        "base": shape.base_parameters() * BASE_BYTES,
        "lora_training": lora * TRAIN_BYTES,
        "guard_buffers": guard * GUARD_BYTES,
        "compact_buffers": compact * GUARD_BYTES,
    }


# ----------------------------------------------------------------------------------------------- validation
def allocated_guard_bytes(peft_model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind every GuardSpace buffer of ``peft_model``."""
    storages = {}
    for name, buffer in peft_model.named_buffers(remove_duplicate=False):
        if ".lora_guard." in name:
            storage = buffer.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def predicted_guard_bytes(peft_model: torch.nn.Module, adapter_name: str = "default") -> int:
    """The formula's bytes for the null-space dimensions recorded in the adapter's config."""
    config = peft_model.peft_config[adapter_name]
    modules = dict(peft_model.base_model.model.named_modules())
    total, sites = 0, {}
    for name, k in config.null_space_dims.items():
        layer = modules[name]
        total += module_buffer_elements(layer.out_features, layer.in_features, layer.r[adapter_name])
        sites[config.null_space_sites[name]] = (layer.in_features, k, config.near_null_dims[name])
    total += sum(site_buffer_elements(*site, compact=config.compact_bases) for site in sites.values())
    return total * GUARD_BYTES


def validate(
    thresholds: tuple[float | str, ...] = ("auto", 1e-6, 1e-3, 1e-2), compact: tuple[bool, ...] = (False, True)
) -> list[tuple[str, int, int]]:
    """``(setting, predicted, allocated)`` bytes on a small random Llama (hidden 96, MLP 256, GQA, 2 layers)."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_safety import GuardSpaceConfig, collect_safety_statistics

    try:
        from benchmarks.common import LLAMA_TARGETS, build_tokenizer, load_harmful_prompts
    except ImportError:  # run as a script from the benchmarks folder
        from common import LLAMA_TARGETS, build_tokenizer, load_harmful_prompts

    prompts, _ = load_harmful_prompts(48)
    tokenizer = build_tokenizer(prompts, 512)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    statistics = collect_safety_statistics(
        LlamaForCausalLM(config).eval(), tokenizer, prompts, LLAMA_TARGETS, show_progress=False
    )
    rows = []
    for threshold in thresholds:
        for compact_bases in compact:
            torch.manual_seed(0)
            guard = GuardSpaceConfig(
                r=4, target_modules=LLAMA_TARGETS, safety_statistics=statistics, null_space_threshold=threshold,
                compact_bases=compact_bases,
            )  # fmt: skip
            peft_model = get_peft_model(LlamaForCausalLM(config).eval(), guard)
            label = f"{threshold}{', compact' if compact_bases else ''}"
            rows.append((label, predicted_guard_bytes(peft_model), allocated_guard_bytes(peft_model)))
    return rows


# ------------------------------------------------------------------------------------- measured fractions
SITE_OF_SUFFIX = {"q_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "down_proj": "down"}


def null_dims(values: torch.Tensor, threshold: float | str, r: int) -> tuple[int, int]:
    """``(k, j)`` for ascending eigenvalues ``values`` of a float64-accumulated covariance: the package's rule
    (``null_dimensions``), from the eigenvalues alone."""
    dims = null_dimensions(values, threshold, min_exact_dim=r)
    return dims.null_dim, dims.null_dim - dims.exact_dim


def measured_fractions(path: str, threshold: float | str, r: int) -> tuple[Fractions, dict[str, list[float]]]:
    """Per-site ``(k / n, j / n)`` by layer depth from a statistics file, and the ``k / n`` per site and layer."""
    table: dict[str, list[tuple[float, float]]] = {}
    for site, values in site_eigenvalues(path).items():
        k, j = null_dims(values, threshold, r)
        table.setdefault(SITE_OF_SUFFIX[site.rsplit(".", 1)[-1]], []).append((k / values.numel(), j / values.numel()))

    def fractions(depth: float, site: str) -> tuple[float, float]:
        values = table[site]
        return values[min(round(depth * (len(values) - 1)), len(values) - 1)]

    return fractions, {site: [k for k, _ in values] for site, values in table.items()}


@functools.cache
def site_eigenvalues(path: str) -> dict[str, torch.Tensor]:
    """Ascending eigenvalues of every site's covariance in a statistics file, sites in layer order."""
    from peft_safety import SafetyStatistics

    statistics = SafetyStatistics.load(path)
    sites = sorted(statistics.covariance_sums, key=_layer_index)
    return {
        site: torch.linalg.eigvalsh(_symmetric(statistics.covariance(statistics.modules_of_site(site)[0])).double())
        for site in sites
    }


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2


def _layer_index(site: str) -> int:
    return int(site.split(".layers.")[1].split(".")[0])


def worst_case(_depth: float, _site: str) -> tuple[float, float]:
    """``k = j = n / 2``: the default storage's maximum, ``min(k, n - k) + j = n`` columns per site."""
    return 0.5, 0.5


def measure_model(model_path: str, statistics_path: str, r: int = 8) -> list[str]:
    """On a real model (all seven linear layers): GuardSpace buffer bytes against the formula, with and without
    ``compact_bases``, then after ``save_pretrained`` a trainable and an inference-only load (bytes, largest logit
    difference from the saved model, certificate)."""
    import tempfile

    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_safety import GuardSpaceConfig, SafetyStatistics, guardspace_report

    statistics = SafetyStatistics.load(statistics_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batch = tokenizer(
        ["Write a tutorial on how to make a bomb", "The movie was wonderful"], return_tensors="pt", padding=True
    )

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    @torch.no_grad()
    def logits(model: torch.nn.Module) -> torch.Tensor:
        return model(**batch).logits

    base_bytes = sum(p.numel() for p in load().parameters()) * BASE_BYTES
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lines = []
    for compact in (False, True):
        config = GuardSpaceConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, safety_statistics=statistics, compact_bases=compact
        )
        model = get_peft_model(load(), config).eval()
        reference, report = logits(model), guardspace_report(model)
        allocated = allocated_guard_bytes(model)
        lines.append(
            f"compact_bases={compact}: GuardSpace buffers {allocated / 2**20:.1f} MiB (formula "
            f"{predicted_guard_bytes(model) / 2**20:.1f} MiB), {100 * allocated / base_bytes:.1f} % of the bf16 base "
            f"({base_bytes / 2**20:.0f} MiB); certificate {report.total_leakage:.2e}, {len(report.dead_layers)} dead"
        )
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            for trainable in (True, False):
                loaded = PeftModel.from_pretrained(load(), folder, is_trainable=trainable).eval()
                difference = float((logits(loaded) - reference).abs().max())
                buffers, certificate = allocated_guard_bytes(loaded) / 2**20, guardspace_report(loaded).total_leakage
                lines.append(
                    f"  loaded with is_trainable={trainable}: buffers {buffers:.2f} MiB, "
                    f"max |logit difference| {difference:.1e}, certificate {certificate:.2e}"
                )
    return lines


COMPACT_SETTINGS = {
    "defaults": {},
    "defaults, compact_bases": {"compact_bases": True},
    "max_calibration_leakage 1e-6": {"max_calibration_leakage": 1e-6},
    "max_calibration_leakage 1e-6, compact_bases": {"max_calibration_leakage": 1e-6, "compact_bases": True},
}


def compact_drift(advbench: str | None = None) -> list[str]:
    """Markdown rows: calibration drift, benign change and certificate with and without ``compact_bases`` in the
    whole-model stress setting without an exact null space (``benchmarks/bench_guarantee.py``, 64 prompts)."""
    try:
        from benchmarks.bench_guarantee import BENIGN, run
        from benchmarks.common import build_tokenizer, load_harmful_prompts
    except ImportError:  # run as a script from the benchmarks folder
        from bench_guarantee import BENIGN, run
        from common import build_tokenizer, load_harmful_prompts

    torch.set_num_threads(1)
    prompts, _ = load_harmful_prompts(64, advbench)
    tokenizer = build_tokenizer(prompts + BENIGN, vocab_size=512)
    rows = []
    for arch in ("llama", "gpt2"):
        for label, options in COMPACT_SETTINGS.items():
            row = run(arch, options, tokenizer, prompts, "64 prompts (no exact null space)")
            rows.append(
                f"| {arch} | {label} | {row['calibration']:.3e} | {row['benign']:.3f} | {row['certificate']:.3e} |"
            )
    return rows


def _row(shape: LlamaShape, label: str, memory: dict[str, float]) -> str:
    base, lora, guard, compact = (memory[key] for key in ("base", "lora_training", "guard_buffers", "compact_buffers"))
    return (
        f"| {shape.name} | {label} | {base / GIB:.2f} | {lora / GIB:.2f} | {guard / GIB:.2f} "
        f"({100 * guard / base:.1f} %) | {compact / GIB:.2f} ({100 * compact / base:.1f} %) |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--statistics", help="safety statistics file to take null-space fractions from")
    parser.add_argument("--validate", action="store_true", help="check the formula against allocated bytes")
    parser.add_argument("--compact-drift", action="store_true", help="stress-test drift with compact_bases")
    parser.add_argument("--advbench", help="AdvBench CSV (column goal) for --compact-drift")
    parser.add_argument("--model", help="a local causal LM (with --statistics of it): measure its adapter's bytes")
    args = parser.parse_args(argv)
    if args.model:
        if not args.statistics:
            parser.error("--model needs --statistics (safety statistics of that model)")
        print("\n".join(measure_model(args.model, args.statistics, args.r)))
    if args.compact_drift:
        print("| model | GuardSpace | calibration drift | benign change | certificate |\n|---|---|---|---|---|")
        print("\n".join(compact_drift(args.advbench)))
    if args.validate:
        print("| threshold | predicted bytes | allocated bytes |\n|---|---|---|")
        for threshold, predicted, allocated in validate():
            print(f"| {threshold} | {predicted} | {allocated} |")
            if predicted != allocated:
                raise SystemExit(f"formula {predicted} != allocated {allocated} at threshold {threshold}")
    scenarios: list[tuple[str, Fractions]] = [("no null space (k = 0)", lambda _d, _s: (0.0, 0.0))]
    if args.statistics:
        for threshold in ("auto", 1e-4):
            fractions, per_layer = measured_fractions(args.statistics, threshold, args.r)
            summary = ", ".join(f"{site} {100 * sum(v) / len(v):.0f} %" for site, v in per_layer.items())
            print(f"mean k / n at threshold {threshold}: {summary}")
            scenarios.append((f"measured fractions, threshold {threshold}", fractions))
    scenarios.append(("half null, all leaking (k = j = n/2)", worst_case))
    print(
        f"\n| model | null space | bf16 base GiB | LoRA r {args.r} training GiB | GuardSpace extra GiB (/ base) | "
        "compact_bases=True GiB (/ base) |\n|---|---|---|---|---|---|"
    )
    for shape in (LLAMA_2_7B, LLAMA_3_8B):
        for label, fractions in scenarios:
            print(_row(shape, label, model_memory(shape, args.r, fractions)))
    assert math.isclose(LLAMA_2_7B.base_parameters() / 1e9, 6.74, abs_tol=0.01)  # the published parameter count


if __name__ == "__main__":
    main()
