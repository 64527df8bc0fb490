"""
Tokens: the GPT-2 tokenizer, and the windows train.py, condensation.py and the benchmarks cut from a split's
token stream (shards.py reads the directory): training windows visited without replacement, and fixed, evenly
spaced validation windows.
numpy only at import: prepare.py uses this module and must not pay ~1.5 s and ~220 MB for importing torch.
"""
import os

import numpy as np

from .errors import DataError

# -----------------------------------------------------------------------------
# Tokenizer

# tiktoken's cache names each file by the sha1 of its download URL (see ../shared/README.md)
TIKTOKEN_CACHE_NAMES = {"vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
                        "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
                        "gpt2.tiktoken": "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"}


def seed_tiktoken_cache(files_dir):
    """Offline machines (the tests, the benchmarks here): copy GPT-2's BPE files from files_dir into a cache
    directory under the names tiktoken looks for, and point TIKTOKEN_CACHE_DIR there (unless already set)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    import shutil
    import tempfile
    cache = os.path.join(tempfile.gettempdir(), f"tiktoken-cache-{os.getuid()}")
    os.makedirs(cache, exist_ok=True)
    for name, cached_name in TIKTOKEN_CACHE_NAMES.items():
        target = os.path.join(cache, cached_name)
        if not os.path.exists(target) and os.path.exists(os.path.join(files_dir, name)):
            shutil.copyfile(os.path.join(files_dir, name), target)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache


GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # = r50k_base.tiktoken


def get_tokenizer():
    """GPT-2 BPE via tiktoken: from the file named by the environment variable GPT2_TIKTOKEN_FILE when set (offline
    machines), else tiktoken's own (downloaded once into its cache, or found in TIKTOKEN_CACHE_DIR)."""
    import tiktoken
    if os.environ.get("GPT2_TIKTOKEN_FILE"):
        return tokenizer_from_file(os.environ["GPT2_TIKTOKEN_FILE"])
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cached files: one line, not a requests traceback
        raise DataError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}): tiktoken downloads it once; offline, "
                        f"set GPT2_TIKTOKEN_FILE to a copy of gpt2.tiktoken (also published as r50k_base.tiktoken; "
                        f"sha256 {GPT2_TIKTOKEN_SHA256[:12]}...)") from e


def tokenizer_from_file(path):
    """tiktoken's GPT-2 encoding built from a local gpt2.tiktoken (lines of base64 token and rank), checked by its
    sha256. The same ranks, pattern and end-of-text token as tiktoken.get_encoding("gpt2"), without its cache."""
    import base64
    import hashlib
    import tiktoken
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"GPT2_TIKTOKEN_FILE={path}: {e.strerror}")
    if hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
        raise DataError(f"GPT2_TIKTOKEN_FILE={path} is not gpt2.tiktoken (its sha256 is not {GPT2_TIKTOKEN_SHA256[:12]}...)")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256},
                             explicit_n_vocab=50257)


# -----------------------------------------------------------------------------
# Windows: training order without replacement, fixed validation windows

class TrainWindows:
    """Non-overlapping windows of block_size + 1 tokens, visited in a seeded shuffled order without replacement.
    Epoch e shuffles with seed (seed, e) and shifts every window by a random offset, so later epochs see new
    boundaries. `position` (windows consumed so far, over all ranks) is all a checkpoint needs to resume.
    vocab_size: when given, every batch is checked for token ids outside the vocabulary (check_token_ids)."""

    def __init__(self, tokens, block_size, seed, vocab_size=None):
        self.tokens, self.block_size, self.seed, self.vocab_size = tokens, block_size, seed, vocab_size
        self.per_epoch = (len(tokens) - 1) // block_size - 1  # so that any offset < block_size still fits
        if self.per_epoch < 1:
            raise DataError(f"the train split ({len(tokens)} tokens) is shorter than two blocks of {block_size}")
        self._epoch, self._offset, self._order = None, 0, None

    def start(self, index):
        """Token offset of the window with global index `index` (0, 1, 2, ... across epochs)."""
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._offset, self._order = epoch, int(rng.integers(self.block_size)), rng.permutation(self.per_epoch)
        return self._offset + int(self._order[i]) * self.block_size

    def batch(self, first, count):
        return stack_windows(self.tokens, [self.start(first + j) for j in range(count)], self.block_size, self.vocab_size)


def stack_windows(tokens, starts, block_size, vocab_size=None):
    """Inputs x and targets y (each (len(starts), block_size), int64) for windows starting at `starts`; with
    vocab_size, checked for token ids outside the vocabulary."""
    import torch
    rows = np.stack([tokens[s:s + block_size + 1] for s in starts])
    if vocab_size is not None:
        check_token_ids(rows, tokens, starts, vocab_size)
    data = torch.from_numpy(rows.astype(np.int64))
    return data[:, :-1], data[:, 1:]


def check_token_ids(rows, tokens, starts, vocab_size):
    """A token file is never scanned whole (it can hold billions of tokens); each batch is checked as it is built,
    for the cost of one max over it. A bad id would otherwise fail later and less clearly: an IndexError in the
    embedding on CPU, a device-side assert on CUDA."""
    if rows.max() < vocab_size:
        return
    bad = np.argwhere(rows >= vocab_size)  # (window, offset) pairs
    position = int((np.asarray(starts)[bad[:, 0]] + bad[:, 1]).min())  # the first bad token of the batch in the file
    # the file holding the token and the token's place in it (a TokenStream of shards knows; a plain array is itself)
    name, offset = tokens.where(position) if hasattr(tokens, "where") else (getattr(tokens, "filename", "token data"), position)
    raise DataError(f"{name}: token id {int(tokens[position])} at position {offset:,} is outside the vocabulary "
                    f"(the data's vocab_size is {vocab_size}): the file is corrupt or was made with another tokenizer; "
                    f"re-run prepare.py")


def fixed_windows(tokens, count, length):
    """`count` evenly spaced window starts over a split: the same tokens at every eval and in every run."""
    if len(tokens) < length + 1:
        raise DataError(f"the val split ({len(tokens)} tokens) is shorter than one window of {length}")
    return np.linspace(0, len(tokens) - length - 1, count).astype(np.int64).tolist()
