"""
The inputs of data/fineweb/prepare.py: what a command-line argument names, and its documents, read in batches
from any row on (a resumed or extended run starts mid-file).

    a.parquet                   a column of text (--text_column), read one row group at a time
    a.jsonl, a.jsonl.gz         one JSON object per line, its text in a field (--text_column); a blank line is skipped
    a.txt                       one document per file, or per line (--txt_document=line)
    folder/, 'glob*'            every file of those kinds below it, in sorted order
    hf:sample/10BT/000_00000.parquet, hf://datasets/owner/name/path
                                a file on the Hugging Face hub (the first form: in HuggingFaceFW/fineweb), read in
                                place through huggingface_hub's HfFileSystem (ranged reads, retries, HF_TOKEN,
                                HF_ENDPOINT): a parquet file's footer, then only the row groups a run reads
    https://host/a.parquet      downloaded once into a cache; with stream=True (a capped run) a parquet file is read
                                in place with HTTP range requests instead

A row is the unit every count and every resume position refers to: a parquet row, a line of a .jsonl or
line-per-document .txt file, the whole file for a .txt file in file mode. A row whose text is null or empty is
skipped. Mistakes in an input are one DataError naming the file (and the line).
"""
import glob
import gzip
import hashlib
import io
import json
import os
import urllib.request
from dataclasses import dataclass

import numpy as np

from .errors import DataError

HF_REPO = "datasets/HuggingFaceFW/fineweb"  # what hf:<path> points into
BATCH_ROWS = 1024  # rows per batch: ~3 MB of FineWeb text, ~0.2 s of tokenizing on one core
KINDS = {".parquet": "parquet", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".txt": "txt"}


@dataclass
class Input:
    source: str  # what the manifest records and a later run matches: an absolute path, a URL, hf:<path>
    kind: str  # 'parquet' | 'jsonl' | 'txt'
    location: str  # where it is read: a local path, a URL (read with range requests) or an HfFileSystem path
    bytes: int
    version: str  # local: modification time (ns); hub: content hash; URL: '' (its size only). Changed: another file
    argument: int  # which command-line argument named it


def kind_of(name):
    for suffix, kind in KINDS.items():
        if name.endswith(suffix):
            return kind
    raise DataError(f"{name}: not an input prepare.py reads (.parquet, .jsonl, .jsonl.gz or .txt)")


# -----------------------------------------------------------------------------
# Arguments -> inputs

def resolve_inputs(specs, cache_dir=None, stream=False):
    """Every input the arguments name, in order (a folder or glob in sorted order). stream: remote parquet files
    are read in place (hf: always is)."""
    inputs = []
    for argument, spec in enumerate(specs):
        if spec.startswith("hf:"):
            inputs += hf_inputs(spec, argument)
        elif spec.startswith(("http://", "https://")):
            kind = kind_of(spec.split("?")[0])
            if stream and kind == "parquet":
                remote = RemoteFile(spec)
                inputs.append(Input(spec, kind, remote.url, remote.size, "", argument))
            else:  # a URL is known by its size only: read in place or from the cache, it is the same input
                inputs.append(local_input(download_url(spec, cache_dir), argument, source=spec, version=""))
        elif os.path.isdir(spec) or glob.has_magic(spec):
            pattern = os.path.join(spec, "**", "*") if os.path.isdir(spec) else spec
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)
                           and (not os.path.isdir(spec) or any(p.endswith(s) for s in KINDS)))
            if not found:
                raise DataError(f"no files match {pattern} (prepare.py reads {', '.join(KINDS)})")
            inputs += [local_input(p, argument) for p in found]
        elif os.path.isfile(spec):
            inputs.append(local_input(spec, argument))
        else:
            raise DataError(f"no such file or directory: {spec}")
    return inputs


def local_input(path, argument, source=None, version=None):
    kind = kind_of(path)
    try:
        with open(path, "rb"):  # readable? (a permission problem shows here, before any work)
            pass
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from None
    stat = os.stat(path)
    return Input(source or os.path.abspath(path), kind, path, stat.st_size,
                 str(stat.st_mtime_ns) if version is None else version, argument)


_hf_fs = None


def hf_filesystem():
    global _hf_fs
    if _hf_fs is None:
        from huggingface_hub import HfFileSystem  # slow import, only when needed
        from huggingface_hub.utils import logging
        logging.set_verbosity_error()  # its "Retrying in 1s [Retry 1/5]" lines would bury the one line that matters
        _hf_fs = HfFileSystem()
    return _hf_fs


def hf_inputs(spec, argument):
    """hf:<path in HuggingFaceFW/fineweb> or hf://<repo type>/<owner>/<name>/<path>; a glob pattern is expanded."""
    full = spec.startswith("hf://")
    path = spec[5:] if full else f"{HF_REPO}/{spec[3:]}"
    fs = hf_filesystem()
    try:
        paths = sorted(fs.glob(path)) if glob.has_magic(path) else [path]
        infos = [fs.info(p) for p in paths]
    except FileNotFoundError:
        raise DataError(f"{spec}: no such file on the Hugging Face hub ({path})") from None
    except Exception as e:  # the hub's errors come in many classes (HTTP, connection, validation)
        raise DataError(f"cannot reach {spec} on the Hugging Face hub ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0]}); offline, pass a local .parquet/.jsonl/.txt file "
                        f"instead (docs/data.md)") from None
    if not paths:
        raise DataError(f"no files on the Hugging Face hub match {spec}")
    return [Input(f"hf://{p}" if full else f"hf:{p[len(HF_REPO) + 1:]}", kind_of(p), p, info["size"],
                  str((info.get("lfs") or {}).get("sha256") or info.get("blob_id")), argument)
            for p, info in zip(paths, infos)]


def download_url(url, cache_dir):
    """Fetch url into cache_dir once (a .part file renamed when complete, so a broken download is never reused)."""
    from tqdm import tqdm
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
    only the row groups it needs, so a capped run (--max_docs) fetches a small part of a 2 GB file."""

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
        self.pos = 0

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
        self.pos += n
        return n


# -----------------------------------------------------------------------------
# Reading: batches of (first row, texts as a pyarrow string array, language scores or None)

def open_binary(inp):
    """The input's bytes as a file object (local, on the hub, or at a URL with ranges)."""
    if inp.location.startswith(("http://", "https://")):
        return io.BufferedReader(RemoteFile(inp.location), buffer_size=1 << 20)
    if inp.source.startswith("hf:"):
        return hf_filesystem().open(inp.location, "rb", block_size=1 << 20)
    return open(inp.location, "rb")


def open_parquet(inp, text_column, need_score):
    """The parquet file, its footer read and checked, so that bad input fails before any work."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    local = not inp.source.startswith("hf:") and not inp.location.startswith(("http://", "https://"))
    try:  # a local path, not a Python file object: pyarrow then reads natively, without the GIL (~10% faster)
        pf = pq.ParquetFile(inp.location if local else open_binary(inp))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{inp.source}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise DataError(f"{inp.source}: no column {text_column!r} (columns: {', '.join(names)}); see --text_column")
    kind = pf.schema_arrow.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{inp.source}: column {text_column!r} holds {kind}, not text; see --text_column")
    if need_score and "language_score" not in names:
        raise DataError(f"{inp.source}: no column 'language_score', needed by --min_language_score")
    return pf


def check_input(inp, text_column, need_score):
    """What can be checked cheaply before any work: a parquet footer and its columns; --min_language_score needs
    a score, which a .txt file has not."""
    if inp.kind == "parquet":
        open_parquet(inp, text_column, need_score)
    elif inp.kind == "txt" and need_score:
        raise DataError(f"{inp.source}: a .txt file has no language_score, needed by --min_language_score")


def count_rows(inp, text_column, txt_document):
    """The input's number of rows (reads a line-based file once)."""
    if inp.kind == "parquet":
        return open_parquet(inp, text_column, False).metadata.num_rows
    if inp.kind == "txt" and txt_document == "file":
        return 1
    with line_reader(inp) as lines:
        return sum(1 for _ in lines)


def read_batches(inp, text_column, txt_document, need_score, start_row=0):
    """The input's rows from start_row on, in batches of up to BATCH_ROWS: (first row, texts, scores or None)."""
    if inp.kind == "parquet":
        yield from parquet_batches(open_parquet(inp, text_column, need_score), inp, text_column, need_score, start_row)
    elif inp.kind == "txt" and txt_document == "file":
        if start_row == 0:
            yield 0, string_array([whole_text(inp)]), None
    else:
        decode = (lambda line, n: jsonl_text(line, n, inp, text_column, need_score)) if inp.kind == "jsonl" else \
            (lambda line, n: (text_line(line, n, inp), None))
        yield from line_batches(inp, decode, need_score, start_row)


def parquet_batches(pf, inp, text_column, need_score, start_row):
    import pyarrow as pa
    columns = [text_column] + (["language_score"] if need_score else [])
    row0 = 0  # the file's row number of the next batch
    try:
        # one row group at a time: one iter_batches over a whole file holds on to memory as it goes (pyarrow 26:
        # peak RSS 150 MB on the sample, 430 MB on 30 copies of it); this stays flat
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if row0 + rows <= start_row:  # done by an earlier run: not even read
                row0 += rows
                continue
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, row_groups=[group]):
                skip = min(len(batch), max(0, start_row - row0))
                if skip < len(batch):
                    part = batch.slice(skip)
                    scores = part.column(1).to_numpy(zero_copy_only=False) if need_score else None  # null: NaN
                    yield row0 + skip, part.column(0), scores
                row0 += len(batch)
    except (pa.ArrowException, OSError) as e:  # a corrupt page shows up only when it is read
        raise DataError(f"{inp.source}: cannot read ({e})") from None


def string_array(texts):
    import pyarrow as pa
    return pa.array(texts, pa.string())


class line_reader:
    """The input's lines as bytes (a .gz file decompressed), as a context manager; errors name the file."""

    def __init__(self, inp):
        self.inp = inp

    def __enter__(self):
        self.raw = open_binary(self.inp)
        return self.lines(gzip.GzipFile(fileobj=self.raw) if self.inp.source.endswith(".gz") else self.raw)

    def lines(self, f):
        try:
            yield from f
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut .gz file ends in EOFError
            raise DataError(f"{self.inp.source}: cannot read ({type(e).__name__}: {e})") from None

    def __exit__(self, *exc):
        self.raw.close()


def line_batches(inp, decode, need_score, start_row):
    texts, scores, first = [], [], start_row
    with line_reader(inp) as lines:
        for row, line in enumerate(lines):
            if row < start_row:
                continue
            text, score = decode(line, row + 1)
            texts.append(text)
            scores.append(score)
            if len(texts) == BATCH_ROWS:
                yield first, string_array(texts), np.array(scores, np.float64) if need_score else None
                texts, scores, first = [], [], row + 1
    if texts:
        yield first, string_array(texts), np.array(scores, np.float64) if need_score else None


def jsonl_text(line, lineno, inp, field, need_score):
    """The text (None: skipped) and language score of one .jsonl line."""
    if not line.strip():
        return None, None
    try:
        record = json.loads(line)
    except ValueError as e:  # also bytes that are not UTF-8 (UnicodeDecodeError)
        raise DataError(f"{inp.source} line {lineno}: not a JSON object ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{inp.source} line {lineno}: not a JSON object but {type(record).__name__}")
    if field not in record:
        raise DataError(f"{inp.source} line {lineno}: no field {field!r} (fields: {', '.join(record)}); see --text_column")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{inp.source} line {lineno}: field {field!r} holds {type(text).__name__}, not text; see --text_column")
    score = record.get("language_score") if need_score else None
    if need_score and not isinstance(score, (int, float, type(None))):
        raise DataError(f"{inp.source} line {lineno}: language_score is {score!r}, not a number")
    return text, (np.nan if score is None else score)


def text_line(line, lineno, inp):
    try:
        return line.rstrip(b"\n").rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{inp.source} line {lineno}: not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1})") from None


def whole_text(inp):
    with open_binary(inp) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{inp.source} line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start:,})") from None
