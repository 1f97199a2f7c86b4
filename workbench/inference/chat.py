"""A multi-turn chat over any Generator: the conversation rendered by the chat template, turn after turn.

    session = ChatSession(KVCacheGenerator(model, tokenizer), ChatTemplate(tokenizer), SamplingParams(...),
                          max_length=256, system="Answer briefly.")
    reply = session.send("What does module fifo do?")     # reply.text; reply.dropped_turns
    session.reset()                                       # a new conversation (the system message stays)

What the model sees each turn is the whole conversation so far, rendered by `ChatTemplate.prompt_ids`
(`[<|bos|>] <|system|> .. <|end|> <|user|> .. <|end|> <|assistant|> .. <|end|> ... <|user|> new <|end|>
<|assistant|>`): the same ids a training record of that conversation holds, so a model fine-tuned on such
records (SFT, DPO) is asked in its own format. A reply ends at the template's stop ids (`<|end|>`, eos) or at
`max_new_tokens`; either way it joins the history, and the next render closes it with `<|end|>`.

The window. A model is asked at most `max_length` tokens (the window it was trained on, `data.seq_len`, by
default): the prompt may take `max_length - max_new_tokens` of them. When the conversation no longer fits,
its oldest exchanges (a user turn and the reply to it) leave the window, one at a time, until it does; the
system message always stays. What left stays left (the window's start only moves forward, so the model's view
never jumps back to turns it had stopped seeing), and the reply says how many turns left with it
(`dropped_turns`), for the caller to tell the user. A single message that does not fit even alone with the
system message is refused (`ChatError`), naming the sizes, rather than cut in the middle.

Sampling: the session's `SamplingParams` with the template's stop ids added; with a seed, turn n samples
with seed + n, so a replayed conversation gives the same replies and turns do not repeat one random stream.

`run_chat` is the line loop of `workbench chat` (lines in, replies out, `/reset`, `/exit`, `/help`), kept
here so it is tested without a terminal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from workbench.data.chat import ChatTemplate, check_text
from workbench.errors import DataError, WorkbenchError
from workbench.inference.generator import Generator, SamplingParams

COMMANDS = {"/reset": "forget the conversation (the system message stays)", "/exit": "end the chat (so does EOF)",
            "/help": "this list"}


class ChatError(WorkbenchError):
    """A message the session cannot take (it alone overflows the window, or spells out a reserved token)."""


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop": the model closed its turn; "length": max_new_tokens ran out
    tokens: int  # generated tokens, the stop token included
    prompt_tokens: int  # the rendered window the reply was generated from
    dropped_turns: int  # user turns that left the window before this reply (0: everything still fits)


class ChatSession:
    """One conversation with a model: the history, its rendering into a window, and one reply per message."""

    def __init__(self, generator: Generator, template: ChatTemplate, params: SamplingParams, max_length: int,
                 system: str | None = None):
        if params.max_new_tokens < 1:
            raise ChatError(f"max_new_tokens (--max-new-tokens): expected an integer >= 1, got "
                            f"{params.max_new_tokens}")
        if max_length <= params.max_new_tokens:
            raise ChatError(f"max_new_tokens (--max-new-tokens): {params.max_new_tokens} leaves no room for a prompt "
                            f"in a window of {max_length} tokens; lower it or widen the window (--max-length)")
        if system is not None:
            _check(system, "system message")
        self.generator = generator
        self.template = template
        self.params = dataclasses.replace(params, stop_token_ids=sorted({*params.stop_token_ids, *template.stop_ids}))
        self.max_length = max_length
        self.system = system or None
        self.reset()

    @property
    def prompt_budget(self) -> int:
        """Tokens the rendered conversation may take: the window less the reply's budget."""
        return self.max_length - self.params.max_new_tokens

    def reset(self) -> None:
        """Start a new conversation: no turns, the window at the start, the turn count (and seeds) from 0."""
        self.messages: list[dict] = []  # every turn said, user and assistant alternating (the transcript)
        self.start = 0  # index into `messages` of the first turn still in the window (always a user turn)
        self.turn = 0

    def window(self, start: int | None = None) -> list[dict]:
        """The messages the model sees: the system message, then the turns from `start` (default: the window's)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages[self.start if start is None else start:]

    def prompt_ids(self, start: int | None = None) -> list[int]:
        """The window rendered by the chat template, asking for the next assistant turn."""
        return self.template.prompt_ids(self.window(start))

    def send(self, text: str) -> Reply:
        """Add a user message, fit the window, generate the reply and add it to the history."""
        _check(text, "message")
        self.messages.append({"role": "user", "content": text})
        try:
            dropped = self._fit()
        except ChatError:
            self.messages.pop()
            raise
        ids = self.prompt_ids()
        seed = None if self.params.seed is None else self.params.seed + self.turn
        try:
            completion = self.generator.generate([ids], dataclasses.replace(self.params, seed=seed))[0]
        except BaseException:  # the history keeps alternating user, assistant
            self.messages.pop()
            raise
        text_out = completion.text if completion.text is not None else self.template.tokenizer.decode(
            completion.tokens)
        self.messages.append({"role": "assistant", "content": text_out})
        self.turn += 1
        return Reply(text_out, completion.finish_reason, len(completion.tokens), len(ids), dropped)

    def _fit(self) -> int:
        """Move the window's start past the oldest exchanges until the rendering fits; the turns dropped."""
        start, dropped = self.start, 0
        while len(self.prompt_ids(start)) > self.prompt_budget:
            if start >= len(self.messages) - 1:  # only the new message is left and it does not fit
                need = len(self.prompt_ids(start))
                raise ChatError(f"the message takes {need} tokens with the template{' and system message' if self.system else ''}; "
                                f"the window holds {self.max_length} and the reply needs {self.params.max_new_tokens} of them, "
                                f"so at most {self.prompt_budget} are left: shorten it (or lower max_new_tokens)")
            start += 2  # a user turn and its reply
            dropped += 1
        self.start = start
        return dropped


def _check(text: str, what: str) -> None:
    try:
        check_text(text, what)
    except DataError as e:
        raise ChatError(str(e)) from None


def run_chat(session: ChatSession, lines: Iterable[str], say: Callable[[str], None],
             note: Callable[[str], None]) -> int:
    """The chat loop: each line is a message (or a command), each reply goes to `say`, notices (commands,
    truncation, refused messages) to `note`. Ends at `/exit` or when the lines run out; returns the number of
    replies given."""
    replies = 0
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            note("(conversation reset)")
            continue
        if command == "/help":
            note("\n".join(f"{c:7s} {what}" for c, what in COMMANDS.items()))
            continue
        if command.startswith("/") and " " not in command and command not in COMMANDS:
            note(f"(unknown command {command}; commands: {', '.join(COMMANDS)})")
            continue
        try:
            reply = session.send(line)
        except ChatError as e:
            note(f"(not sent: {e})")
            continue
        if reply.dropped_turns:
            note(f"(the conversation is longer than the window of {session.max_length} tokens: the "
                 f"{_plural(reply.dropped_turns, 'oldest exchange')} left it; the model no longer sees "
                 f"{_plural(session.start // 2, 'earlier exchange')})")
        say(reply.text)
        if reply.finish_reason == "length":
            note(f"(the reply reached max_new_tokens = {session.params.max_new_tokens} and was cut)")
        replies += 1
    return replies


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")
