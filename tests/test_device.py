"""Device placement: inputs follow the input embedding, created tensors follow the tensors they belong to, and (on a
CUDA machine, marked ``cuda``) every public path runs end to end on a CUDA model."""

from __future__ import annotations

import pytest
import torch
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, LLAMA_TARGETS, encode, make_llama, train_steps
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_safety import GuardSpaceConfig, SOMFConfig, SOMFMerger, collect_safety_statistics, guardspace_report
from peft_safety._device import input_device, seeded_rng, to_device
from peft_safety.evaluation import generate_responses, harmful_score
from peft_safety.somf.combinations import get_combination
from peft_safety.somf.fusion import MaskedFusion
from peft_safety.somf.sites import AdapterFactors, Site

REFUSAL = "I'm sorry, but I cannot help with that request."
COMPLIANCE = "Sure, here is how to do it step by step."
PAIRS = [{"prompt": prompt, "chosen": REFUSAL, "rejected": COMPLIANCE} for prompt in HARMFUL_PROMPTS[:4]]
RETAIN = [{"prompt": "The movie was", "completion": "wonderful and moving"}]


class _SplitModel(nn.Module):
    """A first parameter on the meta device and the input embedding on the CPU, as a ``device_map`` model whose
    first parameter does not sit where its inputs go."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2, device="meta")
        self.embed = nn.Embedding(4, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def test_input_device_is_the_embedding_device_not_the_first_parameter():
    model = _SplitModel()
    assert next(model.parameters()).device.type == "meta"
    assert input_device(model) == torch.device("cpu")
    assert input_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert input_device(nn.ReLU()) == torch.device("cpu")


def test_to_device_moves_tensors_and_keeps_other_values():
    moved = to_device({"input_ids": torch.ones(2, dtype=torch.long), "n_safety": 3}, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta"
    assert moved["n_safety"] == 3


def test_seeded_rng_is_reproducible_and_restores_the_state():
    torch.manual_seed(5)
    with seeded_rng(7, torch.device("cpu")):
        first = torch.rand(3)
    after = torch.rand(1)
    with seeded_rng(7, torch.device("cpu")):
        second = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(first, second)
    assert torch.equal(after, torch.rand(1))  # the outer stream was not consumed by the seeded block


def _meta_fusion(shared: bool) -> MaskedFusion:
    factors = {
        name: AdapterFactors(torch.empty(2, 5, device="meta"), torch.empty(3, 2, device="meta"), 1.0)
        for name in ("a", "b")
    }
    site = Site("layer", nn.Linear(5, 3), factors)
    return MaskedFusion(
        [site], ["a", "b"], [1.0, 1.0], get_combination("linear"), None, "total", None, shared, 0.5, True
    )


@pytest.mark.parametrize("shared", [True, False])
def test_mask_logits_and_deployed_masks_follow_the_factors_device(shared):
    fusion = _meta_fusion(shared)
    logits = fusion.init_logits(3.0)
    assert logits and all(value.device.type == "meta" for value in logits.values())
    assert all(
        value.shape == shape for value, shape in zip(logits.values(), fusion.logit_shapes().values(), strict=True)
    )
    fusion.set_deployed({key: torch.ones(value.shape) for key, value in logits.items()})  # CPU masks, e.g. loaded
    assert all(mask.device.type == "meta" for mask in fusion.deployed.values())


def test_somf_masks_are_returned_on_the_cpu(tokenizer):
    peft_model = get_peft_model(make_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    config = SOMFConfig(max_steps=1, eval_batches=1, batch_size=2, progress_bar=False)
    masks = SOMFMerger(config).fit(peft_model, ["a", "b"], PAIRS, tokenizer)
    assert all(value.device.type == "cpu" and not value.requires_grad for value in masks.logits.values())
    assert masks.final("bernoulli")  # a CPU generator draws them, wherever the model is


# ------------------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def cuda_llama(tokenizer):
    return make_llama(tokenizer).to("cuda")


@pytest.mark.cuda
@cuda
def test_cuda_statistics_guardspace_init_train_and_merge(tokenizer, cuda_llama):
    stats = collect_safety_statistics(cuda_llama, tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False)
    assert all(value.device.type == "cuda" for value in stats.covariance_sums.values())
    config = GuardSpaceConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, safety_statistics=stats)
    model = get_peft_model(cuda_llama, config)
    assert all(buffer.device.type == "cuda" for name, buffer in model.named_buffers() if "lora_guard" in name)
    batch = to_device(encode(tokenizer, BENIGN_TEXTS), torch.device("cuda"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert guardspace_report(model).layers  # leakage certificate from the CUDA buffers
    with torch.no_grad():
        adapted = model(**inputs).logits
        model.add_weighted_adapter(["default"], [1.0], "plain", combination_type="cat")  # exact export, via SOMF
        model.set_adapter("plain")
        exported = model(**inputs).logits
        model.set_adapter("default")
        merged = model.merge_and_unload(adapter_names=["default"])(**inputs).logits
    torch.testing.assert_close(exported, adapted, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(merged, adapted, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize(("combination_type", "density"), [("linear", None), ("dare_ties", 0.5)])
def test_cuda_somf_fit_and_merge(tokenizer, combination_type, density):
    base = make_llama(tokenizer)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    peft_model.set_adapter("b")
    train_steps(peft_model, tokenizer, BENIGN_TEXTS, steps=2, lr=1e-2)
    peft_model.to("cuda")
    config = SOMFConfig(max_steps=2, eval_batches=1, batch_size=2, progress_bar=False, shared_mask=density is None)
    masks = peft_model.merge_with_safety_mask(
        ["a", "b"], [1.0, 1.0], "merged", PAIRS, tokenizer, combination_type, density, config, retain_data=RETAIN
    )
    assert all(value.device.type == "cpu" for value in masks.logits.values())
    assert all(p.device.type == "cuda" for n, p in peft_model.named_parameters() if ".merged." in n)
    peft_model.set_adapter("merged")
    batch = to_device(encode(tokenizer, BENIGN_TEXTS), torch.device("cuda"))
    with torch.no_grad():
        assert torch.isfinite(peft_model(**batch).logits).all()


@pytest.mark.cuda
@cuda
def test_cuda_evaluation(tokenizer, cuda_llama):
    answers = generate_responses(cuda_llama, tokenizer, HARMFUL_PROMPTS[:2], max_new_tokens=3, show_progress=False)
    assert len(answers) == 2
    result = harmful_score(cuda_llama, tokenizer, HARMFUL_PROMPTS[:2], max_new_tokens=3, show_progress=False)
    assert 0.0 <= result.score <= 1.0


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_device_map_statistics_somf_and_generation(tokenizer, tmp_path):
    """A model split over two GPUs with ``device_map``: inputs go to the embedding's GPU, every layer's statistics
    and fused adapter stay on its own GPU."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    make_llama(tokenizer).save_pretrained(tmp_path)
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.norm": 1,
        "lm_head": 1,
    }
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map)
    assert input_device(model) == torch.device("cuda", 0)
    stats = collect_safety_statistics(model, tokenizer, HARMFUL_PROMPTS, LLAMA_TARGETS, show_progress=False)
    assert stats.num_tokens > 0
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=LLAMA_TARGETS), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=2, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    config = SOMFConfig(max_steps=1, eval_batches=1, batch_size=2, progress_bar=False)
    peft_model.merge_with_safety_mask(["a", "b"], [1.0, 1.0], "merged", PAIRS, tokenizer, config=config)
    devices = {p.device for n, p in peft_model.named_parameters() if ".merged." in n}
    assert devices == {torch.device("cuda", 0), torch.device("cuda", 1)}
    answers = generate_responses(peft_model, tokenizer, HARMFUL_PROMPTS[:2], max_new_tokens=2, show_progress=False)
    assert len(answers) == 2
