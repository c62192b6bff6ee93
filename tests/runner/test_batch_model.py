"""The native ragged forward against transformers' own, for each architecture it claims."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from runners.batch_model import PagedLlama, Work, native_support

DEVICE = os.environ.get("LLM_TEST_DEVICE", "cpu")  # `make gpu-check`: cuda
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
    return model.to(DEVICE)


def last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]


def paged(model, packed: bool = True, blocks: int = 64, block_size: int = 4) -> PagedLlama:
    return PagedLlama(model, max_slots=8, context_length=128, num_blocks=blocks,
                      block_size=block_size, packed_weights=packed)  # fmt: skip


def table(*blocks: int) -> tuple[int, ...]:
    return tuple(blocks)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_mixed_steps_match_the_reference_forward(name, packed):
    if packed and DEVICE != "cpu":
        pytest.skip("packed weights are a CPU path")
    model = build(name)
    assert native_support(model.config) is None
    native = paged(model, packed)
    assert bool(native._packed) == packed  # CPU fp32: packed copies are made
    if packed:  # and used at every step size, whatever timing them here chose
        native._packed_at, native._packed_for = [(1, True)], {}
    a, b, c = [3, 4, 5, 6, 7], list(range(10, 40)), [50, 51, 52, 53, 54, 55, 56, 57]
    # Blocks of 4 positions, scattered and out of order in each table.
    ta, tb, tc = table(9, 2), table(*range(30, 20, -1)), table(5, 17, 3)
    # Step 1: two prompts at once.
    out = native.forward([Work(0, a, 0, blocks=ta), Work(3, b, 0, blocks=tb)])
    torch.testing.assert_close(out[0], last_logits(model, a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], last_logits(model, b), rtol=1e-4, atol=1e-4)
    # Step 2: both decode while a third prompt starts a chunked prefill (no logits yet).
    out = native.forward([
        Work(0, [8], 5, blocks=ta), Work(3, [41], 30, blocks=tb),
        Work(5, c[:3], 0, False, blocks=tc),
    ])  # fmt: skip
    assert out.shape[0] == 2
    torch.testing.assert_close(out[0], last_logits(model, a + [8]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], last_logits(model, b + [41]), rtol=1e-4, atol=1e-4)
    # Step 3: the chunk finishes beside a decode, across a block boundary.
    out = native.forward([Work(3, [42], 31, blocks=tb), Work(5, c[3:], 3, blocks=tc)])
    torch.testing.assert_close(out[0], last_logits(model, b + [41, 42]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], last_logits(model, c), rtol=1e-4, atol=1e-4)


def test_a_sequence_reads_blocks_another_one_computed():
    """Prefix sharing at the forward's level: a second sequence's table starts with the first
    one's full blocks and computes only what follows them."""
    model = build("llama")
    native = paged(model)
    prefix, rest = list(range(20, 32)), [7, 8, 9]
    native.forward([Work(0, prefix + [1, 2], 0, blocks=table(4, 6, 8, 10))])
    out = native.forward([Work(1, rest, 12, blocks=table(4, 6, 8, 11))])
    torch.testing.assert_close(out[0], last_logits(model, prefix + rest), rtol=1e-4, atol=1e-4)
    out = native.forward([Work(1, [3], 15, blocks=table(4, 6, 8, 11))])
    torch.testing.assert_close(
        out[0], last_logits(model, prefix + rest + [3]), rtol=1e-4, atol=1e-4
    )


def test_a_reused_block_holds_no_leftovers():
    model = build("llama")
    native = paged(model)
    native.forward([Work(0, list(range(20, 60)), 0, blocks=table(*range(1, 11)))])
    out = native.forward([Work(0, [5, 6, 7], 0, blocks=table(1))])
    out = native.forward([Work(0, [8], 3, blocks=table(1))])
    torch.testing.assert_close(out[0], last_logits(model, [5, 6, 7, 8]), rtol=1e-4, atol=1e-4)


def test_the_pool_is_the_budget_and_does_not_grow():
    native = paged(build("llama"), blocks=16)
    size = native.cache_bytes()
    assert size == 16 * 4 * native.kv_bytes_per_token()
    native.forward([Work(0, list(range(1, 60)), 0, blocks=table(*range(1, 16)))])
    assert native.cache_bytes() == size


def test_models_without_a_native_path_are_named():
    config = transformers.MistralConfig(**SMALL, sliding_window=16)
    assert "sliding" in native_support(config)
    assert "gpt2" in native_support(transformers.GPT2Config())


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_bf16_steps_match_the_reference_forward_in_bf16(name):
    """The dtype a GPU runs by default, checked on the CPU (bf16 runs there): the paged path
    against transformers' own bf16 forward, within bf16's precision."""
    model = build(name).to(torch.bfloat16)
    native = paged(model, packed=False)
    assert native._kv.dtype == torch.bfloat16
    a, b = list(range(3, 20)), list(range(30, 41))
    ta, tb = table(7, 3, 12, 1, 9), table(20, 21, 22)
    out = native.forward([Work(0, a[:9], 0, False, blocks=ta), Work(1, b, 0, blocks=tb)])
    out = native.forward([Work(0, a[9:], 9, blocks=ta), Work(1, [5], 11, blocks=tb)])
    for got, ids in ((out[0], a), (out[1], b + [5])):
        want = last_logits(model, ids).float()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.03)
        assert int(got.argmax()) == int(want.argmax())
