"""A tiny Llama and word-level tokenizer built offline (random weights), so the examples run anywhere in seconds.

Not a real model: its answers are gibberish. Pass ``--model <folder>`` to the examples for a real one (e.g. a local
copy of SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def build_tiny_model(corpus: list[str], seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """``(model, tokenizer)``: a 2-layer Llama (hidden 64) and a word-level tokenizer trained on ``corpus``."""
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config), tokenizer
