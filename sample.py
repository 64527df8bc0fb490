"""
Sample text from a trained GPT: a KV cache (one prefill of the prompt, then one token per step), temperature,
top-k and top-p, a stop at end-of-text, and the text streamed to the terminal as it is generated. With --chat, a
conversation with a model fine-tuned on chats (docs/chat.md).

    python sample.py --out_dir=out/fineweb-40m --start="The meaning of life is" --max_new_tokens=200
    python sample.py --out_dir=out/fineweb-40m/last.pt --num_samples=3 --temperature=0.9 --top_p=0.95
    echo "Once upon a time" | python sample.py --out_dir=out --start=- --seed=7
    python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0   # greedy
    python sample.py --out_dir=out/chat --chat --system="Be brief."        # talk to a fine-tuned model (docs/chat.md)

Reads best.pt or last.pt (--which) from out_dir, or nanoGPT's ckpt.pt, or a checkpoint file given as out_dir.
The text goes to stdout; everything else (checkpoint, speed, warnings) to stderr. With --num_samples > 1 the
samples are generated together as one batch: the first is streamed, the others follow when all are done.
Sample i draws from its own generator seeded seed + i, so `--num_samples=3 --seed=5` gives as third sample
exactly what `--seed=7` gives alone. `python sample.py --help` lists every option.
"""
import math
import sys
import time
from dataclasses import dataclass

from smallgpt.checkpoint import check_which
from smallgpt.config import parse_args
from smallgpt.device import autocast
from smallgpt.errors import ConfigError, DataError, run_main
from smallgpt.generation import (chat_reply, chat_tokens, completion_vocab, encode_prompt, generate_samples,
                                  open_for_generation, text_stream)


@dataclass
class SampleConfig:
    out_dir: str = "out"  # a training run's directory (best.pt, last.pt or nanoGPT's ckpt.pt) or a checkpoint file
    which: str = "best"  # 'best' | 'last': the checkpoint to read from out_dir (falls back to the other)
    start: str = ""  # prompt: text, FILE:path or - (stdin); empty = a new document (the end-of-text token)
    num_samples: int = 1  # samples from the same prompt, generated together as one batch
    max_new_tokens: int = 500  # tokens generated per sample (fewer when a sample reaches end-of-text)
    temperature: float = 0.8  # 1.0 = the model's distribution, < 1 sharper, 0 = greedy (always the likeliest token)
    top_k: int = 200  # sample only among the k likeliest tokens; 0 = off
    top_p: float = 1.0  # sample only among the fewest likeliest tokens holding this much probability; 1.0 = off
    seed: int = 1337  # sample i uses a generator seeded seed + i: the same seed gives the same text
    stop_at_eot: bool = True  # end a sample at the end-of-text token (False: generate across documents)
    device: str = "auto"  # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
    dtype: str = "auto"  # 'auto' (bfloat16 / float16 on GPUs, float32 on CPU) | 'float32' | 'bfloat16' | 'float16'
    compile: bool = False  # torch.compile the trunk: same tokens, faster steps, but tens of seconds of compiling first
    chat: bool = False  # a conversation with a model fine-tuned on chats: type a message, read the reply
    system: str = ""  # --chat: the system message the conversation starts with ('' = none)


def validate(cfg):
    check_which(cfg.which)
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be one of auto, float32, bfloat16, float16, not {cfg.dtype!r}")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0 or cfg.top_k < 0:
        raise ConfigError("num_samples must be at least 1, max_new_tokens and top_k must not be negative")
    if not 0 <= cfg.temperature < math.inf:  # (NaN fails every comparison)
        raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), not {cfg.temperature}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], not {cfg.top_p}")
    if not 0 <= cfg.seed < 2 ** 63 - cfg.num_samples:  # torch generators take 64-bit seeds
        raise ConfigError(f"seed must be in [0, 2**63 - num_samples), not {cfg.seed}")
    if cfg.chat and (cfg.start or cfg.num_samples > 1):
        raise ConfigError("--chat reads the messages from the terminal (or stdin), one reply each: drop --start and "
                          "--num_samples")
    if cfg.system and not cfg.chat:
        raise ConfigError("--system is the system message of a --chat conversation: add --chat")
    return cfg


def read_prompt(start):
    """The prompt text: --start itself, a file's contents (FILE:path) or stdin (-)."""
    if start == "-":
        return sys.stdin.read()
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"cannot read prompt file {start[5:]}: {e.strerror}")
        except UnicodeDecodeError:
            raise DataError(f"cannot read prompt file {start[5:]}: not UTF-8 text")
    return start


def converse(cfg, model, enc, device, dtype):
    """--chat: user turns from stdin (a line each; an empty line or end of input ends), each reply streamed. The
    whole history is the prompt; its oldest turns drop out when it outgrows the context."""
    chat = chat_tokens(model, enc)
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    print("chat: type a message and press Enter; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            text = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        stream, reply = text_stream(enc), []
        with autocast(device, dtype):
            for token in chat_reply(model, chat, messages, cfg):
                if token in chat.stops:  # the turn's end (special tokens are never printed)
                    break
                reply.append(token)
                print(stream([token]), end="", flush=True)
            else:
                print(f"\n(reply cut at max_new_tokens={cfg.max_new_tokens})", end="", file=sys.stderr)
        print(stream([], final=True), flush=True)
        messages.append({"role": "assistant", "content": enc.decode(reply)})


def main(argv):
    cfg = validate(parse_args(SampleConfig, argv))
    text = read_prompt(cfg.start)  # before the model: a wrong path fails at once
    model, enc, device, dtype = open_for_generation(cfg)
    if cfg.chat:
        return converse(cfg, model, enc, device, dtype)
    eot = enc.eot_token

    # --- the prompt: cropped to the model's context, as generation would see it anyway
    prompt, cropped = encode_prompt(enc, text, model.config.block_size)
    if cropped:
        print(f"warning: {cropped} (and shown)", file=sys.stderr)

    # --- generate as one batch, streaming the first sample
    shown = [] if text == "" else prompt  # the default prompt (end-of-text) is not shown
    stream = text_stream(enc)
    print(stream(shown), end="", flush=True)
    t0 = time.time()
    with autocast(device, dtype):
        samples, n_tokens = generate_samples(model, prompt, cfg, completion_vocab(enc), eot if cfg.stop_at_eot else None,
                                             on_token=lambda t: print(stream([t]), end="", flush=True))
    dt = time.time() - t0
    print(stream([], final=True))
    for sample in samples[1:]:
        print("-" * 15)
        print(enc.decode(shown + sample))
    print(f"{n_tokens} tokens in {dt:.2f} s: {n_tokens / max(dt, 1e-9):.1f} tokens/s ({cfg.num_samples} "
          f"sample{'s' if cfg.num_samples > 1 else ''} of up to {cfg.max_new_tokens}, prefill included)", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
