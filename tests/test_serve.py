"""
serve.py: the real server started in a subprocess on 127.0.0.1 with a tiny checkpoint, spoken to over HTTP:
completions plain and streamed, the same text as sample.py, stop strings, bad requests, the queue limit, client
disconnects, bodies too large or too deep, clients too slow, the official openai client, and the web page in a real
browser (headless Chromium via Playwright).
"""
import errno
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from model import GPT, GPTConfig  # noqa: E402
from smallgpt.checkpoint import save_checkpoint  # noqa: E402
from smallgpt.config import ConfigError  # noqa: E402
from conftest import REPO, chromium_page, needs_tokenizer, run_script, serve_process  # noqa: E402
from serve import Choice  # noqa: E402

MAX_TOKENS = 4000  # the server's limit here: long generations for the queue and disconnect tests
REQUEST_TIMEOUT = 3  # seconds the server gives a client to send a request, here (the tests send theirs at once)


# -----------------------------------------------------------------------------
# Choice: stop strings on text that arrives token by token (no server)

def test_choice_cuts_at_the_first_stop_string_and_never_sends_part_of_one(enc):
    text = "The cat sat on the mat. The dog sat on the log. END of story"
    tokens = enc.encode(text)
    for stops, expected, reason in [([], text, "length"), (["sat on the l"], "The cat sat on the mat. The dog ", "stop"),
                                    (["mat", "cat"], "The ", "stop"), (["END", "."], "The cat sat on the mat", "stop"),
                                    (["story!"], text, "length")]:
        choice, sent = Choice(enc, stops), ""
        for t in tokens:
            sent += choice.add(t)
            assert not any(s in sent for s in stops)
            if choice.finish_reason:
                break
        else:
            sent += choice.end("length")
        assert (sent, choice.finish_reason) == (expected, reason), stops
    choice = Choice(enc, [])
    assert choice.add(tokens[0]) == "The" and choice.add(enc.eot_token) == "" and choice.finish_reason == "stop"


def test_a_failing_generation_fails_its_request_not_the_server(monkeypatch, enc):
    """In-process (Starlette's test client): the model raises mid-generation; plain and streamed requests get the
    error in OpenAI's format, and the next request is served."""
    testclient = pytest.importorskip("starlette.testclient")  # needs httpx
    import serve
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50304)).eval()
    engine = serve.Engine(model, enc, "cpu", "float32", queue_size=2)
    client = testclient.TestClient(serve.make_app(engine, serve.ServeConfig(), "tiny"))
    forward, calls = model.hidden_states, []

    def failing(*args, **kwargs):  # the prefill and the first step work, the second step fails
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", failing)
    reply = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5})
    assert reply.status_code == 500 and reply.json()["error"]["message"] == "generation failed: RuntimeError: boom"
    calls.clear()
    streamed = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "stream": True}).text
    assert '{"error": {"message": "generation failed: RuntimeError: boom"' in streamed
    assert streamed.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' not in streamed
    monkeypatch.setattr(model, "hidden_states", forward)
    reply = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
    assert client.get("/health").json()["failed"] == 2


# -----------------------------------------------------------------------------
# The server

@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A tiny random GPT with GPT-2's vocabulary, saved as train.py saves (save_checkpoint, the same keys)."""
    out = tmp_path_factory.mktemp("serve_ckpt")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50304))
    with torch.no_grad():  # weights larger than the init, so that the text varies from token to token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    save_checkpoint({"format": "gpt-checkpoint", "version": 1, "model_args": asdict(model.config),
                     "model": model.state_dict(), "config": {}, "iter_num": 3, "best_val_loss": 9.5}, out / "best.pt")
    return out


@pytest.fixture(scope="module")
def server_process(checkpoint_dir, enc, tmp_path_factory):
    """The real serve.py on a free port of 127.0.0.1, with room for 2 requests (the queue test fills it) and prompts
    of up to 1,000 characters: (process, port, its log: stdout and stderr)."""
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with serve_process(f"--out_dir={checkpoint_dir}", "--queue_size=2", f"--max_tokens={MAX_TOKENS}",
                       "--max_prompt_chars=1000", f"--request_timeout={REQUEST_TIMEOUT}", "--device=cpu",
                       log=log) as (proc, port):
        yield proc, port, log


@pytest.fixture(scope="module")
def server(server_process):
    """The server's port."""
    return server_process[1]


def request(port, method, path, body=None, raw=None):
    """(status, parsed JSON body) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body=raw if raw is not None else json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data)


def open_stream(port, body):
    """A streamed completion, opened: (connection, response) to read server-sent events from."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def events(response):
    """The data of each server-sent event, parsed (the last, [DONE], as the string)."""
    for line in response:
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


def health(port):
    return request(port, "GET", "/health")[1]


def wait_until(condition, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_plain_and_streamed_completions_agree(server):
    body = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 1.0, "top_k": 100, "seed": 3, "n": 2}
    status, plain = request(server, "POST", "/v1/completions", body)
    assert status == 200 and plain["object"] == "text_completion" and plain["id"].startswith("cmpl-")
    texts = [c["text"] for c in sorted(plain["choices"], key=lambda c: c["index"])]
    assert len(texts) == 2 and texts[0] != texts[1] and all(texts)
    assert [c["finish_reason"] for c in plain["choices"]] == ["length", "length"]
    assert plain["usage"] == {"prompt_tokens": 4, "completion_tokens": 40, "total_tokens": 44}
    # streamed: one chunk per piece of text, in OpenAI's format, then the usage (asked for), then [DONE]
    conn, response = open_stream(server, {**body, "stream_options": {"include_usage": True}})
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    chunks = list(events(response))
    conn.close()
    assert chunks[-1] == "[DONE]" and chunks[-2]["usage"] == plain["usage"] and chunks[-2]["choices"] == []
    streamed, reasons = ["", ""], [None, None]
    for chunk in chunks[:-2]:
        (choice,) = chunk["choices"]
        streamed[choice["index"]] += choice["text"]
        reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert streamed == texts and reasons == ["length", "length"] and len(chunks) > 10
    # the same request again: the same text (the seed); another seed: other text
    assert request(server, "POST", "/v1/completions", body)[1]["choices"] == plain["choices"]
    assert request(server, "POST", "/v1/completions", {**body, "seed": 4})[1]["choices"] != plain["choices"]
    status, models = request(server, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["object"] == "model"


@pytest.mark.slow
def test_same_text_as_sample_py(server, checkpoint_dir):
    opts = dict(temperature=0.9, top_k=50, top_p=0.9, seed=11)
    result = run_script("sample.py", f"--out_dir={checkpoint_dir}", "--start=The history of", "--max_new_tokens=15",
                        "--num_samples=2", "--device=cpu", *[f"--{k}={v}" for k, v in opts.items()])
    expected = result.stdout.rstrip("\n").split("\n" + "-" * 15 + "\n")
    status, reply = request(server, "POST", "/v1/completions", {"prompt": "The history of", "max_tokens": 15, "n": 2, **opts})
    assert status == 200
    assert ["The history of" + c["text"] for c in reply["choices"]] == expected


@pytest.mark.slow
def test_stop_strings_and_a_cropped_prompt(server):
    body = {"prompt": "Hello", "max_tokens": 30, "seed": 1}
    free = request(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    stop = free[len(free) // 2:len(free) // 2 + 3]  # three characters from the middle, across token boundaries
    cut = free[:free.index(stop)]
    reply = request(server, "POST", "/v1/completions", {**body, "stop": [stop, "never appears"]})[1]
    assert reply["choices"][0]["text"] == cut and reply["choices"][0]["finish_reason"] == "stop"
    conn, response = open_stream(server, {**body, "stop": stop})
    chunks = list(events(response))
    conn.close()
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == cut and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    # a prompt longer than the context (64 tokens) is cropped to its end, and the response says so
    long = "one two three four five six seven eight nine ten " * 20
    reply = request(server, "POST", "/v1/completions", {"prompt": long, "max_tokens": 5, "seed": 1})[1]
    assert "only its last 64 are used" in reply["warning"] and reply["usage"]["prompt_tokens"] == 64
    assert "warning" not in request(server, "POST", "/v1/completions", body)[1]


@pytest.mark.slow
def test_bad_requests_get_400_in_openai_format(server):
    cases = [
        ('{"prompt": "Hi", ', None, "not valid JSON"),
        (b'{"prompt": "\xff"}', None, "not valid JSON"),
        ('[1, 2]', None, "valid dictionary"),
        ({"prompt": 5}, "prompt", "prompt"),
        ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
        ({"prompt": []}, "prompt", "one prompt per request"),
        ({"temperature": float("nan")}, "temperature", "less than or equal to 2"),
        ({"prompt": "x" * 1001}, "prompt", "longer than 1000 characters"),
        ({"max_tokens": "10"}, "max_tokens", "valid integer"),
        ({"max_tokens": MAX_TOKENS + 1}, "max_tokens", f"at most {MAX_TOKENS}"),
        ({"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_k": -1}, "top_k", "greater than or equal to 0"),
        ({"n": 9}, "n", "at most 8"),
        ({"seed": 2 ** 63}, "seed", "below 2**63"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"stream": "yes"}, "stream", "valid boolean"),
        ({"logprobs": 5}, "logprobs", "not supported by this server"),
    ]
    for body, param, message in cases:
        raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
        status, reply = request(server, "POST", "/v1/completions", raw=raw)
        assert status == 400, (body, reply)
        assert reply["error"]["param"] == param and message in reply["error"]["message"], (body, reply)
        assert reply["error"]["type"] == "invalid_request_error"
    assert request(server, "GET", "/nowhere")[0] == 404
    assert request(server, "GET", "/v1/completions")[0] == 405
    # a model with rows for the chat markers serves chat completions too (test_chat.py; one without them: 404)
    status, reply = request(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                                     "max_tokens": 3})
    assert status == 200 and reply["object"] == "chat.completion"
    assert health(server)["status"] == "ok" and health(server)["failed"] == 0  # still serving


@pytest.mark.slow
def test_queue_full_gets_429_and_disconnects_stop_generation(server):
    long = {"prompt": "Tell me", "max_tokens": MAX_TOKENS, "n": 8, "seed": 0}  # ~32,000 tokens: minutes here
    before = health(server)
    first = open_stream(server, long)
    next(events(first[1]))  # the first is generating...
    second = open_stream(server, long)  # ...the second waits: the queue (2) is full
    wait_until(lambda: health(server)["pending"] == 2)
    status, reply = request(server, "POST", "/v1/completions", {"prompt": "Hi"})
    assert status == 429 and reply["error"]["code"] == "rate_limit_exceeded"
    # both clients leave: the running generation stops, the waiting one never starts
    first[0].close()
    second[0].close()
    wait_until(lambda: health(server)["pending"] == 0, timeout=10)
    after = health(server)
    assert after["cancelled"] - before["cancelled"] == 2 and not after["busy"]
    assert after["tokens_generated"] - before["tokens_generated"] < 8 * MAX_TOKENS // 4
    # a plain (not streamed) request whose client leaves is stopped as well
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("POST", "/v1/completions", body=json.dumps(long), headers={"Content-Type": "application/json"})
    wait_until(lambda: health(server)["busy"])
    conn.close()
    wait_until(lambda: health(server)["pending"] == 0, timeout=10)
    assert health(server)["cancelled"] - before["cancelled"] == 3
    assert request(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3})[0] == 200


@pytest.mark.slow
def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, seed=5, temperature=0.7)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 10
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, seed=5,
                                            temperature=0.7, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    greedy = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, extra_body={"top_k": 1})
    assert greedy.choices[0].text == client.completions.create(model=model, prompt="Once upon a time", max_tokens=10,
                                                               temperature=0).choices[0].text
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=model, prompt="Hi", temperature=3.0)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant"  # its replies: test_chat.py, with a fine-tuned model


@pytest.mark.slow
def test_page_in_a_real_browser(server, tmp_path):
    with chromium_page() as (expect, page):
        page.goto(f"http://127.0.0.1:{server}/")
        expect(page.locator("#model")).to_contain_text("context 64 tokens")
        page.fill("#prompt", "The weather today is")
        page.fill("#max_tokens", "60")
        page.fill("#seed", "7")
        page.click("#generate")
        expect(page.locator("#stats")).to_contain_text("(finish: length)", timeout=60_000)
        shown = page.inner_text("#output .generated")
        page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        expected = request(server, "POST", "/v1/completions", {"prompt": "The weather today is", "max_tokens": 60,
                                                               "seed": 7, "temperature": 0.8, "top_k": 200})[1]
        assert shown == expected["choices"][0]["text"] and "60 tokens in" in page.inner_text("#stats")
        # a long generation, stopped with the button: the server stops too
        page.fill("#max_tokens", str(MAX_TOKENS))
        page.click("#generate")
        expect(page.locator("#output .generated")).not_to_have_text("")
        page.click("#stopButton")
        expect(page.locator("#stats")).to_contain_text("(finish: stopped)")
        wait_until(lambda: health(server)["pending"] == 0, timeout=10)
    assert (tmp_path / "serve.png").stat().st_size > 10_000


@pytest.mark.slow
@needs_tokenizer  # serve.py loads it before the checkpoint
def test_serve_script_errors_are_one_line(tmp_path):
    result = run_script("serve.py", f"--out_dir={tmp_path / 'missing'}", check=False)
    assert result.returncode == 1 and result.stdout == "" and result.stderr.startswith("serve.py: error: ")
    assert "no such checkpoint or directory" in result.stderr and len(result.stderr.splitlines()) == 1
    import serve
    for key, value, message in [("port", 70000, "port must be in 1..65535"), ("queue_size", 0, "queue_size must be at"),
                                ("which", "worst", "which must be best or last"),
                                ("request_timeout", 0.0, "request_timeout must be a positive number of seconds")]:
        with pytest.raises(ConfigError, match=message):
            serve.validate(serve.ServeConfig(**{key: value}))


@pytest.mark.slow
def test_load_serve_script_quick(server):
    result = run_script("bench.load_serve", f"--port={server}", "--clients=2", "--requests=3", "--max_tokens=4")
    assert "2 clients x 3 requests x 4 tokens: 6 of 6 completed, 0 problems" in result.stdout
    assert "latency      p50" in result.stdout and "tokens/s" in result.stdout


@pytest.mark.slow
def test_a_busy_port_is_said_before_the_model_loads(tmp_path):
    """A port in use is the first thing said, in one line naming --port=, before the checkpoint (here: none at all)
    or the tokenizer are even looked for."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_script("serve.py", f"--out_dir={tmp_path / 'missing'}", f"--port={port}", check=False)
    assert result.returncode == 1 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr == (f"serve.py: error: cannot listen on 127.0.0.1:{port}: {os.strerror(errno.EADDRINUSE)} "
                             "(choose another port: --port=...)\n")
    result = run_script("serve.py", f"--out_dir={tmp_path / 'missing'}", "--host=no.such.host.invalid", check=False)
    assert result.returncode == 1 and result.stderr.startswith("serve.py: error: cannot listen on no.such.host.invalid:8000")
    assert result.stderr.endswith(" (choose another address: --host=...)\n") and "Unknown error" not in result.stderr


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=60)


def read_all(sock, timeout):
    """What the server sends until it closes the connection (within timeout seconds, else what came so far)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(server):
    """A body sent in chunks has no Content-Length to check: the server counts what arrives and answers 413 as soon
    as it passes the limit (here 4 x 1,000 + 65,536 bytes), long before this 64 MB body would be sent whole,
    instead of reading it all into memory first."""
    sock, chunk, total = connect(server), b"x" * 65536, 64 * 2 ** 20
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    sent = 0
    while sent < total and not select.select([sock], [], [], 0)[0]:  # until the server answers
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sent += len(chunk)
    if sent == total:  # never answered while sending: end the body and see what comes
        sock.sendall(b"0\r\n\r\n")
    response = http.client.HTTPResponse(sock)
    response.begin()
    message = json.loads(response.read())["error"]["message"]
    sock.close()
    assert response.status == 413 and "larger than this server's limit of 69,536 bytes" in message, message
    assert sent < total // 2, f"answered after {sent:,} of {total:,} bytes"
    status, reply = request(server, "POST", "/v1/completions", raw=b'{"prompt": "' + b"x" * 70_000 + b'"}')
    assert status == 413  # with a Content-Length over the limit: refused unread


@pytest.mark.slow
def test_deeply_nested_json_is_a_400_not_a_server_error(server_process):
    """Within the body limit (here 69,536 bytes) JSON can nest tens of thousands deep, past the parser's stack."""
    proc, port, log = server_process
    for body in ["[" * 30_000 + "]" * 30_000, '{"a": ' * 8_000 + "1" + "}" * 8_000,
                 '{"prompt": ' + "[" * 25_000 + "]" * 25_000 + "}", '{"prompt": ' + "[" * 500 + "]" * 500 + "}",
                 '{"stream_options": ' + '{"a": ' * 500 + "true" + "}" * 501]:
        status, reply = request(port, "POST", "/v1/completions", raw=body)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error", (body[:20], reply)
    assert "Traceback" not in log.read_text() and health(port)["status"] == "ok"


@pytest.mark.slow
def test_clients_that_send_half_a_request_are_cut_off(server):
    """20 connections that send half their headers and wait, one that sends a byte every 0.2 s (each byte would
    restart a plain idle timeout), one that sends half a body, one that sends nothing: within the request timeout
    (3 s here) the server answers 408 to those that started a request and closes all of them; meanwhile it
    serves others."""
    half = [connect(server) for _ in range(20)]
    for sock in half:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Ty")
    body = connect(server)
    body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
    silent, trickle = connect(server), connect(server)
    assert health(server)["status"] == "ok"
    t0, line = time.time(), b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n" + b"X-Slow: " + b"y" * 200
    for i in range(len(line)):  # 49 s to send whole, if the server let it
        try:
            trickle.sendall(line[i:i + 1])
        except OSError:  # closed by the server
            break
        if select.select([trickle], [], [], 0.2)[0]:
            break
    assert time.time() - t0 < REQUEST_TIMEOUT + 20, "the trickling client was never cut off"
    assert read_all(trickle, 10).startswith(b"HTTP/1.1 408")
    for sock in half + [body]:
        assert read_all(sock, 20).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert read_all(silent, 20) == b""  # closed, with nothing to answer
    for sock in half + [body, silent, trickle]:
        sock.close()
    assert request(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


@pytest.mark.slow
def test_shutdown_ends_open_responses(server_process):
    """Last in this file: it stops the server. SIGTERM (as Ctrl-C) with a generation running and one waiting: both
    clients hear why, the log says what stopped it, and the server exits at once instead of waiting for the
    generations to end."""
    proc, port, log = server_process
    long = {"prompt": "Tell me", "max_tokens": MAX_TOKENS, "n": 8, "seed": 0}
    conn, response = open_stream(port, long)
    next(events(response))
    waiting = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    waiting.request("POST", "/v1/completions", body=json.dumps(long), headers={"Content-Type": "application/json"})
    wait_until(lambda: health(port)["pending"] == 2)
    t0 = time.time()
    proc.terminate()
    proc.wait(timeout=30)
    assert time.time() - t0 < 10
    rest = list(events(response))
    assert rest[-1] == "[DONE]" and rest[-2]["error"]["message"] == "generation stopped: the server is shutting down"
    reply = waiting.getresponse()
    assert reply.status == 503 and "shutting down" in json.loads(reply.read())["error"]["message"]
    assert log.read_text().endswith("serve.py: SIGTERM: stopping, 2 open requests cancelled\n"), log.read_text()[-500:]
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn >= 0.29 ends by the signal it stopped for, once it is done
