"""
The tokenizer: GPT-2's BPE (tiktoken; the default) or a byte-level BPE trained on your own text (prepare.py
--vocab_size=N, with Hugging Face `tokenizers`), stored as one tokenizer.json in the `tokenizers` format. Either one
comes back as a tiktoken Encoding, so every script uses one interface (encode_ordinary, decode_single_token_bytes,
eot_token, n_vocab); tiktoken encodes a trained BPE exactly as `tokenizers` does (tested on hard texts), and ~3x
faster. Both have SPECIAL_TOKENS: <|endoftext|> and the chat markers reserved for chat data. A script gets the
tokenizer of its data directory or checkpoint, with those ids, from open_tokenizer (docs/tokenizer.md).

Which tokenizer a thing was made with is a record {"name", "sha256"} (+ "json", the file's text, where the text
must travel): a data directory's manifest.json (its tokenizer.json beside it: data_tokenizer), every checkpoint
(the text inside: checkpoint_tokenizer), a transformers directory written by export.py (its tokenizer.json, byte
for byte the same file). Scripts compare records (check_same) so that a model never reads another tokenizer's ids.
numpy at import (tiktoken and tokenizers when used): prepare.py imports it without paying for torch.
"""
import functools
import hashlib
import json
import os
import sys
from typing import NamedTuple

from .errors import DataError
from .shards import read_meta

TOKENIZER_FILE = "tokenizer.json"
MAX_VOCAB = 2 ** 16  # token files hold uint16 ids
# GPT-4's (cl100k) split, digits in groups of up to three. tiktoken spells that `\p{N}{1,3}+` (possessive), but
# `tokenizers` compiles with Oniguruma, where `{1,3}+` means "repeated": whole digit runs. Without the `+` both
# engines split the same (/work/notes/tokenizers.md measured 0 differences on 8,025 texts; the tests check it)
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
                 r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# The special tokens, in this order (nanochat's set): end-of-text, then the chat format's markers, reserved now so
# that chat data needs no new tokenizer: system/user/assistant turns, tool calls (python) and their output. A trained
# BPE has them as its last ids; GPT-2's tokenizer has <|endoftext|> at 50256 and the others after it, at 50257-50266,
# in the padded part of the 50,304-row embedding every GPT-2-token model here already has (docs/tokenizer.md).
# Their names and order are fixed: checkpoints and chat data store their ids.
SPECIAL_TOKENS = ("<|endoftext|>", "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
                  "<|assistant_start|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                  "<|output_start|>", "<|output_end|>")
EOT = SPECIAL_TOKENS[0]

# -----------------------------------------------------------------------------
# GPT-2: tiktoken's encoding, from its cache (downloaded once) or a local gpt2.tiktoken

GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # = r50k_base.tiktoken
GPT2 = {"name": "gpt2", "sha256": GPT2_TIKTOKEN_SHA256}  # the record of GPT-2's tokenizer
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


GPT2_EOT = 50256  # GPT-2's <|endoftext|>; its ordinary tokens are the ids below


def gpt2_tokenizer():
    """GPT-2 BPE via tiktoken, plus the reserved chat tokens (gpt2_with_specials): from the file named by the
    environment variable GPT2_TIKTOKEN_FILE when set (offline machines), else tiktoken's own (downloaded once into
    its cache, or found in TIKTOKEN_CACHE_DIR)."""
    return _gpt2_tokenizer(os.environ.get("GPT2_TIKTOKEN_FILE") or None)


@functools.lru_cache(maxsize=2)  # building the encoding takes ~0.3 s; a failure is not cached
def _gpt2_tokenizer(path):
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    if path:
        return gpt2_with_specials(gpt2_ranks_from_file(path), r50k_pat_str)
    try:
        base = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cached files: one line, not a requests traceback
        raise DataError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}): tiktoken downloads it once; offline, "
                        f"set GPT2_TIKTOKEN_FILE to a copy of gpt2.tiktoken (also published as r50k_base.tiktoken; "
                        f"sha256 {GPT2_TIKTOKEN_SHA256[:12]}...)") from e
    # tiktoken's documented way to extend an encoding (its README): the same ranks and pattern, more special tokens
    return gpt2_with_specials(base._mergeable_ranks, base._pat_str)


def gpt2_ranks_from_file(path):
    """GPT-2's ranks (token bytes -> id) from a local gpt2.tiktoken (lines of base64 token and rank), checked by its
    sha256: the ranks tiktoken.get_encoding("gpt2") has, without its cache."""
    import base64
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"GPT2_TIKTOKEN_FILE={path}: {e.strerror}")
    if hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
        raise DataError(f"GPT2_TIKTOKEN_FILE={path} is not gpt2.tiktoken (its sha256 is not {GPT2_TIKTOKEN_SHA256[:12]}...)")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


def gpt2_with_specials(ranks, pat_str):
    """GPT-2's encoding (ranks 0..50255, <|endoftext|> 50256) with the other SPECIAL_TOKENS at 50257, 50258, ...:
    ordinary text encodes exactly as GPT-2's; n_vocab is 50,267."""
    import tiktoken
    specials = {name: GPT2_EOT + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("gpt2", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)


# -----------------------------------------------------------------------------
# The one way every script gets its tokenizer

class Tokenizer(NamedTuple):
    enc: object  # a tiktoken Encoding: encode_ordinary, encode, decode, decode_single_token_bytes, eot_token, n_vocab
    record: dict  # {"name", "sha256"} (+ "json", a trained BPE's text): what checkpoints carry, what check_same compares
    special: dict  # each of SPECIAL_TOKENS (in their order) -> its id


def open_tokenizer(data_dir=None, ckpt=None):
    """The tokenizer of a data directory (its manifest) and/or a checkpoint (load_checkpoint's dict; both given:
    they must agree, else one line), with the special tokens' ids; neither given: GPT-2's."""
    records = []
    if data_dir is not None:
        records.append((data_tokenizer(data_dir, read_meta(data_dir)), f"data_dir {data_dir}"))
    if ckpt is not None:
        records.append((checkpoint_tokenizer(ckpt), ckpt.get("path", "the checkpoint")))
    if len(records) == 2:
        check_same(records[0][0], records[1][0], records[0][1], records[1][1])
    record = records[0][0] if records else GPT2
    enc = get_tokenizer(record)
    return Tokenizer(enc, record, {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS})


def get_tokenizer(record=None):
    """The tiktoken Encoding of a tokenizer record (from data_tokenizer, checkpoint_tokenizer or read_tokenizer);
    None = GPT-2."""
    if record is None or record["name"] == GPT2["name"]:
        return gpt2_tokenizer()
    return _bpe_encoding(record["json"], record["name"])


@functools.lru_cache(maxsize=4)  # train.py and eval.py may ask twice; building one takes ~0.1-0.5 s
def _bpe_encoding(text, name):
    import tiktoken
    ranks, specials = parse_bpe(text, name)
    return tiktoken.Encoding(name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def describe(record):
    """A record for messages: 'gpt2', or 'bpe-8192 (sha256 1a2b3c4d5e6f...)'."""
    return record["name"] if record["name"] == GPT2["name"] else f"{record['name']} (sha256 {record['sha256'][:12]}...)"


def check_same(first, second, first_what, second_what, remedy="token ids of one mean other text in the other"):
    """One line when two things were made with different tokenizers (their ids mean different text)."""
    if (first["name"], first["sha256"]) != (second["name"], second["sha256"]):
        raise DataError(f"{first_what} uses the tokenizer {describe(first)}, but {second_what} uses {describe(second)}: "
                        f"{remedy}")


def data_tokenizer(data_dir, meta):
    """The record of a data directory's tokenizer (meta: shards.read_meta's), a trained one with its file's text,
    checked against the manifest's hash."""
    recorded = meta.get("tokenizer", "gpt2")
    if not isinstance(recorded, dict) or recorded.get("name") == GPT2["name"]:  # format 1 wrote "gpt2"
        return GPT2
    path = os.path.join(data_dir, TOKENIZER_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}, the tokenizer the manifest records ({describe(recorded)}): "
                        f"{getattr(e, 'strerror', None) or e}")
    if sha256(text) != recorded.get("sha256"):
        raise DataError(f"{path} is not the tokenizer the manifest records ({describe(recorded)}): it was changed or "
                        f"damaged; restore it, or prepare the data again")
    return dict(recorded, json=text)


def checkpoint_tokenizer(ckpt):
    """The record a checkpoint carries (with the tokenizer's text); checkpoints without one (older ones, nanoGPT's)
    were trained on GPT-2 tokens."""
    return ckpt.get("tokenizer") or GPT2


def read_tokenizer(path):
    """prepare.py --tokenizer: 'gpt2', a tokenizer.json, or a directory holding one (a data directory, an export);
    the record, its file checked (a byte-level BPE as prepare.py trains them)."""
    if path == GPT2["name"]:
        return GPT2
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the tokenizer {file}: {getattr(e, 'strerror', None) or e}")
    return bpe_record(text, file)


def sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -----------------------------------------------------------------------------
# The tokenizer.json of a trained byte-level BPE, read without `tokenizers`

def bytes_to_unicode():
    """GPT-2's byte -> printable character map, in which byte-level BPE vocabularies write token bytes: printable
    Latin-1 bytes stand for themselves, the other 68 bytes take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


CHAR_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def parse_bpe(text, source):
    """(ranks, specials) of a tokenizer.json: each ordinary token's exact bytes -> id, each special token -> id.
    Anything but a byte-level BPE with prepare.py's split and contiguous ids is one DataError naming source."""
    try:
        spec = json.loads(text)
        model, split, byte_level = spec["model"], *spec["pre_tokenizer"]["pretokenizers"]
        shape = (model["type"], split["type"], split["behavior"], split["invert"], byte_level["type"],
                 byte_level["use_regex"], byte_level["add_prefix_space"], spec["normalizer"])
        pattern = split["pattern"]["Regex"]
        # the vocabulary's strings are token bytes in the byte-level map: never tok.decode([id]), which is lossy
        ranks = {bytes(CHAR_TO_BYTE[c] for c in token): i for token, i in model["vocab"].items()}
        specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, another kind of tokenizer
        raise DataError(f"{source} is not a byte-level BPE tokenizer.json ({type(e).__name__}: {e}): it is damaged, "
                        f"or was not written by prepare.py")
    ids = sorted([*ranks.values(), *specials.values()])
    missing = [name for name in SPECIAL_TOKENS if name not in specials]
    for ok, what in [
        (shape == ("BPE", "Split", "Isolated", False, "ByteLevel", False, False, None), "its model or pre-tokenizer is not a byte-level BPE's as prepare.py trains them"),
        (pattern == SPLIT_PATTERN, "its split pattern is not prepare.py's (GPT-4's)"),
        (ids == list(range(len(ids))), "its token ids are not 0, 1, 2, ... without gaps"),
        (len(ids) <= MAX_VOCAB, f"it has {len(ids):,} tokens, more than the {MAX_VOCAB:,} that uint16 token files hold"),
        (not missing, f"it has no {(missing or [''])[0]} token (a tokenizer here has all of {', '.join(SPECIAL_TOKENS)})"),
        (all(bytes([b]) in ranks for b in range(256)), "not every byte is a token (some text could not be encoded)"),
    ]:
        if not ok:
            raise DataError(f"{source}: {what}")
    return ranks, specials


def bpe_record(text, source):
    """The record of a tokenizer.json's text, checked: parse_bpe, and its merges are the ones tiktoken's algorithm
    finds from the ranks (then tiktoken and `tokenizers` encode alike)."""
    ranks, specials = parse_bpe(text, source)
    merges, previous = json.loads(text)["model"]["merges"], -1
    if len(merges) != len(ranks) - 256:  # a token no merge makes: tiktoken would use it, `tokenizers` never
        raise DataError(f"{source}: {len(ranks) - 256 - len(merges)} of its tokens are not made by a merge")
    for i, merge in enumerate(merges):
        left, right = (merge.split(" ") if isinstance(merge, str) else merge)  # older `tokenizers` wrote "a b"
        token = bytes(CHAR_TO_BYTE[c] for c in left + right)
        # tiktoken applies merges by the rank of what they make; `tokenizers` by their place in the list
        implied = bpe_split(ranks, token, ranks[token]) == [token[:len(token) - len(right)], token[len(token) - len(right):]]
        if not implied or ranks[token] <= previous:
            raise DataError(f"{source}: merge {i} ({left!r} + {right!r}) is not the one its ranks imply; tiktoken "
                            f"would encode other tokens than `tokenizers`")
        previous = ranks[token]
    return {"name": f"bpe-{len(ranks) + len(specials)}", "sha256": sha256(text), "json": text}


def bpe_split(ranks, token, max_rank):
    """tiktoken's merge loop on token's bytes with the ranks below max_rank: repeatedly join the adjacent pair
    whose join has the lowest rank. A token of rank r always ends as exactly two parts, its merge."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best:  # the leftmost of equal ranks, as tiktoken
                best, at = rank, i
        if at < 0:  # no pair joins below max_rank: the token is not reachable from lower ones
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


# -----------------------------------------------------------------------------
# Training (prepare.py --vocab_size)

def train_bpe(texts, vocab_size):
    """A byte-level BPE of vocab_size tokens learned from the strings `texts` yields, as tokenizer.json text: all
    256 bytes, the merges, then SPECIAL_TOKENS as the last ids. Deterministic: the same texts give the same file."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DataError("training a tokenizer needs the tokenizers package: pip install tokenizers")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # every byte is a token, seen or not: any text can be encoded. Specials are added after training so that they
    # take the last ids (BpeTrainer's special_tokens would put them first)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())  # its bars; without a terminal, blank lines
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok.to_str()
