"""
An OpenAI-compatible completion server for a trained GPT, and a small web page to try the model in a browser.

    pip install -r requirements-serve.txt             # FastAPI and uvicorn: optional extras
    python serve.py --out_dir=out/fineweb-40m          # then open http://127.0.0.1:8000
    curl -s http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
        -d '{"prompt": "The meaning of life is", "max_tokens": 40, "temperature": 0.8, "top_k": 200, "seed": 7}'

Endpoints: POST /v1/completions (OpenAI's completions API: prompt, max_tokens, temperature, top_p, top_k, stop,
seed, n, stream), GET /v1/models, GET /health and GET / (the page, serve.html: no CDN, works offline).
Generation is generation.py's, as in sample.py: the same prompt, seed and settings give the same text. The one
model runs one request at a time, in arrival order, on one worker thread (no two requests share a KV cache);
at most --queue_size requests wait or run, more get 429. A client that disconnects stops its generation. Bad
requests get 400 with OpenAI's error format; a body over the size limit 413, even when it is sent in chunks of
unknown total length; a request not received whole within --request_timeout seconds 408. Reference:
docs/serve.md. `python serve.py --help` lists every option.
"""
import asyncio
import errno
import functools
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from smallgpt.checkpoint import check_which
from smallgpt.config import parse_args
from smallgpt.device import autocast
from smallgpt.errors import ConfigError, DataError, run_main
from smallgpt.chat import check_messages
from smallgpt.generation import (Sampling, chat_tokens, completion_vocab, encode_prompt, open_for_generation,
                                 stream_tokens, text_stream)

try:
    import h11
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:  # optional extras: as a script, say so in one line
    if __name__ != "__main__":
        raise
    sys.exit(f"serve.py: error: {e.name} is missing; the server's extras: pip install -r requirements-serve.txt")

PAGE = Path(__file__).with_name("serve.html")


@dataclass
class ServeConfig:
    out_dir: str = "out"  # a training run's directory (best.pt, last.pt or nanoGPT's ckpt.pt) or a checkpoint file
    which: str = "best"  # 'best' | 'last': the checkpoint to read from out_dir (falls back to the other)
    device: str = "auto"  # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
    dtype: str = "auto"  # 'auto' (bfloat16 / float16 on GPUs, float32 on CPU) | 'float32' | 'bfloat16' | 'float16'
    compile: bool = False  # torch.compile the trunk: same tokens, faster steps, but tens of seconds of compiling first
    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 = every network interface (there is no authentication)
    port: int = 8000  # TCP port to listen on
    max_tokens: int = 1024  # the most new tokens a request may ask for, per choice
    max_n: int = 8  # the most choices (samples) a request may ask for
    max_prompt_chars: int = 100_000  # longer prompts are refused (400); prompts are cropped to block_size tokens
    queue_size: int = 16  # requests running or waiting at once; more are refused with 429 (try again later)
    request_timeout: float = 30.0  # seconds a client has to send a whole request (headers and body), else 408


def validate(cfg):
    check_which(cfg.which)
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be one of auto, float32, bfloat16, float16, not {cfg.dtype!r}")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"port must be in 1..65535, not {cfg.port}")
    for key in ("max_tokens", "max_n", "max_prompt_chars", "queue_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, not {getattr(cfg, key)}")
    if not 0 < cfg.request_timeout < float("inf"):
        raise ConfigError(f"request_timeout must be a positive number of seconds, not {cfg.request_timeout}")
    return cfg


def body_limit(cfg):
    """The largest request body accepted, in bytes: the longest prompt at 4 UTF-8 bytes (or JSON escapes) per
    character, plus room for the other fields."""
    return 4 * cfg.max_prompt_chars + 65536


# -----------------------------------------------------------------------------
# Requests: OpenAI's completion parameters, checked strictly (a string where a number belongs is an error)

class SamplingRequest(BaseModel):
    """What completions and chat completions share."""
    model_config = ConfigDict(extra="forbid", strict=True)
    max_tokens: int = Field(16, ge=0)  # OpenAI's defaults: 16 tokens, temperature 1, no top-p
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # not in OpenAI's API (vLLM's extension); 0 = off
    stop: Union[None, str, list[str]] = None
    seed: Optional[int] = Field(None, ge=0)  # None: a random seed
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[dict[str, bool]] = None  # {"include_usage": true}: a last chunk with the token counts
    model: Optional[str] = None  # accepted and ignored: there is one model
    user: Optional[str] = None  # accepted and ignored


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str]] = ""  # a list holds exactly one prompt (some clients send lists)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str  # checked by chat.check_messages: one error message for every way in
    content: str
    name: Optional[str] = None  # accepted and ignored


class ChatRequest(SamplingRequest):
    messages: list[Message]
    max_tokens: Optional[int] = Field(None, ge=0)  # OpenAI's chat API: no default (we take the server's max_tokens)
    max_completion_tokens: Optional[int] = Field(None, ge=0)  # its newer name for max_tokens


def error(status, message, param=None, kind="invalid_request_error", code=None, headers=None):
    """An error in OpenAI's format."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def read_body(request, limit):
    """The request's body, or None when it is longer than limit bytes. A Content-Length over the limit is refused
    unread; a chunked body (no length given) as soon as what has arrived passes it: no larger body is ever held.
    The rest of a refused body is read and dropped by uvicorn, within the request's deadline (RequestDeadline)."""
    if int(request.headers.get("content-length") or 0) > limit:  # h11 has checked that it is a number
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def parse_request(body, cfg, kind=CompletionRequest):
    """(the request, None) or (None, the 400 response saying what is wrong with it); kind: the request's model."""
    try:
        body = json.loads(body)
    except ValueError as e:  # bad JSON or not UTF-8
        return None, error(400, f"the body is not valid JSON: {e}")
    except RecursionError:  # json's parser recurses once per level of nesting: [[[[...]]]] runs out of stack
        return None, error(400, "the body is not a completion request: its JSON is nested too deeply")
    try:
        req = kind.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        # the field, not the part of a union; messages.1.role for a message's
        param = ".".join(str(part) for part in first["loc"][:3 if first["loc"][:1] == ("messages",) else 1]) or None
        message = "not supported by this server" if first["type"] == "extra_forbidden" else first["msg"]
        return None, error(400, f"{param}: {message}" if param else message, param)
    return req, check_limits(req, cfg)


def check_limits(req, cfg):
    """The server's own limits on a well-formed request: an error response, or None."""
    if isinstance(req, ChatRequest):
        try:
            check_messages([m.model_dump() for m in req.messages], "messages", need_assistant=False)
        except DataError as e:
            return error(400, str(e), "messages")
        req.max_tokens = next((n for n in (req.max_completion_tokens, req.max_tokens) if n is not None), cfg.max_tokens)
        prompts, field = ["".join(m.content for m in req.messages)], "messages"
    else:
        prompts, field = [req.prompt] if isinstance(req.prompt, str) else req.prompt, "prompt"
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    for ok, param, message in [
        (len(prompts) == 1, "prompt", "one prompt per request (a list must hold exactly one string)"),
        (sum(map(len, prompts)) <= cfg.max_prompt_chars, field,
         f"the {'messages are' if field == 'messages' else 'prompt is'} longer than {cfg.max_prompt_chars} characters"),
        (req.max_tokens <= cfg.max_tokens, "max_tokens", f"max_tokens is at most {cfg.max_tokens} on this server"),
        (req.n <= cfg.max_n, "n", f"n is at most {cfg.max_n} on this server"),
        (req.seed is None or req.seed < 2 ** 63 - req.n, "seed", "seed must be below 2**63 - n"),
        (len(stops) <= 4 and all(stops), "stop", "stop takes up to 4 non-empty strings"),
        (set(req.stream_options or {}) <= {"include_usage"}, "stream_options", "stream_options takes include_usage only"),
    ]:
        if not ok:
            return error(400, message, param)
    return None


# -----------------------------------------------------------------------------
# Generation: one model, one worker thread, a queue of jobs

class Choice:
    """One sample's text as its tokens arrive: whole characters only (text_stream), cut before the first stop
    string. The last (longest stop string - 1) characters are held back until the next tokens show that they do
    not start a stop string, so no part of a stop string is ever sent."""

    def __init__(self, enc, stops, ends=None):
        self.decode, self.stops = text_stream(enc), stops
        self.ends = {enc.eot_token} if ends is None else ends  # the tokens that end a sample (never decoded)
        self.hold = max(map(len, stops), default=1) - 1
        self.text, self.sent, self.tokens, self.finish_reason = "", 0, 0, None

    def add(self, token):
        """Take the sample's next token; return the text that is now final (often '')."""
        self.tokens += 1
        if token in self.ends:  # end-of-text; for a chat reply its turn end or another marker
            return self.end("stop")
        self.text += self.decode([token])
        return self._release(len(self.text) - self.hold)

    def end(self, reason):
        """No more tokens: release the rest."""
        self.text += self.decode([], final=True)
        self.finish_reason = reason
        return self._release(len(self.text))

    def _release(self, end):
        hits = [p for p in (self.text.find(s) for s in self.stops) if p >= 0]
        if hits:  # it cannot lie in text already sent: that was followed by hold more characters when checked
            end = min(hits)
            self.text, self.finish_reason = self.text[:end], "stop"
        end = max(end, self.sent)
        delta, self.sent = self.text[self.sent:end], end
        return delta


class Job:
    """One request's generation. The worker thread sends its events to the request's coroutine through an
    asyncio queue: ('text', choice index, new text, finish_reason or None), then ('done', completion tokens) or
    ('error', message, HTTP status). Setting `cancelled` stops the worker at its next token."""

    def __init__(self, prompt, sampling, stops, chat=False):
        self.prompt, self.sampling, self.stops, self.chat = prompt, sampling, stops, chat  # chat: the reply's turn
        self.loop, self.queue, self.cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

    def emit(self, *event):  # called from the worker thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self, request=None):
        """The events until the last; with request (plain responses), stops early when the client has gone
        (checked every 0.25 s; for a streamed response Starlette cancels the stream when its client goes)."""
        checked = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), 0.25)
            except asyncio.TimeoutError:
                event = None
            if request is not None and time.monotonic() - checked > 0.25:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if event is None:
                continue
            yield event
            if event[0] != "text":
                return


class Engine:
    """The one model and the one thread that runs it: jobs are generated one after another, in arrival order."""

    def __init__(self, model, enc, device, dtype, queue_size):
        self.model, self.enc, self.device, self.dtype, self.queue_size = model, enc, device, dtype, queue_size
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.pending = 0  # jobs submitted and not finished (running or waiting); changed on the event loop only
        self.jobs = set()  # those jobs, for cancel_all
        self.stats = {"busy": False, "completed": 0, "cancelled": 0, "failed": 0, "tokens_generated": 0}
        try:  # /v1/chat/completions: the chat template's ids, when the vocabulary has them (chat_tokens)
            self.chat = chat_tokens(model, enc)
        except DataError as e:
            self.chat, self.no_chat = None, str(e)

    def submit(self, job):
        """Queue the job; False when the queue is full."""
        if self.pending >= self.queue_size:
            return False
        self.pending += 1
        self.jobs.add(job)
        self.worker.submit(self.run, job)
        return True

    def _finished(self, job):
        self.pending -= 1
        self.jobs.discard(job)

    def cancel_all(self):
        """Stop every job (at shutdown): the running one at its next token; their responses then end."""
        for job in list(self.jobs):
            job.cancelled.set()

    def run(self, job):
        """Run one job on the worker thread, then free its place in the queue."""
        if job.cancelled.is_set():  # its client left, or the server stops, while it waited
            self.stats["cancelled"] += 1
        else:
            self.stats["busy"] = True
            try:
                last = ("done", self.generate(job))
            except Exception as e:  # e.g. out of memory: this request fails, the server goes on
                self.stats["failed"] += 1
                last = ("error", f"generation failed: {type(e).__name__}: {e}", 500)
            finally:
                self.stats["busy"] = False
        if job.cancelled.is_set():  # only a server shutting down still has a client to tell
            last = ("error", "generation stopped: the server is shutting down", 503)
        job.loop.call_soon_threadsafe(self._finished, job)  # before the last event: a client that sends its next
        job.emit(*last)  # request on [DONE] finds the place free (callbacks run in the order they were scheduled)

    def generate(self, job):
        """Generate the job's choices, sending text as it becomes final; returns the tokens generated."""
        # a chat reply ends at its turn end (or any other special token), its markers sit beyond the text tokens
        ends, vocab_limit, stop = ((self.chat.stops, self.chat.vocab_size, self.chat.end["assistant"]) if job.chat else
                                   ({self.enc.eot_token}, completion_vocab(self.enc), self.enc.eot_token))
        choices = [Choice(self.enc, job.stops, ends) for _ in range(job.sampling.num_samples)]
        with autocast(self.device, self.dtype):
            for i, token in stream_tokens(self.model, job.prompt, job.sampling, vocab_limit, stop):
                if job.cancelled.is_set():
                    break  # leaving the loop closes the generator: no more forward passes
                self.stats["tokens_generated"] += 1
                if choices[i].finish_reason is None:  # else it ended at a stop string; the batch runs for the others
                    job.emit("text", i, choices[i].add(token), choices[i].finish_reason)
                if all(c.finish_reason for c in choices):
                    break
        for i, c in enumerate(choices):
            if c.finish_reason is None and not job.cancelled.is_set():
                job.emit("text", i, c.end("length"), "length")
        self.stats["cancelled" if job.cancelled.is_set() else "completed"] += 1
        return sum(c.tokens for c in choices)


# -----------------------------------------------------------------------------
# The HTTP API

def new_job(req, engine):
    """The job for a valid request, and the note to send when its prompt was cropped (else None)."""
    block_size, chat = engine.model.config.block_size, isinstance(req, ChatRequest)
    if chat:
        prompt, note = chat_prompt(engine.chat, [m.model_dump() for m in req.messages], block_size, req.max_tokens)
    else:
        prompt, note = encode_prompt(engine.enc, req.prompt if isinstance(req.prompt, str) else req.prompt[0], block_size)
    seed = random.randrange(2 ** 62) if req.seed is None else req.seed
    sampling = Sampling(num_samples=req.n, max_new_tokens=req.max_tokens, temperature=req.temperature,
                        top_k=req.top_k, top_p=req.top_p, seed=seed)
    return Job(prompt, sampling, [req.stop] if isinstance(req.stop, str) else req.stop or [], chat), note


def chat_prompt(chat, messages, block_size, max_tokens):
    """A chat request's prompt (chat.prompt: its oldest turns dropped to leave room for the reply, at most half the
    context) and a note when that or a crop to block_size changed what the model sees (else None)."""
    prompt = chat.prompt(messages, block_size, min(max_tokens, block_size // 2))
    if len(prompt) > block_size:
        return prompt[-block_size:], (f"the conversation's last turn has {len(prompt)} tokens with the template, more "
                                      f"than block_size {block_size}: only its last {block_size} are used")
    dropped = len(prompt) < len(chat.render(messages, generation_prompt=True))
    return prompt, "the oldest turns were left out: the conversation outgrew the context" if dropped else None


def completion_choice(index, text, finish_reason, whole):
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index, text, finish_reason, whole):
    """A chat completion's choice: the whole message, or (streamed) the part of it in this chunk."""
    return {"index": index, ("message" if whole else "delta"): {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish_reason}


async def sse(job, head, usage, shape):
    """A streamed completion: one server-sent event per piece of text, then the usage (if asked), then [DONE].
    shape: completion_choice or chat_choice."""
    try:
        async for event in job.events():
            if event[0] == "text" and (event[2] or event[3]):
                yield f"data: {json.dumps({**head, 'choices': [shape(*event[1:], whole=False)]})}\n\n"
                head.pop("warning", None)  # said once, in the first chunk
            elif event[0] == "done" and usage is not None:
                usage.update(completion_tokens=event[1], total_tokens=usage["prompt_tokens"] + event[1])
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            elif event[0] == "error":
                yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects: Starlette cancels this generator
        job.cancelled.set()


async def collect(job, head, usage, request, shape):
    """A plain completion: the whole text of every choice, once all is generated."""
    texts, reasons = [""] * job.sampling.num_samples, [None] * job.sampling.num_samples
    try:
        async for event in job.events(request):
            if event[0] == "text":
                texts[event[1]] += event[2]
                reasons[event[1]] = event[3]
            elif event[0] == "error":
                return error(event[2], event[1], kind="server_error")
            else:
                usage.update(completion_tokens=event[1], total_tokens=usage["prompt_tokens"] + event[1])
    finally:
        job.cancelled.set()  # a no-op unless the client left
    choices = [shape(i, t, r, whole=True) for i, (t, r) in enumerate(zip(texts, reasons))]
    return JSONResponse({**head, "choices": choices, "usage": usage})


async def answer(request, kind, engine, cfg, model_name):
    """A completion (kind=CompletionRequest) or a chat completion (ChatRequest): the same checks, queue, and
    disconnect rules; only the request's fields and the shape of the choices differ."""
    try:
        body = await read_body(request, body_limit(cfg))
    except ClientDisconnect:  # the client left, or was too slow and RequestDeadline closed its connection
        return error(400, "the request body did not arrive whole")  # (sent nowhere: the connection is gone)
    if body is None:
        return error(413, f"the request body is larger than this server's limit of {body_limit(cfg):,} bytes")
    req, problem = parse_request(body, cfg, kind)
    if problem is not None:
        return problem
    job, note = new_job(req, engine)
    if not engine.submit(job):
        return error(429, f"the server is busy ({cfg.queue_size} requests queued): try again later",
                     kind="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    chat = kind is ChatRequest
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "object": ("chat.completion.chunk" if req.stream else "chat.completion") if chat else "text_completion",
            "model": model_name, **({"warning": note} if note else {})}
    usage = {"prompt_tokens": len(job.prompt), "completion_tokens": 0, "total_tokens": len(job.prompt)}
    shape = chat_choice if chat else completion_choice
    if req.stream:
        include_usage = (req.stream_options or {}).get("include_usage", False)
        return StreamingResponse(sse(job, head, usage if include_usage else None, shape),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await collect(job, head, usage, request, shape)


def make_app(engine, cfg, model_name):
    app = FastAPI(title="GPT completions", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(HTTPException)  # unknown paths, wrong methods: OpenAI's format too
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail), kind="invalid_request_error")

    @app.exception_handler(Exception)  # a bug: this request fails, the server goes on
    async def server_error(request, exc):
        return error(500, f"{type(exc).__name__}: {exc}", kind="server_error")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, CompletionRequest, engine, cfg, model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if engine.chat is None:
            return error(404, f"/v1/chat/completions is not served: {engine.no_chat}; POST /v1/completions instead")
        return await answer(request, ChatRequest, engine, cfg, model_name)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "local"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "block_size": engine.model.config.block_size, "chat": bool(engine.chat),
                "pending": engine.pending, **engine.stats,
                "limits": {k: getattr(cfg, k) for k in ("max_tokens", "max_n", "max_prompt_chars", "queue_size")}}

    @app.get("/")
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


class RequestDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 connection with a deadline: a client has `timeout` seconds from connecting (or from the
    end of its previous response) to send a whole request, headers and body. uvicorn itself only closes idle
    keep-alive connections, and every byte received restarts that clock, so a client sending half its headers
    (or a byte now and then) would hold its connection for ever. A late one gets 408 and is closed; a request
    received whole is never cut short, however long its response takes."""

    def __init__(self, *args, timeout, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout, self.deadline = timeout, None

    def start_clock(self):
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.loop.call_later(self.timeout, self.on_deadline)

    def connection_made(self, transport):
        super().connection_made(transport)
        self.start_clock()

    def on_response_complete(self):  # a keep-alive connection: the next request has its own deadline
        super().on_response_complete()
        self.start_clock()

    def connection_lost(self, exc):
        self.deadline.cancel()
        super().connection_lost(exc)

    def on_deadline(self):
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return  # the request arrived whole
        started = self.conn.their_state is h11.SEND_BODY or self.conn.trailing_data[0]  # else idle: close, no word
        if started and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # and no response has begun: say why
            # (written directly: h11 will not answer headers it has not seen whole; the connection closes next)
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()


def listen(cfg):
    """The listening socket, bound before the model loads, so that a port in use is said at once."""
    where = f"cannot listen on {cfg.host}:{cfg.port}"
    try:
        socket.getaddrinfo(cfg.host, cfg.port)  # an unknown host name: create_server would say "Unknown error -2"
        return socket.create_server((cfg.host, cfg.port), family=socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    except socket.gaierror as e:
        raise DataError(f"{where}: {e.strerror} (choose another address: --host=...)")
    except OSError as e:  # its text adds "(while attempting to bind on address ...)": say the reason alone
        hint = "address: --host=..." if e.errno == errno.EADDRNOTAVAIL else "port: --port=..."
        raise DataError(f"{where}: {os.strerror(e.errno) if e.errno else e} (choose another {hint})")


def main(argv):
    cfg = validate(parse_args(ServeConfig, argv))
    sock = listen(cfg)
    model, enc, device, dtype = open_for_generation(cfg)
    engine = Engine(model, enc, device, dtype, cfg.queue_size)
    app = make_app(engine, cfg, model_name=cfg.out_dir.rstrip("/") or cfg.out_dir)
    print(f"serving on http://{cfg.host}:{cfg.port} (Ctrl-C stops)", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C or SIGTERM: uvicorn waits for open responses, so end them
            if not self.should_exit:
                cancelled = f", {len(engine.jobs)} open requests cancelled" if engine.jobs else ""
                print(f"serve.py: {signal.Signals(sig).name}: stopping{cancelled}", file=sys.stderr, flush=True)
            engine.cancel_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                            http=functools.partial(RequestDeadline, timeout=cfg.request_timeout))
    try:  # uvicorn raises the signal that stopped it again once it has shut down, for the exit status
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C, already said by handle_exit
        pass
    finally:
        engine.worker.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    run_main(main)
