"""
Shared test set-up. Everything runs on CPU with tiny models and the real data in ../shared:
- the fast lane, `python -m pytest -m "not slow"`, runs the units in well under a minute; the whole suite is
  what CI and the README run.
- tiktoken cannot download here, so its cache is seeded from ../shared/data (the same files tiktoken
  would fetch, under the names it looks for) and TIKTOKEN_CACHE_DIR points there for this process and
  every subprocess the tests start.
- a plain clone has no ../shared: what needs its sample data skips (the sample_parquet fixture), and so does
  what needs the GPT-2 tokenizer when tiktoken can neither find nor download it and GPT2_TIKTOKEN_FILE is
  unset (the enc fixture, or @needs_tokenizer on tests that only run scripts which tokenize).
"""
import contextlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_PARQUET = SHARED_DATA / "english-sample.parquet"
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    from smallgpt.tokenizer import seed_tiktoken_cache
    seed_tiktoken_cache(SHARED_DATA)


def pytest_collection_modifyitems(items):
    """Every test that needs prepared tokens (prepare.py in a subprocess, then real training runs) is slow;
    other slow tests carry @pytest.mark.slow themselves."""
    for item in items:
        if "token_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample_parquet():
    if not SAMPLE_PARQUET.exists():
        pytest.skip(f"{SAMPLE_PARQUET} not found")
    return SAMPLE_PARQUET


@pytest.fixture(scope="session")
def enc():
    """The GPT-2 tokenizer, as the scripts load it (smallgpt.tokenizer.get_tokenizer); skips the test when it cannot
    be loaded (offline, with no ../shared to seed tiktoken's cache from and no GPT2_TIKTOKEN_FILE)."""
    from smallgpt.errors import DataError
    from smallgpt.tokenizer import get_tokenizer
    try:
        return get_tokenizer()
    except DataError as e:
        pytest.skip(f"no GPT-2 tokenizer: {e}")


needs_tokenizer = pytest.mark.usefixtures("enc")  # for tests whose scripts tokenize (they use no enc themselves)


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory, sample_parquet, enc):
    """Token files of the first 4,000 documents of the shared sample (~1.6M tokens), made once per session by
    the real prepare.py; treat as read-only."""
    import subprocess
    out = tmp_path_factory.mktemp("tokens")
    subprocess.run([sys.executable, str(REPO / "data/fineweb/prepare.py"), str(sample_parquet), f"--out_dir={out}",
                    "--max_docs=4000", "--val_docs=200", "--num_proc=2"], check=True, capture_output=True)
    return out


def run_script(script, *args, timeout=600, check=True):
    """Run one of the repo's scripts as a user would from the repo root: a file (python train.py args...) or, for
    the tools in bench/, a module (python -m bench.bench_train args...)."""
    import subprocess
    command = [str(REPO / script)] if script.endswith(".py") else ["-m", script]
    result = subprocess.run([sys.executable, *command, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


# train.py run as `python -c HOOK args...` with faults injected at exact points, chosen by environment variables:
# - KILL_AT=k: the checkpoint writes are numbered moments (the temporary complete but not yet moved into place; the
#   file in place), and at moment k the process SIGKILLs itself: kill -9 between or inside the writes;
# - FULL_AFTER=n: the disk is full from the (n+1)-th checkpoint write on (it raises ENOSPC after 1 MB, as a real
#   full disk does after a partial write);
# - POISON_FIRST, POISON_END: the training windows [first, end) are random tokens (a poisoned stretch of data);
# - KILL_AT_WINDOW=w: SIGKILL when a step starts at window w (data_position w).
HOOK = f"""
import builtins, errno, os, runpy, signal, sys
sys.path.insert(0, {str(REPO)!r})
import torch
import smallgpt.checkpoint as checkpoint
import smallgpt.tokens as tokens
env = lambda name: int(os.environ.get(name, -1))
kill_at, full_after, poison, kill_at_window = env("KILL_AT"), env("FULL_AFTER"), range(env("POISON_FIRST"), env("POISON_END")), env("KILL_AT_WINDOW")
moments, writes, real_save, real_replace, real_batch = [0], [0], checkpoint.save_checkpoint, os.replace, tokens.TrainWindows.batch

def moment(what, path):
    moments[0] += 1
    print(f"moment {{moments[0]}}: {{what}} {{os.path.basename(path)}}", file=sys.stderr, flush=True)
    if moments[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def full_open(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)
    if str(path).endswith(".pt.tmp") and 0 <= full_after < writes[0]:
        real_write = f.write
        def write(data):
            if f.tell() + len(data) > 2 ** 20:
                real_write(bytes(data)[:max(0, 2 ** 20 - f.tell())])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(data)
        f.write = write
    return f

def save(obj, path):
    writes[0] += 1
    def replace(src, dst):
        moment("written", src)
        real_replace(src, dst)
    os.replace = replace
    try:
        real_save(obj, path)
    finally:
        os.replace = real_replace
    moment("saved", path)

def batch(self, first, count):
    if first == kill_at_window:
        os.kill(os.getpid(), signal.SIGKILL)
    x, y = real_batch(self, first, count)
    if first in poison:
        g = torch.Generator().manual_seed(first)
        x, y = (torch.randint(50257, t.shape, generator=g, dtype=t.dtype) for t in (x, y))
    return x, y

checkpoint.open = full_open
checkpoint.save_checkpoint = save
tokens.TrainWindows.batch = batch
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def hooked_train(*args, **env):
    """train.py with the faults of HOOK (env: KILL_AT, FULL_AFTER, POISON_FIRST, POISON_END, KILL_AT_WINDOW)."""
    import os
    import subprocess
    return subprocess.run([sys.executable, "-c", HOOK, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **{k: str(v) for k, v in env.items()}})


def randomized_tiny_gpt(wide_mlp=False, **overrides):
    """A tiny GPT (block 16, 2 x 32, GPT-2's padded vocabulary) with every weight randomised: biases, norm gains
    and multipliers too, so that a wrong mapping of any of them shows. wide_mlp: MLP weights of std 0.5, whose
    pre-activations of order 1 are where exact and tanh GELU part (and are amplified)."""
    import torch
    from model import GPT, GPTConfig
    args = dict(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    args.update(overrides)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_mult"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif wide_mlp and name.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
                p.normal_(0, 0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def run_with_fault(fault, script, *args, env=None, timeout=600):
    """Run one of the repo's scripts as run_script does, after the Python code `fault` ran in the same process: it
    patches a library function to inject a fault at an exact moment (a kill, a full disk, no network) into the
    real script. env: variables set (a value of None removes one) on top of this process's environment."""
    import os
    import subprocess
    code = f"{fault}\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    environ = {**os.environ, **(env or {})}
    environ = {k: v for k, v in environ.items() if v is not None}
    return subprocess.run([sys.executable, "-c", code, str(REPO / script), *map(str, args)], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def serve_process(*flags, log):
    """serve.py started as a user starts it (flags: its --key=value options) on a free port of 127.0.0.1, its output
    into the file log: yields (process, port) once /health answers; terminated at the end (if still running)."""
    import http.client
    import socket
    import subprocess
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), *flags, f"--port={port}"], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"serve.py did not start:\n{Path(log).read_text()}")
            time.sleep(0.2)
    try:
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def chromium_page(width=1000, height=720):
    """A page of the system's Chromium, headless, driven by Playwright: yields (expect, page); skips without them."""
    import shutil
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system chromium (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield sync_api.expect, browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
