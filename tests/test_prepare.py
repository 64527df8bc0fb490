"""
data/fineweb/prepare.py: the token files must decode back to the input documents exactly, be
deterministic, keep val apart from train, and fail on bad input with one clear line.
Most tests call main() in-process (fast); a few go through the real entry point in a subprocess.
"""
import functools
import http.server
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from smallgpt.errors import run_main as run_script_main  # noqa: E402
from smallgpt.shards import open_split, read_meta  # noqa: E402
from smallgpt.tokenizer import get_tokenizer  # noqa: E402
from conftest import needs_tokenizer  # noqa: E402

PREPARE = REPO / "data" / "fineweb" / "prepare.py"
_spec = importlib.util.spec_from_file_location("prepare", PREPARE)
prepare = importlib.util.module_from_spec(_spec)
sys.modules["prepare"] = prepare  # so the worker pool can pickle prepare.encode_batch
_spec.loader.exec_module(prepare)
EOT = 50256


def run_main(*args):
    """prepare.py's entry point in this process; returns the SystemExit code (None on success): a user mistake is
    its one line."""
    argv = sys.argv
    sys.argv = ["prepare.py", *map(str, args)]
    try:
        run_script_main(prepare.main)
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv
    return None


def run_cli(*args):
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def write_parquet(path, texts, **columns):
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), **columns}), path, row_group_size=7)
    return path


def decode_split(out_dir, split):
    """The documents of one split, decoded; checks that each is preceded by EOT."""
    if read_meta(out_dir)["splits"][split]["tokens"] == 0:
        assert not [name for name in out_files(out_dir) if name.startswith(split)]
        return []
    stream = open_split(out_dir, split)[0]
    tokens = stream[0:len(stream)]
    assert tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT)
    enc = get_tokenizer()
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, [*starts[1:], len(tokens)])]


def expected_split(texts, args):
    """The reference: non-empty texts in order, routed by the split function of their row number."""
    rows = np.array([i for i, t in enumerate(texts) if t])
    opts = prepare.parse_args(args)
    is_val = prepare.in_val(rows, dict(seed=opts.seed, val_docs=None, val_fraction=opts.val_fraction), None)
    return [texts[r] for r, v in zip(rows, is_val) if not v], [texts[r] for r, v in zip(rows, is_val) if v]


def out_files(out_dir):
    return sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []


# -----------------------------------------------------------------------------
# round trip, determinism, split

@pytest.mark.slow
def test_entry_point_round_trip(sample_parquet, tmp_path):
    out = tmp_path / "out"
    flags = ["--max_docs=3000", "--val_fraction=0.02", "--seed=3"]
    r = run_cli(sample_parquet, f"--out_dir={out}", "--num_proc=2", *flags)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and "doc/s" in r.stderr  # summary and progress bar
    texts = pq.read_table(sample_parquet, columns=["text"]).column(0).to_pylist()[:3000]
    train, val = expected_split(texts, flags)
    assert 20 < len(val) < 120
    assert decode_split(out, "train") == train
    assert decode_split(out, "val") == val
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["name"] == "gpt2"
    assert meta["vocab_size"] == 50267 and meta["eot_token"] == EOT  # GPT-2's 50,257 and the reserved chat tokens
    for split, docs in (("train", train), ("val", val)):
        s = meta["splits"][split]
        assert s["documents"] == len(docs)
        assert s["bytes"] == sum(len(d.encode()) for d in docs)
        assert s["tokens"] == os.path.getsize(out / f"{split}_000000.bin") // 2
    [source] = meta["inputs"]
    assert (source["source"], source["size"], source["rows"]) == (str(sample_parquet), os.path.getsize(sample_parquet), 3000)
    assert meta["skipped"] == {"null_or_empty": 0, "below_language_score": 0}
    assert meta["split"]["seed"] == 3 and meta["split"]["val_fraction"] == 0.02
    assert out_files(out) == ["manifest.json", "train_000000.bin", "val_000000.bin"]


def test_identical_across_runs_and_num_proc(sample_parquet, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, n in zip(outs, (2, 2, 1)):
        assert run_main(sample_parquet, f"--out_dir={out}", f"--num_proc={n}", "--max_docs=2500") is None
    for name in ("train_000000.bin", "val_000000.bin", "manifest.json"):
        data = [(o / name).read_bytes() for o in outs]
        assert data[0] == data[1] == data[2], name
    assert read_meta(outs[0])["splits"]["val"]["documents"] > 0


@needs_tokenizer
def test_special_token_text_and_unicode(tmp_path):
    texts = ["a web page that says <|endoftext|> literally", "héllo wörld ✓ 日本語 🙂", " \n\t ",
             "x" * 5000, "<|endoftext|>"]
    src = write_parquet(tmp_path / "u.parquet", texts)
    assert run_main(src, f"--out_dir={tmp_path}", "--num_proc=1", "--val_fraction=0") is None
    assert decode_split(tmp_path, "train") == texts  # the EOT id appears only as the separator
    assert decode_split(tmp_path, "val") == []


@needs_tokenizer
def test_val_docs_exact_disjoint_and_seeded(tmp_path):
    texts = [f"document number {i}" for i in range(500)]
    src = write_parquet(tmp_path / "d.parquet", texts)
    splits = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"out{len(splits)}"
        assert run_main(src, f"--out_dir={out}", "--val_docs=37", f"--seed={seed}", "--num_proc=2") is None
        train, val = decode_split(out, "train"), decode_split(out, "val")
        assert len(val) == 37 and not set(train) & set(val) and sorted(train + val) == sorted(texts)
        assert train == [t for t in texts if t in set(train)]  # order kept within a split
        splits[len(splits)] = val
    assert splits[0] == splits[1] and splits[0] != splits[2]


def test_split_function_is_per_row():
    split = dict(val_fraction=0.1, seed=5, val_docs=None)
    rows = np.arange(100_000)
    whole = prepare.in_val(rows, split, None)
    assert np.array_equal(whole, np.concatenate([prepare.in_val(c, split, None) for c in np.array_split(rows, 37)]))
    assert 0.095 < whole.mean() < 0.105
    other = prepare.in_val(rows, {**split, "seed": 6}, None)
    assert 0.15 < (whole != other).mean() < 0.21  # independent draws: ~2 * 0.1 * 0.9 disagree


# -----------------------------------------------------------------------------
# limits and filters

def test_max_tokens_keeps_whole_documents(sample_parquet, tmp_path):
    assert run_main(sample_parquet, f"--out_dir={tmp_path}", "--max_tokens=20000", "--val_fraction=0") is None
    docs = decode_split(tmp_path, "train")
    meta = read_meta(tmp_path)
    assert meta["splits"]["train"]["tokens"] <= 20000
    texts = pq.read_table(sample_parquet, columns=["text"]).column(0).to_pylist()
    assert docs == texts[:len(docs)]
    next_len = len(get_tokenizer().encode_ordinary(texts[len(docs)])) + 1
    assert meta["splits"]["train"]["tokens"] + next_len > 20000


@needs_tokenizer
def test_null_empty_and_language_score_skipped(tmp_path, capsys):
    texts = ["first", None, "", "second", "low score", None, "third", "null score"]
    scores = [0.9, 0.9, 0.9, 0.8, 0.2, 0.1, 0.95, None]
    src = write_parquet(tmp_path / "n.parquet", texts, language_score=pa.array(scores, pa.float64()))
    out = tmp_path / "out"
    assert run_main(src, f"--out_dir={out}", "--val_fraction=0", "--min_language_score=0.5") is None
    assert decode_split(out, "train") == ["first", "second", "third"]
    assert read_meta(out)["skipped"] == {"null_or_empty": 3, "below_language_score": 2}
    assert "skipped 3 null/empty rows, 2 below language score" in capsys.readouterr().out
    # without the filter only null/empty rows go, and --max_docs stops after the 2nd kept document
    assert run_main(src, f"--out_dir={tmp_path / 'capped'}", "--val_fraction=0", "--max_docs=2") is None
    assert decode_split(tmp_path / "capped", "train") == ["first", "second"]
    assert read_meta(tmp_path / "capped")["skipped"] == {"null_or_empty": 2, "below_language_score": 0}


@needs_tokenizer
def test_directory_and_glob_inputs(tmp_path):
    write_parquet(tmp_path / "b.parquet", ["b1", "b2"])
    write_parquet(tmp_path / "a.parquet", ["a1"])
    for spec in (tmp_path, tmp_path / "*.parquet"):
        out = tmp_path / "out"
        assert run_main(spec, f"--out_dir={out}", "--val_fraction=0") is None
        assert decode_split(out, "train") == ["a1", "b1", "b2"]  # files in sorted order
        assert [Path(s["source"]).name for s in read_meta(out)["inputs"]] == ["a.parquet", "b.parquet"]
        shutil.rmtree(out)


# -----------------------------------------------------------------------------
# bad input: one line, non-zero exit, no output

def _bad_inputs(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", [f"doc {i} " * 50 for i in range(200)])
    data = good.read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    middle = bytearray(data)  # damage the data pages but keep the footer
    middle[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    (tmp_path / "damaged.parquet").write_bytes(bytes(middle))
    (tmp_path / "notes.parquet").write_text("not parquet")
    (tmp_path / "notes.csv").write_text("a,b")
    (tmp_path / "empty_dir").mkdir()
    write_parquet(tmp_path / "all_empty.parquet", [None, "", None])
    pq.write_table(pa.table({"text": pa.array([b"bytes, not text"], pa.binary())}), tmp_path / "binary.parquet")
    return {
        "missing": ([tmp_path / "nope.parquet"], "no such file"),
        "not_parquet": ([tmp_path / "notes.parquet"], "not a readable parquet file"),
        "unknown_kind": ([tmp_path / "notes.csv"], "not an input prepare.py reads (.parquet, .jsonl, .jsonl.gz or .txt)"),
        "truncated": ([tmp_path / "truncated.parquet"], "not a readable parquet file"),
        "damaged": ([tmp_path / "damaged.parquet"], "cannot read"),
        "no_column": ([good, "--text_column=content"], "no column 'content'"),
        "no_score_column": ([good, "--min_language_score=0.5"], "no column 'language_score'"),
        "empty_input": ([tmp_path / "all_empty.parquet"], "no documents in the input (3 null/empty rows"),
        "binary_column": ([tmp_path / "binary.parquet"], "column 'text' holds binary, not text"),
        "too_long_for_max_tokens": ([good, "--max_tokens=1"], "the first document alone exceeds --max_tokens=1"),
        "empty_dir": ([tmp_path / "empty_dir"], "no files match"),
        "no_glob_match": ([tmp_path / "*.nothing"], "no files match"),
        "bad_url": (["http://127.0.0.1:9/x.parquet", f"--cache_dir={tmp_path / 'cache'}"], "cannot download"),
    }


@needs_tokenizer
def test_bad_input_in_process(tmp_path):
    for name, (args, message) in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out_{name}"
        code = run_main(*args, f"--out_dir={out}")
        assert isinstance(code, str) and code.startswith("prepare.py: error: ") and "\n" not in code, (name, code)
        assert message in code, (name, code)
        assert out_files(out) == [], name  # nothing left behind, not even temp files
    assert run_main("--max_docs=0") == "prepare.py: config error: max_docs must be at least 1, not 0"
    assert run_main("--val_fraction=1") == "prepare.py: config error: val_fraction must be in [0, 1), not 1.0"


@needs_tokenizer
def test_bad_input_entry_point(tmp_path):
    cases = _bad_inputs(tmp_path)
    for name in ("truncated", "no_column"):
        args, message = cases[name]
        r = run_cli(*args, f"--out_dir={tmp_path / 'out'}")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("prepare.py: error: ") and message in r.stderr
    assert out_files(tmp_path / "out") == []


@needs_tokenizer
def test_interrupted_run_keeps_complete_shards(tmp_path, monkeypatch):
    """Ctrl-C mid-run: exit 130, the complete shards stay listed, nothing half-written is left; the same command
    continues and ends with the files of an uninterrupted run."""
    src = write_parquet(tmp_path / "s.parquet", [f"doc {i} " * (i % 7 + 1) for i in range(3000)])
    flags = ["--val_fraction=0.1", "--num_proc=1", "--shard_tokens=2000"]
    assert run_main(src, f"--out_dir={tmp_path / 'whole'}", *flags) is None
    real = prepare.encode_in_order

    def interrupted(*args):  # Ctrl-C after the 60th batch (of 7 rows: write_parquet's row groups)
        it = real(*args)
        for _ in range(60):
            yield next(it)
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "encode_in_order", interrupted)
    out = tmp_path / "out"
    assert run_main(src, f"--out_dir={out}", *flags) == 130
    meta = read_meta(out)
    assert 0 < len(meta["shards"]) and not any(name.startswith(".") for name in out_files(out))
    assert sorted(out_files(out)) == sorted(["manifest.json"] + [s["file"] for s in meta["shards"]])
    monkeypatch.setattr(prepare, "encode_in_order", real)
    assert run_main(src, f"--out_dir={out}", *flags) is None
    assert {n: (out / n).read_bytes() for n in out_files(out)} == \
        {n: (tmp_path / "whole" / n).read_bytes() for n in out_files(tmp_path / "whole")}


def test_ctrl_c_entry_point(sample_parquet, tmp_path):
    """A real Ctrl-C (SIGINT to the process group) while tokenizing: exit 130, workers gone, no files left."""
    out = tmp_path / "out"
    copy = shutil.copyfile(sample_parquet, tmp_path / "copy.parquet")  # a second input: the run lasts long enough that
    # the signal lands mid-run even when this (busy) test process is scheduled late
    # SIGINT as in a terminal: a test run started in the background by a shell (`pytest &`) ignores SIGINT, and
    # its children would inherit that
    proc = subprocess.Popen([sys.executable, str(PREPARE), str(sample_parquet), str(copy), f"--out_dir={out}",
                             "--num_proc=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not any(name.startswith(".train") for name in out_files(out)):  # tokenizing has begun
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "prepare.py: interrupted; the complete shards are kept: run the same command again to continue"
    assert out_files(out) == []  # no shard was complete (100M tokens each): nothing is kept, not even the directory


@pytest.mark.slow
def test_sigkill_while_tokenizing(sample_parquet, tmp_path):
    """kill -9 of the main process while tokenizing: the workers exit without a traceback, and the next run removes
    the dead run's temporary files, continues, and leaves only its output."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(PREPARE), str(sample_parquet), f"--out_dir={out}", "--num_proc=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    err = []  # stderr, read by a thread until every process holding it (main and workers) has exited
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: os.read(proc.stderr.fileno(), 4096), b"")))
    reader.start()
    deadline = time.time() + 120
    # the progress bar counts documents (workers are busy) and the first shard's temporary exists (on a loaded
    # machine the bar can move before the writer opens it)
    while not (re.search(rb" [1-9][\d.]*k?doc", b"".join(err)) and out.exists()
               and any(name.startswith(".train_000000.bin.tmp") for name in os.listdir(out))):
        assert proc.poll() is None and time.time() < deadline, b"".join(err)
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    reader.join(timeout=60)
    assert proc.wait(timeout=10) == -signal.SIGKILL and not reader.is_alive()
    err = b"".join(err).decode()
    assert "Traceback" not in err and "Error" not in err, err
    left = out_files(out)
    assert "manifest.json" in left and f".train_000000.bin.tmp{proc.pid}" in left
    assert set(left) <= {"manifest.json", f".train_000000.bin.tmp{proc.pid}", f".val_000000.bin.tmp{proc.pid}"}
    assert run_main(sample_parquet, f"--out_dir={out}", "--num_proc=1") is None
    assert out_files(out) == ["manifest.json", "train_000000.bin", "val_000000.bin"]


def test_abbreviated_flag_refused(tmp_path):
    """One flag dialect with the other scripts: --key=value, a typo named with a suggestion."""
    r = run_cli("--max_doc=5", f"--out_dir={tmp_path}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "prepare.py: config error: unknown key 'max_doc' in the command line (did you mean 'max_docs'?)"
    r = run_cli("--out_dir", str(tmp_path))
    assert r.returncode == 1 and r.stderr.strip() == "prepare.py: config error: --out_dir needs a value: --out_dir=..."
    assert run_cli("--max_docs=five").stderr.strip() == "prepare.py: config error: max_docs expects int, got 'five'"
    assert out_files(tmp_path) == []
    r = run_cli("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python data/fineweb/prepare.py [INPUT ...]")
    assert "--max_docs=None" in r.stdout and "stop when the directory holds this many documents" in r.stdout


@pytest.mark.slow
def test_unusable_out_dir_one_line(tmp_path):
    """--out_dir that is a file, or under a file (unwritable even for root), or read-only: one line, nothing made."""
    src = write_parquet(tmp_path / "s.parquet", ["one doc", "another doc"])
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = [(a_file, f"--out_dir {a_file} is a file, not a directory"),
             (a_file / "sub" / "dir", f"cannot create --out_dir {a_file / 'sub' / 'dir'}: Not a directory")]
    if os.geteuid() != 0:  # root writes into read-only directories anyway
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        cases.append((read_only / "new", "Permission denied"))
    for out, message in cases:
        r = run_cli(src, f"--out_dir={out}", "--num_proc=1")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and line.startswith("prepare.py: error: ") and message in line, line
    assert a_file.read_text() == "not a directory"


@needs_tokenizer
def test_failed_run_leaves_no_directory(tmp_path):
    """A run that fails creates nothing: not out_dir, not the parents it had to create."""
    missing = tmp_path / "missing.parquet"
    code = run_main(missing, f"--out_dir={tmp_path / 'new' / 'deeper'}")
    assert code.startswith("prepare.py: error: no such file") and out_files(tmp_path) == []
    (tmp_path / "keep").mkdir()
    assert run_main(missing, f"--out_dir={tmp_path / 'keep' / 'x'}") is not None
    assert out_files(tmp_path) == ["keep"] and out_files(tmp_path / "keep") == []


# -----------------------------------------------------------------------------
# remote input

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """http.server's file handler plus byte ranges (Range: bytes=a-b -> 206), counting the bytes it sends."""
    sent = 0

    def log_message(self, *args):
        pass

    def send_head(self):
        header = self.headers.get("Range")
        if self.command == "HEAD":
            f = super().send_head()  # the plain headers (Content-Length) ...
            if f:
                f.close()
            return None
        if not header:
            return super().send_head()
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        start, end = map(int, header.removeprefix("bytes=").split("-"))
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{os.path.getsize(path)}")
        self.end_headers()
        type(self).sent += len(data)
        return io.BytesIO(data)

    def end_headers(self):
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1 from a thread, with byte ranges; yields the base URL, root, handler."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (RangeHandler,), {"sent": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, handler
    server.shutdown()
    server.server_close()


@needs_tokenizer
def test_remote_url_downloaded_whole(tmp_path, http_server):
    """Without a cap, a URL is downloaded once into the cache (complete, no .part left) and read locally."""
    base, root, _ = http_server
    src = write_parquet(root / "shard.parquet", [f"document {i} " * 20 for i in range(300)])
    cache = tmp_path / "cache"
    r = run_cli(f"{base}/shard.parquet", f"--out_dir={tmp_path / 'remote'}", f"--cache_dir={cache}")
    assert r.returncode == 0, r.stderr
    assert run_main(src, f"--out_dir={tmp_path / 'local'}") is None
    for name in ("train_000000.bin", "val_000000.bin"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == src.read_bytes()
    assert read_meta(tmp_path / "remote")["inputs"][0]["source"] == f"{base}/shard.parquet"
    code = run_main(f"{base}/missing.parquet", f"--out_dir={tmp_path / 'x'}", f"--cache_dir={cache}")
    assert "cannot download" in code and "404" in code


def test_remote_url_with_max_docs_reads_only_what_it_needs(sample_parquet, tmp_path, http_server):
    """--max_docs on a remote file: range requests fetch the footer and the first row groups only, nothing is
    cached, and the tokens equal those of the same run on the local file."""
    base, root, handler = http_server
    shutil.copyfile(sample_parquet, root / "shard.parquet")
    cache = tmp_path / "cache"
    r = run_cli(f"{base}/shard.parquet", f"--out_dir={tmp_path / 'remote'}", f"--cache_dir={cache}",
                "--max_docs=1500", "--val_docs=50")
    assert r.returncode == 0, r.stderr
    assert run_main(sample_parquet, f"--out_dir={tmp_path / 'local'}", "--max_docs=1500", "--val_docs=50") is None
    for name in ("train_000000.bin", "val_000000.bin"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert 0 < handler.sent < sample_parquet.stat().st_size / 3  # the sample has 11 row groups; 1 is needed
    assert not cache.exists()
    source = read_meta(tmp_path / "remote")["inputs"][0]
    assert source["size"] == sample_parquet.stat().st_size and source["source"] == f"{base}/shard.parquet"
    code = run_main(f"{base}/missing.parquet", f"--out_dir={tmp_path / 'x'}", "--max_docs=5")
    assert code.startswith("prepare.py: error: cannot open") and "404" in code


def test_remote_without_byte_ranges_is_one_line(sample_parquet, tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    shutil.copyfile(sample_parquet, root / "shard.parquet")
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard.parquet"
        code = run_main(url, f"--out_dir={tmp_path / 'x'}", "--max_docs=5")
    finally:
        server.shutdown()
        server.server_close()
    assert "does not serve byte ranges" in code and "\n" not in code


def test_encode_batch_equals_encode_ordinary(sample_parquet):
    """The fast path (encode_to_numpy without special tokens) against the plain one, EOT first."""
    enc = prepare.load_tokenizer()
    texts = pq.ParquetFile(sample_parquet).read_row_group(0, columns=["text"]).column(0).to_pylist()[:300]
    texts += ["<|endoftext|> inside", "<|fim_prefix|>", "🙂 naïve"]
    tokens, lens = prepare.encode_batch(texts)
    expected = [t for text in texts for t in [EOT] + enc.encode_ordinary(text)]
    assert tokens.dtype == np.dtype("<u2") and tokens.tolist() == expected
    assert lens.tolist() == [len(enc.encode_ordinary(t)) + 1 for t in texts]
    assert len(prepare.encode_batch([])[0]) == 0


class FakeHub(http.server.BaseHTTPRequestHandler):
    """What huggingface_hub's HfFileSystem asks of the hub (seen with huggingface_hub 2.4): the repository's info,
    a folder's listing, and byte ranges of a file; files come from a local folder. Counts the file bytes it sends."""
    root, sent = None, 0

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        import json
        import urllib.parse
        path = urllib.parse.unquote(self.path.split("?")[0])
        if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
            return self.reply(200, json.dumps({"id": m.group(1), "sha": "0" * 40}).encode())
        if m := re.fullmatch(r"/api/datasets/[^/]+/[^/]+/tree/[^/]+/?(.*)", path):
            folder = self.root / m.group(1)
            if not folder.is_dir():
                return self.reply(404, b'{"error": "not found"}', [("X-Error-Code", "EntryNotFound")])
            return self.reply(200, json.dumps([{"type": "file" if p.is_file() else "directory", "size": p.stat().st_size,
                                                "path": str(p.relative_to(self.root)), "oid": "1" * 40}
                                               for p in sorted(folder.iterdir())]).encode())
        if m := re.fullmatch(r"/datasets/[^/]+/[^/]+/resolve/[^/]+/(.*)", path):
            data = (self.root / m.group(1)).read_bytes()
            start, end = map(int, self.headers["Range"].removeprefix("bytes=").split("-"))
            type(self).sent += len(data[start:end + 1])
            return self.reply(206, data[start:end + 1], [("Content-Range", f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}")])
        self.reply(404)


@pytest.fixture
def fake_hub(tmp_path):
    """A stand-in for huggingface.co on 127.0.0.1 serving tmp_path/hub as the dataset HuggingFaceFW/fineweb; yields
    (the environment that points HF_ENDPOINT at it, its root folder, its handler class)."""
    root = tmp_path / "hub"
    (root / "sample" / "10BT").mkdir(parents=True)
    handler = type("Hub", (FakeHub,), {"root": root, "sent": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_OFFLINE="0")
    yield env, root, handler
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_hf_inputs_through_hf_filesystem(sample_parquet, tmp_path, fake_hub):
    """hf: inputs (the default one too) are read through huggingface_hub's file system, which honours HF_ENDPOINT:
    with --max_docs only the footer and the first row groups are fetched; the tokens equal a local run's."""
    env, root, handler = fake_hub
    shutil.copyfile(sample_parquet, root / "sample" / "10BT" / "000_00000.parquet")

    def prepare_from_hub(*args):
        return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, **env}, cwd=REPO, timeout=300)
    r = prepare_from_hub(f"--out_dir={tmp_path / 'hub_out'}", "--max_docs=1500", "--val_docs=50", "--num_proc=1")
    assert r.returncode == 0, r.stderr
    assert 0 < handler.sent < sample_parquet.stat().st_size / 3  # 11 row groups of 2,000 rows; 1 is needed
    assert run_main(sample_parquet, f"--out_dir={tmp_path / 'local'}", "--max_docs=1500", "--val_docs=50") is None
    for name in ("train_000000.bin", "val_000000.bin"):
        assert (tmp_path / "hub_out" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    [entry] = read_meta(tmp_path / "hub_out")["inputs"]
    assert entry["source"] == "hf:sample/10BT/000_00000.parquet" and entry["size"] == sample_parquet.stat().st_size
    r = prepare_from_hub("hf:sample/10BT/999_00000.parquet", f"--out_dir={tmp_path / 'x'}")
    assert r.returncode == 1 and r.stderr.strip() == ("prepare.py: error: hf:sample/10BT/999_00000.parquet: no such file on "
                                                     "the Hugging Face hub (datasets/HuggingFaceFW/fineweb/sample/10BT/999_00000.parquet)")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_hub_unreachable_is_one_line(tmp_path):
    """Offline with the default input: one line that names the way out, no retry chatter, nothing created."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}  # nothing listens there
    r = subprocess.run([sys.executable, str(PREPARE), f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("prepare.py: error: cannot reach hf:sample/10BT/000_00000.parquet on the Hugging Face hub")
    assert "offline, pass a local .parquet/.jsonl/.txt file instead (docs/data.md)" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tokenizer_from_a_local_file(sample_parquet, tmp_path, monkeypatch):
    """Offline set-up: GPT2_TIKTOKEN_FILE names a copy of gpt2.tiktoken. With an empty tiktoken cache and no
    network, prepare.py writes the same tokens as with tiktoken's own GPT-2 encoding; without the variable, the
    error names it."""
    import tiktoken
    from smallgpt.errors import DataError
    from smallgpt.tokenizer import get_tokenizer
    from conftest import SHARED_DATA
    texts = pq.ParquetFile(sample_parquet).read_row_group(0, columns=["text"]).column(0).to_pylist()[:200]
    monkeypatch.setenv("GPT2_TIKTOKEN_FILE", str(SHARED_DATA / "gpt2.tiktoken"))
    local = get_tokenizer()
    reference = tiktoken.get_encoding("gpt2")
    for text in texts + ["<|endoftext|> héllo 🙂\n\n  x"]:
        assert local.encode(text, allowed_special={"<|endoftext|>"}) == reference.encode(text, allowed_special="all")
    assert local.eot_token == reference.eot_token == EOT and reference.n_vocab == 50257
    assert local.n_vocab == 50267  # and the reserved chat tokens after <|endoftext|>
    monkeypatch.setenv("GPT2_TIKTOKEN_FILE", str(SHARED_DATA / "vocab.bpe"))
    with pytest.raises(DataError, match="is not gpt2.tiktoken"):
        get_tokenizer()
    monkeypatch.delenv("GPT2_TIKTOKEN_FILE")

    src = write_parquet(tmp_path / "s.parquet", texts)
    assert run_main(src, f"--out_dir={tmp_path / 'reference'}", "--num_proc=1") is None
    offline = {k: v for k, v in os.environ.items() if k != "GPT2_TIKTOKEN_FILE"}  # set per call below
    offline.update(TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"), https_proxy="http://127.0.0.1:9",
                   HTTPS_PROXY="http://127.0.0.1:9")  # any download fails at once

    def prepare_offline(out, **env):
        return subprocess.run([sys.executable, str(PREPARE), str(src), f"--out_dir={tmp_path / out}", "--num_proc=1"],
                              capture_output=True, text=True, env={**offline, **env}, timeout=120)
    r = prepare_offline("local", GPT2_TIKTOKEN_FILE=str(SHARED_DATA / "gpt2.tiktoken"))
    assert r.returncode == 0, r.stderr
    for name in ("train_000000.bin", "val_000000.bin"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert not any((tmp_path / "empty_cache").glob("*"))  # tiktoken's cache was not used
    r = prepare_offline("x")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("prepare.py: error: cannot load the GPT-2 tokenizer")
    assert "set GPT2_TIKTOKEN_FILE to a copy of gpt2.tiktoken" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@needs_tokenizer
def test_prepare_does_not_import_torch(tmp_path):
    """prepare.py shares the package with the training scripts but must not pay for torch's import (~1.5 s)."""
    src = write_parquet(tmp_path / "s.parquet", ["one document", "another one"])
    r = subprocess.run([sys.executable, "-X", "importtime", str(PREPARE), str(src), f"--out_dir={tmp_path / 'out'}",
                        "--num_proc=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "numpy" in imported and "pyarrow" in imported and "tiktoken" in imported  # the listing works
    assert "torch" not in imported
