"""
Sample text from a trained GPT: a KV cache (one prefill of the prompt, then one token per step), temperature,
top-k and top-p, a stop at end-of-text, and the text streamed to the terminal as it is generated.

    python sample.py --out_dir=out/fineweb-40m --start="The meaning of life is" --max_new_tokens=200
    python sample.py --out_dir=out/fineweb-40m/last.pt --num_samples=3 --temperature=0.9 --top_p=0.95
    echo "Once upon a time" | python sample.py --out_dir=out --start=- --seed=7
    python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0   # greedy

Reads best.pt or last.pt (--which) from out_dir, or nanoGPT's ckpt.pt, or a checkpoint file given as out_dir.
The text goes to stdout; everything else (checkpoint, speed, warnings) to stderr. With --num_samples > 1 the
samples are generated together as one batch: the first is streamed, the others follow when all are done.
Sample i draws from its own generator seeded seed + i, so `--num_samples=3 --seed=5` gives as third sample
exactly what `--seed=7` gives alone. `python sample.py --help` lists every option.
"""
import codecs
import sys
import time
from dataclasses import dataclass

import torch

from checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from config import parse_args
from device import autocast, select_device, select_dtype
from errors import ConfigError, DataError, run_main
from tokens import get_tokenizer


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


def validate(cfg):
    if cfg.which not in ("best", "last"):
        raise ConfigError(f"which must be best or last, not {cfg.which!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be one of auto, float32, bfloat16, float16, not {cfg.dtype!r}")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0 or cfg.top_k < 0:
        raise ConfigError("num_samples must be at least 1, max_new_tokens and top_k must not be negative")
    if cfg.temperature < 0:
        raise ConfigError(f"temperature must not be negative (0 = greedy), not {cfg.temperature}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], not {cfg.top_p}")
    if not 0 <= cfg.seed < 2 ** 63 - cfg.num_samples:  # torch generators take 64-bit seeds
        raise ConfigError(f"seed must be in [0, 2**63 - num_samples), not {cfg.seed}")
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


def load_model(cfg, device, n_vocab):
    """The checkpoint's model on device, multipliers merged, in eval mode; plus a line describing it."""
    path = find_checkpoint(cfg.out_dir, cfg.which)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    if model.config.vocab_size < n_vocab:
        raise DataError(f"{path} has vocab_size {model.config.vocab_size}, fewer than the GPT-2 tokenizer's {n_vocab} "
                        f"tokens: it was trained with another tokenizer, which sample.py does not support")
    model.merge_multipliers()  # the same function, as plain weights: no multiplier work per token
    val = ckpt.get("best_val_loss")
    info = f"{path}: iter {ckpt.get('iter_num', '?')}" + (f", best val loss {float(val):.4f}" if val is not None else "")
    del ckpt
    return model.to(device).eval(), info


def text_stream(enc):
    """A function from tokens to the text they complete. GPT-2 tokens are byte sequences and one UTF-8 character
    may be split across two tokens: its bytes are held back until it is complete, so nothing half-printed."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tiktoken's decode uses errors="replace"
    return lambda tokens, final=False: decoder.decode(b"".join(enc.decode_single_token_bytes(t) for t in tokens), final)


def generate_samples(model, prompt, cfg, vocab_limit, stop=None, on_token=None):
    """cfg.num_samples continuations of prompt (token ids), generated as one batch. Returns each sample's new
    tokens (without the stop token that ended it) and the number of tokens generated (stop tokens included).
    on_token(t) is called with each new token of the first sample as soon as it exists."""
    device = model.lm_head.weight.device
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)
    generators = [torch.Generator(device=device).manual_seed(cfg.seed + i) for i in range(cfg.num_samples)]
    samples, done, n_tokens = [[] for _ in range(cfg.num_samples)], [False] * cfg.num_samples, 0
    for step in model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p,
                               stop_token=stop, vocab_limit=vocab_limit, generators=generators):
        for i, token in enumerate(step.tolist()):  # .tolist() waits for the device: once per step
            if done[i]:  # generate repeats stop_token for finished samples until all are done
                continue
            n_tokens += 1
            if token == stop:
                done[i] = True
                continue
            samples[i].append(token)
            if i == 0 and on_token is not None:
                on_token(token)
    return samples, n_tokens


def main(argv):
    cfg = validate(parse_args(SampleConfig, argv))
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    enc = get_tokenizer()
    eot = enc.eot_token
    text = read_prompt(cfg.start)  # before the model: a wrong path fails at once
    model, info = load_model(cfg, device, enc.n_vocab)
    print(f"{info}; {model.num_params() / 1e6:.1f}M parameters on {device} in {dtype}", file=sys.stderr)
    if cfg.compile:
        model.hidden_states = torch.compile(model.hidden_states)  # generate() runs the trunk through this

    # --- the prompt: cropped to the model's context, as generation would see it anyway
    prompt = enc.encode(text, allowed_special="all") if text else [eot]
    block = model.config.block_size
    if len(prompt) > block:
        print(f"warning: the prompt has {len(prompt)} tokens, more than block_size {block}: only its last {block} "
              f"are used (and shown)", file=sys.stderr)
        prompt = prompt[-block:]

    # --- generate as one batch, streaming the first sample
    shown = [] if text == "" else prompt  # the default prompt (end-of-text) is not shown
    stream = text_stream(enc)
    print(stream(shown), end="", flush=True)
    t0 = time.time()
    with autocast(device, dtype):
        samples, n_tokens = generate_samples(model, prompt, cfg, enc.n_vocab, eot if cfg.stop_at_eot else None,
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
