"""
Evaluation shared by train.py and eval.py:
- bits per byte with exact token bytes (nanochat's definition): the nats of every target token that carries
  text, divided by ln 2 and by the raw bytes of those tokens. <|endoftext|> and the padded ids 50257..50303
  carry 0 bytes, so they leave both sums.
- HellaSwag, completion style (build-nanogpt / llm.c): each of the 4 endings is scored by the model's loss on
  its tokens after the context; acc picks the lowest summed loss, acc_norm the lowest mean loss per token.
  The validation jsonl (10,042 items) is downloaded once into a cache directory, or read from a local file.
transformers is never needed here: a model is any function from token ids (B, T) to logits (B, T, V).
"""
import json
import math
import os
import urllib.request

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .errors import DataError, out_of_space

# -----------------------------------------------------------------------------
# Bits per byte


def token_bytes(enc, vocab_size):
    """Raw UTF-8 byte count of every token id (int64, (vocab_size,)). Raw bytes, not decoded text: a token
    may hold half a character. Special tokens (tiktoken would return the 13-byte literal '<|endoftext|>') and
    ids beyond the tokenizer's (the padded vocabulary) count 0."""
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    counts = [0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(min(enc.n_vocab, vocab_size))]
    return torch.tensor(counts + [0] * (vocab_size - len(counts)), dtype=torch.long)


def bits_per_byte(nats, n_bytes):
    return nats / math.log(2) / n_bytes


def loss_sums(losses, targets, token_bytes):
    """The CE of every target (any shape, as targets) -> float64 sums [nats of all targets, number of targets (-1,
    ignored, not counted), nats of byte-carrying targets, their bytes]: val loss = [0] / [1], bits per byte from
    [2] and [3]."""
    losses, targets = losses.flatten().double(), targets.flatten()
    counted = targets != -1  # -1: an ignored target (SFT's non-assistant tokens), which has a loss of 0
    n_bytes = token_bytes.to(targets.device)[targets.clamp(min=0)] * counted
    return torch.stack([losses.sum(), counted.sum().double(), losses[n_bytes > 0].sum(), n_bytes.sum().double()])


# -----------------------------------------------------------------------------
# HellaSwag data

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_ITEMS = 10042  # lines in the validation file


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gpt-eval")


def hellaswag_file(path="", cache_dir="", url=HELLASWAG_URL):
    """The HellaSwag jsonl to read: path when given, else cache_dir's copy, downloaded from url the first time."""
    if path:
        if not os.path.isfile(path):
            raise DataError(f"no HellaSwag file at {path}")
        return path
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, os.path.basename(url))
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    print(f"downloading {url} to {target}")
    part = f"{target}.{os.getpid()}.part"  # renamed when complete; one per process (DDP ranks download at once)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as e:  # URLError and HTTPError are OSErrors too
        if os.path.exists(part):  # never left to be taken for the data
            os.remove(part)
        if out_of_space(e):
            raise DataError(f"no space left on the device writing {target}")
        raise DataError(f"cannot download HellaSwag from {url} ({e})")
    os.replace(part, target)
    return target


def read_hellaswag(path="", cache_dir="", limit=0, remedy="", url=HELLASWAG_URL):
    """(file, items) of the HellaSwag file path, or of the cached download when path is ''. A file the user
    passed is only named when it is missing or damaged (never "delete it"); a failed download or a damaged
    cached copy also gets `remedy`, the calling script's own options (a local file, skipping HellaSwag)."""
    if path:
        return path, load_hellaswag(hellaswag_file(path), limit)
    try:
        file = hellaswag_file("", cache_dir, url)
    except DataError as e:
        raise DataError(f"{e}: {remedy}") from None
    try:
        return file, load_hellaswag(file, limit)
    except DataError as e:
        raise DataError(f"{e}; it is the cached download: delete it to download it again, or {remedy}") from None


def load_hellaswag(path, limit=0):
    """Items {ctx, endings, label} of a HellaSwag jsonl (the first `limit`; 0 = all). A damaged file or line is
    one DataError naming the line."""
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if limit and len(items) == limit:
                    break
                if line.strip():
                    items.append(_parse_item(line, f"{path} line {n}"))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a HellaSwag jsonl (not UTF-8 text)")
    if not items:
        raise DataError(f"{path} holds no HellaSwag items")
    return items


LABELS = {0: 0, 1: 1, 2: 2, 3: 3, "0": 0, "1": 1, "2": 2, "3": 3}  # the HF copy stores the label as text


def _parse_item(line, where):
    try:
        item = json.loads(line)
        ctx, endings, label = item["ctx"], item["endings"], item["label"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where} is not a HellaSwag item ({type(e).__name__}: {e})")
    # an int or its text: never true (== 1 in Python) nor 2.9 (which int() would have made 2)
    if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
            and all(isinstance(e, str) for e in endings) and type(label) in (int, str) and label in LABELS):
        raise DataError(f"{where} is not a HellaSwag item (needs ctx, 4 endings and a label 0-3; label is {label!r})")
    return {"ctx": ctx, "endings": endings, "label": LABELS[label]}


# -----------------------------------------------------------------------------
# HellaSwag scoring

def render(item, encode, max_len):
    """The 4 rows (context + ending tokens) of an item and the number of ending tokens to score in each. The
    ending gets a leading space (GPT-2's BPE marks word starts with it). A row longer than max_len loses its
    first tokens."""
    ctx = encode(item["ctx"])
    rows, n_end = [], []
    for ending in item["endings"]:
        end = encode(" " + ending)
        row = (ctx + end)[-max_len:]
        rows.append(row)
        n_end.append(min(len(end), len(row) - 1))  # the first token of a row has no prediction
    return rows, n_end


def score_rendered(logits_fn, rendered, device):
    """Summed and mean loss over the ending tokens of a batch of rendered items: 2 tensors (items, 4)."""
    rows = [row for rows, _ in rendered for row in rows]
    n_end = [n for _, ns in rendered for n in ns]
    L = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), L, dtype=torch.long)  # right-padded: causal attention never sees the padding
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(row) - n_end[i]:len(row)] = True
    tokens, mask = tokens.to(device), mask.to(device)
    logits = logits_fn(tokens)  # (4K, L, V)
    # position t predicts token t + 1: the first ending token is scored from the last context position
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    sums = (losses.view(len(rows), L - 1) * mask[:, 1:]).sum(1)
    return sums.view(-1, 4), (sums / torch.tensor(n_end, device=device)).view(-1, 4)


@torch.no_grad()
def hellaswag_predictions(logits_fn, items, encode, max_len, device, batch_size=8, progress=False):
    """For every item: (ending with the lowest summed loss, ending with the lowest mean loss), in item order.
    Items are scored batch_size at a time (4 rows each), sorted by length so that batches pad little."""
    rendered = [render(item, encode, max_len) for item in items]
    order = sorted(range(len(items)), key=lambda i: max(map(len, rendered[i][0])))
    predictions = [None] * len(items)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="hellaswag", unit="batch")
    for b in batches:
        chosen = order[b:b + batch_size]
        sums, means = score_rendered(logits_fn, [rendered[i] for i in chosen], device)
        for i, s, m in zip(chosen, sums.argmin(1).tolist(), means.argmin(1).tolist()):
            predictions[i] = (s, m)
    return predictions


def score_hellaswag(logits_fn, items, encode, max_len, device, batch_size=8, progress=False, rank=0, world=1):
    """{'hellaswag_acc', 'hellaswag_acc_norm', 'hellaswag_items'} over items; under DDP each rank scores the
    items i % world == rank and the counts are summed over ranks."""
    mine = items[rank::world]
    predictions = hellaswag_predictions(logits_fn, mine, encode, max_len, device, batch_size, progress)
    counts = torch.tensor([sum(s == it["label"] for (s, _), it in zip(predictions, mine)),
                           sum(m == it["label"] for (_, m), it in zip(predictions, mine)), len(mine)],
                          dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    correct, correct_norm, n = counts.tolist()
    return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n, "hellaswag_items": int(n)}
