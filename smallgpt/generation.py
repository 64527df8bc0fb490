"""
Generation from a checkpoint, shared by sample.py (the terminal) and serve.py (the HTTP server), so that the same
seed and settings give the same text in both: loading the model, the prompt (cropped to the context), the batch of
seeded samples, decoding tokens to whole characters as they arrive, and a chat model's reply (chat.py's template).
The sampling itself (KV cache, temperature, top-k, top-p) is GPT.generate and sample_token in model.py.
"""
import codecs
import sys
from dataclasses import dataclass, replace

import torch

from .chat import ChatTokens
from .checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from .device import select_device, select_dtype
from .errors import DataError
from .tokenizer import open_tokenizer


@dataclass
class Sampling:
    """The settings generate_samples and stream_tokens read (sample.py's SampleConfig has the same fields, with
    their defaults and meaning)."""
    num_samples: int  # samples from the same prompt, generated together as one batch
    max_new_tokens: int  # tokens generated per sample (fewer when a sample reaches its stop token)
    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1.0 = off
    seed: int  # sample i uses a generator seeded seed + i


def open_for_generation(cfg):
    """What sample.py and serve.py start from: the device and dtype (cfg.device, cfg.dtype), the checkpoint's model
    and the tokenizer it was trained with (load_model), with one line on stderr saying what was loaded."""
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    model, enc, info = load_model(cfg, device)
    print(f"{info}; {model.num_params() / 1e6:.1f}M parameters on {device} in {dtype}", file=sys.stderr)
    return model, enc, device, dtype


def load_model(cfg, device):
    """The checkpoint's model (cfg.out_dir, cfg.which) on device, multipliers merged, in eval mode, its trunk
    compiled when cfg.compile; the tokenizer it carries (GPT-2 for older checkpoints); a line describing them."""
    path = find_checkpoint(cfg.out_dir, cfg.which)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    enc = open_tokenizer(ckpt=ckpt).enc
    # every id of text needs a row (a model from HF GPT-2 has none for the reserved chat tokens: never sampled)
    if model.config.vocab_size <= enc.eot_token:  # e.g. a nanoGPT checkpoint of characters
        raise DataError(f"{path} has vocab_size {model.config.vocab_size}, fewer than the {enc.eot_token + 1} tokens of "
                        f"its tokenizer ({enc.name}): it was trained with a tokenizer that sample.py and serve.py do not know")
    model.merge_multipliers()  # the same function, as plain weights: no multiplier work per token
    val = ckpt.get("best_val_loss")
    info = (f"{path}: iter {ckpt.get('iter_num', '?')}" + (f", best val loss {float(val):.4f}" if val is not None else "")
            + f", tokenizer {enc.name}")
    del ckpt
    model = model.to(device).eval()
    if cfg.compile:
        model.hidden_states = torch.compile(model.hidden_states)  # generate() runs the trunk through this
    return model, enc, info


def completion_vocab(enc):
    """How many ids a completion samples from: every token of text and <|endoftext|>, never the padded ids or the
    reserved chat markers (the ids after <|endoftext|>, for GPT-2's tokenizer and a trained one alike)."""
    return enc.eot_token + 1


def encode_prompt(enc, text, block_size):
    """The prompt's tokens as generation sees them (an empty prompt = a new document: the end-of-text token),
    cropped to the last block_size; plus a note saying so when cropped, else None."""
    prompt = enc.encode(text, allowed_special="all") if text else [enc.eot_token]
    if len(prompt) <= block_size:
        return prompt, None
    return prompt[-block_size:], (f"the prompt has {len(prompt)} tokens, more than block_size {block_size}: only its "
                                  f"last {block_size} are used")


def text_stream(enc):
    """A function from tokens to the text they complete. Byte-level BPE tokens are byte sequences and one UTF-8 character
    may be split across two tokens: its bytes are held back until it is complete, so nothing half-printed."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tiktoken's decode uses errors="replace"
    return lambda tokens, final=False: decoder.decode(b"".join(enc.decode_single_token_bytes(t) for t in tokens), final)


def stream_tokens(model, prompt, cfg, vocab_limit, stop=None):
    """Yield (i, token) for each new token of sample i, for cfg.num_samples continuations of prompt (token ids)
    generated as one batch, step by step. A sample's stop token is yielded once; after it, that sample yields
    nothing more. Closing this generator early ends the generation (no further forward passes)."""
    device = model.lm_head.weight.device
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)
    generators = [torch.Generator(device=device).manual_seed(cfg.seed + i) for i in range(cfg.num_samples)]
    done = [False] * cfg.num_samples
    for step in model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p,
                               stop_token=stop, vocab_limit=vocab_limit, generators=generators):
        for i, token in enumerate(step.tolist()):  # .tolist() waits for the device: once per step
            if done[i]:  # generate repeats stop_token for finished samples until all are done
                continue
            done[i] = token == stop
            yield i, token


def generate_samples(model, prompt, cfg, vocab_limit, stop=None, on_token=None):
    """cfg.num_samples continuations of prompt (token ids), generated as one batch. Returns each sample's new
    tokens (without the stop token that ended it) and the number of tokens generated (stop tokens included).
    on_token(t) is called with each new token of the first sample as soon as it exists."""
    samples, n_tokens = [[] for _ in range(cfg.num_samples)], 0
    for i, token in stream_tokens(model, prompt, cfg, vocab_limit, stop):
        n_tokens += 1
        if token == stop:
            continue
        samples[i].append(token)
        if i == 0 and on_token is not None:
            on_token(token)
    return samples, n_tokens


def chat_tokens(model, enc):
    """The chat template's ids for talking to model (ChatTokens); one line when its vocabulary lacks the markers."""
    chat = ChatTokens(enc)
    if model.config.vocab_size < chat.vocab_size:
        raise DataError(f"this model's vocabulary ({model.config.vocab_size} tokens) lacks the chat markers (ids up to "
                        f"{chat.vocab_size - 1}): chat with a model fine-tuned by train.py with sft=True (docs/chat.md)")
    return chat


def chat_reply(model, chat, messages, cfg, room=None):
    """Yield the tokens of the assistant's next reply to messages (checked), one sample (cfg.num_samples is
    ignored). The oldest turns are dropped when the conversation leaves less than `room` tokens of the context for
    the reply (default: max_new_tokens, at most half the context). The last token yielded is in chat.stops when the
    reply ended (its turn end, or any other special token), else the reply ran out of max_new_tokens."""
    room = min(cfg.max_new_tokens, model.config.block_size // 2) if room is None else room
    prompt = chat.prompt(messages, model.config.block_size, room)
    # vocab_limit: the chat markers sit beyond the text tokens (chat.py); generation stops at any of them
    for _, token in stream_tokens(model, prompt, replace(cfg, num_samples=1), chat.vocab_size, chat.end["assistant"]):
        yield token
        if token in chat.stops:
            return


def reply_scores(model, chat, conversations, cfg):
    """Greedy replies to each conversation's messages before its last (an assistant turn): the share that equal
    that turn exactly and end at the turn end, and the share that end at the turn end at all."""
    exact = ended = 0
    for messages in conversations:
        tokens = list(chat_reply(model, chat, messages[:-1], replace(cfg, temperature=0.0)))
        finished = bool(tokens) and tokens[-1] == chat.end["assistant"]
        ended += finished
        exact += finished and chat.enc.decode(tokens[:-1]) == messages[-1]["content"]
    return exact / len(conversations), ended / len(conversations)
