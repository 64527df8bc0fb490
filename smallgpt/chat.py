"""
The chat format, one definition for training, sampling, serving and export (docs/chat.md):

    <|endoftext|><|system_start|>Be brief.<|system_end|><|user_start|>Hi<|user_end|><|assistant_start|>Hello!<|assistant_end|>...

A conversation is {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} (the OpenAI
format): an optional system message first, then turns; content is encoded as ordinary text (a literal
"<|user_end|>" in a message stays text, it cannot fake a turn), the markers are the tokenizer's reserved special
tokens. The loss mask (which targets SFT trains on: the assistant's content and its <|assistant_end|>) is a
function of the ids alone, so it travels with the token shards and is never out of step with them.
numpy only at import: data/chat/prepare.py uses this module without importing torch.
"""
import json

import numpy as np

from .errors import DataError

ROLES = ("system", "user", "assistant")
TEMPLATE_NAME = "smallgpt-chat-1"  # what a chat data directory's manifest records: the format its ids follow

# The same format for transformers' apply_chat_template (export.py writes it into the exported tokenizer; the
# markers are special tokens there, so each message's content is encoded on its own, as render does). The
# {% generation %} block marks what return_assistant_tokens_mask=True returns: the assistant_mask.
CHAT_TEMPLATE = (
    "{{- '<|endoftext|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role: ' + message['role']) -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant_start|>{%- generation -%}{{- message['content'] -}}<|assistant_end|>{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


class ChatTokens:
    """The template's tokens, from the tokenizer (enc: smallgpt/tokenizer.py's tiktoken Encoding, whose special
    tokens are the reserved ones: for GPT-2's, the chat markers at 50257-50266, in the padded part of the 50,304-row
    embedding): bos (each conversation starts with <|endoftext|>), the turn markers, and the ids that end a reply
    when generated (any special token: the turn end, end-of-text, or a marker the model should not have produced)."""

    def __init__(self, enc):
        self.enc = enc
        self.ids = dict(sorted(((name, enc.encode_single_token(name)) for name in enc.special_tokens_set),
                               key=lambda item: item[1]))
        self.bos = self.ids["<|endoftext|>"]
        self.start = {role: self.ids[f"<|{role}_start|>"] for role in ROLES}
        self.end = {role: self.ids[f"<|{role}_end|>"] for role in ROLES}
        self.stops = set(self.ids.values())
        self.vocab_size = max(self.stops) + 1  # the ids a chat model must be able to produce

    def render(self, messages, generation_prompt=False):
        """The ids of a conversation (checked messages); generation_prompt adds <|assistant_start|>: the reply
        comes next."""
        ids = [self.bos]
        for m in messages:
            ids += [self.start[m["role"]], *self.enc.encode_ordinary(m["content"]), self.end[m["role"]]]
        return ids + [self.start["assistant"]] if generation_prompt else ids

    def prompt(self, messages, block_size, room):
        """The ids that ask for the next reply: the conversation and <|assistant_start|>, with its oldest exchanges
        (after a system message) dropped until `room` tokens for the reply fit in block_size. A last message too long
        on its own stays whole: generation sees its last block_size tokens."""
        head = 1 if messages[0]["role"] == "system" else 0  # the system message stays
        system, turns = messages[:head], messages[head:]
        ids = self.render(system + turns, generation_prompt=True)
        while len(ids) + room > block_size and len(turns) > 1:
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":  # what remains starts with the user's turn
                turns = turns[1:]
            ids = self.render(system + turns, generation_prompt=True)
        return ids

    def assistant_mask(self, ids):
        """True where a token is the assistant's (its content and <|assistant_end|>, not <|assistant_start|>), over
        the last axis of ids: the targets SFT trains on."""
        ids = np.asarray(ids)
        opened = np.cumsum(ids == self.start["assistant"], axis=-1)
        closed_before = np.cumsum(ids == self.end["assistant"], axis=-1) - (ids == self.end["assistant"])
        return (opened > closed_before) & (ids != self.start["assistant"])


# -----------------------------------------------------------------------------
# Conversations: read and checked, every mistake one line naming where it is

def check_messages(messages, where, need_assistant=True):
    """The messages of one conversation, checked; `where` names it in the error ('file line 3', 'messages')."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has the unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} ({m['role']}) has content of type {type(m['content']).__name__}, "
                            f"not text")
        if m["role"] == "system" and i > 0:
            raise DataError(f"{where}: message {i} is a system message; only the first message may be one")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message (nothing to learn from)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path):
    """The conversations of a .jsonl (or .jsonl.gz) file (one {"messages": [...]} per line; blank lines skipped),
    checked."""
    import gzip
    conversations = []
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{where}: not a JSON object ({e})") from None
                if not isinstance(record, dict) or "messages" not in record:
                    raise DataError(f"{where}: expected an object with a 'messages' list")
                conversations.append(check_messages(record["messages"], where))
    except OSError as e:  # a missing file; a damaged .gz (gzip's BadGzipFile has no strerror)
        raise DataError(f"cannot read {path}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start:,})")
    if not conversations:
        raise DataError(f"{path} holds no conversations")
    return conversations


# -----------------------------------------------------------------------------
# A synthetic task a tiny model learns on a CPU in minutes (docs/chat.md): repeat or reverse a few words

WORDS = ("red", "blue", "green", "black", "white", "gold", "cat", "dog", "fish", "bird", "cow", "horse", "sun",
         "moon", "star", "rain", "wind", "one", "two", "three", "four", "five", "six")  # one GPT-2 token each


def word_task(n_train, n_val, seed):
    """(train, val) conversations: "repeat: cat sun dog" -> "cat sun dog", "reverse: ..." -> the words reversed,
    2 to 4 distinct words, a system message in half of them; no val prompt occurs in train."""
    rng, seen, out = np.random.default_rng(seed), set(), []
    while len(out) < n_train + n_val:
        task = ("repeat", "reverse")[int(rng.integers(2))]
        words = [WORDS[i] for i in rng.choice(len(WORDS), int(rng.integers(2, 5)), replace=False)]
        if (task, *words) in seen:
            continue
        seen.add((task, *words))
        reply = words if task == "repeat" else words[::-1]
        messages = [{"role": "system", "content": "Follow the instruction."}] if rng.random() < 0.5 else []
        out.append(messages + [{"role": "user", "content": f"{task}: {' '.join(words)}"},
                               {"role": "assistant", "content": " ".join(reply)}])
    return out[:n_train], out[n_train:]


# -----------------------------------------------------------------------------
# Training rows: one conversation a row, in a seeded order without replacement

def conversation_starts(tokens, bos):
    """Where each conversation of a split's token stream begins (its <|endoftext|>), read in chunks."""
    chunk = 1 << 24
    starts = np.concatenate([np.flatnonzero(tokens[a:a + chunk] == bos) + a for a in range(0, len(tokens), chunk)])
    if not len(starts) or starts[0] != 0:
        raise DataError("the data does not start with a conversation: sft=True needs data from data/chat/prepare.py")
    return starts


class ConversationRows:
    """Batches for SFT, with TrainWindows' interface (batch(first, count), a global index that a checkpoint's
    data_position resumes): row i is one conversation, cut to block_size + 1 tokens, its targets -1 (ignored)
    except the assistant's, padded with ignored targets. Epoch e visits the conversations in the order of a
    permutation seeded (seed, e); fixed(count) are evenly spaced ones for evaluation."""

    def __init__(self, tokens, block_size, seed, chat_tokens):
        self.tokens, self.block_size, self.seed, self.chat = tokens, block_size, seed, chat_tokens
        self.starts = np.append(conversation_starts(tokens, chat_tokens.bos), len(tokens))
        self.count = len(self.starts) - 1
        self.too_long = int(np.sum(np.diff(self.starts) > block_size + 1))  # cut: their ends are not trained
        self._epoch, self._order = None, None

    def conversation(self, index):
        epoch, i = divmod(index, self.count)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return int(self._order[i])

    def batch(self, first, count):
        return self.rows([self.conversation(first + j) for j in range(count)])

    def fixed(self, count):
        return np.linspace(0, self.count - 1, count).astype(np.int64).tolist()

    def rows(self, conversations):
        """x, y ((len(conversations), block_size), int64) for these conversation numbers."""
        import torch
        T = self.block_size
        x = np.full((len(conversations), T), self.chat.bos, np.int64)
        y = np.full((len(conversations), T), -1, np.int64)
        for r, c in enumerate(conversations):
            ids = np.asarray(self.tokens[self.starts[c]:min(self.starts[c + 1], self.starts[c] + T + 1)], np.int64)
            x[r, :len(ids) - 1] = ids[:-1]
            y[r, :len(ids) - 1] = np.where(self.chat.assistant_mask(ids)[1:], ids[1:], -1)
        return torch.from_numpy(x), torch.from_numpy(y)
