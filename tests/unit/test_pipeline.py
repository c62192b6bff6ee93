"""The business-logic pipeline: each built-in step alone, the registry, and whole pipelines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from logic.errors import InvalidRequestError
from logic.pipeline import (
    POST_STEPS,
    PRE_STEPS,
    Conversation,
    Pipeline,
    register_post_step,
    register_pre_step,
)
from logic.protocol import ChatMessage
from logic.settings import APISettings


def conv(*pairs: tuple[str, str], **notes: object) -> Conversation:
    return Conversation(messages=[{"role": r, "content": c} for r, c in pairs], notes=notes)


def pre(name: str, **settings: object):
    return PRE_STEPS[name](SimpleNamespace(**settings))


def post(name: str, **settings: object):
    return POST_STEPS[name](SimpleNamespace(**settings))


# ---------------------------------------------------------------- conversation


def test_a_conversation_is_made_from_request_messages_or_dicts():
    request = [
        ChatMessage(role="developer", content="Rules."),
        ChatMessage(
            role="user", content=[{"type": "text", "text": "Hi, "}, {"type": "text", "text": "you"}]
        ),
    ]
    expected = [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "Hi, you"}]
    assert Conversation.from_messages(request).messages == expected
    dicts = [
        {"role": "developer", "content": "Rules."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi, "}, {"type": "text", "text": "you"}],
        },
    ]
    assert Conversation.from_messages(dicts) == Conversation(messages=expected, notes={})


# ---------------------------------------------------------------- system_prompt


def test_system_prompt_is_added_when_the_conversation_has_none():
    out = pre("system_prompt", system_prompt="Be brief.")(conv(("user", "hi")))
    assert out.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert out.notes == {"added_system_prompt": True}


def test_system_prompt_keeps_the_clients_and_renames_developer():
    step = pre("system_prompt", system_prompt="Be brief.")
    original = conv(("developer", "Pirate."), ("user", "hi"))
    out = step(original)
    assert out.messages == [
        {"role": "system", "content": "Pirate."},
        {"role": "user", "content": "hi"},
    ]
    assert out.notes == {}
    assert original.messages[0]["role"] == "developer"  # steps do not change their input


@pytest.mark.parametrize("settings", [{}, {"system_prompt": ""}, {"system_prompt": None}])
def test_no_system_prompt_setting_adds_none(settings: dict):
    assert pre("system_prompt", **settings)(conv(("user", "hi"))).messages == [
        {"role": "user", "content": "hi"}
    ]


# ---------------------------------------------------------------- input_limits


def test_input_limits_pass_a_conversation_within_them():
    step = pre("input_limits", max_messages=2, max_message_chars=5, max_input_chars=8)
    original = conv(("user", "hello"), ("assistant", "hey"))
    assert step(original) is original


def test_too_many_messages():
    step = pre("input_limits", max_messages=2)
    with pytest.raises(InvalidRequestError) as caught:
        step(conv(("user", "a"), ("assistant", "b"), ("user", "c")))
    error = caught.value
    assert (error.status_code, error.param, error.code) == (400, "messages", "too_many_messages")
    assert "At most 2" in error.message


def test_a_message_too_long_is_named_by_its_index():
    step = pre("input_limits", max_message_chars=5)
    with pytest.raises(InvalidRequestError) as caught:
        step(conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("user", "toolong")))
    assert (caught.value.param, caught.value.code) == ("messages[3].content", "input_too_long")


def test_total_input_too_long():
    step = pre("input_limits", max_message_chars=5, max_input_chars=8)
    with pytest.raises(InvalidRequestError) as caught:
        step(conv(("user", "hello"), ("user", "world")))
    assert (caught.value.param, caught.value.code) == ("messages", "input_too_long")


def test_limits_default_when_unset_and_none_means_unlimited():
    huge = conv(*[("user", "x" * 40_000)] * 300)
    with pytest.raises(InvalidRequestError):
        pre("input_limits")(huge)  # defaults apply
    unlimited = pre("input_limits", max_messages=None, max_message_chars=None, max_input_chars=None)
    assert unlimited(huge) is huge


def test_limits_ignore_the_added_system_prompt_and_keep_request_indices():
    conversation = conv(
        ("system", "Default."), ("user", "ok"), ("user", "toolong"), added_system_prompt=True
    )
    with pytest.raises(InvalidRequestError) as caught:
        pre("input_limits", max_messages=2, max_message_chars=5)(conversation)
    assert caught.value.param == "messages[1].content"


# ---------------------------------------------------------------- redact_pii


def test_redact_pii_masks_user_and_system_messages_and_counts():
    conversation = conv(
        ("system", "Support line +1 415 555 2671."),
        ("user", "I am jane@example.com, card 4111 1111 1111 1111."),
        ("assistant", "Noted: jane@example.com."),
        pii={"email": 1, "phone": 0, "card": 0},  # counts from an earlier step add up
    )
    out = pre("redact_pii")(conversation)
    assert [m["content"] for m in out.messages] == [
        "Support line [PHONE].",
        "I am [EMAIL], card [CARD].",
        "Noted: jane@example.com.",  # the model's own earlier answers are left alone
    ]
    assert out.notes["pii"] == {"email": 2, "phone": 1, "card": 1}
    assert conversation.messages[1]["content"].startswith("I am jane")


def test_redact_pii_mask_is_a_setting():
    out = pre("redact_pii", pii_mask="***")(conv(("developer", "mail a@example.com")))
    assert out.messages[0]["content"] == "mail ***"


# ---------------------------------------------------------------- post-steps


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("Hello!", "Hello!"),
        ("Hello!<|im_end|>", "Hello!"),
        ("Hello!<|eot_id|>", "Hello!"),
        ("Hello!<|endoftext|>", "Hello!"),
        ("<|im_start|>assistant\nHello!<|im_end|>", "Hello!"),
        ("assistant\nHello!", "Hello!"),
        ("<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>", "Hello!"),
        ("Hello!<|im_end|>\n<|im_start|>user\nAnd you?", "Hello!"),  # a made-up next turn
        ("Ask the assistant\nplease.", "Ask the assistant\nplease."),
        ("Bye.\n\n", "Bye.\n\n"),
    ],
)
def test_strip_template_artefacts(text: str, cleaned: str):
    assert post("strip_template_artefacts")(text) == cleaned


def test_strip_trailing_whitespace():
    assert post("strip_trailing_whitespace")("  Hi there. \n\t \n") == "  Hi there."


# ---------------------------------------------------------------- registry


@register_pre_step("test_shout")
def shout(settings):
    suffix = getattr(settings, "shout_suffix", "!")

    def step(conversation: Conversation) -> Conversation:
        messages = [{**m, "content": m["content"].upper() + suffix} for m in conversation.messages]
        return conversation.replace(messages=messages)

    return step


@register_post_step("test_sign")
def sign(settings):
    return lambda text: f"{text} -- {getattr(settings, 'signature', 'bot')}"


def test_a_user_step_registered_elsewhere_is_picked_by_name():
    settings = SimpleNamespace(shout_suffix="!!", signature="Ada")
    pipeline = Pipeline.from_settings(settings, pre=["test_shout"], post=["test_sign"])
    assert pipeline.before(conv(("user", "hi"))).messages == [{"role": "user", "content": "HI!!"}]
    assert pipeline.after("Bye") == "Bye -- Ada"


def test_a_name_cannot_be_registered_twice_unless_replaced():
    with pytest.raises(ValueError, match="already registered"):
        register_pre_step("test_shout")(lambda settings: lambda c: c)
    register_pre_step("test_shout", replace=True)(shout)  # the same factory is fine
    assert PRE_STEPS["test_shout"] is shout


def test_unknown_step_names_list_the_known_ones():
    with pytest.raises(ValueError, match="Unknown pre-step 'nope'") as caught:
        Pipeline.from_settings(SimpleNamespace(), pre=["system_prompt", "nope"])
    for name in ("input_limits", "redact_pii", "system_prompt", "test_shout"):
        assert name in str(caught.value)
    with pytest.raises(ValueError, match="Unknown post-step 'nope'.*strip_trailing_whitespace"):
        Pipeline.from_settings(SimpleNamespace(), post=["nope"])


def test_a_step_returning_the_wrong_type_is_caught():
    pipeline = Pipeline(pre=(("broken", lambda c: None),), post=(("broken", lambda t: None),))
    with pytest.raises(TypeError, match="'broken' returned NoneType"):
        pipeline.before(conv(("user", "hi")))
    with pytest.raises(TypeError, match="'broken' returned NoneType"):
        pipeline.after("hi")


# ---------------------------------------------------------------- pipelines


def test_names_come_from_settings_then_defaults():
    assert Pipeline.from_settings(SimpleNamespace()).pre_names == ["system_prompt"]
    assert Pipeline.from_settings(SimpleNamespace()).post_names == []
    settings = SimpleNamespace(
        pre_steps="redact_pii, input_limits", post_steps=["strip_trailing_whitespace"]
    )
    pipeline = Pipeline.from_settings(settings)
    assert (pipeline.pre_names, pipeline.post_names) == (
        ["redact_pii", "input_limits"],
        ["strip_trailing_whitespace"],
    )
    assert Pipeline.from_settings(settings, pre=[], post="").pre_names == []


def test_step_modules_are_imported_so_their_steps_can_be_named():
    settings = SimpleNamespace(step_modules=[__name__], pre_steps=["test_shout"])
    assert Pipeline.from_settings(settings).pre_names == ["test_shout"]
    with pytest.raises(ModuleNotFoundError):
        Pipeline.from_settings(SimpleNamespace(step_modules="no_such_module_here"))


def test_the_bundles_settings_work_as_is():
    pipeline = Pipeline.from_settings(
        APISettings(model="tiny-chat", system_prompt="Be brief."),
        pre=["input_limits", "redact_pii", "system_prompt"],
        post=["strip_template_artefacts", "strip_trailing_whitespace"],
    )
    out = pipeline.before(Conversation.from_messages([ChatMessage(role="user", content="hi")]))
    assert out.messages[0] == {"role": "system", "content": "Be brief."}
    assert pipeline.after("Hi!<|im_end|>") == "Hi!"


def test_end_to_end_in_order():
    settings = SimpleNamespace(system_prompt="Be brief.", max_message_chars=40)
    pipeline = Pipeline.from_settings(
        settings,
        pre=["redact_pii", "input_limits", "system_prompt"],
        post=["strip_template_artefacts", "strip_trailing_whitespace"],
    )
    request = [
        ChatMessage(role="developer", content="Never share card 4111 1111 1111 1111."),
        ChatMessage(role="user", content="Mail me at someone.long.name@example.com"),
    ]
    out = pipeline.before(Conversation.from_messages(request))
    assert out.messages == [
        {"role": "system", "content": "Never share card [CARD]."},
        {"role": "user", "content": "Mail me at [EMAIL]"},
    ]
    assert out.notes == {"pii": {"email": 1, "phone": 0, "card": 1}}
    assert pipeline.after("<|im_start|>assistant\nDone.  \n<|im_end|>junk") == "Done."


def test_order_matters_redaction_before_limits():
    settings = SimpleNamespace(max_message_chars=20)
    message = conv(("user", "mail someone.long.name@example.com"))  # 34 characters; 17 masked
    redact_first = Pipeline.from_settings(settings, pre=["redact_pii", "input_limits"])
    assert redact_first.before(message).messages[0]["content"] == "mail [EMAIL]"
    limits_first = Pipeline.from_settings(settings, pre=["input_limits", "redact_pii"])
    with pytest.raises(InvalidRequestError, match="34 characters"):
        limits_first.before(message)


def test_order_matters_system_prompt_before_limits_keeps_request_indices():
    settings = SimpleNamespace(system_prompt="Be brief.", max_messages=1, max_message_chars=3)
    pipeline = Pipeline.from_settings(settings, pre=["system_prompt", "input_limits"])
    assert len(pipeline.before(conv(("user", "hi"))).messages) == 2  # the default is not counted
    with pytest.raises(InvalidRequestError) as caught:
        pipeline.before(conv(("user", "long")))
    assert caught.value.param == "messages[0].content"
