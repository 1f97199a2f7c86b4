"""The chat template: conversations as token ids over the reserved role tokens, and which ids are trained.

    [<|bos|>] <|system|> text <|end|>  <|user|> text <|end|>  <|assistant|> text <|end|>  <|user|> ...
                                                                          ^^^^^^^^^^^^^ targets

Every turn is a role token, the turn's text and `<|end|>`; nothing else (no newlines, no names) is added,
so the template is the reserved tokens of `workbench.data.tokenizer` and nothing to learn by heart. A
conversation to continue (`prompt_ids`) ends with a bare `<|assistant|>`: the model writes the reply and
ends it with `<|end|>`, which is therefore a stop token of chat generation (`stop_ids`).

What is trained (`encode(...).targets`): the text of every assistant turn *and its closing `<|end|>`* (a
model that never learns to close its turn rambles on), never the system or user text, the role tokens or the
bos. "Loss on responses only" is this mask; the collators turn it into labels (-100 elsewhere).

Tokenization. Each text is encoded alone (`add_special_tokens=False`) and the role ids are put between: the
special tokens are never merged with their neighbours, so this equals encoding the whole rendered string at
once (tested), and the boundary between prompt and response is exact, which separate tokenization of a prompt
and a completion by string concatenation does not guarantee (a merge can straddle the joint).

Records. Data files hold either `{"messages": [{"role": ..., "content": ...}, ...]}` or the short form
`{"prompt": ..., "response": ...}` (optional "system"); `messages_of` reads both and names what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workbench.data.tokenizer import Tokenizer
from workbench.errors import DataError

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
# the reserved tokens that structure a conversation: a text that spells one out would inject a turn boundary (a
# literal <|end|> in an answer would train a stop in mid-answer). <think>, <answer>, ... are content, not structure.
STRUCTURE_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", *ROLE_TOKENS.values(), END_TOKEN)


def check_text(text: str, where: str) -> None:
    """Refuse a message or completion text that spells out a structural reserved token."""
    found = next((t for t in STRUCTURE_TOKENS if t in text), None)
    if found is not None:
        raise DataError(f"{where}: the text contains the reserved token {found!r}, which would become a turn "
                        f"boundary; remove it from the data")


def messages_of(record: dict, where: str = "record") -> list[dict]:
    """The conversation of a data record: its "messages", or [system,] user, assistant from the short form
    {"prompt", "response"[, "system"]}. Checks roles, types and order; errors name `where` and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else [])
        messages += [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise DataError(f"{where}: expected 'messages' (a list of {{role, content}}) or 'prompt' and 'response'")
    check_messages(messages, where)
    return messages


def check_messages(messages, where: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLE_TOKENS:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLE_TOKENS)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i}: 'content' must be a string")
        check_text(m["content"], f"{where}: message {i}")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: message {i}: a system message may only come first")


@dataclass
class Encoded:
    ids: list[int]
    targets: list[bool]  # targets[t]: token t is trained (it is predicted from the tokens before it)


class ChatTemplate:
    """Renders conversations for a tokenizer that has the reserved tokens (`Tokenizer.require_reserved`)."""

    def __init__(self, tokenizer: Tokenizer):
        tokenizer.require_reserved()
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer.special_ids[tok] for role, tok in ROLE_TOKENS.items()}
        self.end_id = tokenizer.special_ids[END_TOKEN]
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end an assistant turn in generation: `<|end|>`, and the tokenizer's eos ids."""
        return sorted({self.end_id, *self.tokenizer.eos_ids})

    def encode(self, messages: Sequence[dict], train_on: str = "assistant") -> Encoded:
        """The ids of a whole conversation and its target mask: every assistant turn (`train_on =
        "assistant"`) or only the last one (`"last"`), each with its closing `<|end|>`."""
        if train_on not in ("assistant", "last"):
            raise ValueError(f"train_on must be 'assistant' or 'last', got {train_on!r}")
        ids, targets = list(self.bos), [False] * len(self.bos)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        for i, m in enumerate(messages):
            text = self.tokenizer.encode(m["content"], add_special_tokens=False) if m["content"] else []
            trained = m["role"] == "assistant" and (train_on == "assistant" or i == last)
            ids += [self.role_ids[m["role"]], *text, self.end_id]
            targets += [False, *[trained] * len(text), trained]
        return Encoded(ids, targets)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The ids that ask for the next assistant turn: the conversation so far, then `<|assistant|>`."""
        return self.encode(messages).ids + [self.role_ids["assistant"]]

    def ask(self, text: str) -> list[int]:
        """The ids asking for a reply to one user turn holding `text`."""
        return self.prompt_ids([{"role": "user", "content": text}])

    def render(self, messages: Sequence[dict]) -> str:
        """The conversation as text (the reserved tokens spelled out): for reading, and to check `encode`."""
        parts = [self.tokenizer.id_to_token(self.bos[0])] if self.bos else []
        for m in messages:
            parts += [ROLE_TOKENS[m["role"]], m["content"], END_TOKEN]
        return "".join(parts)
