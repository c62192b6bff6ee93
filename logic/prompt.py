"""Prompt policy: what the model sees besides the user's messages."""

from __future__ import annotations

from logic.protocol import ChatMessage

# Roles the chat templates of small open models know; "developer" is OpenAI's newer name
# for the system role.
_TEMPLATE_ROLE = {"developer": "system"}


def apply_prompt_policy(
    messages: list[ChatMessage], *, default_system_prompt: str | None
) -> list[dict[str, str]]:
    """Template-ready messages: plain text content, and the default system prompt when
    the conversation brings none."""
    rendered = [{"role": _TEMPLATE_ROLE.get(m.role, m.role), "content": m.text} for m in messages]
    if default_system_prompt and not any(m["role"] == "system" for m in rendered):
        rendered.insert(0, {"role": "system", "content": default_system_prompt})
    return rendered
