"""Chat data: validating OpenAI-style message lists and turning them into token ids with the
tokenizer's chat template.

A prompt is either raw text (``str``, tokenized as it is, with the tokenizer's own special
tokens) or a list of messages ``[{"role": ..., "content": ...}, ...]`` ending with a user turn,
rendered by ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` and tokenized
WITHOUT adding special tokens again (the template writes its own BOS where it wants one; this is
what ``apply_chat_template(tokenize=True)`` does too).

Token-in, token-out: the ids made here are the ids the engines are given; what they generate
comes back as ids, and the learner trains on exactly those. Text is only ever produced from ids
for the rewards (which score text), never turned back into ids on the policy path.

SFT conversations (:func:`encode_conversation`) are tokenized segment by segment so that every
assistant turn's tokens (its end-of-turn token included) are known exactly: the loss is masked
to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]
Messages = list[Message]
PromptInput = str | Messages

ROLES = ("system", "user", "assistant", "tool")


class ChatError(ValueError):
    """A message list that cannot be used; the loader prefixes the row's ``file:line``."""


def check_messages(value: Any, key: str, last_role: str | None = None) -> Messages:
    """``value`` as a clean message list (only ``role`` and ``content`` kept), or ChatError."""
    if not isinstance(value, list) or not value:
        raise ChatError(f"field {key!r} must be a non-empty list of messages, got {type(value).__name__}"
                        + (" (empty)" if isinstance(value, list) else ""))
    out: Messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ChatError(f"{key}[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"{key}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatError(f"{key}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if last_role is not None and out[-1]["role"] != last_role:
        raise ChatError(f"{key} must end with a turn of role {last_role!r}, the last one is {out[-1]['role']!r}")
    return out


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _require_template(tokenizer: Any) -> None:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ChatError(f"{name} has no chat template, so chat rows ('messages') cannot be rendered; "
                        "use raw-text rows or a tokenizer that ships a chat template")


def render(tokenizer: Any, messages: Messages, generation_prompt: bool) -> str:
    """The chat template's text of ``messages`` (with the assistant header when asked)."""
    _require_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_prompt(tokenizer: Any, prompt: PromptInput) -> str:
    """The text a prompt stands for: raw text as is, messages through the chat template. This
    is what rewards see as the prompt (exactly what the policy was conditioned on)."""
    return prompt if isinstance(prompt, str) else render(tokenizer, prompt, True)


def prompt_token_ids(tokenizer: Any, prompts: Sequence[PromptInput]) -> list[list[int]]:
    """Token ids of each prompt (raw text: with the tokenizer's special tokens; messages:
    rendered with the generation prompt, no special tokens added on top)."""
    out: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            out.append(list(tokenizer(p)["input_ids"]))
        else:
            out.append(list(tokenizer(render(tokenizer, p, True), add_special_tokens=False)["input_ids"]))
    return out


def encode_conversation(tokenizer: Any, messages: Messages) -> tuple[list[int], list[int]]:
    """``(ids, assistant_mask)`` of a conversation: mask 1 on every assistant turn's tokens.

    Each assistant turn ``k`` is the text between the rendering of ``messages[:k]`` with the
    generation prompt and the rendering of ``messages[:k + 1]``; everything else is context.
    Segments are tokenized one by one, so the context before the last assistant turn has
    exactly the ids that :func:`prompt_token_ids` gives for it (what rollout would be given).
    A template that is not prefix-consistent (later renderings do not extend earlier ones) is
    refused: the assistant tokens could not be located.
    """
    _require_template(tokenizer)
    segments: list[tuple[str, int]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], True) if k else ""
        after = render(tokenizer, messages[: k + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise ChatError(f"the chat template is not prefix-consistent at message {k}: the assistant turn's "
                            "tokens cannot be located for the loss mask")
        segments += [(before[len(done):], 0), (after[len(before):], 1)]
        done = after
    if not segments:
        raise ChatError("the conversation has no assistant turn to train on")
    ids: list[int] = []
    mask: list[int] = []
    for text, is_assistant in segments:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [is_assistant] * len(piece)
    return ids, mask
