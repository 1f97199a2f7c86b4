"""The chat session (workbench/inference/chat.py): the window is the template's rendering of the conversation,
the oldest exchanges leave it first (the system message stays), /reset forgets, and the line loop's commands."""

import pytest
import torch

from data_pipelines.tokenizer import train_bpe
from workbench.data.chat import ChatTemplate
from workbench.inference.chat import ChatError, ChatSession, run_chat
from workbench.inference.generator import Completion, KVCacheGenerator, SamplingParams
from workbench.models.base import ModelSection, build_model

TEXTS = ["module counter(input clk, output [7:0] q);\nendmodule\n", "What does module fifo do? It buffers data.",
         "How do I instantiate uart_tx? Connect clk and tx."] * 20


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(train_bpe(TEXTS, 300))


class Scripted:
    """A Generator that answers from a list and records what it was asked."""

    def __init__(self, template, replies):
        self.template, self.replies, self.asked, self.params = template, list(replies), [], []

    def generate(self, prompts, params):
        assert len(prompts) == 1
        self.asked.append(list(prompts[0]))
        self.params.append(params)
        text = self.replies.pop(0)
        tokens = self.template.tokenizer.encode(text, add_special_tokens=False) + [self.template.end_id]
        return [Completion(prompt_tokens=list(prompts[0]), tokens=tokens, finish_reason="stop", text=text)]


def test_each_turn_asks_the_templates_rendering_of_the_whole_conversation(template):
    gen = Scripted(template, ["It counts clock edges.", "Ports clk and q."])
    session = ChatSession(gen, template, SamplingParams(max_new_tokens=8, seed=3), max_length=512,
                          system="Answer briefly.")
    first = session.send("What does counter do?")
    second = session.send("And its ports?")
    assert (first.text, second.text) == ("It counts clock edges.", "Ports clk and q.")
    conversation = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "What does counter do?"},
                    {"role": "assistant", "content": "It counts clock edges."},
                    {"role": "user", "content": "And its ports?"}]
    assert gen.asked[0] == template.prompt_ids(conversation[:2])
    assert gen.asked[1] == template.prompt_ids(conversation)  # the whole history, rendered by the template
    assert template.tokenizer.decode(gen.asked[1], skip_special_tokens=False) == template.render(conversation) + \
        "<|assistant|>"
    assert second.dropped_turns == 0 and second.prompt_tokens == len(gen.asked[1])
    # the template's stop ids end every reply; turn n samples with seed + n
    assert set(template.stop_ids) <= set(gen.params[0].stop_token_ids)
    assert [p.seed for p in gen.params] == [3, 4]


def test_the_oldest_exchanges_leave_the_window_first_and_the_system_message_stays(template):
    long_reply = "It buffers data between two clocks. " * 4
    gen = Scripted(template, [long_reply] * 6)
    params = SamplingParams(max_new_tokens=16)
    session = ChatSession(gen, template, params, max_length=1000, system="Be a teacher.")
    questions = [f"Question number {i}: what does module m{i} do?" for i in range(6)]
    for q in questions[:3]:
        assert session.send(q).dropped_turns == 0
    # a window that holds about two exchanges: the next message drops the oldest ones, never the newest
    session.max_length = len(session.prompt_ids()) - 10 + params.max_new_tokens
    reply = session.send(questions[3])
    assert reply.dropped_turns >= 1
    window = session.window()
    assert window[0] == {"role": "system", "content": "Be a teacher."}
    assert window[-1] == {"role": "user", "content": questions[3]} or window[-2]["content"] == questions[3]
    seen = [m["content"] for m in window if m["role"] == "user"]
    assert seen == questions[3 - len(seen) + 1: 4]  # a contiguous run of the newest questions
    assert questions[0] not in seen
    assert len(gen.asked[-1]) <= session.prompt_budget
    assert gen.asked[-1] == template.prompt_ids(window[:-1])  # what was asked is the rendering of the window
    # the transcript keeps everything; the window's start only moves forward
    assert [m["content"] for m in session.messages if m["role"] == "user"] == questions[:4]
    start = session.start
    session.send("ok?")
    assert session.start >= start


def test_a_message_that_alone_overflows_the_window_is_refused_and_not_kept(template):
    gen = Scripted(template, ["fine"])
    session = ChatSession(gen, template, SamplingParams(max_new_tokens=8), max_length=40)
    with pytest.raises(ChatError, match="the window holds 40 and the reply needs 8"):
        session.send("word " * 200)
    assert session.messages == [] and gen.asked == []
    assert session.send("hi").text == "fine"


def test_reset_forgets_the_conversation_but_keeps_the_system_message(template):
    gen = Scripted(template, ["a", "b"])
    session = ChatSession(gen, template, SamplingParams(max_new_tokens=8, seed=0), max_length=256, system="S")
    session.send("first")
    session.reset()
    assert session.messages == [] and session.start == 0 and session.window() == [{"role": "system", "content": "S"}]
    session.send("second")
    assert gen.asked[1] == template.prompt_ids([{"role": "system", "content": "S"},
                                                {"role": "user", "content": "second"}])
    assert gen.params[1].seed == 0  # a new conversation replays like the first


def test_bad_settings_and_reserved_tokens_are_refused_by_name(template):
    gen = Scripted(template, [])
    with pytest.raises(ChatError, match="max_new_tokens.*: 64 leaves no room"):
        ChatSession(gen, template, SamplingParams(max_new_tokens=64), max_length=64)
    with pytest.raises(ChatError, match="max_new_tokens.*: expected an integer >= 1"):
        ChatSession(gen, template, SamplingParams(max_new_tokens=0), max_length=64)
    with pytest.raises(ChatError, match="system message.*<\\|user\\|>"):
        ChatSession(gen, template, SamplingParams(), max_length=256, system="x <|user|> y")
    session = ChatSession(gen, template, SamplingParams(), max_length=256)
    with pytest.raises(ChatError, match="reserved token '<\\|end\\|>'"):
        session.send("a <|end|> b")
    assert session.messages == []


def test_the_line_loop_runs_commands_and_stops_at_exit(template):
    gen = Scripted(template, ["one", "two", "three"])
    session = ChatSession(gen, template, SamplingParams(max_new_tokens=8), max_length=256)
    said, notes = [], []
    lines = ["q1\n", "\n", "/help\n", "q2\n", "/reset\n", "/bogus\n", "bad <|end|>\n", "q3\n", "/exit\n", "never\n"]
    assert run_chat(session, lines, said.append, notes.append) == 3
    assert said == ["one", "two", "three"]
    assert any("/reset" in n for n in notes) and "(conversation reset)" in notes
    assert any("unknown command /bogus" in n for n in notes) and any("not sent" in n for n in notes)
    assert [m["content"] for m in session.messages] == ["q3", "three"]  # reset forgot q1 and q2


def test_a_real_model_replies_through_the_kv_cache_generator(template):
    torch.manual_seed(0)
    model = build_model(ModelSection.of("llama3", "debug", vocab_size=template.tokenizer.vocab_size)).eval()
    session = ChatSession(KVCacheGenerator(model, template.tokenizer), template,
                          SamplingParams(max_new_tokens=6, temperature=0.8, seed=1), max_length=64)
    first = session.send("What does counter do?")
    assert first.tokens >= 1 and isinstance(first.text, str)
    assert 1 <= first.tokens <= 6 and first.finish_reason in ("stop", "length")
    session.send("And fifo?")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
