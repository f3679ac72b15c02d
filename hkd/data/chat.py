"""Conversations and prompts as token ids, rendered by the tokenizer's own chat template.

A conversation is TRL's conversational format: a list of ``{"role": ..., "content": ...}``
messages (``system``, ``user``, ``assistant``, any role the template knows), several turns
allowed. :func:`encode_conversation` renders it once and labels the assistant turns only:

* a template with generation markers (``{% generation %}...{% endgeneration %}``) says itself
  which tokens are the assistant's: ``apply_chat_template(..., return_assistant_tokens_mask=True)``;
* any other template is asked turn by turn: the text that ``messages[:i + 1]`` adds to
  ``messages[:i]`` rendered with the generation prompt is assistant turn ``i`` (its content and
  the template's end-of-turn token; template text after that token, such as ChatML's newline
  between turns, is not a target). A template that does not render a conversation's turns as
  extensions of each other (some drop earlier reasoning) is refused with a message that asks
  for generation markers.

Prompts for sampling (:func:`prompt_ids`) are rendered exactly as the data's prompts are, so
a sampler continues the ids training saw, and :func:`end_of_turn_ids` names the token a chat
template closes a turn with, where samplers stop.
"""

from __future__ import annotations

import re
from typing import Any

from hkd.data.labels import IGNORE_INDEX
from hkd.errors import HkdError

Message = dict[str, Any]

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def template_of(tokenizer: Any) -> str | None:
    """The tokenizer's default chat template text (``None`` without one)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def has_generation_markers(tokenizer: Any) -> bool:
    template = template_of(tokenizer)
    return template is not None and _GENERATION_MARKER.search(template) is not None


def conversation_problem(value: Any, need_assistant: bool = True) -> str | None:
    """What is wrong with ``value`` as a conversation, or ``None`` (it is a list of role/content messages)."""
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of {{role, content}} messages, got {type(value).__name__}"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i} is a {type(message).__name__}, not a {{role, content}} object"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if key not in message else f"a {type(message[key]).__name__}"
                return f"message {i}: {key!r} must be text, got {got}"
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        return "no assistant message (nothing to learn)"
    return None


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool, where: str = "data") -> str:
    """The template's text for ``messages``; a template error names ``where``."""
    if template_of(tokenizer) is None:
        raise HkdError(f"{where}: the tokenizer has no chat template, which renders conversations and chat prompts "
                       "(give the tokenizer one, or use plain prompt/completion records without data.chat_template)")
    try:
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False))
    except Exception as exc:  # jinja's own errors: raise_exception(), undefined variables, ...
        raise HkdError(f"{where}: the tokenizer's chat template failed on this conversation: {exc}") from exc


def render_ids(tokenizer: Any, messages: list[Message], add_generation_prompt: bool, where: str = "data") -> list[int]:
    """Token ids of the rendered conversation, as ``apply_chat_template(..., tokenize=True)`` gives them
    (the template writes its own special tokens, so the tokenizer adds none)."""
    text = render(tokenizer, messages, add_generation_prompt, where)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, prompt: str | list[Message], chat_template: bool = False, where: str = "data") -> list[int]:
    """The ids a completion of ``prompt`` follows, exactly as training data encodes prompts.

    A conversation (a list of messages) is rendered with the chat template and the generation
    prompt; a string is one user turn in the template with ``chat_template``, else ``[bos] + text``.
    """
    if not isinstance(prompt, list):
        prompt = str(prompt)  # a number in a JSON field is its text
    else:
        problem = conversation_problem(prompt, need_assistant=False)
        if problem:
            raise HkdError(f"{where}: {problem}")
        return render_ids(tokenizer, prompt, True, where)
    if chat_template:
        return render_ids(tokenizer, [{"role": "user", "content": prompt}], True, where)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + (list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else [])


def special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for index, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(index))
    return ids


def end_of_turn_ids(tokenizer: Any) -> tuple[int, ...]:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``, ...), read off a rendered two-turn probe; ``()`` without a template or when
    the template writes none (then EOS alone ends a sample)."""
    template = template_of(tokenizer)
    if template is None:
        return ()
    cached = getattr(tokenizer, "_hkd_end_of_turn", None)
    if cached is not None and cached[0] == template:
        return tuple(cached[1])
    found: tuple[int, ...] = ()
    probe: list[Message] = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    try:
        before = render(tokenizer, probe[:1], True)
        after = render(tokenizer, probe, False)
    except HkdError:
        before, after = "", ""
    if after.startswith(before) and after != before:
        special = special_ids(tokenizer)
        tail = tokenizer(after[len(before):], add_special_tokens=False)["input_ids"]
        found = next(((int(i),) for i in tail if int(i) in special), ())
    try:
        tokenizer._hkd_end_of_turn = (template, found)  # asked per sampling call; the template decides it
    except AttributeError:
        pass
    return found


def _assistant_spans(tokenizer: Any, messages: list[Message], text: str, where: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` that are assistant turns, by rendering each turn's prefix."""
    end_of_turn = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], True, where) if i else ""
        after = render(tokenizer, messages[: i + 1], False, where)
        if not (after.startswith(before) and text.startswith(after)):
            raise HkdError(f"{where}: the chat template does not render assistant turn {i} as a continuation of the "
                           "turns before it, so its tokens cannot be told apart; use a template with "
                           "{% generation %} markers around the assistant's reply")
        end = len(after)
        for token in end_of_turn:  # the template's text after its end-of-turn token is not the reply
            found = after.find(token, len(before))
            if found >= 0:
                end = found + len(token)
        spans.append((len(before), end))
    return spans


def encode_conversation(tokenizer: Any, messages: list[Message], max_length: int,
                        where: str = "data") -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation: the assistant turns are targets, everything else
    :data:`IGNORE_INDEX`; truncated to ``max_length``."""
    problem = conversation_problem(messages)
    if problem:
        raise HkdError(f"{where}: {problem}")
    if has_generation_markers(tokenizer):
        render(tokenizer, messages, False, where)  # a template error names the record
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask)]
        return ids[:max_length], labels[:max_length]
    text = render(tokenizer, messages, False, where)
    spans = _assistant_spans(tokenizer, messages, text, where)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets: count tokens instead
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            first, last = (len(tokenizer(text[:at], add_special_tokens=False)["input_ids"]) for at in (start, end))
            labels[first:last] = ids[first:last]
        return ids[:max_length], labels[:max_length]
    ids = list(encoded["input_ids"])
    labels = [token if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for token, (start, _) in zip(ids, encoded["offset_mapping"])]
    return ids[:max_length], labels[:max_length]
