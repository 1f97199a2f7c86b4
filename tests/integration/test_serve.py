"""`workbench serve` live: a server over a tiny trained run, driven by the official `openai` client and by raw HTTP.

The in-process server (one Engine, one loop thread) answers models, completions and chat completions, streamed
and not; its greedy text equals `workbench generate`'s; concurrent requests equal each request run alone; stop
strings and seeds behave; every error is answered in OpenAI's shape and the next request still succeeds; a
client that drops a generation gets its cache blocks freed; a step that fails fails its requests with a 500
and the server keeps serving. One subprocess runs the CLI itself: --port 0, an adapter, an API key, SIGTERM."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from workbench.checkpoint.load import load_run
from workbench.inference.engine import Engine
from workbench.inference.server import OpenAIServer

openai = pytest.importorskip("openai", reason="the openai client (the dev extra) is not installed")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BLOCK, NUM_BLOCKS = 16, 17  # a KV cache of 16 blocks = 256 tokens, below the model's max_len of 512


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run  # conftest: the debug config trained 6 steps, shared by the session


@pytest.fixture(scope="module")
def server(run):
    model, tokenizer, _ = load_run(run)
    engine = Engine(model, tokenizer, block_size=BLOCK, num_blocks=NUM_BLOCKS, max_batch=8)
    logs: list[str] = []
    srv = OpenAIServer(engine, tokenizer, "tiny", log=logs.append).start()
    srv.logs = logs
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def full_pool(server) -> int:
    return server.engine.cache.allocator.capacity


def complete(client, prompt="def main(", **kw):
    kw.setdefault("max_tokens", 24)
    extra = {k: kw.pop(k) for k in ("top_k", "repetition_penalty") if k in kw}  # extensions: extra_body
    return client.completions.create(model="tiny", prompt=prompt, extra_body=extra or None, **kw)


def stream_text(client, **kw) -> tuple[str, str | None]:
    texts, reason = {}, None
    for chunk in complete(client, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            reason = c.finish_reason or reason
    return texts[0], reason


def raw(server, method, path, body=None, headers=None, conn=None):
    """(status, parsed JSON) over http.client; `conn` to reuse a keep-alive connection."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def assert_serving(client):
    out = complete(client, max_tokens=3, temperature=0)  # raises unless the server answers 200
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


# -------------------------------------------------------------------------------------------- the happy path


def test_models_lists_the_run(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert raw(server, "GET", "/health") == (200, {"status": "ok"})


def test_greedy_completion_equals_workbench_generate(client, run, capsys):
    from workbench.cli import main

    for prompt in ("def main(", "import os\nclass Parser"):
        assert main(["generate", "--ckpt", str(run), "--prompt", prompt, "--max-new-tokens", "24"]) == 0
        expected = capsys.readouterr().out
        assert expected.endswith("\n")
        got = complete(client, prompt, temperature=0, max_tokens=24)
        assert got.choices[0].text == expected[:-1]
        assert got.usage.completion_tokens == 24 and got.choices[0].finish_reason == "length"


def test_streamed_text_equals_the_whole_text(client):
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 0.8, "top_k": 20, "seed": 3}):
        whole = complete(client, max_tokens=32, **kw).choices[0]
        text, reason = stream_text(client, max_tokens=32, **kw)
        assert (text, reason) == (whole.text, whole.finish_reason)


def test_prompt_forms_and_choices(client, server):
    ids = server.tokenizer.encode("def main(")
    by_text = complete(client, "def main(", temperature=0).choices[0].text
    assert complete(client, ids, temperature=0).choices[0].text == by_text
    many = complete(client, ["def main(", "x = 1"], temperature=0, max_tokens=8)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == complete(client, "def main(", temperature=0, max_tokens=8).choices[0].text
    assert many.choices[1].text == complete(client, "x = 1", temperature=0, max_tokens=8).choices[0].text
    as_ids = complete(client, [ids, server.tokenizer.encode("x = 1")], temperature=0, max_tokens=8)
    assert [c.text for c in as_ids.choices] == [c.text for c in many.choices]
    # n samples: sample j uses seed + j, so the choices differ and a repeat gives the same ones
    n3 = complete(client, "x", n=3, temperature=1.0, seed=11, max_tokens=16)
    assert [c.index for c in n3.choices] == [0, 1, 2]
    assert len({c.text for c in n3.choices}) > 1
    assert [c.text for c in n3.choices] == [c.text for c in complete(client, "x", n=3, temperature=1.0, seed=11,
                                                                     max_tokens=16).choices]
    assert n3.choices[1].text == complete(client, "x", temperature=1.0, seed=12, max_tokens=16).choices[0].text
    if all(c.finish_reason == "length" for c in n3.choices):
        assert n3.usage.completion_tokens == 3 * 16
    assert n3.usage.prompt_tokens == len(server.tokenizer.encode("x"))  # the prompt counts once


def test_logprobs_are_the_sampled_tokens(client, server):
    out = complete(client, temperature=1.0, seed=5, max_tokens=6, logprobs=0).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6 and all(x < 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, temperature=0)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


def test_stop_strings_cut_the_text(client):
    free = complete(client, temperature=1.0, seed=21, max_tokens=40).choices[0].text
    k = next(i for i in range(4, len(free) - 2) if "\ufffd" not in free[i:i + 2])
    stop = free[k:k + 2]
    cut = complete(client, temperature=1.0, seed=21, max_tokens=40, stop=[stop, "never-there"]).choices[0]
    assert (cut.text, cut.finish_reason) == (free[:free.index(stop)], "stop")
    assert stream_text(client, temperature=1.0, seed=21, max_tokens=40, stop=stop) == (cut.text, "stop")


def test_seeds_reproduce_and_differ(client):
    a, b = (complete(client, temperature=1.0, seed=1, max_tokens=24).choices[0].text for _ in range(2))
    c = complete(client, temperature=1.0, seed=2, max_tokens=24).choices[0].text
    assert a == b and a != c
    # 64-bit seeds work, n past the largest one wraps around; a vanishing temperature is greedy, not NaN
    assert len(complete(client, n=2, temperature=1.0, seed=2**63 - 1, max_tokens=4).choices) == 2
    greedy = complete(client, temperature=0, max_tokens=12).choices[0].text
    assert complete(client, temperature=1e-40, max_tokens=12).choices[0].text == greedy


def test_chat_completions(client, server):
    from workbench.data.chat import ChatTemplate

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does fifo do?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    template = ChatTemplate(server.tokenizer)
    prompt = template.prompt_ids(messages)
    assert out.usage.prompt_tokens == len(prompt)
    # the reply is what the engine gives the rendered conversation, ended at the template's stop ids
    from workbench.inference.generator import SamplingParams

    ref = Engine(server.engine.model, server.tokenizer).generate(
        [prompt], SamplingParams(max_new_tokens=20, stop_token_ids=template.stop_ids))[0]
    assert choice.message.content == ref.text and out.usage.completion_tokens == len(ref.tokens)
    # streamed: the role first, then content deltas, then the finish reason; usage on request
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content and reasons == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens
    # text parts and the developer role are read as plain text and a system message
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "What does "}, {"type": "text", "text": "fifo do?"}]}]
    again = client.chat.completions.create(model="tiny", messages=parts, max_tokens=20, temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_concurrent_requests_equal_each_alone(client, server):
    requests = [
        ("text", {"prompt": "def main(", "temperature": 0, "max_tokens": 30}),
        ("text", {"prompt": "import sys\n", "temperature": 1.0, "seed": 4, "max_tokens": 20}),
        ("text", {"prompt": "class A:", "temperature": 0.7, "top_p": 0.9, "seed": 9, "max_tokens": 25, "stream": True}),
        ("chat", {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 16}),
        ("chat", {"messages": [{"role": "user", "content": "why?"}], "temperature": 1.0, "seed": 2, "max_tokens": 18,
                  "stream": True}),
        ("text", {"prompt": "x" * 40, "temperature": 1.0, "seed": 8, "max_tokens": 28, "repetition_penalty": 1.3}),
    ]

    def ask(kind, kw):
        kw = dict(kw)
        stream, extra = kw.pop("stream", False), {}
        for k in ("top_k", "repetition_penalty"):
            if k in kw:
                extra[k] = kw.pop(k)
        create = client.completions.create if kind == "text" else client.chat.completions.create
        out = create(model="tiny", stream=stream, extra_body=extra or None, **kw)
        if not stream:
            c = out.choices[0]
            return c.text if kind == "text" else c.message.content
        return "".join((c.choices[0].text if kind == "text" else c.choices[0].delta.content or "")
                       for c in out if c.choices)

    alone = [ask(*r) for r in requests]
    steps = server.engine.stats["steps"]
    solo_steps = steps
    results: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def worker(i):
        barrier.wait()
        results[i] = ask(*requests[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    batched_steps = server.engine.stats["steps"] - solo_steps
    assert batched_steps < sum(r[1]["max_tokens"] for r in requests)  # they shared steps
    assert server.engine.free_blocks == full_pool(server)


# ------------------------------------------------------------------------------------------------ errors


def test_errors_are_openai_shaped_and_the_server_keeps_serving(client, server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    cases = [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        ({"model": "tiny"}, 400, "prompt", "prompt: required"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "expected a number"),
        ({"prompt": "x", "temperature": 3}, 400, "temperature", "from 0 to 2"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", ">= 0"),
        ({"prompt": "x", "max_tokens": True}, 400, "max_tokens", "an integer"),
        ({"prompt": "x", "n": 0}, 400, "n", "from 1 to 64"),
        ({"prompt": "x", "stop": [""]}, 400, "stop", "non-empty string"),
        ({"prompt": [], "max_tokens": 1}, 400, "prompt", "expected a string"),
        ({"prompt": [1, 99999]}, 400, "prompt", "outside this model's vocabulary (0 to 511)"),
        ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not implemented"),
        ({"prompt": "x", "presence_penalty": -1}, 400, "presence_penalty", "not implemented"),
        ({"prompt": "x", "echo": True}, 400, "echo", "not supported"),
        ({"prompt": "x", "logprobs": 2}, 400, "logprobs", "only 0"),
        ({"prompt": "x", "best_of": 3}, 400, "best_of", "best_of = n"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream: true"),
        ({"prompt": "x", "colour": "blue"}, 400, "colour", "unknown field"),
        ({"prompt": "x", "seed": 2**64}, 400, "seed", "an integer from"),
        ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "from 0.01 to 100"),
        ({"prompt": "x", "top_k": -2}, 400, "top_k", ">= -1"),
        ({"prompt": "x", "model": "gpt-9"}, 404, "model", "not served here"),
        # too long: the numbers are in the message (context 512, cache 256 tokens)
        ({"prompt": "x", "max_tokens": 600}, 400, "max_tokens", "context is 512 tokens, but 602 were asked for "
                                                                "(2 in the prompt, 600 in the completion)"),
        ({"prompt": "x", "max_tokens": 300}, 400, "max_tokens", "KV cache holds 256 tokens, but 302"),
        ({"prompt": [1] * 600}, 400, "prompt", "600 tokens, but this model's context is 512"),
    ]
    for body, status, param, words in cases:
        got_status, got = raw(server, "POST", "/v1/completions", body, conn=conn)
        assert got_status == status, (body, got)
        assert set(got["error"]) == {"message", "type", "param", "code"}
        assert got["error"]["param"] == param and words in got["error"]["message"], (body, got)
        assert raw(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}, conn=conn)[0] == 200
    chat_cases = [
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "role 'robot'"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"messages": [{"role": "user", "content": "a <|end|> b"}]}, "messages", "reserved token"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs", "only 0"),
        # no max_tokens: the rest of the window, but a conversation that fills the KV cache leaves none
        ({"messages": [{"role": "user", "content": "x " * 400}]}, "messages", "tokens, but the KV cache holds 256"),
    ]
    for body, param, words in chat_cases:
        got_status, got = raw(server, "POST", "/v1/chat/completions", body, conn=conn)
        assert got_status == 400 and got["error"]["param"] == param and words in got["error"]["message"], got
    assert raw(server, "GET", "/v1/nowhere")[0] == 404
    status, got = raw(server, "GET", "/v1/completions", conn=conn)
    assert status == 405 and "use POST" in got["error"]["message"]
    assert raw(server, "DELETE", "/v1/models", conn=conn)[0] == 405
    assert raw(server, "GET", "/v1/models/gpt-9", conn=conn)[0] == 404
    with pytest.raises(openai.BadRequestError, match="KV cache holds 256 tokens"):
        complete(client, max_tokens=255)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    assert_serving(client)
    assert server.engine.free_blocks == full_pool(server)


def test_oversized_and_unsized_bodies_are_refused_without_reading_them(client, server):
    for headers, status in ((f"Content-Length: {(1 << 20) + 1}\r\n", 413),
                            ("Transfer-Encoding: chunked\r\n", 411)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n"
                      f"{{\"prompt\": \"".encode())  # the rest of the body is never sent
            reply = b""
            while chunk := s.recv(65536):  # the server answers and closes the connection
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}".encode()) and b"Connection: close" in head
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert "larger than this server's limit of 1048576 bytes" in json.dumps(
        raw(server, "POST", "/v1/completions", b" " * ((1 << 20) + 5))[1])
    assert_serving(client)


# ------------------------------------------------------------------------------------------ disconnects


@pytest.fixture
def slow_model(server):
    """Each forward sleeps 20 ms: a 200-token generation takes seconds, far longer than noticing a dropped client."""
    handle = server.engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    yield
    handle.remove()


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_frees_its_blocks(client, server, slow_model, stream):
    full = full_pool(server)
    assert server.engine.free_blocks == full
    before = dict(server.loop.stats)
    body = json.dumps({"prompt": "def main(", "max_tokens": 200, "temperature": 0, "stream": stream}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    if stream:  # wait until the stream has begun
        got = b""
        while b"data: " not in got:
            got += s.recv(65536)
    assert wait_for(lambda: server.engine.free_blocks < full)  # the request holds blocks
    s.close()
    # aborted, not finished: 200 steps of >= 20 ms would take 4 s, and would count as finished
    assert wait_for(lambda: server.loop.stats["aborted"] == before["aborted"] + 1, timeout=10.0)
    assert wait_for(lambda: server.engine.free_blocks == full, timeout=5.0)
    assert server.loop.stats["finished"] == before["finished"]
    assert not server.engine.has_unfinished()
    assert_serving(client)


def test_a_failing_step_fails_its_requests_with_500_and_serving_goes_on(client, server):
    armed = {"n": 0}

    def explode(*_):
        if armed["n"]:
            armed["n"] -= 1
            raise RuntimeError("planted failure in the forward")

    handle = server.engine.model.register_forward_pre_hook(explode)
    try:
        for stream in (False, True):
            armed["n"] = 1
            with pytest.raises(openai.InternalServerError, match="the engine failed"):
                out = complete(client, max_tokens=8, stream=stream)
                if stream:
                    list(out)
            assert server.engine.free_blocks == full_pool(server)
            assert_serving(client)
    finally:
        handle.remove()
    assert any("planted failure in the forward" in line and "Traceback" in line for line in server.logs)
    assert server.loop.stats["failed_steps"] >= 2


# ----------------------------------------------------------------------------------------- the CLI itself


def make_adapter(run, folder):
    """A LoRA adapter of the run's model with random non-zero B, saved as training saves one."""
    from workbench.checkpoint.run import sha256_file
    from workbench.nn.lora import LoraConfig, inject_lora, lora_modules, save_adapter

    model, _, _ = load_run(run)
    cfg = LoraConfig(r=4, alpha=8.0)
    torch.manual_seed(0)
    inject_lora(model, cfg)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.5)
    return save_adapter(model, folder, cfg, meta={"family": "llama3", "flavor": "debug",
                                                  "tokenizer_sha256": sha256_file(run / "tokenizer.json")})


def test_the_cli_serves_adapters_behind_a_key_and_stops_on_sigterm(run, tmp_path, capsys):
    from workbench.cli import main

    adapter = make_adapter(run, tmp_path / "sql")
    env = dict(os.environ, PYTHONPATH=str(ROOT), WORKBENCH_API_KEY="s3cret")
    log = tmp_path / "stderr.log"  # a file, not a pipe: a full pipe would block the server's logging
    with open(log, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "serve", "--ckpt", str(run), "--port", "0",
                                 "--lora", f"sql={adapter}", "--max-batch", "4", "--num-blocks", "40"],
                                stdout=subprocess.PIPE, stderr=err_file, text=True, cwd=ROOT, env=env)
    try:
        first = []  # the URL line, read in a thread so a server that never prints fails the test instead of hanging
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        line = first[0] if first else ""
        assert line.startswith("serving tiny at http://127.0.0.1:") and line.rstrip().endswith("/v1"), (
            line, log.read_text())
        url = line.split(" at ")[1].strip()
        denied = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            denied.models.list()
        c = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=60)
        models = {m.id: m for m in c.models.list().data}
        assert set(models) == {"tiny", "sql"}
        base = c.completions.create(model="tiny", prompt="def main(", max_tokens=16, temperature=0).choices[0].text
        tuned = c.completions.create(model="sql", prompt="def main(", max_tokens=16, temperature=0).choices[0].text
        # the adapter's requests equal `workbench generate` on the merged adapter
        assert main(["generate", "--ckpt", str(run), "--adapter", str(adapter), "--prompt", "def main(",
                     "--max-new-tokens", "16"]) == 0
        assert tuned == capsys.readouterr().out[:-1] and tuned != base
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = log.read_text()
        assert "shutting down" in err and "Traceback" not in err
        assert "KV cache 624 tokens (39 blocks of 16), max_batch 4, adapters sql" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_the_cli_refuses_bad_settings_and_warns_off_loopback(run, capsys):
    from workbench.cli import main

    for args, words in ((["--port", "70000"], "--port: expected 0 (any free port) to 65535"),
                        (["--lora", "nameless"], "--lora: expected NAME=DIR"),
                        (["--max-batch", "0"], "--max-batch: expected an integer >= 1"),
                        (["--num-blocks", "1"], "--num-blocks: expected an integer >= 2")):
        assert main(["serve", "--ckpt", str(run), *args]) == 2
        assert words in capsys.readouterr().err
    # an address off loopback is warned about before binding (192.0.2.1 is TEST-NET-1: not this machine's, so the
    # bind then fails, naming the address, and nothing is ever exposed)
    assert main(["serve", "--ckpt", str(run), "--host", "192.0.2.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "warning: binding to 192.0.2.1, not a loopback address" in err and "no --api-key" in err
    assert err.strip().splitlines()[-1].startswith("error:")
