"""
The token data directory that data/fineweb/prepare.py writes and train.py, eval.py and condensation.py read,
as one token stream per split. numpy only at import: prepare.py uses it without paying for torch.

Format 2, a directory that grows (docs/data.md has an example):
  manifest.json        what the directory holds: the tokenizer, the train/val rule, every input (where it came
                       from, how much of it is done) and every shard; rewritten atomically after each shard is
                       complete, so it never lists a partial file
  train_000000.bin ... raw little-endian uint16 token ids, every document preceded by the EOT token; a split is
  val_000000.bin ...   the concatenation of its shards in manifest order
Format 1, prepare.py before shards: train.bin, val.bin and meta.json, read as one shard per split.
"""
import bisect
import glob
import json
import os

import numpy as np

from .errors import DataError

TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50,257 ids fit in uint16
FORMAT_NAME = "gpt-tokens"
FORMAT_VERSION = 2  # manifest.json and shards; bumping it makes old readers fail loudly instead of misreading
SINGLE_FILE_VERSION = 1  # train.bin / val.bin / meta.json: still read
SPLITS = ("train", "val")
MANIFEST = "manifest.json"


def shard_name(split, index):
    return f"{split}_{index:06d}.bin"


def read_meta(data_dir):
    """The directory's description, checked: manifest.json (format 2) or meta.json (format 1). Both come back with
    what the readers use: vocab_size, eot_token, splits[split] = {documents, tokens, bytes}, and files[split], the
    split's shard files in order with their token counts."""
    if os.path.isfile(os.path.join(data_dir, MANIFEST)):
        meta = _read_json(os.path.join(data_dir, MANIFEST), FORMAT_VERSION)
        try:
            meta["files"] = {split: [(s["file"], s["tokens"]) for s in meta["shards"] if s["split"] == split]
                             for split in SPLITS}
        except (KeyError, TypeError) as e:
            raise DataError(f"{os.path.join(data_dir, MANIFEST)} lacks the field {e}: re-run prepare.py")
    elif os.path.isfile(os.path.join(data_dir, "meta.json")):
        meta = _read_json(os.path.join(data_dir, "meta.json"), SINGLE_FILE_VERSION)
        meta["files"] = {split: [(f"{split}.bin", meta["splits"][split]["tokens"])] for split in SPLITS}
    else:
        raise DataError(f"no token data in {str(data_dir)!r} (no manifest.json or meta.json): "
                        + prepared_elsewhere(os.path.dirname(os.path.abspath(data_dir))))
    return meta


def prepared_elsewhere(root):
    """The advice for a data_dir without data: the prepared directories near it (its siblings and their children,
    e.g. data/sample beside data/fineweb), else how to make one."""
    found = sorted({os.path.relpath(os.path.dirname(p)) for name in (MANIFEST, "meta.json")
                    for p in glob.glob(os.path.join(root, "*", name)) + glob.glob(os.path.join(root, "*", "*", name))})
    if found:
        return f"prepared data is in {', '.join(found)}: pass --data_dir=..."
    return "run data/fineweb/prepare.py first"


def _read_json(path, version):
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is unreadable ({e}): re-run prepare.py")
    if not isinstance(meta, dict):
        raise DataError(f"{path} is not written by prepare.py: re-run prepare.py")
    if meta.get("format") != FORMAT_NAME or meta.get("version") != version:
        raise DataError(f"{path}: expected format {FORMAT_NAME!r} version {version}, "
                        f"found {meta.get('format')!r} version {meta.get('version')!r}; re-run prepare.py")
    try:  # the fields the training scripts read
        meta["vocab_size"]
        for split in SPLITS:
            meta["splits"][split]["tokens"], meta["splits"][split]["bytes"]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path} lacks the field {e}: re-run prepare.py")
    return meta


def open_split(data_dir, split):
    """One split as a TokenStream over its memory-mapped shards (read-only, nothing loaded into RAM), each checked
    against the manifest's token count. Returns (tokens, meta)."""
    meta = read_meta(data_dir)
    if meta["splits"][split]["tokens"] == 0:
        raise DataError(f"the {split} split in {data_dir} is empty: re-run prepare.py with more documents or --val_docs")
    shards = []
    for name, expected in meta["files"][split]:
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"missing {path}")
        size = os.path.getsize(path)
        if size % TOKEN_DTYPE.itemsize:  # np.memmap would raise a bare ValueError
            raise DataError(f"{path} has an odd number of bytes ({size:,}), so it is not whole {TOKEN_DTYPE.itemsize}-byte "
                            f"tokens: the file is cut or damaged; re-run prepare.py")
        if size // TOKEN_DTYPE.itemsize != expected:
            raise DataError(f"{path} holds {size // TOKEN_DTYPE.itemsize} tokens but the manifest says {expected}: "
                            f"re-run prepare.py")
        shards.append(np.memmap(path, dtype=TOKEN_DTYPE, mode="r") if expected else np.empty(0, TOKEN_DTYPE))
    return TokenStream(shards), meta


class TokenStream:
    """Shards read as their concatenation: len() and slices [a:b] as of one array (a slice across a shard
    boundary joins the pieces), so windows, batches and a resumed data position are the same as over one file
    holding all the tokens."""

    def __init__(self, shards):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards]).tolist()  # shard i covers [starts[i], starts[i+1])

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, index):
        if not isinstance(index, slice):
            i = self.shard_of(index)
            return self.shards[i][index - self.starts[i]]
        start, stop, step = index.indices(len(self))
        assert step == 1, "token streams are read in contiguous slices"
        pieces = []
        while start < stop:
            i = self.shard_of(start)
            end = min(stop, self.starts[i + 1])
            pieces.append(self.shards[i][start - self.starts[i]:end - self.starts[i]])
            start = end
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [np.empty(0, TOKEN_DTYPE)])

    def shard_of(self, position):
        return bisect.bisect_right(self.starts, position) - 1

    def where(self, position):
        """For error messages: (the shard file holding a token, the token's place in that file)."""
        i = self.shard_of(position)
        return getattr(self.shards[i], "filename", "token data"), position - self.starts[i]


def write_json_atomically(path, obj):
    write_atomically(path, json.dumps(obj, indent=1))


def write_atomically(path, text):
    """Write text to path so that a reader (or a kill at any moment) sees the old file or the new one, never a mix:
    a temporary file, flushed to disk, renamed over path, and the rename itself made durable."""
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_directory(os.path.dirname(path))


def sync_directory(path):
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)  # the directory entry (a rename) survives a power cut too
    finally:
        os.close(fd)
