"""
Conversations into the token data train.py fine-tunes on (sft=True): a .jsonl file of one conversation a line, in
the format of the OpenAI API and most public chat datasets,

    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]}

rendered with the chat template (smallgpt/chat.py, docs/chat.md) into the same directory format as
data/fineweb/prepare.py writes (manifest.json, train_000000.bin, val_000000.bin; smallgpt/shards.py), each
conversation starting with <|endoftext|>. The loss mask is a function of the ids (the assistant's turns), so it
needs no file of its own. Commands:

  python data/chat/prepare.py conversations.jsonl --out_dir=data/chat --val_docs=200
  python data/chat/prepare.py train.jsonl --val_file=held_out.jsonl --out_dir=data/chat   # your own val set
  python data/chat/prepare.py train.jsonl --tokenizer=data/mine16k --out_dir=data/chat16k   # the base's own BPE
  python data/chat/prepare.py --words=2000 --out_dir=data/chat_words   # the synthetic repeat/reverse task (docs/chat.md)

A malformed line, an unknown role or a conversation without an assistant turn is one line naming file and line.
"""
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

# run as a file (python data/chat/prepare.py, as the docs say): the repository root holds the package
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from smallgpt.chat import TEMPLATE_NAME, ChatTokens, read_conversations, word_task  # noqa: E402
from smallgpt.errors import ConfigError, DataError, run_main  # noqa: E402
from smallgpt.flags import parse_args  # noqa: E402
from smallgpt.shards import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, TOKEN_DTYPE, shard_name,  # noqa: E402
                             write_atomically, write_json_atomically)
from smallgpt.tokenizer import TOKENIZER_FILE, get_tokenizer, read_tokenizer  # noqa: E402


@dataclass
class ChatPrepareConfig:
    inputs: list = field(default_factory=list)  # the plain arguments: .jsonl (.jsonl.gz) files of conversations
    out_dir: str = "data/chat"  # the data directory to write (must not hold data yet)
    val_file: str = ""  # a .jsonl of held-out conversations; '' = draw --val_docs from the inputs
    val_docs: int = 100  # conversations drawn at random (--seed) from the inputs for val, when no --val_file
    seed: int = 0  # seed of the train/val draw and of --words
    words: int = 0  # > 0: write this many synthetic repeat/reverse conversations (+ 10% held out) instead of inputs
    tokenizer: str = "gpt2"  # 'gpt2', or the base model's own: a tokenizer.json or a directory holding one (its data)


USAGE = "usage: python data/chat/prepare.py CONVERSATIONS.jsonl ... [--key=value ...]"


def load_splits(cfg):
    """{'train': conversations, 'val': conversations}, checked."""
    if cfg.words and (cfg.inputs or cfg.val_file):
        raise ConfigError("--words writes the synthetic task instead of conversation files: drop one or the other")
    if cfg.words:
        train, val = word_task(cfg.words, max(1, cfg.words // 10), cfg.seed)
        return {"train": train, "val": val}
    if not cfg.inputs:
        raise ConfigError("name a .jsonl file of conversations (or --words=N for the synthetic task)")
    conversations = [c for path in cfg.inputs for c in read_conversations(path)]
    if cfg.val_file:
        return {"train": conversations, "val": read_conversations(cfg.val_file)}
    if not 0 < cfg.val_docs < len(conversations):
        raise ConfigError(f"val_docs must be in [1, {len(conversations) - 1}] for {len(conversations)} conversations, "
                          f"not {cfg.val_docs} (or give --val_file)")
    val = set(np.random.default_rng(cfg.seed).choice(len(conversations), cfg.val_docs, replace=False).tolist())
    return {"train": [c for i, c in enumerate(conversations) if i not in val],
            "val": [c for i, c in enumerate(conversations) if i in val]}


def write_split(out_dir, split, conversations, chat):
    """The split's shard (written under a temporary name, then renamed) and its manifest entry."""
    tokens = np.array([t for c in conversations for t in chat.render(c)], dtype=TOKEN_DTYPE)
    name = shard_name(split, 0)
    tmp = os.path.join(out_dir, f".{name}.tmp")
    tokens.tofile(tmp)
    os.replace(tmp, os.path.join(out_dir, name))
    text_bytes = sum(len(m["content"].encode("utf-8")) for c in conversations for m in c)
    return dict(file=name, split=split, tokens=len(tokens), documents=len(conversations), bytes=text_bytes)


def main(argv):
    cfg = parse_args(ChatPrepareConfig, argv, positional="inputs", usage=USAGE)
    if os.path.exists(os.path.join(cfg.out_dir, MANIFEST)):
        raise DataError(f"{cfg.out_dir} already holds token data: prepare into another --out_dir")
    t0 = time.time()
    splits = load_splits(cfg)
    record = read_tokenizer(cfg.tokenizer)  # the base model's: train.py checks that they agree
    enc = get_tokenizer(record)
    chat = ChatTokens(enc)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if "json" in record:  # a trained tokenizer lies beside the manifest that names it (smallgpt/tokenizer.py)
        write_atomically(os.path.join(cfg.out_dir, TOKENIZER_FILE), record["json"])
    shards = [write_split(cfg.out_dir, split, conversations, chat) for split, conversations in splits.items()]
    manifest = dict(format=FORMAT_NAME, version=FORMAT_VERSION, dtype="uint16",
                    tokenizer={k: v for k, v in record.items() if k != "json"}, vocab_size=enc.n_vocab,
                    eot_token=enc.eot_token, chat=dict(template=TEMPLATE_NAME, special_tokens=chat.ids),
                    inputs=[dict(source=s) for s in cfg.inputs + ([cfg.val_file] if cfg.val_file else [])],
                    splits={s["split"]: {k: s[k] for k in ("documents", "tokens", "bytes")} for s in shards},
                    shards=[{k: s[k] for k in ("file", "split", "tokens")} for s in shards])
    write_json_atomically(os.path.join(cfg.out_dir, MANIFEST), manifest)  # last: the directory is complete
    for s in shards:
        print(f"{s['split']}: {s['documents']:,} conversations, {s['tokens']:,} tokens")
    print(f"wrote {cfg.out_dir} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_main(main)
