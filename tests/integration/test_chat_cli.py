"""`workbench chat` on a tiny trained run, with questions piped into it: the replies are the chat session's (the
whole conversation asked each turn), a window too small for the conversation says so, and bad input is named."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.checkpoint.load import load_run
from workbench.data.chat import ChatTemplate
from workbench.inference.chat import ChatSession
from workbench.inference.generator import KVCacheGenerator, SamplingParams

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What does module counter do?", "And how do I instantiate it?"]


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run  # conftest: the debug config trained 6 steps, shared by the session


def chat(*args, stdin: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "workbench.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def expected_replies(run_dir, questions, max_new_tokens, max_length, system=None):
    model, tokenizer, _ = load_run(run_dir)
    session = ChatSession(KVCacheGenerator(model, tokenizer), ChatTemplate(tokenizer),
                          SamplingParams(max_new_tokens=max_new_tokens), max_length, system)
    return [session.send(q) for q in questions]


def test_piped_questions_get_the_sessions_multi_turn_replies(run):
    done = chat("--ckpt", str(run), "--max-new-tokens", "12", "--system", "Be brief.",
                stdin="\n".join(QUESTIONS) + "\n/exit\nnot asked\n")
    assert done.returncode == 0, done.stderr
    replies = expected_replies(run, QUESTIONS, 12, 64, "Be brief.")  # the debug config's window: data.seq_len 64
    assert done.stdout == "".join(r.text + "\n" for r in replies)
    assert replies[1].prompt_tokens > replies[0].prompt_tokens  # the second turn was asked with the first
    assert "window 64 tokens" in done.stderr


def test_a_window_too_small_for_the_conversation_drops_the_oldest_turns_and_says_so(run):
    questions = [f"Tell me about module m{i} please." for i in range(4)]
    done = chat("--ckpt", str(run), "--max-new-tokens", "10", "--max-length", "40", stdin="\n".join(questions))
    assert done.returncode == 0, done.stderr
    replies = expected_replies(run, questions, 10, 40)
    assert done.stdout == "".join(r.text + "\n" for r in replies)
    assert any(r.dropped_turns for r in replies)
    assert "the model no longer sees" in done.stderr and "oldest exchange" in done.stderr


def test_bad_checkpoints_and_settings_are_named(run, tmp_path):
    done = chat("--ckpt", str(tmp_path / "missing"), stdin="hi\n")
    assert done.returncode == 2 and "missing" in done.stderr and "not found" in done.stderr
    done = chat("--ckpt", str(tmp_path), stdin="hi\n")  # a folder that is no run
    assert done.returncode == 2 and done.stderr.startswith("error:")
    done = chat("--ckpt", str(run), "--max-new-tokens", "64", stdin="hi\n")
    assert done.returncode == 2 and "--max-new-tokens" in done.stderr and "64" in done.stderr
    done = chat("--ckpt", str(run), "--top-p", "0", stdin="hi\n")
    assert done.returncode == 2 and "--top-p" in done.stderr
