"""A tiny chat model built from a config, for fast tests: a byte-level BPE tokenizer with
ChatML markers and a 2-layer Llama with random weights. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONTEXT_LENGTH = 256
_CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. What is the answer? Hello, how are you today?",
    "system user assistant: numbers 0 1 2 3 4 5 6 7 8 9 and words of every kind.",
] * 20


def write_tokenizer(directory: Path) -> int:
    """tokenizer.json + tokenizer_config.json (with the chat template); returns vocab size.
    Uses only the `tokenizers` library, so it works where torch cannot be imported."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML_TEMPLATE,
                "model_max_length": CONTEXT_LENGTH,
            }
        )
    )
    (directory / "config.json").write_text(
        json.dumps(
            {
                "max_position_embeddings": CONTEXT_LENGTH,
                "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
            }
        )
    )
    return tokenizer.get_vocab_size()


def write_model(directory: Path, seed: int = 0) -> Path:
    """A complete Hugging Face directory: tokenizer files and a random 2-layer Llama."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    vocab_size = write_tokenizer(directory)
    im_start, im_end = 1, 2  # SPECIAL_TOKENS order
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=im_start,
        eos_token_id=im_end,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=im_start, eos_token_id=im_end, pad_token_id=0
    )
    model.save_pretrained(directory)
    return directory
