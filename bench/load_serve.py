"""
A bounded load test of serve.py: starts the real server on 127.0.0.1 (a free port), then `clients` concurrent
clients each send `requests` streamed completions one after another; checks every reply, prints latency
(p50 / p95), time to first text and tokens/s, stops the server and exits.

    OMP_NUM_THREADS=1 python -m bench.load_serve                  # random weights, the 40M architecture
    python -m bench.load_serve --out_dir=out/fineweb-40m --clients=4 --requests=2
    python -m bench.load_serve --port=8000                       # a server already running (its --queue_size >= clients)

Checks: every request gets status 200, [DONE], max_tokens tokens or an end (finish_reason), and the same text as
every other request with the same seed (request j of each client uses seed j): had two requests shared a KV cache
or a random generator, their texts would differ. Without --out_dir a random-weights model of the size below is
saved to a temporary directory (speed does not depend on the weights; random weights rarely end at end-of-text).
"""
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if not __package__:  # run as a file, the repository root is not on the path: say how to run it
    sys.exit(f"run it from the repository root as: python -m bench.{os.path.basename(__file__)[:-3]} ...")

from smallgpt.checkpoint import save_checkpoint
from smallgpt.config import ConfigError, parse_args
from smallgpt.errors import run_main

REPO = Path(__file__).resolve().parent.parent


@dataclass
class LoadServeConfig:
    out_dir: str = ""  # a checkpoint or run directory; empty = random weights of the size below
    port: int = 0  # test the server already running on 127.0.0.1:port instead of starting one (out_dir unused)
    clients: int = 16  # concurrent clients
    requests: int = 4  # completions each client sends, one after another
    max_tokens: int = 32  # new tokens per completion
    prompt: str = "The history of the bicycle"  # every request's prompt
    device: str = "cpu"  # serve.py's --device
    # the random-weights model: config/train_fineweb_40m.py's architecture
    n_layer: int = 12  # transformer blocks
    n_head: int = 6  # attention heads
    n_embd: int = 384  # width
    block_size: int = 1024  # context length


def random_checkpoint(cfg, directory):
    """A random-weights GPT saved as train.py saves it; returns its parameter count."""
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=50304))
    save_checkpoint({"format": "gpt-checkpoint", "version": 1, "model_args": asdict(model.config),
                     "model": model.state_dict(), "config": {}, "iter_num": 0, "best_val_loss": None},
                    os.path.join(directory, "best.pt"))
    return model.num_params()


def start_server(out_dir, cfg):
    """serve.py on a free port, with room for every client; returns (process, port) once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), f"--out_dir={out_dir}", f"--port={port}",
                             f"--device={cfg.device}", f"--queue_size={cfg.clients}", f"--max_tokens={cfg.max_tokens}"],
                            cwd=REPO)
    deadline = time.time() + 300
    while True:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")
            return proc, port
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit("load_serve.py: serve.py did not start")
            time.sleep(0.2)


def one_request(port, body):
    """A streamed completion: (text, completion tokens, finish_reason, seconds to the first text, seconds in all)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:200]!r}")
    text, tokens, finish, first, done = "", 0, None, None, False
    for line in response:
        data = line.decode().strip()[len("data: "):]
        if not data:
            continue
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            first = first or time.perf_counter() - t0
            text, finish = text + choice["text"], choice["finish_reason"] or finish
    conn.close()
    if not done or finish is None:
        raise RuntimeError("the stream ended without a finish_reason and [DONE]")
    return text, tokens, finish, first, time.perf_counter() - t0


def run_clients(port, cfg):
    """Every client's replies, as {(client, j): reply or the exception}; and the wall time."""
    results = {}

    def client(c):
        for j in range(cfg.requests):
            body = {"prompt": cfg.prompt, "max_tokens": cfg.max_tokens, "seed": j, "temperature": 0.8, "top_k": 200,
                    "stream": True, "stream_options": {"include_usage": True}}
            try:
                results[c, j] = one_request(port, body)
            except Exception as e:  # recorded and reported: a failed request fails the run
                results[c, j] = e

    threads = [threading.Thread(target=client, args=(c,)) for c in range(cfg.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def check(results, cfg):
    """One line per problem: failed requests, short replies, texts that differ from their seed's."""
    problems = [f"client {c} request {j}: {r}" for (c, j), r in results.items() if isinstance(r, Exception)]
    ok = {key: r for key, r in results.items() if not isinstance(r, Exception)}
    problems += [f"client {c} request {j}: {r[1]} tokens, finish {r[2]}" for (c, j), r in ok.items()
                 if r[2] == "length" and r[1] != cfg.max_tokens]
    for j in range(cfg.requests):
        texts = {r[0] for (c, jj), r in ok.items() if jj == j}
        if len(texts) > 1:
            problems.append(f"seed {j}: {len(texts)} different texts from the same seed and settings")
    return problems


def percentile(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv):
    cfg = parse_args(LoadServeConfig, argv)
    if cfg.clients < 1 or cfg.requests < 1 or cfg.max_tokens < 1:
        raise ConfigError("clients, requests and max_tokens must be at least 1")
    if cfg.port:
        results, wall = run_clients(cfg.port, cfg)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = cfg.out_dir
            if not out_dir:
                out_dir = tmp
                print(f"random weights: {cfg.n_layer} layers x {cfg.n_embd}, block {cfg.block_size}, "
                      f"{random_checkpoint(cfg, tmp) / 1e6:.1f}M parameters", flush=True)
            proc, port = start_server(out_dir, cfg)
            try:
                results, wall = run_clients(port, cfg)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    problems = check(results, cfg)
    ok = [r for r in results.values() if not isinstance(r, Exception)]
    tokens = sum(r[1] for r in ok)
    latency, first = [r[4] for r in ok], [r[3] for r in ok]
    print(f"{cfg.clients} clients x {cfg.requests} requests x {cfg.max_tokens} tokens: {len(ok)} of {len(results)} "
          f"completed, {len(problems)} problems, {wall:.1f} s")
    if ok:
        print(f"latency      p50 {percentile(latency, 50):.2f} s   p95 {percentile(latency, 95):.2f} s")
        print(f"first text   p50 {percentile(first, 50):.2f} s   p95 {percentile(first, 95):.2f} s")
        print(f"throughput   {tokens / wall:.1f} tokens/s ({tokens} tokens), {len(ok) / wall:.2f} requests/s")
    for line in problems:
        print("problem:", line)
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)
