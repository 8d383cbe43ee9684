"""Safe LoRA (``apply_safe_lora``) on tiny Llama models, checked against a dense computation of the paper's maths.

The unaligned model is ``make_llama(seed=0)``; the aligned model is a copy with a small rank-2 perturbation on every
target layer (different per layer), so each layer has its own alignment matrix ``V``. A LoRA adapter is trained a
few AdamW steps on the aligned model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import (
    BENIGN_TEXTS,
    HARMFUL_PROMPTS,
    build_tokenizer,
    exit_worker,
    logits_of,
    make_gpt2,
    make_llama,
    train_steps,
)
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from peft_safety import GuardSpaceConfig, SafeLoRAReport, apply_safe_lora, collect_safety_statistics
from peft_safety.cli import main
from peft_safety.safe_lora import DEFAULT_THRESHOLD

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYER_NAMES = [
    f"model.layers.{i}.{name}" for i in range(2) for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
]
R, ALPHA = 4, 8


def perturbed(model: torch.nn.Module, names: list[str], seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """A copy of ``model`` with ``W += scale * U W'`` (rank 2) on the layers ``names``."""
    aligned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(aligned.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            left = torch.randn(weight.shape[0], 2, generator=generator)
            right = torch.randn(2, weight.shape[1], generator=generator)
            weight += scale * left @ right / math.sqrt(weight.shape[1])
    return aligned


@pytest.fixture(scope="module")
def models():
    """``(tokenizer, unaligned, aligned, trained adapter state)``."""
    tokenizer = build_tokenizer()
    unaligned = make_llama(tokenizer, seed=0)
    aligned = perturbed(unaligned, LAYER_NAMES)
    peft_model = get_peft_model(copy.deepcopy(aligned), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    train_steps(peft_model, tokenizer, BENIGN_TEXTS, steps=3, lr=1e-2)
    state = {key: value.clone() for key, value in get_peft_model_state_dict(peft_model).items()}
    return tokenizer, unaligned, aligned, state


def fresh(models, base: torch.nn.Module | None = None) -> PeftModel:
    """A new PeftModel on (a copy of) the aligned model, holding the trained adapter as 'default'."""
    _, _, aligned, state = models
    peft_model = get_peft_model(
        copy.deepcopy(aligned) if base is None else base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)
    )
    set_peft_model_state_dict(peft_model, state)
    return peft_model.eval()


def lora_modules(peft_model: PeftModel, adapter: str = "default") -> dict[str, torch.nn.Module]:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if adapter in getattr(module, "lora_A", {})
    }


def dense_reference(unaligned, aligned, peft_model, adapter: str = "default") -> dict[str, tuple[float, torch.Tensor]]:
    """Per layer ``(cos(C dW, dW), C B)`` with dense float64 ``V``, ``C = V V^T / ||V||_F`` and ``dW = s B A``."""
    un, al = dict(unaligned.named_modules()), dict(aligned.named_modules())
    result = {}
    for name, module in lora_modules(peft_model, adapter).items():
        v = al[name].weight.detach().double() - un[name].weight.detach().double()
        c = v @ v.T / torch.linalg.matrix_norm(v)
        b = module.lora_B[adapter].weight.detach().double()
        dw = module.scaling[adapter] * b @ module.lora_A[adapter].weight.detach().double()
        cdw = c @ dw
        similarity = float((cdw * dw).sum() / (cdw.norm() * dw.norm()))
        result[name] = (similarity, c @ b)
    return result


def weights_of(peft_model: PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()}


def test_similarity_from_factors_equals_the_dense_computation(models):
    _, unaligned, aligned, _ = models
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        peft_model = fresh(models)
        reference = dense_reference(unaligned, aligned, peft_model)
        report = apply_safe_lora(peft_model, unaligned, threshold=0.0, dtype=dtype)
        assert [layer.name for layer in report.layers] == LAYER_NAMES
        for layer in report.layers:
            assert layer.skipped is None and 0.0 <= layer.similarity <= 1.0
            assert abs(layer.similarity - reference[layer.name][0]) < tolerance * max(reference[layer.name][0], 1e-3)
    similarities = [layer.similarity for layer in report.layers]
    assert len(set(similarities)) == len(similarities)  # distinct: the budget test below is meaningful


def test_projected_layers_hold_C_B_and_the_others_are_untouched(models):
    _, unaligned, aligned, _ = models
    peft_model = fresh(models)
    reference = dense_reference(unaligned, aligned, peft_model)
    before = {name: (m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone())
              for name, m in lora_modules(peft_model).items()}  # fmt: skip
    threshold = sorted(sim for sim, _ in reference.values())[3]  # median: 3 of 6 below
    report = apply_safe_lora(peft_model, unaligned, threshold=threshold)
    assert isinstance(report, SafeLoRAReport) and report.num_projected == 3
    assert report.output_adapter == "default" and report.threshold == threshold
    for name, module in lora_modules(peft_model).items():
        similarity, c_b = reference[name]
        layer = next(layer for layer in report.layers if layer.name == name)
        assert layer.projected == (similarity < threshold)
        torch.testing.assert_close(module.lora_A["default"].weight, before[name][0], rtol=0, atol=0)
        if layer.projected:
            torch.testing.assert_close(module.lora_B["default"].weight.double(), c_b, rtol=1e-5, atol=1e-7)
            assert module.lora_B["default"].weight.shape == (module.out_features, R)  # still rank r
        else:
            torch.testing.assert_close(module.lora_B["default"].weight, before[name][1], rtol=0, atol=0)
    text = str(report)
    assert "3 of 6 layers projected" in text and all(name in text for name in LAYER_NAMES)
    assert json.loads(json.dumps(report.to_dict()))["num_projected"] == 3


def test_threshold_zero_projects_nothing_and_one_projects_everything(models):
    _, unaligned, _, state = models
    peft_model = fresh(models)
    before = weights_of(peft_model)
    report = apply_safe_lora(peft_model, unaligned, threshold=0.0)
    assert report.num_projected == 0
    assert all(torch.equal(before[key], value) for key, value in weights_of(peft_model).items())

    report = apply_safe_lora(peft_model, unaligned, threshold=1.0)
    assert report.projected_layers == LAYER_NAMES
    changed = [key for key, value in weights_of(peft_model).items() if not torch.equal(before[key], value)]
    assert sorted(changed) == sorted(key for key in before if "lora_B" in key)

    default = apply_safe_lora(fresh(models), unaligned)
    assert default.threshold == DEFAULT_THRESHOLD


def test_budget_projects_the_least_similar_layers(models):
    _, unaligned, aligned, _ = models
    reference = dense_reference(unaligned, aligned, fresh(models))
    by_similarity = sorted(reference, key=lambda name: reference[name][0])
    report = apply_safe_lora(fresh(models), unaligned, budget=2)
    assert set(report.projected_layers) == set(by_similarity[:2]) and report.budget == 2 and report.threshold is None
    report = apply_safe_lora(fresh(models), unaligned, budget=0.5)  # a fraction of the 6 layers
    assert set(report.projected_layers) == set(by_similarity[:3]) and report.budget == 3
    assert apply_safe_lora(fresh(models), unaligned, budget=0).num_projected == 0
    assert apply_safe_lora(fresh(models), unaligned, budget=6).num_projected == 6


def test_output_adapter_is_a_projected_copy(models):
    _, unaligned, aligned, _ = models
    peft_model = fresh(models)
    before = weights_of(peft_model)
    report = apply_safe_lora(peft_model, unaligned, aligned, threshold=1.0, output_adapter="safe")
    assert report.output_adapter == "safe" and report.num_projected == 6
    assert peft_model.active_adapter == "default"
    assert all(torch.equal(before[key], value) for key, value in weights_of(peft_model).items())  # original kept
    reference = dense_reference(unaligned, aligned, peft_model)
    for name, module in lora_modules(peft_model, "safe").items():
        torch.testing.assert_close(module.lora_A["safe"].weight, module.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(module.lora_B["safe"].weight.double(), reference[name][1], rtol=1e-5, atol=1e-7)


def test_saved_result_reloads_with_plain_peft_with_the_same_logits(models, tmp_path):
    tokenizer, unaligned, aligned, _ = models
    peft_model = fresh(models)
    apply_safe_lora(peft_model, unaligned, threshold=1.0)
    expected = logits_of(peft_model, tokenizer, HARMFUL_PROMPTS)
    peft_model.save_pretrained(tmp_path / "safe")
    config = json.loads((tmp_path / "safe" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == R
    reloaded = PeftModel.from_pretrained(copy.deepcopy(aligned), tmp_path / "safe").eval()
    torch.testing.assert_close(logits_of(reloaded, tokenizer, HARMFUL_PROMPTS), expected, rtol=0, atol=1e-6)
    with reloaded.disable_adapter():  # and it did change the model
        assert (logits_of(reloaded, tokenizer, HARMFUL_PROMPTS) - expected).abs().max() > 1e-6


def test_identical_models_skip_every_layer_with_a_warning(models):
    _, _, aligned, _ = models
    peft_model = fresh(models)
    before = weights_of(peft_model)
    with pytest.warns(UserWarning, match="identical in 6 of 6 layers"):
        report = apply_safe_lora(peft_model, copy.deepcopy(aligned), threshold=1.0)
    assert report.num_projected == 0 and report.skipped_layers == LAYER_NAMES
    assert all(math.isnan(layer.similarity) and layer.alignment_norm == 0 for layer in report.layers)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))  # strict JSON: nan similarities are null
    assert data["mean_similarity"] is None and all(layer["similarity"] is None for layer in data["layers"])
    assert all(torch.equal(before[key], value) for key, value in weights_of(peft_model).items())


def test_layers_without_alignment_change_are_skipped(models):
    _, unaligned, _, state = models
    aligned = perturbed(unaligned, LAYER_NAMES[:2])
    peft_model = fresh(models, base=copy.deepcopy(aligned))
    with pytest.warns(UserWarning, match="identical in 4 of 6 layers"):
        report = apply_safe_lora(peft_model, unaligned, threshold=1.0)
    assert report.projected_layers == LAYER_NAMES[:2] and report.skipped_layers == LAYER_NAMES[2:]


def _guardspace_model(tokenizer):
    stats = collect_safety_statistics(
        make_llama(tokenizer), tokenizer, HARMFUL_PROMPTS, target_modules=TARGETS, show_progress=False
    )
    return get_peft_model(
        make_llama(tokenizer), GuardSpaceConfig(r=2, target_modules=TARGETS, safety_statistics=stats)
    )


def _with_nan(model: torch.nn.Module, name: str) -> torch.nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        dict(model.named_modules())[name].weight[0, 0] = float("nan")
    return model


def test_bad_inputs_raise_before_the_model_changes(models, tokenizer):
    _, unaligned, aligned, _ = models
    other_shape = LlamaForCausalLM(copy.deepcopy(unaligned.config).__class__(**{
        **unaligned.config.to_dict(), "intermediate_size": 96,
    }))  # fmt: skip
    cases = [
        (dict(adapter_name="nope"), "no adapter named 'nope'"),
        (dict(threshold=-0.1), "`threshold` must be a similarity in [0, 1]"),
        (dict(threshold=1.5), "`threshold` must be a similarity in [0, 1]"),
        (dict(threshold=float("nan")), "`threshold` must be a similarity in [0, 1]"),
        (dict(budget=-1), "non-negative"),
        (dict(budget=7), "more than the adapter's 6 LoRA layers"),
        (dict(budget=1.5), "fraction of the layers must be in [0, 1]"),
        (dict(budget=True), "`budget` must be a number of layers"),
        (dict(budget=2, threshold=0.3), "not both"),
        (dict(dtype=torch.float16), "`dtype`"),
        (dict(output_adapter="safe_0.5"), "contain no '.'"),
        (dict(output_adapter=""), "contain no '.'"),
        (dict(unaligned_model=make_gpt2(tokenizer)), "no layer 'model.layers.0.self_attn.q_proj'"),
        (dict(unaligned_model=other_shape), "Layer 'model.layers.0.mlp.down_proj' has shape"),
        (dict(aligned_model=other_shape), "in the aligned model"),
        (
            dict(unaligned_model=_with_nan(unaligned, LAYER_NAMES[4])),
            f"unaligned model has NaN or inf weights in layer '{LAYER_NAMES[4]}'",
        ),  # fmt: skip
        (
            dict(aligned_model=_with_nan(aligned, LAYER_NAMES[5])),
            f"aligned model has NaN or inf weights in layer '{LAYER_NAMES[5]}'",
        ),  # fmt: skip
    ]
    peft_model = fresh(models)
    before = weights_of(peft_model)
    for kwargs, message in cases:
        kwargs = {"unaligned_model": unaligned, **kwargs}
        with pytest.raises(ValueError) as error:
            apply_safe_lora(peft_model, **kwargs)
        assert message in str(error.value), (kwargs, str(error.value))
        assert list(peft_model.peft_config) == ["default"]
        assert all(torch.equal(before[key], value) for key, value in weights_of(peft_model).items()), kwargs

    with torch.no_grad():
        lora_modules(peft_model)[LAYER_NAMES[1]].lora_A["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf weights in layer 'model.layers.0.self_attn.v_proj'"):
        apply_safe_lora(peft_model, unaligned)

    with pytest.raises(ValueError, match="export_to_lora"):
        apply_safe_lora(_guardspace_model(tokenizer), unaligned)
    peft_model = fresh(models)
    peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'other'` already exists"):
        apply_safe_lora(peft_model, unaligned, output_adapter="other")
    dora = get_peft_model(copy.deepcopy(aligned), LoraConfig(r=2, target_modules=TARGETS, use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        apply_safe_lora(dora, unaligned)
    peft_model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="unmerge_adapter"):
        apply_safe_lora(peft_model, unaligned)


# ----------------------------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_base_is_dequantised_per_layer(kind, models, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tokenizer, unaligned, aligned, state = models
    aligned.save_pretrained(tmp_path / "aligned")
    unaligned.save_pretrained(tmp_path / "unaligned")
    if kind == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)

    def load(name):
        return AutoModelForCausalLM.from_pretrained(tmp_path / name, quantization_config=quant, device_map="cpu")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = fresh(models, base=load("aligned"))
        quantised_unaligned = load("unaligned")
        # the dense reference on the dequantised weights of both quantised models
        dequantised = {}
        for role, model in (("aligned", peft_model.get_base_model()), ("unaligned", quantised_unaligned)):
            reference = copy.deepcopy(unaligned)
            modules = dict(model.named_modules())
            with torch.no_grad():
                for name in LAYER_NAMES:
                    layer = modules[name]
                    layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                    parameter = layer.weight
                    dict(reference.named_modules())[name].weight.copy_(dequantize_module_weight(layer).float())
                    layer.weight = parameter  # 8-bit on CPU: dequantising may replace the Parameter
            dequantised[role] = reference
        expected = dense_reference(dequantised["unaligned"], dequantised["aligned"], peft_model)
        report = apply_safe_lora(peft_model, quantised_unaligned, threshold=1.0)  # aligned = the 4-bit peft base
        assert report.num_projected == 6
        for layer in report.layers:
            assert abs(layer.similarity - expected[layer.name][0]) < 1e-4
        for name, module in lora_modules(peft_model).items():
            torch.testing.assert_close(
                module.lora_B["default"].weight.double(), expected[name][1], rtol=1e-5, atol=1e-7
            )
        logits = logits_of(peft_model, tokenizer, BENIGN_TEXTS)
        assert torch.isfinite(logits).all()
        # a full-precision unaligned reference on the quantised peft base works as well
        report = apply_safe_lora(fresh(models, base=load("aligned")), unaligned, threshold=0.0)
        assert report.num_projected == 0 and all(layer.skipped is None for layer in report.layers)


# ----------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("safe_lora_cli")
    tokenizer, unaligned, aligned, _ = models
    aligned.save_pretrained(root / "aligned")
    tokenizer.save_pretrained(root / "aligned")
    unaligned.save_pretrained(root / "unaligned")
    fresh(models).save_pretrained(root / "adapter")
    return root


def test_cli_writes_the_projected_plain_lora_adapter(models, folders, capsys):
    tokenizer, unaligned, aligned, _ = models
    out, report_json = folders / "safe", folders / "report.json"
    code = main([
        "safe-lora", "--model", str(folders / "aligned"), "--unaligned", str(folders / "unaligned"),
        "--adapter", str(folders / "adapter"), "--output", str(out), "--budget", "2", "--json", str(report_json),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 of 6 layers projected" in printed and str(out) in printed
    assert json.loads(report_json.read_text())["num_projected"] == 2
    expected = fresh(models)
    apply_safe_lora(expected, unaligned, budget=2)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(aligned), out).eval()
    torch.testing.assert_close(
        logits_of(reloaded, tokenizer, HARMFUL_PROMPTS), logits_of(expected, tokenizer, HARMFUL_PROMPTS)
    )


def test_cli_user_errors_exit_2_with_one_line(folders, tokenizer, capsys):
    aligned, unaligned, adapter = (str(folders / name) for name in ("aligned", "unaligned", "adapter"))
    guard = folders / "guard"
    if not guard.exists():
        _guardspace_model(tokenizer).save_pretrained(guard)
    common = ["safe-lora", "--model", aligned, "--unaligned", unaligned, "--adapter", adapter, "--output"]
    cases = [
        ([*common, str(folders / "x"), "--threshold", "2"], "`threshold` must be a similarity in [0, 1]"),
        ([*common, str(folders / "x"), "--budget", "many"], "--budget 'many'"),
        ([*common, str(folders / "x"), "--budget", "-1"], "non-negative"),
        ([*common, str(folders / "x"), "--budget", "99"], "more than the adapter's 6 LoRA layers"),
        ([*common, str(folders / "x"), "--budget", "2", "--threshold", "0.3"], "not both"),
        ([*common, adapter], "--output must be a new folder"),
        (
            ["safe-lora", "--model", aligned, "--unaligned", adapter, "--adapter", adapter, "--output", "x"],
            "--unaligned",
        ),  # fmt: skip
        (
            ["safe-lora", "--model", aligned, "--unaligned", unaligned, "--adapter", str(guard), "--output", "x"],
            "'peft-safety export'",
        ),  # fmt: skip
        (["safe-lora", "--model", aligned, "--adapter", adapter, "--output", "x"], "required: --unaligned"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
        assert code == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert message in lines[0], (argv, lines[0])
    assert not os.path.exists(folders / "x")


# ----------------------------------------------------------------------------------------------- two processes

WORLD = 2


def _random_adapter(aligned: torch.nn.Module) -> PeftModel:
    """The same non-zero adapter in every process (seeded init, no training)."""
    torch.manual_seed(3)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(copy.deepcopy(aligned), config).eval()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        tokenizer = build_tokenizer()
        unaligned = make_llama(tokenizer, seed=0)
        aligned = perturbed(unaligned, LAYER_NAMES)
        peft_model = _random_adapter(aligned)
        mesh = init_device_mesh("cpu", (WORLD,))
        sharded = copy.deepcopy(unaligned)  # FSDP2 / tensor-parallel style: each rank holds half of every weight
        for name in LAYER_NAMES:
            layer = dict(sharded.named_modules())[name]
            layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
        report = apply_safe_lora(peft_model, sharded, budget=3)
        tensors = {
            f"{name}.lora_B": m.lora_B["default"].weight.detach() for name, m in lora_modules(peft_model).items()
        }
        save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
        # ranks that disagree (here: different thresholds) are told so on every rank
        try:
            apply_safe_lora(_random_adapter(aligned), unaligned, threshold=[0.0, 1.0][rank])
            mismatch = None
        except RuntimeError as err:
            mismatch = str(err)
        result = {"report": report.to_dict(), "mismatch": mismatch}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    exit_worker()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_with_sharded_weights_agree_with_one_process(models, tmp_path):
    context = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("distributed workers did not finish within 300 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    _, unaligned, aligned, _ = models
    single = _random_adapter(aligned)
    expected = apply_safe_lora(single, unaligned, budget=3).to_dict()
    for rank, result in enumerate(results):
        assert result["report"]["num_projected"] == 3
        for got, want in zip(result["report"]["layers"], expected["layers"], strict=True):
            assert got["projected"] == want["projected"] and abs(got["similarity"] - want["similarity"]) < 1e-6, rank
        assert result["mismatch"] and "different layers on different ranks" in result["mismatch"]
        tensors = load_file(tmp_path / f"rank{rank}.safetensors")
        for name, module in lora_modules(single).items():
            torch.testing.assert_close(tensors[f"{name}.lora_B"], module.lora_B["default"].weight.detach())
