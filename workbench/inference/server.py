"""`workbench serve`: an OpenAI-compatible HTTP server over the continuous-batching `Engine`.

What it is
    The endpoints the official `openai` client (and curl) speak, answered by one `Engine`
    (workbench/inference/engine.py): every HTTP request becomes one engine request per choice, and all of
    them, from every client, are batched together step by step.

        server = OpenAIServer(engine, tokenizer, "tiny", port=0).start()   # in a thread; server.url
        ...                                                               # requests from any client
        server.close()
        serve(engine, tokenizer, "tiny", port=8000)                       # the CLI: blocks until Ctrl-C / SIGTERM

Endpoints (paths under /v1; every body and answer is JSON, errors in OpenAI's shape)
    GET  /v1/models              the model (its id: the run folder's or Hugging Face directory's name, or
                                 --model-name) and each served LoRA adapter (with `parent`: the model)
    GET  /v1/models/{id}         one of them
    POST /v1/completions         prompt: a string, a list of strings, a list of token ids or a list of
                                 such lists; max_tokens (default 16), temperature, top_p, stop (a string or
                                 up to 16), seed, n, stream (+ stream_options.include_usage), logprobs (0:
                                 the sampled tokens' log-probs)
    POST /v1/chat/completions    messages ({role: system|developer|user|assistant, content: a string or
                                 text parts}) rendered by the tokenizer's ChatTemplate and ended at its stop
                                 ids; max_tokens / max_completion_tokens (default: the rest of the window),
                                 the sampling fields above, stream (a role delta, content deltas, a
                                 finish_reason chunk), logprobs (true; top_logprobs 0)
    GET  /health                 {"status": "ok"}
    Extensions accepted by both POST endpoints: `top_k` (0 or -1 = off) and `repetition_penalty` (1 = off).
    `model` may name a served adapter: the request runs on it (one forward serves rows of many adapters);
    leaving `model` out means the base model.

Design choices
    The Engine is not thread-safe, so one loop thread (`EngineLoop`) owns it. Handler threads (one per
    connection, http.server.ThreadingHTTPServer) hand it jobs (prompt ids, SamplingParams, adapter) and read
    the outputs from the request's own queue; cancellation goes through the loop too. The loop admits new
    jobs and applies cancellations between steps, steps while the engine has work and sleeps on a condition
    otherwise. A step that raises is logged with its traceback; the requests that were running in it get a
    500 (their cache blocks freed) and the loop goes on serving the rest.
    Everything is validated before it reaches the loop, and a request that cannot fit is refused with the
    numbers (prompt + max_tokens > the engine's max_len, or more tokens than the whole KV cache holds)
    rather than cut short: OpenAI answers an over-long request the same way.
    Standard library HTTP/1.1: keep-alive for JSON answers (Content-Length), chunked transfer encoding for
    server-sent-event streams (`data: {chunk}` lines, then `data: [DONE]`), which httpx (the openai
    client's transport) reads as it comes. A stream's headers wait for its first tokens, so an error found
    by the loop (a failed step) is still an HTTP status; a failure after that is sent as an `error` event,
    which the openai client raises as APIError.
    A client that goes away is noticed while its request waits (the socket is polled for EOF with select
    and a peeked recv every 50 ms) and when a stream write fails; its requests are aborted at once, so their
    cache blocks return to the pool. A client that half-closes its socket after sending (shutdown(SHUT_WR))
    therefore counts as gone, as in uvicorn.
    Choices: n samples of each prompt are n engine requests (index = prompt * n + sample); with a seed,
    sample j uses seed + j, so the choices differ yet a repeated request returns the same ones.
    One request's sampling settings must not break a step that other requests share: a temperature below
    1e-5 is greedy (as in vLLM), the repetition penalty is bounded to [0.01, 100] and seeds to 64 bits, so no
    row's logits become inf or NaN from its settings alone (`SamplingParams.validate` holds the same ranges
    for the engine's other callers). If a step fails anyway, the engine aborts that step's requests
    (`StepError.request_ids`), their HTTP requests get a 500, and every other request goes on.

Errors ({"error": {"message", "type", "param", "code"}}; the connection stays usable unless said)
    400 bad JSON, a missing or invalid field (named in `message` and `param`), an unknown field, a request
        too long for the model or the cache (with the numbers), a field this server does not implement
        (named: frequency_penalty / presence_penalty other than 0, echo, suffix, best_of > n, logit_bias,
        logprobs > 0, top_logprobs > 0, tools, response_format other than text)
    401 a wrong or missing bearer token when the server has an API key
    404 an unknown path, or a `model` that is neither the model nor a served adapter (code model_not_found)
    405 a known path with the wrong method (an `Allow` header names the right one)
    411 a POST without Content-Length (chunked request bodies are not read); the connection is closed
    413 a body larger than `max_body_bytes` (1 MiB by default), refused from its Content-Length without
        reading it; the connection is closed
    500 a step of the engine failed (logged with its traceback)
    503 the server is shutting down

Limits
    Up to 64 choices per request (prompts x n), 16 stop strings. Log-probs are of the model's unmodified
    distribution (temperature 1, before top-k / top-p / the repetition penalty), as `Completion.logprobs`;
    no top alternatives are computed. Usage counts each prompt once and every generated token, the stop
    token included. No tool calls, no response formats, no embeddings, no prompt caching across requests.

Security defaults
    Binds 127.0.0.1: only this machine can connect. Another --host is honoured with a warning, since the
    server has no TLS and no authentication unless --api-key (or WORKBENCH_API_KEY) is set, in which case
    every request needs `Authorization: Bearer KEY` (compared in constant time). Bodies are capped (413), the
    choices and stop strings of one request are capped, idle keep-alive connections close after 5 minutes.
    Tracebacks go to the server's log, never to a client.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import queue
import select
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from workbench.errors import WorkbenchError
from workbench.inference.engine import Engine, RequestOutput, StepError
from workbench.inference.generator import MIN_TEMPERATURE, Completion, SamplingParams

DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 64  # prompts x n in one request
MAX_STOP = 16
POLL_S = 0.05  # how often a waiting handler checks that its client is still there
IDLE_TIMEOUT_S = 300  # a keep-alive connection with no request for this long is closed
LINGER_S, LINGER_BYTES = 2.0, 4 << 20  # what is read and dropped of a refused body before closing
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _ClientGone(Exception):
    """The client closed its connection."""


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None
    stream_text: bool = False


@dataclass
class Event:
    """What the loop hands a ticket: an output of job `index` (with the log-probs of its new tokens), or an error."""

    index: int
    output: RequestOutput | None = None
    logprobs: list[float] = field(default_factory=list)
    error: ApiError | None = None


class Ticket:
    """One HTTP request's jobs; their events arrive, in order per job, on one queue."""

    def __init__(self, jobs: Sequence[Job]):
        self.jobs = list(jobs)
        self.events: queue.Queue[Event] = queue.Queue()
        self.cancelled = False
        self.done = False  # every job finished and was read: nothing to cancel


class EngineLoop:
    """The thread that owns an Engine: admits jobs, applies cancellations, steps, routes outputs (module notes)."""

    def __init__(self, engine: Engine, log: Callable[[str], None] | None = None):
        self.engine = engine
        self.log = log or (lambda _msg: None)
        self._cv = threading.Condition()
        self._submitted: list[Ticket] = []
        self._cancelled: list[Ticket] = []
        self._owner: dict[int, tuple[Ticket, int]] = {}  # engine request id -> (ticket, job index)
        self._stopping = False
        self.stats = {"requests": 0, "finished": 0, "aborted": 0, "failed_steps": 0}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, fail what is left with 503, and end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, jobs: Sequence[Job]) -> Ticket:
        ticket = Ticket(jobs)
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down")
            self._submitted.append(ticket)
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Abort every unfinished job of `ticket` (its blocks go back to the pool); a no-op when all finished."""
        with self._cv:
            if ticket.cancelled or ticket.done:
                return
            ticket.cancelled = True
            self._cancelled.append(ticket)
            self._cv.notify()

    # ------------------------------------------------------------------------------------------- thread

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._submitted or self._cancelled or self._stopping or self.engine.has_unfinished()):
                    self._cv.wait()
                submitted, self._submitted = self._submitted, []
                cancelled, self._cancelled = self._cancelled, []
                stopping = self._stopping
            try:
                for t in cancelled:
                    self._abort(t)
                if stopping:
                    for t in submitted:
                        self._fail(t, range(len(t.jobs)), ApiError(503, "the server is shutting down"))
                    for t in {t for t, _ in self._owner.values()}:
                        self._abort(t, ApiError(503, "the server is shutting down"))
                    return
                for t in submitted:
                    self._admit(t)
                if self.engine.has_unfinished():
                    self._step()
            except Exception:  # a bug in the loop itself: log it, fail everything, keep serving
                self.log("engine loop error:\n" + traceback.format_exc())
                for t in {t for t, _ in self._owner.values()}:
                    self._abort(t, ApiError(500, "internal error in the engine loop (see the server log)"))

    def _admit(self, ticket: Ticket) -> None:
        if ticket.cancelled:
            return
        for i, job in enumerate(ticket.jobs):
            if job.params.max_new_tokens == 0:  # nothing to generate (the engine would finish it unseen)
                c = Completion(prompt_tokens=list(job.prompt), finish_reason="length", text="")
                ticket.events.put(Event(i, RequestOutput(-1, [], "", True, c)))
                continue
            try:
                rid = self.engine.add_request(job.prompt, job.params, adapter=job.adapter, stream_text=job.stream_text)
            except Exception as e:  # validated before, so rare: refuse the whole request, and only it
                self._abort(ticket)
                if isinstance(e, (ValueError, WorkbenchError)):
                    self._fail(ticket, [i], ApiError(400, f"{e}"))
                else:
                    self.log("engine.add_request failed:\n" + traceback.format_exc())
                    self._fail(ticket, [i], ApiError(500, "the engine could not take this request (see the server log)"))
                return
            self.stats["requests"] += 1
            self._owner[rid] = (ticket, i)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            self.stats["failed_steps"] += 1
            self.log("engine step failed; failing the requests it ran:\n" + traceback.format_exc())
            # a failed forward or sampling names its requests (the engine aborted them, the rest are intact);
            # anything else (the scheduler itself) leaves no request it can vouch for
            affected = [rid for rid in e.request_ids if rid in self._owner] if isinstance(e, StepError) \
                else list(self._owner)
            for ticket in {self._owner[rid][0] for rid in affected}:  # the whole HTTP request fails
                self._abort(ticket, ApiError(500, "the engine failed while generating this request "
                                                  "(the server log has the traceback); other requests go on"))
            return
        for out in outputs:
            owner = self._owner.get(out.request_id)
            if owner is None:
                continue
            ticket, i = owner
            n = len(out.new_tokens)
            ticket.events.put(Event(i, out, out.completion.logprobs[len(out.completion.logprobs) - n:]))
            if out.finished:
                del self._owner[out.request_id]
                self.stats["finished"] += 1

    def _abort(self, ticket: Ticket, error: ApiError | None = None) -> None:
        """Abort `ticket`'s live requests; with `error`, tell the ticket why."""
        for rid, (t, i) in list(self._owner.items()):
            if t is ticket:
                del self._owner[rid]
                self.engine.abort(rid)
                self.stats["aborted"] += 1
                if error is not None:
                    ticket.events.put(Event(i, error=error))

    @staticmethod
    def _fail(ticket: Ticket, indices, error: ApiError) -> None:
        for i in indices:
            ticket.events.put(Event(i, error=error))


# -------------------------------------------------------------------------------------- request parsing


_MISSING = object()


def _field(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"{name}: expected {what}, got {json.dumps(value)[:80]}", name)
    return value


def _int(body: dict, name: str, default, low: int | None = None, high: int | None = None):
    value = _field(body, name, (int,), default, "an integer")
    if value is None:
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"from {low} to {high}"
        raise ApiError(400, f"{name}: expected an integer {rng}, got {value}", name)
    return value


def _number(body: dict, name: str, default: float, check: Callable[[float], bool], what: str) -> float:
    value = float(_field(body, name, (int, float), default, "a number"))
    if not check(value):
        raise ApiError(400, f"{name}: expected {what}, got {value:g}", name)
    return value


def _unknown_fields(body: dict, known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown field (this endpoint reads {', '.join(sorted(known))})",
                       unknown[0], "unknown_field")


def _refuse(body: dict, name: str, allowed: Callable[[object], bool], why: str) -> None:
    if name in body and body[name] is not None and not allowed(body[name]):
        raise ApiError(400, f"{name}: {why}", name, "unsupported")


SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                   "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "top_k",
                   "repetition_penalty"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                 "parallel_tool_calls", "response_format", "store", "metadata", "service_tier"}


@dataclass
class Plan:
    """A parsed POST: the jobs to run and how to answer."""

    kind: str  # "text" | "chat"
    model: str
    jobs: list[Job]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    logprobs: bool
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = f"{'cmpl' if self.kind == 'text' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())


class OpenAIServer:
    """The HTTP front of an Engine (module notes). `start()` serves in a thread; `serve_forever()` in this one."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, *, host: str = "127.0.0.1", port: int = 0,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_key: str | None = None,
                 log: Callable[[str], None] | None = None, access_log: bool = False):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: expected a size >= 1, got {max_body_bytes}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapter_names = list(engine.adapters.names) if engine.adapters is not None else []
        if model_name in self.adapter_names:
            raise ValueError(f"model name {model_name!r} is also an adapter's name; give the adapter another name")
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key or None
        self.log = log or (lambda _msg: None)
        self.access_log = access_log
        self.created = int(time.time())
        cfg = getattr(engine.model, "cfg", None)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or tokenizer.vocab_size)
        try:
            from workbench.data.chat import ChatTemplate

            self.template, self.no_chat = ChatTemplate(tokenizer), None
        except WorkbenchError as e:
            self.template, self.no_chat = None, str(e)
        self.loop = EngineLoop(engine, self.log)
        server_cls = _Server6 if ":" in host else _Server
        self.httpd = server_cls((host, port), _Handler)
        self.httpd.app = self
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> OpenAIServer:
        """Serve from a background thread (tests, notebooks); `close()` ends it."""
        self.loop.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.loop.start()
        self.httpd.serve_forever(poll_interval=0.2)

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.loop.stop()
        self.httpd.server_close()

    # ---------------------------------------------------------------------------------------- routes

    def models(self) -> list[dict]:
        base = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "workbench",
                "max_model_len": self.engine.max_len}
        return [base] + [{"id": n, "object": "model", "created": self.created, "owned_by": "workbench",
                          "parent": self.model_name, "max_model_len": self.engine.max_len} for n in self.adapter_names]

    def check_auth(self, header: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key")

    def _adapter(self, body: dict) -> tuple[str, str | None]:
        name = _field(body, "model", (str,), self.model_name, "a model id string")
        if name == self.model_name:
            return name, None
        if name in self.adapter_names:
            return name, name
        served = ", ".join(repr(m) for m in [self.model_name, *self.adapter_names])
        raise ApiError(404, f"model: {name!r} is not served here (served: {served})", "model", "model_not_found")

    def _sampling(self, body: dict) -> dict:
        """The SamplingParams fields common to both endpoints, checked, plus refusals of what is not implemented."""
        for name in ("frequency_penalty", "presence_penalty"):
            _number(body, name, 0.0, lambda v: v == 0, "0 (not implemented here; `repetition_penalty` is an "
                                                       "extension field that penalizes repeats)")
        _refuse(body, "logit_bias", lambda v: v == {}, "not supported by this server")
        temperature = _number(body, "temperature", 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2 (0 = greedy)")
        if temperature < MIN_TEMPERATURE:  # greedy (SamplingParams.greedy), reported as 0
            temperature = 0.0
        top_p = _number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        top_k = _int(body, "top_k", 0, -1)
        rp = _number(body, "repetition_penalty", 1.0, lambda v: 0.01 <= v <= 100, "a number from 0.01 to 100 (1 = off)")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop: expected a non-empty string or a list of them", "stop")
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
        seed = _int(body, "seed", None, -(2**63), 2**63 - 1)  # a 64-bit integer, as torch.Generator takes
        return {"temperature": temperature, "top_p": top_p, "top_k": max(top_k, 0), "repetition_penalty": rp,
                "stop": stop, "seed": seed}

    def _stream(self, body: dict) -> tuple[bool, bool]:
        stream = _field(body, "stream", (bool,), False, "true or false")
        opts = _field(body, "stream_options", (dict,), {}, "an object")
        if opts and not stream:
            raise ApiError(400, "stream_options: only allowed with stream: true", "stream_options")
        if set(opts) - {"include_usage"}:
            raise ApiError(400, "stream_options: only include_usage is supported", "stream_options")
        return stream, _field(opts, "include_usage", (bool,), False, "true or false")

    def _budget(self, prompt: list[int], max_tokens: int | None, param: str, where: str) -> int:
        """max_tokens checked against the engine (None: the rest of the window); errors carry the numbers."""
        limit, cap, P = self.engine.max_len, self.engine.capacity_tokens, len(prompt)
        if P >= limit:
            raise ApiError(400, f"{where}: {P} tokens, but this model's context is {limit} tokens "
                                f"(prompt and completion together)", "messages" if where == "messages" else "prompt",
                           "context_length_exceeded")
        if max_tokens is None:
            if P >= cap:
                raise ApiError(400, f"{where}: {P} tokens, but the KV cache holds {cap} (prompt and completion "
                                    f"together); shorten it or start the server with more --num-blocks",
                               "messages" if where == "messages" else "prompt", "context_length_exceeded")
            return min(limit, cap) - P
        if P + max_tokens > limit:
            raise ApiError(400, f"{param}: this model's context is {limit} tokens, but {P + max_tokens} were asked "
                                f"for ({P} in the {where}, {max_tokens} in the completion); ask for at most "
                                f"{limit - P}", param, "context_length_exceeded")
        if P + max_tokens > cap:
            raise ApiError(400, f"{param}: the KV cache holds {cap} tokens, but {P + max_tokens} were asked for "
                                f"({P} in the {where}, {max_tokens} in the completion); ask for at most "
                                f"{max(cap - P, 0)} (or start the server with more --num-blocks)", param,
                           "context_length_exceeded")
        return max_tokens

    def _choices(self, body: dict, prompts: int) -> int:
        n = _int(body, "n", 1, 1, MAX_CHOICES)
        if prompts * n > MAX_CHOICES:
            raise ApiError(400, f"n: {prompts} prompts x n {n} = {prompts * n} choices; at most {MAX_CHOICES} "
                                f"per request", "n")
        return n

    def plan_completion(self, body: dict) -> Plan:
        _unknown_fields(body, COMPLETION_FIELDS)
        model, adapter = self._adapter(body)
        if "prompt" not in body:
            raise ApiError(400, "prompt: required (a string, a list of strings, token ids or lists of token ids)",
                           "prompt")
        prompts = self._prompts(body["prompt"])
        _refuse(body, "echo", lambda v: v is False, "not supported by this server (it returns only the completion)")
        _refuse(body, "suffix", lambda v: v == "", "not supported by this server (no insertion)")
        sampling = self._sampling(body)
        n = self._choices(body, len(prompts))
        _refuse(body, "best_of", lambda v: v == n, "only best_of = n is supported (no server-side ranking)")
        logprobs = _int(body, "logprobs", None, 0, 5)
        if logprobs:
            raise ApiError(400, "logprobs: only 0 is supported (the sampled tokens' log-probs; no top alternatives "
                                "are computed)", "logprobs", "unsupported")
        max_tokens = _int(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, 0)
        stream, include_usage = self._stream(body)
        jobs = []
        for p in prompts:
            budget = self._budget(p, max_tokens, "max_tokens", "prompt")
            jobs += self._jobs(p, sampling, budget, n, adapter, stream, [])
        return Plan("text", model, jobs, sum(len(p) for p in prompts), stream, include_usage, logprobs is not None)

    def plan_chat(self, body: dict) -> Plan:
        _unknown_fields(body, CHAT_FIELDS)
        model, adapter = self._adapter(body)
        if self.template is None:
            raise ApiError(400, f"this model has no chat template: {self.no_chat}; use /v1/completions", "messages")
        if "messages" not in body:
            raise ApiError(400, "messages: required (a list of {role, content} objects)", "messages")
        messages = self._messages(body["messages"])
        _refuse(body, "tools", lambda v: v == [], "tool calls are not supported by this server")
        _refuse(body, "tool_choice", lambda v: v == "none", "tool calls are not supported by this server")
        _refuse(body, "response_format", lambda v: v == {"type": "text"}, "only {\"type\": \"text\"} is supported")
        sampling = self._sampling(body)
        n = self._choices(body, 1)
        logprobs = _field(body, "logprobs", (bool,), False, "true or false")
        if _int(body, "top_logprobs", 0, 0, 20):
            raise ApiError(400, "top_logprobs: only 0 is supported (no top alternatives are computed)",
                           "top_logprobs", "unsupported")
        max_tokens = _int(body, "max_tokens", None, 0)
        if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
            if max_tokens is not None:
                raise ApiError(400, "max_completion_tokens: give it or max_tokens, not both", "max_completion_tokens")
            max_tokens = _int(body, "max_completion_tokens", None, 0)
        stream, include_usage = self._stream(body)
        try:
            prompt = self.template.prompt_ids(messages)
        except WorkbenchError as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        budget = self._budget(prompt, max_tokens, "max_tokens", "messages")
        jobs = self._jobs(prompt, sampling, budget, n, adapter, stream, self.template.stop_ids)
        return Plan("chat", model, jobs, len(prompt), stream, include_usage, logprobs)

    @staticmethod
    def _jobs(prompt, sampling, budget, n, adapter, stream, stop_ids) -> list[Job]:
        jobs = []
        for j in range(n):
            seed = None if sampling["seed"] is None else (sampling["seed"] + j + 2**63) % 2**64 - 2**63  # stays int64
            params = SamplingParams(max_new_tokens=budget, temperature=sampling["temperature"], top_k=sampling["top_k"],
                                    top_p=sampling["top_p"], repetition_penalty=sampling["repetition_penalty"],
                                    stop=list(sampling["stop"]), stop_token_ids=list(stop_ids), seed=seed)
            jobs.append(Job(list(prompt), params, adapter, stream))
        return jobs

    def _prompts(self, prompt) -> list[list[int]]:
        what = "a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(prompt, str):
            texts: list = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
            texts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, list) and t and all(_is_id(i) for i in t)
                                                         for t in prompt):
            texts = prompt
        else:
            raise ApiError(400, f"prompt: expected {what} (none of them empty)", "prompt")
        if len(texts) > MAX_CHOICES:
            raise ApiError(400, f"prompt: {len(texts)} prompts; at most {MAX_CHOICES} per request", "prompt")
        out = []
        for t in texts:
            if isinstance(t, str):
                ids = self.tokenizer.encode(t)
                if not ids:
                    raise ApiError(400, "prompt: an empty prompt encodes to no tokens (this tokenizer adds no bos)",
                                   "prompt")
            else:
                bad = next((i for i in t if not 0 <= i < self.vocab_size), None)
                if bad is not None:
                    raise ApiError(400, f"prompt: token id {bad} is outside this model's vocabulary "
                                        f"(0 to {self.vocab_size - 1})", "prompt")
                ids = list(t)
            out.append(ids)
        return out

    @staticmethod
    def _messages(messages) -> list[dict]:
        from workbench.data.chat import check_messages

        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: expected a non-empty list of {role, content} objects", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}]: expected an object with role and content", "messages")
            extra = sorted(set(m) - {"role", "content", "name"})
            if extra:
                raise ApiError(400, f"messages[{i}].{extra[0]}: not supported by this server (role and content only)",
                               "messages")
            role, content = m.get("role"), m.get("content")
            role = "system" if role == "developer" else role
            if isinstance(content, list):  # text parts
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts ({{type: text, text}}) are supported",
                                   "messages")
                content = "".join(p["text"] for p in content)
            out.append({"role": role, "content": content})
        try:
            check_messages(out, "messages")
        except WorkbenchError as e:
            raise ApiError(400, str(e), "messages") from None
        return out


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: OpenAIServer


class _Server6(_Server):
    address_family = socket.AF_INET6


# ------------------------------------------------------------------------------------------------ HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "workbench-serve"
    timeout = IDLE_TIMEOUT_S
    disable_nagle_algorithm = True  # TCP_NODELAY: the body after the headers, and each stream event, go out at
    server: _Server                 # once (Nagle + a delayed ACK held each answer's second write ~40 ms)

    ROUTES = {"/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST", "/health": "GET"}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self):  # noqa: N802
        self._dispatch("PATCH")

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        app = self.server.app
        if app.access_log:
            app.log(f"{self.address_string()} {format % args}")

    # ------------------------------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        self._sent, self._polled = False, time.monotonic()
        try:
            if method in ("POST", "PUT", "PATCH"):
                body = self._read_body()
            else:  # a body we do not read would be taken for the next request: close after answering
                body = b""
                if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
                    self.close_connection = True
            path = unquote(urlsplit(self.path).path).rstrip("/") or "/"
            model = path[len("/v1/models/"):] if path.startswith("/v1/models/") else None
            allowed = "GET" if model is not None else self.ROUTES.get(path)
            if allowed is None:
                raise ApiError(404, f"unknown path {method} {path} (this server has GET /v1/models, POST "
                                    f"/v1/completions, POST /v1/chat/completions, GET /health)", code="unknown_url")
            if method != allowed:
                self._allow = allowed
                raise ApiError(405, f"{method} {path}: method not allowed (use {allowed})", code="method_not_allowed")
            if path != "/health":
                app.check_auth(self.headers.get("Authorization"))
            if model is not None:
                found = next((m for m in app.models() if m["id"] == model), None)
                if found is None:
                    raise ApiError(404, f"model {model!r} is not served here", "model", "model_not_found")
                return self._json(200, found)
            if path == "/health":
                return self._json(200, {"status": "ok"})
            if path == "/v1/models":
                return self._json(200, {"object": "list", "data": app.models()})
            data = self._parse(body)
            plan = app.plan_completion(data) if path == "/v1/completions" else app.plan_chat(data)
            self._generate(plan)
        except ApiError as e:
            self._error(e)
            if e.status in (411, 413):
                self._linger()
        except _ClientGone:
            self.close_connection = True
        except Exception:
            app.log(f"error serving {method} {self.path}:\n{traceback.format_exc()}")
            self._error(ApiError(500, "internal server error (the server log has the traceback)"))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
            self.close_connection = True
            raise ApiError(411, "a request body needs a Content-Length header (chunked request bodies are not read)")
        try:
            n = int(self.headers["Content-Length"])
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"Content-Length: not a size: {self.headers['Content-Length']!r}") from None
        limit = self.server.app.max_body_bytes
        if n > limit:
            self.close_connection = True  # the body stays unread: this connection cannot carry another request
            raise ApiError(413, f"request body of {n} bytes is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
        body = self.rfile.read(n)
        if len(body) < n:
            raise _ClientGone
        return body

    @staticmethod
    def _parse(body: bytes) -> dict:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        return data

    def _headers(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._sent = True

    def _json(self, status: int, obj: dict, extra: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self._headers(status, {"Content-Type": "application/json", "Content-Length": str(len(data)), **(extra or {})})
        self._write(data)

    def _error(self, e: ApiError) -> None:
        if self._sent:  # a stream already answered 200: the error goes in the stream (see _generate)
            self.close_connection = True
            return
        extra = {"Allow": self._allow} if e.status == 405 else {}
        if e.status == 401:
            extra["WWW-Authenticate"] = "Bearer"
        try:
            self._json(e.status, e.body(), extra)
        except _ClientGone:
            self.close_connection = True

    def _linger(self) -> None:
        """After refusing an unread body: end our side, then read and drop what the client still sends (up to
        LINGER_BYTES, LINGER_S), so that closing does not reset the connection before it has read the answer."""
        sock, got, end = self.connection, 0, time.monotonic() + LINGER_S
        try:
            sock.shutdown(socket.SHUT_WR)
            while got < LINGER_BYTES and (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    break
                got += len(data)
        except OSError:
            pass

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (OSError, ValueError):  # BrokenPipe, ConnectionReset, a timeout, a closed file
            raise _ClientGone from None

    def _chunk(self, data: bytes) -> None:
        self._write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, obj) -> None:
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _client_gone(self) -> bool:
        """Whether the client closed its end (EOF or a reset on the socket); data it sent ahead is not EOF."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _next(self, ticket: Ticket) -> Event:
        """The ticket's next event; checks every POLL_S that the client is still there (events may never pause)."""
        while True:
            now = time.monotonic()
            if now - self._polled >= POLL_S:
                self._polled = now
                if self._client_gone():
                    raise _ClientGone
            try:
                return ticket.events.get(timeout=POLL_S)
            except queue.Empty:
                pass

    # ---------------------------------------------------------------------------------------- generation

    def _generate(self, plan: Plan) -> None:
        app = self.server.app
        ticket = app.loop.submit(plan.jobs)
        try:
            if plan.stream:
                self._stream(plan, ticket)
            else:
                self._complete(plan, ticket)
        finally:
            app.loop.cancel(ticket)  # aborts whatever is unfinished (a client gone, an error); else a no-op

    def _complete(self, plan: Plan, ticket: Ticket) -> None:
        finals: list = [None] * len(plan.jobs)
        left = len(plan.jobs)
        while left:
            ev = self._next(ticket)
            if ev.error is not None:
                raise ev.error
            if ev.output.finished:
                finals[ev.index] = ev.output.completion
                left -= 1
        ticket.done = True
        tok = self.server.app.tokenizer
        choices = []
        for i, c in enumerate(finals):
            text = c.text or ""
            if plan.kind == "text":
                lp = _text_logprobs(tok, c.tokens, c.logprobs, 0) if plan.logprobs else None
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                lp = {"content": _chat_logprobs(tok, c.tokens, c.logprobs)} if plan.logprobs else None
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        generated = sum(len(c.tokens) for c in finals)
        self._json(200, {**_head(plan), "choices": choices, "usage": _usage(plan, generated)})

    def _stream(self, plan: Plan, ticket: Ticket) -> None:
        first = self._next(ticket)  # headers wait for it, so an error of the loop is still a status
        if first.error is not None:
            raise first.error
        self._headers(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                            "Transfer-Encoding": "chunked"})
        head = _head(plan, chunk=True)
        tok = self.server.app.tokenizer
        if plan.kind == "chat":  # the role first, once per choice
            for i in range(len(plan.jobs)):
                self._event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
        left, generated, offsets = len(plan.jobs), 0, [0] * len(plan.jobs)
        ev = first
        try:
            while True:
                if ev.error is not None:
                    raise ev.error
                out = ev.output
                generated += len(out.new_tokens)
                reason = out.completion.finish_reason if out.finished else None
                if plan.kind == "text":
                    lp = None
                    if plan.logprobs:
                        lp = _text_logprobs(tok, out.new_tokens, ev.logprobs, offsets[ev.index])
                        offsets[ev.index] += sum(len(t) for t in lp["tokens"])
                    choice = {"index": ev.index, "text": out.new_text, "logprobs": lp, "finish_reason": reason}
                    if out.new_text or lp or reason:
                        self._event({**head, "choices": [choice]})
                else:
                    lp = {"content": _chat_logprobs(tok, out.new_tokens, ev.logprobs)} if plan.logprobs else None
                    if out.new_text or lp:
                        self._event({**head, "choices": [{"index": ev.index, "delta": {"content": out.new_text},
                                                          "logprobs": lp, "finish_reason": None}]})
                    if reason:
                        self._event({**head, "choices": [{"index": ev.index, "delta": {}, "logprobs": None,
                                                          "finish_reason": reason}]})
                if out.finished:
                    left -= 1
                    if not left:
                        ticket.done = True
                        break
                ev = self._next(ticket)
        except ApiError as e:  # after the 200: tell the client in the stream, then end it
            self.server.app.log(f"stream ended by an error: {e.message}")
            self._event(e.body())
            self._chunk(b"")
            self.close_connection = True
            return
        if plan.include_usage:
            self._event({**head, "choices": [], "usage": _usage(plan, generated)})
        self._event(b"[DONE]")
        self._chunk(b"")


def _head(plan: Plan, chunk: bool = False) -> dict:
    obj = "text_completion" if plan.kind == "text" else "chat.completion.chunk" if chunk else "chat.completion"
    return {"id": plan.id, "object": obj, "created": plan.created, "model": plan.model}


def _usage(plan: Plan, generated: int) -> dict:
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": generated,
            "total_tokens": plan.prompt_tokens + generated}


def _token_text(tokenizer, t: int) -> str:
    return tokenizer.decode([t], skip_special_tokens=False)


def _text_logprobs(tokenizer, tokens: Sequence[int], logprobs: Sequence[float], offset: int) -> dict:
    texts = [_token_text(tokenizer, t) for t in tokens]
    offsets = []
    for s in texts:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}


def _chat_logprobs(tokenizer, tokens: Sequence[int], logprobs: Sequence[float]) -> list[dict]:
    out = []
    for t, lp in zip(tokens, logprobs):
        s = _token_text(tokenizer, t)
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []})
    return out


# ------------------------------------------------------------------------------------------------ entry


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(engine: Engine, tokenizer, model_name: str, *, host: str = "127.0.0.1", port: int = 0,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_key: str | None = None,
          log: Callable[[str], None] = print, announce: Callable[[str], None] = print) -> int:
    """Serve until Ctrl-C or SIGTERM (both shut down cleanly: in-flight requests get 503); returns 0.
    `announce` gets the line naming the URL (the CLI prints it on stdout for scripts to read)."""
    if not is_loopback(host):
        log(f"warning: binding to {host}, not a loopback address: anyone who can reach this machine can use the "
            f"model{'' if api_key else ' (no --api-key is set)'}, and traffic is not encrypted")
    server = OpenAIServer(engine, tokenizer, model_name, host=host, port=port, max_body_bytes=max_body_bytes,
                          api_key=api_key, log=log, access_log=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        announce(f"serving {model_name} at {server.url}")
        server.serve_forever()
    except KeyboardInterrupt:
        log("shutting down")
    finally:
        server.loop.stop()
        server.httpd.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
