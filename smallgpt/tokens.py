"""
Token windows: what train.py, eval.py, condensation.py and the benchmarks cut from a split's token stream
(shards.py reads the directory): training windows visited without replacement, and fixed, evenly spaced
validation windows. (The tokenizer itself is tokenizer.py.) numpy only at import.
"""
import numpy as np

from .errors import DataError


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
                    f"(vocab_size {vocab_size}): the file is corrupt or was made with another tokenizer; "
                    f"re-run prepare.py")


def fixed_windows(tokens, count, length):
    """`count` evenly spaced window starts over a split: the same tokens at every eval and in every run."""
    if len(tokens) < length + 1:
        raise DataError(f"the val split ({len(tokens)} tokens) is shorter than one window of {length}")
    return np.linspace(0, len(tokens) - length - 1, count).astype(np.int64).tolist()
