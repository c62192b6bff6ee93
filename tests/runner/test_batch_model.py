"""The native ragged forward against transformers' own, for each architecture it claims."""

from __future__ import annotations

import pytest
import torch
import transformers

from runners.batch_model import SlotLlama, Work, native_support

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "llama-with-biases": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {"attention_bias": True, "mlp_bias": True},
    ),
}


def build(name: str):
    config_cls, model_cls, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SMALL, **extra)).eval()
    for module in model.modules():  # random biases, so a path that ignores them would show
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    return model


def last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_mixed_steps_match_the_reference_forward(name, packed):
    model = build(name)
    assert native_support(model.config) is None
    native = SlotLlama(model, max_slots=8, context_length=128, packed_weights=packed)
    assert bool(native._packed) == packed  # CPU fp32: the packed path is really taken
    a, b, c = [3, 4, 5, 6, 7], list(range(10, 40)), [50, 51, 52, 53, 54, 55, 56, 57]
    # Step 1: two prompts at once, in slots 0 and 3 (a hole between them).
    out = native.forward([Work(0, a, 0), Work(3, b, 0)])
    torch.testing.assert_close(out[0], last_logits(model, a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], last_logits(model, b), rtol=1e-4, atol=1e-4)
    # Step 2: both decode while a third prompt starts a chunked prefill (no logits yet).
    out = native.forward([Work(0, [8], 5), Work(3, [41], 30), Work(5, c[:3], 0, False)])
    assert out.shape[0] == 2
    torch.testing.assert_close(out[0], last_logits(model, a + [8]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], last_logits(model, b + [41]), rtol=1e-4, atol=1e-4)
    # Step 3: the chunk finishes beside a decode, and the cache grows past its first size.
    out = native.forward([Work(3, [42], 31), Work(5, c[3:], 3)])
    torch.testing.assert_close(out[0], last_logits(model, b + [41, 42]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], last_logits(model, c), rtol=1e-4, atol=1e-4)


def test_a_released_slot_is_reused_without_leftovers():
    model = build("llama")
    native = SlotLlama(model, max_slots=2, context_length=128)
    native.forward([Work(0, list(range(20, 60)), 0)])
    native.release(0)
    out = native.forward([Work(0, [5, 6, 7], 0)])
    out = native.forward([Work(0, [8], 3)])
    torch.testing.assert_close(out[0], last_logits(model, [5, 6, 7, 8]), rtol=1e-4, atol=1e-4)


def test_the_cache_grows_by_doubling_and_trims_back():
    native = SlotLlama(build("llama"), max_slots=8, context_length=128)
    idle = native.cache_bytes()
    assert idle == native.idle_cache_bytes()
    native.forward([Work(6, list(range(1, 90)), 0)])
    assert native.cache_bytes() > idle
    native.trim()
    assert native.cache_bytes() == idle


def test_models_without_a_native_path_are_named():
    config = transformers.MistralConfig(**SMALL, sliding_window=16)
    assert "sliding" in native_support(config)
    assert "gpt2" in native_support(transformers.GPT2Config())
