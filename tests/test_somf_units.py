"""Pure pieces of SOMF: the Concrete relaxation, final masks, combinations' gradients, data formatting."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_llama

from peft_safety.somf.combinations import COMBINATIONS, get_combination
from peft_safety.somf.data import encode, encode_rows
from peft_safety.somf.masks import SafetyMasks, mask_key, parse_key
from peft_safety.somf.objectives import budget_penalty, dpo_loss
from peft_safety.somf.relaxed import concrete_masked, concrete_sample, logistic_noise


def test_concrete_sample_mean_and_gradient():
    logits = torch.full((20000,), 3.0, requires_grad=True)
    sample = concrete_sample(logits, 0.5, seed=0)
    assert ((sample >= 0) & (sample <= 1)).all()
    assert abs(float(sample.mean()) - 0.934) < 0.01  # E[m] at l = 3, T = 0.5, below sigmoid(3) = 0.953
    assert torch.equal(sample, concrete_sample(logits, 0.5, seed=0))  # the backward pass redraws the same noise
    assert not torch.equal(sample, concrete_sample(logits, 0.5, seed=1))
    concrete_masked(torch.ones(20000), logits, 0, 0.5, rescale=False).sum().backward()
    assert (logits.grad >= 0).all() and logits.grad.sum() > 0


@pytest.mark.parametrize("rescale", [True, False])
def test_concrete_masked_matches_plain_autograd(rescale):
    """The graph-free function has the gradients of ``v * m / mean(m)`` written with ordinary autograd."""
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    values = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 7, dtype=torch.float64)

    def reference(logits, values):
        mask = torch.sigmoid((logits + logistic_noise(logits, 11)) / 0.5)
        return values * (mask / mask.mean() if rescale else mask)

    ours = concrete_masked(values, logits, 11, 0.5, rescale)
    torch.testing.assert_close(ours, reference(logits, values))
    grads = torch.autograd.grad((ours * weights).sum(), (logits, values))
    expected = torch.autograd.grad((reference(logits, values) * weights).sum(), (logits, values))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    masked = lambda logit, value: concrete_masked(value, logit, 11, 0.5, rescale)  # noqa: E731
    assert torch.autograd.gradcheck(masked, (logits, values))


def test_final_masks():
    logits = {"a.lora_A": torch.tensor([[3.0, -1.0], [0.5, 2.0]]), "a.lora_B": torch.tensor([[-2.0], [4.0]])}
    config = {"final_mask": "expected", "revert_budget": 0.34, "seed": 3}
    masks = SafetyMasks(logits=logits, adapters=["x"], config=config)
    torch.testing.assert_close(masks.final()["a.lora_A"], torch.sigmoid(logits["a.lora_A"]))
    assert masks.final("threshold")["a.lora_A"].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    budget = masks.final("budget")  # 6 entries, 34% -> the 2 lowest logits (-2, -1) reverted
    assert budget["a.lora_A"].tolist() == [[1.0, 0.0], [1.0, 1.0]] and budget["a.lora_B"].tolist() == [[0.0], [1.0]]
    draws = [masks.final("bernoulli") for _ in range(2)]
    assert all(torch.equal(draws[0][k], draws[1][k]) for k in logits)
    kept = masks.kept_fraction("budget")
    assert kept["per_adapter"]["x"] == pytest.approx(4 / 6) and kept["per_layer"]["a"] == pytest.approx(4 / 6)


def test_mask_keys():
    assert parse_key(mask_key("model.layers.0.q_proj", "A", None)) == ("model.layers.0.q_proj", "A", None)
    assert parse_key(mask_key("m.q", "B", "my.adapter")) == ("m.q", "B", "my.adapter")


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_combinations_are_differentiable_wrt_the_mask(name):
    torch.manual_seed(0)
    combination = get_combination(name)
    tasks = [torch.randn(4, 6), torch.randn(4, 6)]
    mask = torch.full((4, 6), 0.9, requires_grad=True)
    weights = combination.side_weights([1.0, 0.5], [2.0, 2.0], "A")
    merged = combination.combine([t * mask for t in tasks], weights, 0.5, "A", "total")
    merged.pow(2).sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


def test_dpo_loss_at_reference_is_log2():
    zeros = torch.zeros(3)
    loss, margins = dpo_loss(zeros, zeros, zeros, zeros, 0.1)
    assert float(loss) == pytest.approx(math.log(2)) and margins.abs().sum() == 0


def test_budget_penalty():
    assert float(budget_penalty([torch.full((10,), 3.0)], 0.1)) == 0.0
    assert float(budget_penalty([torch.full((10,), 0.0)], 0.1)) == pytest.approx(0.4)


def test_encode_labels_only_the_response(tokenizer):
    ids, labels = encode(tokenizer, "What is the capital", "of France", max_length=64)
    response = tokenizer(" of France", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[-len(response) :] == response and labels[-len(response) :] == response
    assert all(label == -100 for label in labels[: -len(response)])
    ids, labels = encode(tokenizer, "What is the capital of France", "of France", max_length=5)
    assert len(ids) == 5 and labels[-1] == tokenizer.eos_token_id


def test_conversational_rows_and_chat_template(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "What is the capital"}],
        "chosen": [{"role": "assistant", "content": "of France"}],
        "rejected": [{"role": "assistant", "content": "I did not like"}],
    }
    plain = encode_rows(tokenizer, [row], "preference", 64)[0]
    assert plain[0] == encode(tokenizer, "What is the capital", "of France", 64)
    templated = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    templated.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
    ids, labels = encode(templated, row["prompt"], row["chosen"], 64)
    assert ids[0] == templated.convert_tokens_to_ids("<s>")
    assert sum(label != -100 for label in labels) == 3  # "of France" + eos


def test_datasets_dataset_is_accepted(tokenizer):
    datasets = pytest.importorskip("datasets")
    from peft_safety.somf.data import check_data

    data = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        check_data(data, ("prompt", "chosen", "rejected"), "safety_data")


def _templated(tokenizer):
    """A copy of the test tokenizer with a small chat template (each turn: ``<s> role content``)."""
    templated = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    templated.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    return templated


MESSAGES_ROW = {
    "messages": [
        {"role": "system", "content": "Add seven and five"},
        {"role": "user", "content": "What is the capital"},
        {"role": "assistant", "content": "of France"},
    ]
}


@pytest.mark.parametrize("chat_template", [True, False])
def test_messages_rows_encode_as_prompt_and_last_assistant_turn(tokenizer, chat_template):
    tok = _templated(tokenizer) if chat_template else tokenizer
    [(ids, labels)] = encode_rows(tok, [MESSAGES_ROW], "completion", 64)[0]
    prompt, answer = MESSAGES_ROW["messages"][:2], [MESSAGES_ROW["messages"][2]]
    assert (ids, labels) == encode(tok, prompt, answer, 64)
    answer_ids = tok("of France", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [label for label in labels if label != -100] == answer_ids
    if chat_template:  # both prompt turns rendered by the template, then its generation prompt
        rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert ids[: -len(answer_ids)] == tok(rendered, add_special_tokens=False)["input_ids"]
        assert rendered.count("<s>") == 3


def test_messages_rows_are_checked_before_any_work():
    from peft_safety.somf.data import check_data

    check_data([MESSAGES_ROW], ("prompt", "completion"), "retain_data", allow_messages=True)
    no_answer = {"messages": MESSAGES_ROW["messages"][:2]}
    with pytest.raises(ValueError, match=r"retain_data\[1\]: 'messages' must end with the assistant's answer"):
        check_data([MESSAGES_ROW, no_answer], ("prompt", "completion"), "retain_data", allow_messages=True)
    with pytest.raises(ValueError, match=r"retain_data\[0\]: 'messages' must be a list"):
        check_data([{"messages": "hi"}], ("prompt", "completion"), "retain_data", allow_messages=True)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt', 'chosen', 'rejected'\]"):
        check_data([MESSAGES_ROW], ("prompt", "chosen", "rejected"), "safety_data")  # DPO needs pairs


def test_somf_fit_accepts_messages_for_refusal_sft_and_retain_data(tokenizer):
    from peft import LoraConfig, get_peft_model

    from peft_safety import SOMFConfig, SOMFMerger

    tok = _templated(tokenizer)
    peft_model = get_peft_model(make_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="x")
    peft_model.add_adapter("y", LoraConfig(r=2, target_modules=["q_proj"]))
    refusals = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "I'm sorry"}]}
        for p in ("How do I build a bomb at home", "Explain how to steal a car without keys")
    ]
    config = SOMFConfig(objective="sft", max_steps=1, eval_batches=1, batch_size=2, progress_bar=False)
    masks = SOMFMerger(config).fit(peft_model, ["x", "y"], refusals, tok, retain_data=[MESSAGES_ROW])
    assert math.isfinite(masks.history["safety_loss_deployed"])
    with pytest.raises(ValueError, match="missing column"):  # the DPO objective needs preference pairs
        SOMFMerger(SOMFConfig(max_steps=1)).fit(peft_model, ["x", "y"], refusals, tok)
