"""Conversations: turns with roles, any modality in any turn, rendered into one document by a chat template.

A conversation document (a JSONL line, the pretokenizer's input, beside `segments` documents):

    {"messages": [{"role": "user", "content": [{"image": "img/7.png"}, {"text": "what digit is this?"}]},
                  {"role": "assistant", "content": "seven"}], "source": "chat"}

`content` is a string or a list of segments as in a `segments` document. The bundle's template renders it as

    <s> user: <image ...> what digit is this? assistant: seven </s>

with each role's prefix a text segment of its own. The loss falls on the assistant's content and on `</s>`
only: the model learns to answer and to stop, not to predict questions. A segment of an assistant turn
may still say `"loss": false`. A prompt for `Tessera.chat` is the same rendering of the turns so far plus
the assistant's prefix; a text answer is cut where the model starts another turn (a role's prefix).

The prefixes are plain text, so every text tokenizer encodes them (the digits corpus trains its
SentencePiece model on them); `tessera tokenizer build --chat-template FILE` stores another template in a
bundle. A bundle built before templates existed uses `DEFAULT_CHAT`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from tessera.errors import TesseraError

ROLES = ("system", "user", "assistant")


class ChatError(TesseraError):
    pass


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "system:"
    user: str = "user:"
    assistant: str = "assistant:"

    def __post_init__(self):
        for role in ROLES:
            prefix = getattr(self, role)
            if not isinstance(prefix, str) or not prefix.strip():
                raise ChatError(f"the chat template's {role} prefix must be non-empty text, got {prefix!r}")
        if len({getattr(self, r).strip() for r in ROLES}) != len(ROLES):
            raise ChatError("the chat template's role prefixes must differ from one another")

    @classmethod
    def from_dict(cls, d: dict | None) -> "ChatTemplate":
        if d is None:
            return DEFAULT_CHAT
        if not isinstance(d, dict) or set(d) - set(ROLES):
            raise ChatError(f"a chat template is an object with the keys {', '.join(ROLES)}; got {str(d)[:120]}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self, messages, *, for_reply: bool = False) -> list[tuple[str, object, bool]]:
        """Turns -> [(kind, value, loss)]. `content` is a list of (kind, value, loss) (the caller has parsed
        it); with `for_reply` the assistant's prefix ends the list, ready for the model's answer."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatError("a conversation needs a non-empty list of messages")
        out = []
        for n, msg in enumerate(messages):
            role, content = msg
            if role not in ROLES:
                raise ChatError(f"message {n}: role must be one of {', '.join(ROLES)}, not {role!r}")
            if role == "system" and n:
                raise ChatError(f"message {n}: a system message may only come first")
            out.append(("text", getattr(self, role), False))
            out += [(kind, value, loss and role == "assistant") for kind, value, loss in content]
        if for_reply:
            out.append(("text", self.assistant, False))
        return out

    def jinja(self) -> str:
        """The template as a transformers chat template (Jinja), for an HF export: the text of `render` (each
        role's prefix, then its content; the assistant's prefix with `add_generation_prompt`), without BOS and
        EOS, which are ids and not text in tessera's tokenizers: `tok(rendered)` prepends BOS as tessera's
        prompts start. It renders text content only; an image or audio part raises, since only tessera's
        tokenizer encodes media. Text is encoded as one string there, where tessera encodes each segment on
        its own, so ids can differ where a text piece would span a prefix and its content."""
        prefix = json.dumps({r: getattr(self, r) for r in ROLES}, ensure_ascii=False)
        media = "images and audio in a conversation need tessera's tokenizer (Tessera.chat)"
        return (
            "{%- set prefix = " + prefix + " -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in prefix -%}{{- raise_exception('a role must be system, user or assistant')"
            " -}}{%- endif -%}"
            "{%- if message['role'] == 'system' and not loop.first -%}"
            "{{- raise_exception('a system message may only come first') -}}{%- endif -%}"
            "{{- prefix[message['role']] -}}"
            "{%- if message['content'] is string -%}{{- message['content'] -}}"
            "{%- else -%}{%- for part in message['content'] -%}"
            "{%- if part is string -%}{{- part -}}"
            "{%- elif part['text'] is defined -%}{{- part['text'] -}}"
            "{%- else -%}{{- raise_exception(" + json.dumps(media) + ") -}}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- prefix['assistant'] -}}{%- endif -%}"
        )

    def cut_reply(self, text: str) -> str:
        """A generated text answer, up to where the model starts another turn."""
        cut = len(text)
        for role in ROLES:
            i = text.find(getattr(self, role).strip())
            if i >= 0:
                cut = min(cut, i)
        return text[:cut].strip()


DEFAULT_CHAT = ChatTemplate()


def split_message(msg, n: int) -> tuple[str, object]:
    """One message of a conversation: (role, content), from {"role": ..., "content": ...}."""
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
        raise ChatError(f"message {n} needs 'role' and 'content': {str(msg)[:120]}")
    return msg["role"], msg["content"]
