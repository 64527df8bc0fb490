"""
Tokenize text into the token shards train.py reads: FineWeb (or any parquet file with a text column), .jsonl /
.jsonl.gz, .txt files and folders of them. A data directory grows: run prepare.py on it again with new inputs
and only those are tokenized and appended; a run stopped at any moment (Ctrl-C, kill -9, a crash) continues
from the end of its last complete shard when the same command runs again, with the same result as an
uninterrupted run.

Source: the Hugging Face dataset HuggingFaceFW/fineweb, parquet files of ~2.15 GB (~1M documents, ~0.7B GPT-2
tokens) under data/CC-MAIN-YYYY-WW/ and sample/10BT/ (000_00000 .. 014_00000.parquet). One record (the columns
besides `text` are ignored, except language_score with --min_language_score):
  {"text": "Surprise your boss.  Get to work on time.", "id": "<urn:uuid:4c1c...>",
   "dump": "CC-MAIN-2013-20", "url": "http://...", "date": "2013-05-01T00:00:00Z",
   "file_path": "s3://commoncrawl/...", "language": "en", "language_score": 0.6853, "token_count": 12}

Commands:
  python data/fineweb/prepare.py                              # hf:sample/10BT/000_00000.parquet into data/fineweb
  python data/fineweb/prepare.py hf:sample/10BT/001_00000.parquet   # later: adds a second file to data/fineweb
  python data/fineweb/prepare.py --max_docs=5000 --val_docs=200 --out_dir=data/sample   # reads the first row groups
  python data/fineweb/prepare.py my_texts/ --txt_document=line --out_dir=data/mine      # .txt/.jsonl/.parquet files
  python data/fineweb/prepare.py my_texts/ --vocab_size=16384 --out_dir=data/mine16k  # its own BPE (docs/tokenizer.md)
hf: files are read in place through huggingface_hub's HfFileSystem: the footer, then only the row groups needed.
Inputs and how each is read: smallgpt/sources.py. The output format (manifest.json and the shards):
smallgpt/shards.py and docs/data.md. The train/val rule: val documents come only from the inputs of the first
argument of the run that created the directory, so adding data never changes the val split.
"""
import collections
import fcntl
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

# run as a file (python data/fineweb/prepare.py, as the docs say): the repository root holds the package
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from smallgpt.errors import ConfigError, DataError, run_main  # noqa: E402
from smallgpt.flags import parse_args as parse_flags  # noqa: E402
from smallgpt.shards import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, SPLITS, TOKEN_DTYPE, read_meta,  # noqa: E402
                             shard_name, sync_directory, write_atomically, write_json_atomically)
from smallgpt.sources import check_input, count_rows, read_batches, resolve_inputs  # noqa: E402
from smallgpt.tokenizer import (GPT2, MAX_VOCAB, SPECIAL_TOKENS, TOKENIZER_FILE, bpe_record, check_same,  # noqa: E402
                                data_tokenizer, get_tokenizer, read_tokenizer, train_bpe)

DEFAULT_INPUT = "hf:sample/10BT/000_00000.parquet"
NUM_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
SPLIT_KEYS = ("seed", "val_docs", "val_fraction")  # fixed when the directory is created


@dataclass
class PrepareConfig:
    inputs: list = field(default_factory=lambda: [DEFAULT_INPUT])  # the plain arguments: files, folders, globs, URLs
    out_dir: str = os.path.dirname(os.path.abspath(__file__))  # the data directory: created, or grown if it exists
    text_column: str = "text"  # the parquet column / .jsonl field that holds the document text
    txt_document: str = "file"  # .txt inputs: 'file' = one document per file | 'line' = one per line (empty lines skipped)
    val_fraction: float = 0.001  # share of the first argument's documents held out for val, in [0, 1)
    val_docs: int | None = None  # number of val documents, drawn from the first argument's rows (replaces val_fraction)
    seed: int = 0  # seed of the train/val split
    max_docs: int | None = None  # stop when the directory holds this many documents (a later run can raise it)
    max_tokens: int | None = None  # stop before the directory holds more tokens than this (whole documents, EOTs counted)
    min_language_score: float | None = None  # skip rows whose language_score is lower (FineWeb has that column)
    shard_tokens: int = 100_000_000  # a shard is complete at this many train tokens (200 MB); a killed run resumes there
    num_proc: int = NUM_CPUS  # tokenizer processes; 1 = tokenize in this process
    cache_dir: str = ""  # download cache of http(s) inputs; '' = ~/.cache/gpt-prepare
    tokenizer: str = ""  # 'gpt2', a tokenizer.json or a directory holding one (a data directory); '' = the directory's own, GPT-2 for a new one
    vocab_size: int = 0  # > 0: a new directory gets its own byte-level BPE of this many tokens (at most 65,536), trained on its train documents
    tokenizer_bytes: int = 1_000_000_000  # with vocab_size: the BPE learns from the first this many bytes of train documents


USAGE = """usage: python data/fineweb/prepare.py [INPUT ...] [--key=value ...]
INPUT: .parquet, .jsonl, .jsonl.gz or .txt files, folders and globs of them, http(s) URLs,
hf:<path in HuggingFaceFW/fineweb> or hf://datasets/<owner>/<name>/<path> (default: hf:sample/10BT/000_00000.parquet)"""


def parse_args(argv=None):
    """The flags, checked (one dialect with every script: --key=value, 'did you mean' for a typo)."""
    opts = parse_flags(PrepareConfig, sys.argv[1:] if argv is None else argv, positional="inputs", usage=USAGE)
    if not 0 <= opts.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), not {opts.val_fraction}")
    for name, low in (("val_docs", 0), ("max_docs", 1), ("max_tokens", 1), ("num_proc", 1), ("shard_tokens", 1)):
        if getattr(opts, name) is not None and getattr(opts, name) < low:
            raise ConfigError(f"{name} must be at least {low}, not {getattr(opts, name)}")
    if opts.txt_document not in ("file", "line"):
        raise ConfigError(f"txt_document must be 'file' or 'line', not {opts.txt_document!r}")
    if opts.vocab_size and not len(SPECIAL_TOKENS) + 256 < opts.vocab_size <= MAX_VOCAB:
        raise ConfigError(f"vocab_size must be above {len(SPECIAL_TOKENS) + 256} (the 256 bytes and {len(SPECIAL_TOKENS)} "
                          f"special tokens) and at most {MAX_VOCAB:,} (token files are uint16), not {opts.vocab_size}")
    if opts.vocab_size and opts.tokenizer:
        raise ConfigError("give --tokenizer (use that one) or --vocab_size (train one), not both")
    if opts.tokenizer_bytes < 1:
        raise ConfigError(f"tokenizer_bytes must be at least 1, not {opts.tokenizer_bytes}")
    return opts


# -----------------------------------------------------------------------------
# The manifest: created with the split rule, then every input registered before any of it is read

def new_manifest(opts):
    """A new directory's manifest; its tokenizer fields are set once the tokenizer is known (set_tokenizer)."""
    return dict(format=FORMAT_NAME, version=FORMAT_VERSION, dtype="uint16", tokenizer=None, vocab_size=None, eot_token=None,
                split=dict(seed=opts.seed, val_docs=opts.val_docs, val_fraction=0.0 if opts.val_docs is not None
                           else opts.val_fraction, population_inputs=0, population_rows=None),
                splits={s: dict(documents=0, tokens=0, bytes=0) for s in SPLITS},
                skipped=dict(null_or_empty=0, below_language_score=0), inputs=[], shards=[])


def open_manifest(opts, given):
    """The directory's manifest (None for a new directory), checked against this run's flags."""
    if not os.path.exists(os.path.join(opts.out_dir, MANIFEST)):
        if os.path.exists(os.path.join(opts.out_dir, "meta.json")):
            raise DataError(f"{opts.out_dir} holds the single-file output of an older prepare.py (train.bin, val.bin, "
                            f"meta.json; train.py still reads it): prepare into another --out_dir")
        return None
    manifest = read_meta(opts.out_dir)
    manifest.pop("files")  # derived by read_meta, not stored
    split = manifest["split"]
    wanted = dict(seed=opts.seed, val_docs=opts.val_docs, val_fraction=opts.val_fraction)
    for key in SPLIT_KEYS:
        if key in given and wanted[key] != split[key]:
            raise DataError(f"{opts.out_dir} was made with --{key}={split[key]}: the train/val split is fixed when a "
                            f"directory is created (drop --{key}, or prepare into another --out_dir)")
    return manifest


def register_inputs(manifest, inputs, opts):
    """Match the inputs against the manifest: known ones are skipped (complete) or continued (a stopped run);
    new ones are appended, in order. Creates the manifest (and fixes the val rows) for a new directory."""
    creating = manifest is None
    manifest = manifest or new_manifest(opts)
    known = {entry["source"]: entry for entry in manifest["inputs"]}
    need_score = opts.min_language_score is not None
    for inp in inputs:
        entry = known.get(inp.source)
        if entry is None:
            check_input(inp, opts.text_column, need_score)
            entry = known[inp.source] = dict(source=inp.source, kind=inp.kind, size=inp.bytes, version=inp.version,
                                             options=input_options(inp, opts), rows=0, complete=False, shards=[],
                                             splits={s: dict(documents=0, tokens=0, bytes=0) for s in SPLITS},
                                             skipped=dict(null_or_empty=0, below_language_score=0))
            manifest["inputs"].append(entry)
        else:
            check_known_input(entry, inp, opts)
    if creating:  # the val population: the inputs of the first argument
        population = [inp for inp in inputs if inp.argument == inputs[0].argument]
        manifest["split"]["population_inputs"] = len(population)
        if opts.val_docs is not None:
            rows = sum(count_rows(inp, opts.text_column, opts.txt_document) for inp in population)
            manifest["split"]["population_rows"] = min(rows, opts.max_docs or rows)
    return manifest


def input_options(inp, opts):
    """The flags that decide what an input's rows become; a continued input must be read with the same."""
    return dict(text_column=opts.text_column if inp.kind != "txt" else None, min_language_score=opts.min_language_score,
                txt_document=opts.txt_document if inp.kind == "txt" else None)


def check_known_input(entry, inp, opts):
    changed = (entry["size"], entry["version"]) != (inp.bytes, inp.version)
    if entry["complete"]:
        print(f"skipping {inp.source}: already in the manifest ({entry['rows']:,} rows)"
              + ("; it has changed since, and its new content is not added" if changed else ""))
        return
    if entry["rows"] == 0:  # registered by a run that stopped before reading it: nothing depends on it yet
        check_input(inp, opts.text_column, opts.min_language_score is not None)
        entry.update(size=inp.bytes, version=inp.version, options=input_options(inp, opts))
        return
    if changed:
        raise DataError(f"{inp.source} changed after its first {entry['rows']:,} rows were prepared; restore it, or "
                        f"prepare into another --out_dir")
    if entry["options"] != input_options(inp, opts):
        raise DataError(f"{inp.source} was begun with {entry['options']}: continue it with the same flags")
    print(f"continuing {inp.source} from row {entry['rows']:,}")


# -----------------------------------------------------------------------------
# The train/val split: val rows come from the first argument's inputs only (the population), numbered across
# them, and depend only on the seed and that row number: adding data, --num_proc, batch sizes and resumes do
# not change them.

def val_rows_for_count(n_val, population_rows, seed):
    """--val_docs: n_val row numbers drawn without replacement (fewer if some of them are skipped)."""
    return np.sort(np.random.default_rng(seed).choice(population_rows, size=min(n_val, population_rows), replace=False))


def in_val(rows, split, val_rows):
    """Boolean mask: which of these population row numbers belong to val."""
    if split["val_docs"] is not None:
        return np.isin(rows, val_rows)
    # --val_fraction: splitmix64 hash of (seed, row) as a uniform number in [0, 1)
    z = rows.astype(np.uint64) + np.uint64(split["seed"] * 0x9E3779B97F4A7C15 % 2**64)  # arrays wrap mod 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < split["val_fraction"]


def document_batches(manifest, inputs, opts):
    """Every row still to read, input after input in manifest order, in batches: yields (texts, info), the kept
    texts and what the writer needs about them (input, row numbers, UTF-8 sizes, val flags, skipped rows). After
    an input's last batch comes an empty one with info["end"]: the input is complete."""
    import pyarrow as pa
    import pyarrow.compute as pc
    split, by_source = manifest["split"], {inp.source: inp for inp in inputs}
    val_rows = (val_rows_for_count(split["val_docs"], split["population_rows"], split["seed"])
                if split["val_docs"] is not None else None)
    ends = {}  # input -> its number of rows, once read to the end (the writer learns it later: batches are in flight)
    for index, entry in enumerate(manifest["inputs"]):
        if entry["complete"]:
            ends[index] = entry["rows"]
        if entry["complete"] or entry["source"] not in by_source:
            continue
        # the population's rows are numbered across its inputs in order: the inputs before this one must be read
        unfinished = [e["source"] for i, e in enumerate(manifest["inputs"][:index]) if i not in ends]
        if index < split["population_inputs"] and unfinished:
            raise DataError(f"{unfinished[0]} is not finished, and the val rows of {entry['source']} are numbered "
                            f"after all of its rows: name both inputs, in that order, to continue")
        offset = sum(ends.get(i, 0) for i in range(index))
        options, row = entry["options"], entry["rows"]
        for row, text, scores in read_batches(by_source[entry["source"]], options["text_column"], options["txt_document"],
                                              options["min_language_score"] is not None, start_row=entry["rows"]):
            nbytes = pc.fill_null(pc.binary_length(text), 0).to_numpy()  # UTF-8 bytes, 0 for null and ""
            empty, low = nbytes == 0, np.zeros(len(text), bool)
            if options["min_language_score"] is not None:  # a missing score (NaN) counts as low
                low = ~(scores >= options["min_language_score"]) & ~empty
            keep = ~(empty | low)
            rows = row + np.flatnonzero(keep)
            is_val = (in_val(offset + rows, split, val_rows) if index < split["population_inputs"]
                      else np.zeros(len(rows), bool))
            info = dict(input=index, rows=rows, end_row=row + len(text), bytes=nbytes[keep].astype(np.int64),
                        val=is_val, skipped={"null_or_empty": row + np.flatnonzero(empty),
                                             "below_language_score": row + np.flatnonzero(low)})
            yield text.filter(pa.array(keep)).to_pylist(), info
            row += len(text)
        ends[index] = row
        yield [], dict(input=index, end=True, rows=np.empty(0, np.int64), end_row=row)


# -----------------------------------------------------------------------------
# The tokenizer: fixed when a directory is created (GPT-2, --tokenizer, or trained with --vocab_size) and kept
# in it: the manifest records it, a trained one's tokenizer.json lies beside it (smallgpt/tokenizer.py)

def choose_tokenizer(opts, manifest, given):
    """This run's tokenizer record: an existing directory's own (--tokenizer or --vocab_size, given again, must name
    it), else --tokenizer, else GPT-2. None: a new directory trains its own (--vocab_size)."""
    wanted = read_tokenizer(opts.tokenizer) if opts.tokenizer else None
    if manifest is None:
        return None if opts.vocab_size else wanted or GPT2
    own = data_tokenizer(opts.out_dir, manifest)
    remedy = "a directory keeps the tokenizer it was created with (drop the flag, or prepare into another --out_dir)"
    if wanted is not None:
        check_same(own, wanted, opts.out_dir, f"--tokenizer={opts.tokenizer}", remedy)
    trained = own.get("trained", {})
    for key in ("vocab_size", "tokenizer_bytes"):
        if key in given and getattr(opts, key) != trained.get(key):
            raise DataError(f"{opts.out_dir} was made with the tokenizer {own['name']}, not one trained with "
                            f"--{key}={getattr(opts, key)}: {remedy}")
    return own


def train_tokenizer(manifest, inputs, opts):
    """--vocab_size: a byte-level BPE learned from the train documents of a new directory, in input order, up to
    --tokenizer_bytes of text and --max_docs documents. It never sees a val document: val bits per byte stay a
    fair measure."""
    seen = dict(documents=0, bytes=0)

    def train_texts():
        read = 0  # documents read, val ones too: --max_docs counts both
        for texts, info in document_batches(manifest, inputs, opts):
            if info.get("end"):
                continue
            for text, nbytes, is_val in zip(texts, info["bytes"].tolist(), info["val"].tolist()):
                if seen["bytes"] >= opts.tokenizer_bytes or read == opts.max_docs:
                    return
                read += 1
                if not is_val:
                    seen["documents"] += 1
                    seen["bytes"] += nbytes
                    yield text

    print(f"training a {opts.vocab_size:,}-token BPE on the train documents (up to {opts.tokenizer_bytes:,} bytes)",
          file=sys.stderr)
    t0 = time.time()
    record = bpe_record(train_bpe(train_texts(), opts.vocab_size), "the trained tokenizer")
    print(f"trained {record['name']} on {seen['documents']:,} documents ({seen['bytes']:,} bytes) in "
          f"{time.time() - t0:.1f} s", file=sys.stderr)
    if record["name"] != f"bpe-{opts.vocab_size}":
        print(f"warning: the text held pairs for only {record['name'][4:]} tokens, not {opts.vocab_size:,}",
              file=sys.stderr)
    return {**record, "trained": dict(vocab_size=opts.vocab_size, tokenizer_bytes=opts.tokenizer_bytes, **seen)}


def set_tokenizer(manifest, record, enc, out_dir):
    """A new directory's tokenizer fields (and a trained tokenizer's file, written before the manifest names it)."""
    if "json" in record:
        write_atomically(os.path.join(out_dir, TOKENIZER_FILE), record["json"])
    manifest.update(tokenizer={k: v for k, v in record.items() if k != "json"}, vocab_size=enc.n_vocab,
                    eot_token=enc.eot_token)


# -----------------------------------------------------------------------------
# Tokenizing: worker processes encode batches; the main process reads the inputs and writes the shards.

_enc = None  # the tokenizer, one per process
_lock_fd = None  # the out_dir lock, closed in the workers so that only the main process holds it


def load_tokenizer(record=None):
    """The tiktoken Encoding of record (None: GPT-2), once per process."""
    global _enc
    if _enc is None:  # forked workers inherit the main process's tokenizer; spawned ones load it
        _enc = get_tokenizer(record)  # a DataError with one clear line when offline without tiktoken's files
        assert _enc.n_vocab <= np.iinfo(TOKEN_DTYPE).max + 1, "token ids must fit the token dtype"
    return _enc


def _exit_with_parent():
    """In a worker: exit as soon as the main process is gone. Otherwise a worker can wait forever on a queue lock
    that a sibling held when it died (seen after kill -9 of the main process)."""
    mp.connection.wait([mp.parent_process().sentinel])  # ready when the parent exits, however it exits
    os._exit(0)


def _init_worker(record):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and kill are handled once, by the main process,
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # which then terminates the workers
    # if the main process dies (kill -9), a worker's next result goes into a pipe nobody reads: die quietly there,
    # like a Unix tool in a pipeline, instead of printing a BrokenPipeError traceback (Python ignores SIGPIPE)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if _lock_fd is not None:
        os.close(_lock_fd)  # the lock stays the main process's: it ends with it, whatever the workers do
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # blocked by start_pool
    load_tokenizer(record)


def start_pool(num_proc, record):
    """Fork the workers with SIGINT/SIGTERM blocked: a Ctrl-C landing during a fork is otherwise swallowed
    by CPython's at-fork hooks ("Exception ignored in _releaseLock") and the run goes on. Delivered after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return mp.Pool(num_proc, initializer=_init_worker, initargs=(record,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def encode_batch(texts):
    """-> (tokens, lengths): the documents as one uint16 array, each preceded by EOT, and each one's length."""
    eot = np.array([_enc.eot_token], np.uint32)
    lens, parts = np.empty(len(texts), np.int64), [np.empty(0, np.uint32)]  # (a batch can be all skipped rows)
    for i, text in enumerate(texts):
        # = encode_ordinary (no special tokens: a literal "<|endoftext|>" in a web page stays text), but into a
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


# -----------------------------------------------------------------------------
# Writing: documents go into the open shards (temporary files); a shard is complete when its train tokens reach
# --shard_tokens, at a cap, and at the end of the run. Completing renames the files into place and then rewrites
# the manifest, which therefore only ever lists whole shards; every position in it is a document boundary, so
# a resumed run cuts its shards where an uninterrupted one does.

class ShardWriter:
    """The run's open shards (one temporary file per split) and the manifest they join when complete."""

    def __init__(self, out_dir, manifest, opts):
        self.out_dir, self.manifest, self.opts = out_dir, manifest, opts
        self.files, self.open = {}, {s: dict(documents=0, tokens=0, bytes=0, parts={}) for s in SPLITS}
        self.added = {s: dict(documents=0, tokens=0) for s in SPLITS}  # by this run, for the summary

    def temp_path(self, split):
        return os.path.join(self.out_dir, f".{self.next_name(split)}.tmp{os.getpid()}")

    def next_name(self, split):
        return shard_name(split, sum(s["split"] == split for s in self.manifest["shards"]))

    def room(self, info, lens):
        """How many of the batch's documents to write now, and why not more: None (all of them), 'full' (the train
        shard is complete after the n-th) or 'cap' (--max_docs / --max_tokens is reached)."""
        held = {key: sum(s[key] for s in self.manifest["splits"].values()) for key in ("documents", "tokens")}
        n_cap = len(lens)
        if self.opts.max_docs is not None:
            n_cap = min(n_cap, self.opts.max_docs - held["documents"])
        if self.opts.max_tokens is not None:  # whole documents only, in order
            n_cap = min(n_cap, int(np.searchsorted(np.cumsum(lens), self.opts.max_tokens - held["tokens"], side="right")))
        train_tokens = np.cumsum(np.where(info["val"], 0, lens)) + self.open["train"]["tokens"]
        full = np.flatnonzero(train_tokens >= self.opts.shard_tokens)
        if len(full) and full[0] < n_cap:
            return int(full[0]) + 1, "full"
        capped = n_cap < len(lens) or (self.opts.max_docs is not None and held["documents"] + n_cap >= self.opts.max_docs)
        return n_cap, "cap" if capped else None

    def take(self, info, tokens, lens):
        """Write the batch's documents, completing shards as they fill. False once a cap stops the run."""
        entry = self.manifest["inputs"][info["input"]]
        if info.get("end"):
            entry.update(rows=info["end_row"], complete=True)
            return True
        while True:
            n, stop = self.room(info, lens)
            cut = int(lens[:n].sum())
            # the input's position afterwards: past the batch, or (cut short) just past the last document written
            end_row = info["end_row"] if stop is None else int(info["rows"][n - 1]) + 1 if n else entry["rows"]
            self.write(entry, info, tokens[:cut], lens[:n], end_row)
            if stop != "full":
                return stop is None
            self.complete()
            info = {**info, "rows": info["rows"][n:], "bytes": info["bytes"][n:], "val": info["val"][n:]}
            tokens, lens = tokens[cut:], lens[n:]

    def write(self, entry, info, tokens, lens, end_row):
        """Append documents to the open shards and count them (in memory: the manifest on disk changes only when
        a shard is complete)."""
        is_val = info["val"][:len(lens)]
        val_token = np.repeat(is_val, lens)
        for split, docs, part in (("train", ~is_val, tokens[~val_token]), ("val", is_val, tokens[val_token])):
            if len(part) == 0:
                continue
            if split not in self.files:
                self.files[split] = open(self.temp_path(split), "wb", buffering=1 << 24)
            self.files[split].write(part)
            counts = dict(documents=int(docs.sum()), tokens=len(part), bytes=int(info["bytes"][:len(lens)][docs].sum()))
            for total in (self.open[split], entry["splits"][split], self.manifest["splits"][split]):
                for key, value in counts.items():
                    total[key] += value
            self.added[split]["documents"] += counts["documents"]
            self.added[split]["tokens"] += counts["tokens"]
            self.open[split]["parts"].setdefault(info["input"], [int(info["rows"][:len(lens)][docs][0]), 0])[1] = \
                int(info["rows"][:len(lens)][docs][-1]) + 1
        for reason, rows in info["skipped"].items():  # rows skipped between the last position and the new one
            n = int(((rows >= entry["rows"]) & (rows < end_row)).sum())
            entry["skipped"][reason] += n
            self.manifest["skipped"][reason] += n
        entry["rows"] = end_row

    def complete(self):
        """Make the open shards part of the directory: on disk, renamed into place, then listed in the manifest."""
        for split, f in list(self.files.items()):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            name, shard = self.next_name(split), self.open[split]
            os.replace(self.temp_path(split), os.path.join(self.out_dir, name))
            self.manifest["shards"].append(dict(file=name, split=split, documents=shard["documents"], tokens=shard["tokens"],
                                                bytes=shard["bytes"], parts=[dict(input=i, rows=rows) for i, rows
                                                                             in shard["parts"].items()]))
            for i in shard["parts"]:
                self.manifest["inputs"][i]["shards"].append(name)
        self.files, self.open = {}, {s: dict(documents=0, tokens=0, bytes=0, parts={}) for s in SPLITS}
        sync_directory(self.out_dir)
        write_json_atomically(os.path.join(self.out_dir, MANIFEST), self.manifest)

    def close(self):
        """On any exit: the open shards' temporary files go (the manifest does not list them)."""
        for split, f in self.files.items():
            f.close()
            os.remove(self.temp_path(split))
        self.files = {}


# -----------------------------------------------------------------------------
# The run

def lock_directory(out_dir):
    """One prepare.py at a time per directory: an exclusive flock on the directory itself, which ends with this
    process however it ends (kill -9 too), so no lock file is ever left behind."""
    global _lock_fd
    _lock_fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another prepare.py is writing to {out_dir}: waiting for it to finish", file=sys.stderr)
        fcntl.flock(_lock_fd, fcntl.LOCK_EX)


def remove_strays(out_dir, manifest):
    """What a killed run leaves: temporary files, and shards renamed into place that the manifest does not list
    yet. Safe to remove: this process holds the directory's lock, so no other run is writing them."""
    listed = {s["file"] for s in manifest["shards"]} if manifest else set()
    for name in os.listdir(out_dir):
        temporary = re.fullmatch(r"\.(?:(?:train|val)_\d{6}\.bin|manifest\.json)\.tmp\d+", name)
        if temporary or (re.fullmatch(r"(?:train|val)_\d{6}\.bin", name) and name not in listed):
            os.remove(os.path.join(out_dir, name))


def prepare(opts, given):
    """Register the inputs, then tokenize what is still to do. Returns (manifest, what this run added, seconds)."""
    manifest = open_manifest(opts, given)
    remove_strays(opts.out_dir, manifest)
    record = choose_tokenizer(opts, manifest, given)
    if record is not None:  # loaded now: offline without GPT-2's file fails before any input is read
        load_tokenizer(record)
    capped = opts.max_docs is not None or opts.max_tokens is not None  # remote parquet: read only what is needed
    inputs = resolve_inputs(opts.inputs, opts.cache_dir or None, stream=capped)
    manifest = register_inputs(manifest, inputs, opts)
    if manifest["tokenizer"] is None:  # a new directory
        record = record or train_tokenizer(manifest, inputs, opts)
        set_tokenizer(manifest, record, load_tokenizer(record), opts.out_dir)
    write_json_atomically(os.path.join(opts.out_dir, MANIFEST), manifest)  # the inputs, before any of them is read
    writer, t0 = ShardWriter(opts.out_dir, manifest, opts), time.time()
    pool = start_pool(opts.num_proc, record) if opts.num_proc > 1 else None  # 1: tokenize in this process
    bar = tqdm(unit="doc", unit_scale=True, desc="tokenizing")
    try:
        for info, (tokens, lens) in encode_in_order(document_batches(manifest, inputs, opts), pool, 2 * opts.num_proc):
            bar.update(len(lens))
            bar.set_postfix_str(f"{writer.added['train']['tokens'] / (time.time() - t0) / 1e6:.2f}M tok/s", refresh=False)
            if not writer.take(info, tokens, lens):
                break
        writer.complete()
    finally:
        bar.close()
        writer.close()
        if pool is not None:
            pool.terminate()  # also stops workers still busy with batches past a cap
    return manifest, writer.added, time.time() - t0


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


def remove_if_empty(out_dir, created):
    """A run that ends with no document in the directory (a failure, an empty input) leaves nothing behind: not
    its manifest, not the directories it created."""
    path = os.path.join(out_dir, MANIFEST)
    try:
        meta = read_meta(out_dir) if os.path.exists(path) else None
    except DataError:  # not ours to judge: leave it
        return
    if meta is not None and not meta["shards"]:
        os.remove(path)
        if meta["tokenizer"] not in (None, GPT2) and os.path.exists(os.path.join(out_dir, TOKENIZER_FILE)):
            os.remove(os.path.join(out_dir, TOKENIZER_FILE))  # written for this manifest
    for directory in created:
        try:
            os.rmdir(directory)
        except OSError:  # not empty (something else wrote there): keep it and its parents
            break


def main(argv):
    opts = parse_args(argv)
    given = {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}
    created = make_out_dir(opts.out_dir)
    try:
        lock_directory(opts.out_dir)
        manifest, added, seconds = prepare(opts, given)
        if not manifest["shards"]:
            raise DataError(f"no documents in the input ({manifest['skipped']['null_or_empty']} null/empty rows, "
                            f"{manifest['skipped']['below_language_score']} below --min_language_score"
                            + (f"; or the first document alone exceeds --max_tokens={opts.max_tokens}" if opts.max_tokens else "") + ")")
    except KeyboardInterrupt:
        print("prepare.py: interrupted; the complete shards are kept: run the same command again to continue",
              file=sys.stderr)
        sys.exit(130)
    finally:
        remove_if_empty(opts.out_dir, created)
        if _lock_fd is not None:
            os.close(_lock_fd)
    report(opts, manifest, added, seconds)


def report(opts, manifest, added, seconds):
    line = " | ".join(f"{split} {s['documents']:,} docs {s['tokens']:,} tokens" for split, s in added.items())
    print(f"added to {opts.out_dir}: {line}")
    print(f"{opts.out_dir} holds " + " | ".join(
        f"{split} {s['documents']:,} docs {s['tokens']:,} tokens {s['bytes']:,} bytes" for split, s in manifest["splits"].items())
        + f" in {len(manifest['shards'])} shard(s) from {len(manifest['inputs'])} input(s)")
    skipped = manifest["skipped"]
    print(f"skipped {skipped['null_or_empty']:,} null/empty rows, {skipped['below_language_score']:,} below language score")
    docs, tokens = (sum(s[k] for s in added.values()) for k in ("documents", "tokens"))
    print(f"{docs:,} docs, {tokens:,} tokens in {seconds:.1f} s: {docs / seconds:,.0f} docs/s, "
          f"{tokens / seconds / 1e6:.2f}M tokens/s with {opts.num_proc} process(es)")
    pending = [e["source"] for e in manifest["inputs"] if not e["complete"]]
    if pending:
        print(f"not finished: {', '.join(pending[:3])}{' ...' if len(pending) > 3 else ''} (a cap stopped the run; "
              f"a run with a higher or no --max_docs/--max_tokens continues)")
    for split, advice in (("val", "raise --val_fraction or --val_docs"), ("train", "lower --val_docs or --val_fraction")):
        if manifest["splits"][split]["documents"] == 0:
            print(f"warning: the {split} split is empty; {advice}", file=sys.stderr)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill cleans up the temporary files, like Ctrl-C
    run_main(main)
