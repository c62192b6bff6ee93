"""Prompt policy, chat template and model files."""

from __future__ import annotations

from pathlib import Path

import pytest

from logic.errors import InvalidRequestError
from logic.model_files import ModelFiles
from logic.prompt import apply_prompt_policy
from logic.protocol import ChatMessage
from logic.template import ChatTemplate


def msgs(*pairs: tuple[str, object]) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c) for r, c in pairs]


def test_default_system_prompt_is_added_when_the_conversation_has_none():
    out = apply_prompt_policy(msgs(("user", "hi")), default_system_prompt="Be brief.")
    assert out == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_a_client_system_prompt_replaces_the_default():
    out = apply_prompt_policy(
        msgs(("system", "Pirate."), ("user", "hi")), default_system_prompt="Be brief."
    )
    assert [m["content"] for m in out] == ["Pirate.", "hi"]


def test_developer_role_is_a_system_message_and_text_parts_are_joined():
    conversation = msgs(
        ("developer", "Rules."),
        ("user", [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]),
    )
    out = apply_prompt_policy(conversation, default_system_prompt=None)
    assert out == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "Hello, there"},
    ]


def test_no_default_system_prompt_leaves_messages_alone():
    assert apply_prompt_policy(msgs(("user", "hi")), default_system_prompt=None) == [
        {"role": "user", "content": "hi"}
    ]


def test_model_files_render_the_models_own_template(tiny_tokenizer_dir: Path):
    files = ModelFiles.load(tiny_tokenizer_dir)
    text = files.template.render([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert files.eos_token_ids == [files.tokenizer.token_to_id("<|im_end|>")]
    assert sorted(files.template_markers) == ["<|im_end|>", "<|im_start|>"]
    assert files.context_length == 256


def test_template_refusals_become_a_400_naming_messages():
    template = ChatTemplate(
        "{% if messages[0]['role'] == 'assistant' %}"
        "{{ raise_exception('Conversations must start with a user turn') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequestError) as info:
        template.render([{"role": "assistant", "content": "x"}])
    assert info.value.param == "messages"
    assert "start with a user turn" in info.value.message


def test_template_sandbox_blocks_attribute_escapes():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception) as info:
        template.render([])
    assert "unsafe" in str(info.value).lower() or isinstance(info.value, InvalidRequestError)
