"""
Generation speed: GPT.generate (KV cache: one prefill, then one token per step) against full recomputation
(nanoGPT's sampler: a forward over the whole context, cropped to block_size, for every new token), batch 1,
greedy, random weights; and a multipliers='vector' model after merge_multipliers() against a plain one.

    python -m bench.bench_sample                 # the 40M architecture on CPU, 256 and 1024 new tokens (minutes)
    python -m bench.bench_sample --quick         # a tiny model, seconds: a smoke test for CI
    python -m bench.bench_sample --device=cuda --lengths=256,1024,4096

The compared variants run in one process, in lockstep: one token of each in turn, each one's time summed, so load
from other processes that comes and goes falls on both in the same seconds. Both must produce the same tokens
(checked at every step).
"""
import os
import sys
import time
from dataclasses import dataclass

if not __package__:  # run as a file, the repository root is not on the path: say how to run it
    sys.exit(f"run it from the repository root as: python -m bench.{os.path.basename(__file__)[:-3]} ...")

import torch

from model import GPT, GPTConfig
from smallgpt.errors import run_main
from smallgpt.config import parse_args


@dataclass
class BenchSampleConfig:
    lengths: str = "256,1024"  # new tokens per run, comma-separated
    prompt_tokens: int = 4  # a few random prompt tokens
    device: str = "cpu"  # 'cpu' | 'cuda' | 'mps'
    threads: int = 0  # torch.set_num_threads; 0 = PyTorch's default
    quick: bool = False  # a tiny model and short runs, for a smoke test
    # the architecture: config/train_fineweb_40m.py
    n_layer: int = 12  # transformer blocks
    n_head: int = 6  # attention heads
    n_embd: int = 384  # width
    block_size: int = 1024  # context length
    vocab_size: int = 50304  # GPT-2's vocabulary padded to a multiple of 64


@torch.no_grad()
def full_recomputation(model, idx, max_new_tokens):
    """nanoGPT's sampler, greedy: every token is a forward over the last block_size tokens (the LM head on the
    last position only, as nanoGPT does). Yields one (B,) token tensor per step, like GPT.generate."""
    for _ in range(max_new_tokens):
        x, _ = model.hidden_states(idx[:, -model.config.block_size:])
        token = model.lm_head(x[:, -1, :]).float().argmax(-1)
        yield token
        idx = torch.cat([idx, token[:, None]], dim=1)


def lockstep(runs, n, same_tokens=True):
    """Seconds each generator in runs {name: generator} takes for n tokens. They advance one token at a time, in
    turn (order flipped every step), so load from other processes that comes and goes slows all of them alike."""
    seconds = dict.fromkeys(runs, 0.0)
    names = list(runs)
    for step in range(n):
        tokens = {}
        for name in names if step % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            tokens[name] = next(runs[name]).tolist()  # .tolist() waits for the device
            seconds[name] += time.perf_counter() - t0
        if same_tokens and len({str(t) for t in tokens.values()}) != 1:
            raise AssertionError(f"the variants generated different tokens at step {step}: {tokens}")
    return seconds


def main(argv):
    cfg = parse_args(BenchSampleConfig, argv)
    if cfg.quick:
        cfg.lengths, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size = "16,80", 2, 2, 64, 64, 512
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lengths = [int(s) for s in cfg.lengths.split(",")]
    arch = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**arch)).to(cfg.device).eval()
    merged = GPT(GPTConfig(**arch, multipliers="vector"))
    with torch.no_grad():
        for p in merged.multiplier_parameters():
            p.uniform_(0.5, 1.5)  # as after training: away from their init of 1
    merged.merge_multipliers()
    merged = merged.to(cfg.device).eval()
    idx = torch.randint(0, 50257 if not cfg.quick else cfg.vocab_size, (1, cfg.prompt_tokens), device=cfg.device)
    print(f"{plain.num_params() / 1e6:.1f}M parameters (position embeddings not counted), {cfg.n_layer} layers x {cfg.n_embd}, block "
          f"{cfg.block_size}; batch 1, prompt {cfg.prompt_tokens} tokens, greedy; device {cfg.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    greedy = lambda model, n: model.generate(idx, n, temperature=0)
    lockstep({"kv": greedy(plain, 8), "full": full_recomputation(plain, idx, 8)}, 8)  # warm-up

    print("| new tokens | full recomputation tok/s | KV cache tok/s | KV cache speed-up |")
    print("|---:|---:|---:|---:|")
    for n in lengths:
        secs = lockstep({"kv": greedy(plain, n), "full": full_recomputation(plain, idx, n)}, n)
        crossing = cfg.prompt_tokens + n - 1 - cfg.block_size  # steps whose context no longer fits the window
        note = f" (the last {crossing} steps slide the window: a full re-prefill each)" if crossing > 0 else ""
        print(f"| {n}{note} | {n / secs['full']:.1f} | {n / secs['kv']:.1f} | {secs['full'] / secs['kv']:.2f}x |", flush=True)

    n = lengths[0]
    secs = lockstep({"plain": greedy(plain, n), "merged": greedy(merged, n)}, n, same_tokens=False)  # other weights
    print(f"multipliers='vector' after merge_multipliers() vs plain, KV cache, {n} new tokens: "
          f"{n / secs['merged']:.1f} vs {n / secs['plain']:.1f} tok/s (merged / plain time {secs['merged'] / secs['plain']:.3f})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    run_main(main)
