"""
Tokenize FineWeb (or any parquet file with a text column) into the token files train.py reads.

Source: the Hugging Face dataset HuggingFaceFW/fineweb, parquet shards of ~2.15 GB (~1M documents,
~0.7B GPT-2 tokens) under data/CC-MAIN-YYYY-WW/ and sample/10BT/ (000_00000 .. 014_00000.parquet).
One record (the columns besides `text` are ignored, except language_score with --min_language_score):
  {"text": "Surprise your boss.  Get to work on time.", "id": "<urn:uuid:4c1c...>",
   "dump": "CC-MAIN-2013-20", "url": "http://...", "date": "2013-05-01T00:00:00Z",
   "file_path": "s3://commoncrawl/...", "language": "en", "language_score": 0.6853, "token_count": 12}

Commands:
  python data/fineweb/prepare.py                              # downloads sample/10BT/000_00000.parquet
  python data/fineweb/prepare.py hf:sample/10BT/001_00000.parquet shards/ 'more/*.parquet'
  python data/fineweb/prepare.py https://host/x.parquet --out_dir=data/web --max_docs=10000
  python data/fineweb/prepare.py --max_docs=5000 --val_docs=200 --out_dir=data/sample   # reads ~first row groups
With --max_docs or --max_tokens, a remote file (hf: or http(s)) is not downloaded: its footer and then only the
row groups needed are read with HTTP range requests (nothing cached). Without them it is downloaded once.
  python data/fineweb/prepare.py ../shared/data/english-sample.parquet --val_fraction=0.01

Output (in --out_dir, default: this script's directory; format defined in common.py):
  train.bin, val.bin  raw little-endian uint16 GPT-2 token ids. Every document, in input order, is
                      preceded by the EOT token 50256: [EOT, doc0..., EOT, doc1..., ...]
  meta.json           {"format": "gpt-tokens", "version": 1, "dtype": "uint16", "tokenizer": "gpt2",
                       "vocab_size": 50257, "eot_token": 50256,
                       "splits": {"train": {"documents", "tokens" (EOTs included), "bytes" (UTF-8 of
                       the texts, for bits per byte)}, "val": {...}}, "sources": [{"path", "bytes"}],
                       "skipped": {"null_or_empty", "below_language_score"}, "options": {...}}
The three files appear only when the run completes (written under temporary names .train.tmp<PID> ..., then
renamed); the temporary files of a run killed with kill -9 are removed by the next run into the same --out_dir.
A document's split depends only on --seed and its row number in the input: the same input and flags
give byte-identical files, whatever --num_proc.
"""
import argparse
import collections
import glob
import hashlib
import io
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

# run as a file (python data/fineweb/prepare.py, as the docs say): the repository root holds the package
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from smallgpt.errors import DataError  # noqa: E402
from smallgpt.tokens import FORMAT_NAME, FORMAT_VERSION, SPLITS, TOKEN_DTYPE, get_tokenizer  # noqa: E402

HF_REPO = "HuggingFaceFW/fineweb"
DEFAULT_INPUT = "hf:sample/10BT/000_00000.parquet"
BATCH_ROWS = 1024  # documents per task: ~3 MB of FineWeb text, ~0.2 s of tokenizing on one core
NUM_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
OPTIONS = ("inputs", "text_column", "val_fraction", "val_docs", "seed", "max_docs", "max_tokens",
           "min_language_score")  # the flags that change the output; recorded in meta.json


def parse_args(argv=None):
    # no abbreviations: --max_doc=5 must not be taken for --max_docs=5 and replace a good dataset
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    p.error = lambda message: p.exit(2, f"prepare.py: error: {message} (see --help)\n")  # one line, no usage block
    p.add_argument("inputs", nargs="*", default=[DEFAULT_INPUT],
                   help="parquet files, directories, globs, http(s) URLs or hf:<path in HuggingFaceFW/fineweb>"
                        f" (default: {DEFAULT_INPUT})")
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)), help="output directory")
    p.add_argument("--text_column", default="text", help="column holding the document text")
    p.add_argument("--val_fraction", type=float, default=0.001, help="fraction of documents for val, 0..1")
    p.add_argument("--val_docs", type=int, default=None, help="number of val documents: rows drawn by --seed, fewer if some get skipped (overrides --val_fraction)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--max_docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--max_tokens", type=int, default=None, help="stop before exceeding this many tokens (whole documents)")
    p.add_argument("--min_language_score", type=float, default=None, help="skip rows whose language_score is lower")
    p.add_argument("--num_proc", type=int, default=NUM_CPUS, help="tokenizer processes")
    p.add_argument("--cache_dir", default=None, help="download cache (default: ~/.cache/gpt-prepare, HF's own cache for hf:)")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        p.error("--val_fraction must be in [0, 1)")
    for name, low in (("val_docs", 0), ("max_docs", 1), ("max_tokens", 1), ("num_proc", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name} must be at least {low}")
    return args


# -----------------------------------------------------------------------------
# Inputs: turn each argument into local parquet files, downloading remote ones into a cache.

def download_url(url, cache_dir):
    """Fetch url into cache_dir once (a .part file renamed when complete, so a broken download is never reused)."""
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "gpt-prepare")
    os.makedirs(cache_dir, exist_ok=True)
    name = hashlib.sha1(url.encode()).hexdigest()[:12] + "-" + os.path.basename(url.split("?")[0])
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        return path
    part = f"{path}.part{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            size = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=size or None, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(name)}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if size and os.path.getsize(part) != size:
            raise DataError(f"download of {url} stopped after {os.path.getsize(part)} of {size} bytes")
        os.replace(part, path)
    except OSError as e:  # urllib's URLError/HTTPError are OSErrors
        raise DataError(f"cannot download {url}: {e}") from None
    finally:
        if os.path.exists(part):
            os.remove(part)
    return path


class RemoteFile(io.RawIOBase):
    """A remote file read through HTTP range requests, seekable: pyarrow reads a parquet file's footer and then
    only the row groups it needs, so a capped run (--max_docs) fetches a small part of a 2 GB shard."""

    def __init__(self, url):
        super().__init__()
        try:  # a HEAD request: the size, whether ranges work, and the final address after redirects
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
                self.url, self.size = r.geturl(), int(r.headers.get("Content-Length") or -1)
                ranges = r.headers.get("Accept-Ranges", "")
        except OSError as e:
            raise DataError(f"cannot open {url}: {e}") from None
        if self.size < 0 or ranges != "bytes":
            raise DataError(f"{url}: the server does not serve byte ranges; drop --max_docs/--max_tokens to download it whole")
        self.pos, self.fetched = 0, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer):
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{self.pos + n - 1}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                data = r.read()
        except OSError as e:
            raise DataError(f"reading {self.url}: {e}") from None
        if len(data) != n:
            raise DataError(f"{self.url}: asked for {n} bytes at {self.pos}, got {len(data)}")
        buffer[:n] = data
        self.pos, self.fetched = self.pos + n, self.fetched + n
        return n


def hf_url(path):
    return f"https://huggingface.co/datasets/{HF_REPO}/resolve/main/{path}"


def resolve_inputs(specs, cache_dir, stream=False):
    """Expand the input arguments into a list of (local path or streamed URL, origin) in a fixed (sorted) order.
    stream: remote files are read in place with range requests instead of downloaded."""
    files = []
    for spec in specs:
        if stream and spec.startswith(("hf:", "http://", "https://")):
            files.append((hf_url(spec[3:]) if spec.startswith("hf:") else spec, spec))
        elif spec.startswith("hf:"):
            from huggingface_hub import hf_hub_download  # slow import, only when needed
            try:
                files.append((hf_hub_download(repo_id=HF_REPO, repo_type="dataset", filename=spec[3:],
                                              cache_dir=cache_dir), spec))
            except Exception as e:  # hub errors come in many classes; all mean "could not fetch"
                raise DataError(f"cannot download {spec[3:]} from {HF_REPO}: {e}") from None
        elif spec.startswith(("http://", "https://")):
            files.append((download_url(spec, cache_dir), spec))
        elif os.path.isdir(spec) or glob.has_magic(spec):
            pattern = os.path.join(spec, "**", "*.parquet") if os.path.isdir(spec) else spec
            found = sorted(glob.glob(pattern, recursive=True))
            if not found:
                raise DataError(f"no files match {pattern}")
            files += [(f, f) for f in found]
        elif os.path.isfile(spec):
            files.append((spec, spec))
        else:
            raise DataError(f"no such file or directory: {spec}")
    return files


def open_sources(files, text_column, need_score):
    """Open every parquet file up front (reads only the footers) so bad input fails before any work."""
    sources = []
    for path, origin in files:
        streamed = path.startswith(("http://", "https://"))
        try:
            handle = io.BufferedReader(RemoteFile(path), buffer_size=1 << 20) if streamed else path
            pf = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        if text_column not in names:
            raise DataError(f"{path}: no column {text_column!r} (columns: {', '.join(names)}); see --text_column")
        kind = pf.schema_arrow.field(text_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {text_column!r} holds {kind}, not text; see --text_column")
        if need_score and "language_score" not in names:
            raise DataError(f"{path}: no column 'language_score', needed by --min_language_score")
        sources.append((pf, path, origin, handle.raw.size if streamed else os.path.getsize(path)))
    return sources


# -----------------------------------------------------------------------------
# The train/val split is a function of (seed, global row number) only, so it does not depend on
# --num_proc, batch sizes or filters, and the same input and seed always give the same split.

def val_rows_for_count(n_val, total_rows, seed):
    """--val_docs: exactly n_val row numbers drawn without replacement (fewer if some of them get skipped)."""
    return np.sort(np.random.default_rng(seed).choice(total_rows, size=min(n_val, total_rows), replace=False))


def in_val(rows, args, val_rows):
    """Boolean mask: which of these global row numbers belong to val."""
    if val_rows is not None:
        return np.isin(rows, val_rows)
    # --val_fraction: splitmix64 hash of (seed, row) as a uniform number in [0, 1)
    z = rows.astype(np.uint64) + np.uint64(args.seed * 0x9E3779B97F4A7C15 % 2**64)  # arrays wrap mod 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < args.val_fraction


def iter_record_batches(pf, columns):
    """A file's record batches, one row group at a time: one iter_batches over a whole file holds on to memory
    as it goes (pyarrow 26: peak RSS 150 MB on the sample, 430 MB on 30 copies of it); this stays flat."""
    for row_group in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, row_groups=[row_group])


def read_batches(sources, args, val_rows):
    """Stream the text column, BATCH_ROWS rows at a time (never a whole file in memory). Yields (texts, info):
    the kept texts as a list of str, and what the main process needs about them (global row numbers,
    UTF-8 sizes, val flags, and the row numbers of the skipped rows, by reason)."""
    row0, docs = 0, 0  # global row number of the batch's first row, documents yielded so far
    columns = [args.text_column] + (["language_score"] if args.min_language_score is not None else [])
    for pf, path, _, _ in sources:
        try:
            for batch in iter_record_batches(pf, columns):
                text = batch.column(0)
                nbytes = pc.fill_null(pc.binary_length(text), 0).to_numpy()  # UTF-8 bytes, 0 for null and ""
                empty, low = nbytes == 0, np.zeros(len(text), bool)
                if args.min_language_score is not None:
                    low = (pc.fill_null(batch.column(1), -1.0).to_numpy() < args.min_language_score) & ~empty
                keep = ~(empty | low)
                if args.max_docs is not None and docs + keep.sum() >= args.max_docs:
                    n = np.flatnonzero(keep)[args.max_docs - docs - 1] + 1  # cut after the last wanted document
                    text, nbytes, empty, low, keep = text[:n], nbytes[:n], empty[:n], low[:n], keep[:n]
                rows = row0 + np.flatnonzero(keep)
                info = dict(rows=rows, bytes=nbytes[keep].astype(np.int64), val=in_val(rows, args, val_rows),
                            skipped={"null_or_empty": row0 + np.flatnonzero(empty),
                                     "below_language_score": row0 + np.flatnonzero(low)})
                yield text.filter(pa.array(keep)).to_pylist(), info
                row0, docs = row0 + len(text), docs + len(rows)
                if args.max_docs is not None and docs >= args.max_docs:
                    return
        except (pa.ArrowException, OSError) as e:  # a corrupt page shows up only when it is read
            raise DataError(f"{path}: cannot read ({e})") from None


# -----------------------------------------------------------------------------
# Tokenizing: worker processes encode batches; the main process reads parquet and writes tokens.

_enc = None  # the tokenizer, one per process


def load_tokenizer():
    global _enc
    if _enc is None:  # forked workers inherit the main process's tokenizer; spawned ones load it
        _enc = get_tokenizer()  # a DataError with one clear line when offline without tiktoken's files
        assert _enc.n_vocab <= np.iinfo(TOKEN_DTYPE).max + 1, "token ids must fit the token dtype"
    return _enc


def _exit_with_parent():
    """In a worker: exit as soon as the main process is gone. Otherwise a worker can wait forever on a queue lock
    that a sibling held when it died (seen after kill -9 of the main process)."""
    mp.connection.wait([mp.parent_process().sentinel])  # ready when the parent exits, however it exits
    os._exit(0)


def _init_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and kill are handled once, by the main process,
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # which then terminates the workers
    # if the main process dies (kill -9), a worker's next result goes into a pipe nobody reads: die quietly there,
    # like a Unix tool in a pipeline, instead of printing a BrokenPipeError traceback (Python ignores SIGPIPE)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # blocked by start_pool
    load_tokenizer()


def start_pool(num_proc):
    """Fork the workers with SIGINT/SIGTERM blocked: a Ctrl-C landing during a fork is otherwise swallowed
    by CPython's at-fork hooks ("Exception ignored in _releaseLock") and the run goes on. Delivered after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return mp.Pool(num_proc, initializer=_init_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def encode_batch(texts):
    """-> (tokens, lengths): the documents as one uint16 array, each preceded by EOT, and each one's length."""
    eot = np.array([_enc.eot_token], np.uint32)
    lens, parts = np.empty(len(texts), np.int64), [np.empty(0, np.uint32)]  # (a batch can be all skipped rows)
    for i, text in enumerate(texts):
        # = encode_ordinary (no special tokens: a literal "<|endoftext|>" in a page stays text), but into a
        # numpy buffer rather than a list of Python ints: ~15% faster (tiktoken >= 0.8)
        ids = _enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        parts += (eot, ids)
        lens[i] = len(ids) + 1
    return np.concatenate(parts).astype(TOKEN_DTYPE), lens  # ids < 2**16, checked in load_tokenizer


def encode_in_order(batches, pool, depth):
    """Like pool.imap, but keeps at most `depth` batches in flight (imap would read the whole input ahead)."""
    if pool is None:
        yield from ((info, encode_batch(texts)) for texts, info in batches)
        return
    pending = collections.deque()
    for texts, info in batches:
        pending.append((info, pool.apply_async(encode_batch, (texts,))))
        if len(pending) >= depth:
            info, result = pending.popleft()
            yield info, result.get()
    while pending:
        info, result = pending.popleft()
        yield info, result.get()


def tokenize(sources, args, out):
    """Write all documents to the open files out["train"], out["val"]; returns the stats for meta.json."""
    total_rows = sum(pf.metadata.num_rows for pf, _, _, _ in sources)
    val_rows = None
    if args.val_docs is not None:
        val_rows = val_rows_for_count(args.val_docs, min(total_rows, args.max_docs or total_rows), args.seed)
    stats = {s: dict(documents=0, tokens=0, bytes=0) for s in SPLITS}
    skipped = dict(null_or_empty=0, below_language_score=0)
    load_tokenizer()  # before the fork, so workers start ready
    pool = start_pool(args.num_proc) if args.num_proc > 1 else None  # 1: tokenize in this process
    t0, n_tokens = time.time(), 0
    bar = tqdm(total=min(total_rows, args.max_docs or total_rows), unit="doc", unit_scale=True, desc="tokenizing")
    try:
        for info, (tokens, lens) in encode_in_order(read_batches(sources, args, val_rows), pool, 2 * args.num_proc):
            cut = len(lens)  # documents of this batch to keep
            if args.max_tokens is not None:  # whole documents only, in order
                cut = int(np.searchsorted(np.cumsum(lens), args.max_tokens - n_tokens, side="right"))
                tokens, lens = tokens[:lens[:cut].sum()], lens[:cut]
            is_val = info["val"][:cut]
            val_token = np.repeat(is_val, lens)
            for split, docs, part in (("train", ~is_val, tokens[~val_token]), ("val", is_val, tokens[val_token])):
                out[split].write(part)
                stats[split]["documents"] += int(docs.sum())
                stats[split]["tokens"] += len(part)
                stats[split]["bytes"] += int(info["bytes"][:cut][docs].sum())
            full = cut == len(info["val"])
            last_row = np.inf if full else info["rows"][cut]  # rows from here on were not used
            for reason, rows in info["skipped"].items():
                skipped[reason] += int((rows < last_row).sum())
            n_tokens += len(tokens)
            bar.update(cut)
            bar.set_postfix_str(f"{n_tokens / (time.time() - t0) / 1e6:.2f}M tok/s", refresh=False)
            if not full:
                break
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # also stops workers still busy with batches past a --max_tokens cut
    return stats, skipped, time.time() - t0


def write_outputs(args, sources, tmp):
    """Tokenize into the temp files tmp[...], then rename them into place. meta.json is removed first and
    renamed last: a run stopped at any point leaves either the old complete output or no meta.json at all
    (which read_meta refuses), never a mix."""
    with open(tmp["train"], "wb", buffering=1 << 24) as ftrain, open(tmp["val"], "wb", buffering=1 << 24) as fval:
        stats, skipped, seconds = tokenize(sources, args, {"train": ftrain, "val": fval})
        for f in (ftrain, fval):  # on disk before the renames make it visible
            f.flush()
            os.fsync(f.fileno())
    if sum(s["documents"] for s in stats.values()) == 0:
        raise DataError(f"no documents in the input ({skipped['null_or_empty']} null/empty rows, "
                        f"{skipped['below_language_score']} below --min_language_score"
                        + (f"; or the first document alone exceeds --max_tokens={args.max_tokens}" if args.max_tokens else "") + ")")
    meta = dict(format=FORMAT_NAME, version=FORMAT_VERSION, dtype="uint16", tokenizer="gpt2",
                vocab_size=_enc.n_vocab, eot_token=_enc.eot_token, splits=stats,
                sources=[dict(path=path if path.startswith(("http://", "https://")) else os.path.abspath(path),
                              bytes=nbytes, rows=pf.metadata.num_rows, **({"origin": origin} if origin != path else {}))
                         for pf, path, origin, nbytes in sources],
                skipped=skipped, options={k: getattr(args, k) for k in OPTIONS})
    with open(tmp["meta"], "w") as f:
        json.dump(meta, f, indent=2)
    meta_path = os.path.join(args.out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split in SPLITS:
        os.replace(tmp[split], os.path.join(args.out_dir, f"{split}.bin"))
    os.replace(tmp["meta"], meta_path)
    return stats, skipped, seconds


def make_out_dir(out_dir):
    """Create out_dir and its missing parents; returns the directories created, deepest first, so that a failed
    run can remove them again."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out_dir {out_dir} is a file, not a directory")
    created, path = [], os.path.abspath(out_dir)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, a read-only file system
        raise DataError(f"cannot create --out_dir {out_dir}: {e.strerror}") from None
    return created


def remove_stale_temporaries(out_dir):
    """kill -9 gives no chance to clean up: remove the temp files (.train.tmp<PID> ...) of runs whose process
    is gone. Those of a live process (maybe a run writing here now) are left alone."""
    for name in os.listdir(out_dir):
        m = re.fullmatch(r"\.(?:train|val|meta)\.tmp(\d+)", name)
        if m and not process_alive(int(m.group(1))):
            os.remove(os.path.join(out_dir, name))


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def main(argv=None):
    args = parse_args(argv)
    tmp = {name: os.path.join(args.out_dir, f".{name}.tmp{os.getpid()}") for name in (*SPLITS, "meta")}
    created, finished = [], False
    try:
        created = make_out_dir(args.out_dir)
        remove_stale_temporaries(args.out_dir)
        load_tokenizer()
        stream = args.max_docs is not None or args.max_tokens is not None  # read only what is needed
        sources = open_sources(resolve_inputs(args.inputs, args.cache_dir, stream), args.text_column,
                               args.min_language_score is not None)
        stats, skipped, seconds = write_outputs(args, sources, tmp)
        finished = True
    except DataError as e:
        sys.exit(f"prepare.py: error: {' '.join(str(e).split())}")  # exit status 1, one line on stderr
    except OSError as e:  # an unwritable out_dir, a full disk: the message names the file
        sys.exit(f"prepare.py: error: {e.strerror}: {e.filename}" if e.filename else f"prepare.py: error: {e}")
    except KeyboardInterrupt:
        print("prepare.py: interrupted; partial output removed", file=sys.stderr)
        sys.exit(130)
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        for path in created if not finished else []:  # a failed run leaves no empty directory behind
            try:
                os.rmdir(path)
            except OSError:  # not empty (something else wrote there): keep it and its parents
                break
    report(args, stats, skipped, seconds)


def report(args, stats, skipped, seconds):
    docs, tokens = (sum(s[k] for s in stats.values()) for k in ("documents", "tokens"))
    print(f"wrote {args.out_dir}: " + " | ".join(
        f"{split} {s['documents']:,} docs {s['tokens']:,} tokens {s['bytes']:,} bytes" for split, s in stats.items()))
    print(f"skipped {skipped['null_or_empty']:,} null/empty rows, {skipped['below_language_score']:,} below language score")
    print(f"{docs:,} docs, {tokens:,} tokens in {seconds:.1f} s: {docs / seconds:,.0f} docs/s, "
          f"{tokens / seconds / 1e6:.2f}M tokens/s with {args.num_proc} process(es)")
    for split, advice in (("val", "raise --val_fraction or --val_docs"), ("train", "lower --val_docs or --val_fraction")):
        if stats[split]["documents"] == 0:
            print(f"warning: the {split} split is empty; {advice}", file=sys.stderr)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill cleans up the temp files, like Ctrl-C
    main()
