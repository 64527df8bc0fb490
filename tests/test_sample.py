"""
Generation: the KV-cache generate() against a naive reference that recomputes the whole (cropped) context for
every token, sampling options, seeding, end-of-text, and sample.py end to end on checkpoints made here.
"""
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig, sample_token
from smallgpt.errors import DataError
from smallgpt.config import ConfigError
from conftest import REPO, needs_tokenizer, run_script
import sample
from sample import SampleConfig, completion_vocab, generate_samples, text_stream

EOT = 50256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than several, and far faster on a CPU that other processes share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(vocab_size=64, block_size=16, std=0.3, seed=0, **kw):
    """A small random GPT. Weights far larger than GPT-2's init (0.02), so that greedy text varies instead of
    repeating one token, and a wrong cache would show."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size, **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model.eval()


def naive_generate(model, idx, max_new_tokens, pick=lambda logits: logits.argmax(-1), vocab_limit=None):
    """Reference: a full forward over the last block_size tokens for every new token (nanoGPT's sampler)."""
    out = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits, _ = model(idx[:, -model.config.block_size:])
        logits = logits[:, -1].float()
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        token = pick(logits)
        out.append(token)
        idx = torch.cat([idx, token[:, None]], dim=1)
    return torch.stack(out, 1)


def kv_generate(model, idx, max_new_tokens, **kw):
    return torch.stack(list(model.generate(idx, max_new_tokens, **kw)), 1)  # (B, steps)


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# -----------------------------------------------------------------------------
# generate() against full recomputation

def test_greedy_kv_cache_equals_full_recomputation_across_block_size():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    kv = kv_generate(model, idx, 40, temperature=0)  # 5 + 40 tokens: crosses block_size 16 after 11 steps
    ref = naive_generate(model, idx, 40)
    assert kv.tolist() == ref.tolist()
    assert len(set(kv[0].tolist())) > 5  # varied text: a broken cache would not go unnoticed


def test_sampling_kv_cache_equals_full_recomputation():
    model = tiny_model(bias=True, gelu_approximate="tanh")
    idx = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    kv = kv_generate(model, idx, 30, generators=gens(3, 4), **kw)
    g = gens(3, 4)
    ref = naive_generate(model, idx, 30, pick=lambda logits: sample_token(logits, generators=g, **kw))
    assert kv.tolist() == ref.tolist()


def test_prompt_longer_than_block_size_is_cropped():
    model = tiny_model()
    idx = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(5))
    kv = kv_generate(model, idx, 10, temperature=0)
    assert kv.tolist() == kv_generate(model, idx[:, -16:], 10, temperature=0).tolist()
    assert kv.tolist() == naive_generate(model, idx, 10).tolist()


def test_padded_vocab_slots_are_never_sampled():
    model = tiny_model(vocab_size=64)
    with torch.no_grad():
        model.lm_head.weight[50:] *= 20  # the padded slots would win most draws if they were allowed
    idx = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(6))
    assert kv_generate(model, idx, 20, temperature=1.0, generators=gens(0, 1, 2, 3)).max() >= 50
    assert kv_generate(model, idx, 20, temperature=1.0, vocab_limit=50, generators=gens(0, 1, 2, 3)).max() < 50
    assert kv_generate(model, idx, 20, temperature=0, vocab_limit=50).max() < 50


@pytest.mark.parametrize("fill", ["nan", "inf_padded", "inf_everywhere"])
def test_padded_vocab_slots_are_never_sampled_whatever_the_logits(fill):
    """vocab_limit must hold even for a broken model: NaN logits, or +inf on the padded slots (a -inf mask
    loses against both: NaN probabilities send the draw to the last slot)."""
    model = tiny_model(vocab_size=64)
    logits = torch.zeros(64)
    if fill == "nan":
        logits[:] = float("nan")
    else:
        logits[50:] = float("inf")
        if fill == "inf_everywhere":
            logits[:] = float("inf")
    model.lm_head.forward = lambda x: logits.expand(*x.shape[:-1], 64)
    idx = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(6))
    for options in (dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_p=0.9),
                    dict(temperature=0)):
        tokens = kv_generate(model, idx, 5, vocab_limit=50, generators=gens(0, 1, 2, 3), **options)
        assert tokens.min() >= 0 and tokens.max() < 50, (fill, options)


def test_kv_cache_under_bfloat16_autocast(monkeypatch):
    import model as model_module
    made, original = [], model_module.KVCache
    monkeypatch.setattr(model_module, "KVCache", lambda *args: made.append(original(*args)) or made[-1])
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kv = kv_generate(model, idx, 30, temperature=0)
        ref = naive_generate(model, idx, 30)
    assert kv.tolist() == ref.tolist()
    assert made[0].k[0].dtype == torch.bfloat16  # keys as autocast makes them: half the memory of float32


# -----------------------------------------------------------------------------
# Sampling options and seeds

def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(8))
    greedy = kv_generate(model, idx, 25, temperature=0).tolist()
    assert kv_generate(model, idx, 25, temperature=1.0, top_k=1, generators=gens(1, 2)).tolist() == greedy
    assert kv_generate(model, idx, 25, temperature=1.0, top_p=1e-6, generators=gens(1, 2)).tolist() == greedy
    assert kv_generate(model, idx, 25, temperature=1.0, generators=gens(1, 2)).tolist() != greedy


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log().expand(2000, -1)
    drawn = lambda **kw: set(sample_token(logits, generators=None, **kw).tolist())
    torch.manual_seed(0)
    assert drawn() == {0, 1, 2, 3, 4}
    assert drawn(top_k=2) == {1, 3}
    assert drawn(top_p=0.6) == {1, 3}  # 0.4 + 0.3 is the smallest set holding 0.6
    assert drawn(top_p=0.75) == {1, 3, 4}
    zero = torch.tensor([[float("-inf"), 0.0, float("-inf")]]).expand(500, -1)
    assert set(sample_token(zero).tolist()) == {1}


def test_same_seed_same_text():
    model = tiny_model()
    idx = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(9))
    a = kv_generate(model, idx, 30, temperature=1.0, top_p=0.95, generators=gens(42))
    b = kv_generate(model, idx, 30, temperature=1.0, top_p=0.95, generators=gens(42))
    c = kv_generate(model, idx, 30, temperature=1.0, top_p=0.95, generators=gens(43))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_stop_token_ends_a_sample():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(10))
    free = kv_generate(model, idx, 30, temperature=0)
    stop = free[0, 4].item()  # row 0 reaches it at step 4, row 1 never (checked next)
    assert stop not in free[0, :4].tolist() and stop not in free[1].tolist()
    stopped = kv_generate(model, idx, 30, temperature=0, stop_token=stop)
    assert stopped[0, :5].tolist() == free[0, :5].tolist()
    assert (stopped[0, 5:] == stop).all()  # a finished row repeats the stop token...
    assert stopped[1].tolist() == free[1].tolist()  # ...while the other runs on, unchanged
    one = kv_generate(model, idx[:1], 30, temperature=0, stop_token=stop)
    assert one.tolist() == [free[0, :5].tolist()]  # alone, generation ends with the stop token
    cfg = SampleConfig(num_samples=1, max_new_tokens=30, temperature=0)
    samples, n_tokens = generate_samples(model, idx[0].tolist(), cfg, vocab_limit=None, stop=stop)
    assert samples == [free[0, :4].tolist()] and n_tokens == 5


def test_batch_of_samples_equals_samples_one_at_a_time():
    model = tiny_model()
    prompt = [3, 14, 15, 9]
    cfg = SampleConfig(num_samples=3, max_new_tokens=30, temperature=1.0, top_k=30, top_p=0.9, seed=5)
    stop = 7  # a token these samples produce now and then, so some samples end early
    batch, n_batch = generate_samples(model, prompt, cfg, vocab_limit=60, stop=stop)
    singles = [generate_samples(model, prompt, SampleConfig(num_samples=1, max_new_tokens=30, temperature=1.0, top_k=30,
                                                            top_p=0.9, seed=5 + i), vocab_limit=60, stop=stop)
               for i in range(3)]
    assert batch == [s[0][0] for s in singles]
    assert n_batch == sum(s[1] for s in singles)
    assert len({tuple(s) for s in batch}) == 3 and min(map(len, batch)) < 30  # distinct, some ended early


def test_text_stream_prints_only_whole_characters(enc):
    text = "naïve café 🙂🦜 日本語のテキスト — done"
    tokens = enc.encode(text)
    stream = text_stream(enc)
    pieces = [stream([t]) for t in tokens] + [stream([], final=True)]
    assert "".join(pieces) == enc.decode(tokens) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(tokens) > len([p for p in pieces if p])  # some characters did span several tokens


# -----------------------------------------------------------------------------
# sample.py end to end

def save(path, model, **extra):
    """A checkpoint in train.py's format (the parts sample.py reads)."""
    torch.save({"format": "gpt-checkpoint", "version": 1, "model_args": asdict(model.config), "model": model.state_dict(),
                "config": {}, "iter_num": 7, "best_val_loss": 5.25, **extra}, path)


def gpt2_vocab_model(seed=0, **kw):
    return tiny_model(vocab_size=50304, block_size=32, std=0.1, seed=seed, **kw)


def samples_of(stdout):
    return stdout.rstrip("\n").split("\n" + "-" * 15 + "\n")


@pytest.mark.slow
def test_sample_script_batch_seeds_and_streaming(tmp_path, enc):
    model = gpt2_vocab_model()
    save(tmp_path / "best.pt", model)
    opts = [f"--out_dir={tmp_path}", "--start=Once upon a time", "--max_new_tokens=12", "--temperature=1.0"]
    batch = run_script("sample.py", *opts, "--num_samples=3", "--seed=5")
    single = run_script("sample.py", *opts, "--num_samples=1", "--seed=7")
    texts = samples_of(batch.stdout)
    assert len(texts) == 3 and texts[2] == samples_of(single.stdout)[0] and texts[0] != texts[2]
    assert all(t.startswith("Once upon a time") for t in texts)
    # the streamed first sample is exactly the decoded tokens the same options give in-process
    cfg = SampleConfig(num_samples=3, max_new_tokens=12, temperature=1.0, seed=5)
    prompt = enc.encode("Once upon a time")
    expected, _ = generate_samples(model, prompt, cfg, vocab_limit=completion_vocab(enc), stop=EOT)
    assert texts[0] == enc.decode(prompt + expected[0])
    assert "best.pt: iter 7, best val loss 5.2500" in batch.stderr and "tokens/s" in batch.stderr


@pytest.mark.slow
@needs_tokenizer
def test_sample_script_stops_at_end_of_text(tmp_path):
    model = gpt2_vocab_model(bias=True)
    with torch.no_grad():  # ln_f outputs a constant pointing at the end-of-text embedding: it always comes next
        w = model.lm_head.weight
        w[EOT] = 6 * w[EOT] / w[EOT].norm()  # logit 36; the others ~N(0, 0.6^2)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(w[EOT])
    save(tmp_path / "last.pt", model)
    stopped = run_script("sample.py", f"--out_dir={tmp_path}", "--which=last", "--start=Hi", "--max_new_tokens=5")
    assert stopped.stdout == "Hi\n" and "1 tokens in" in stopped.stderr
    free = run_script("sample.py", f"--out_dir={tmp_path}", "--start=Hi", "--max_new_tokens=5", "--stop_at_eot=False")
    assert free.stdout == "Hi" + "<|endoftext|>" * 5 + "\n"


@pytest.mark.slow
def test_sample_script_prompt_from_file_cropped_and_from_stdin(tmp_path, enc):
    save(tmp_path / "best.pt", gpt2_vocab_model())
    (tmp_path / "prompt.txt").write_text("one two three four five six seven eight nine ten " * 5)  # > 32 tokens
    result = run_script("sample.py", f"--out_dir={tmp_path}", f"--start=FILE:{tmp_path / 'prompt.txt'}",
                        "--max_new_tokens=3", "--temperature=0")
    prompt = enc.encode((tmp_path / "prompt.txt").read_text())
    assert f"warning: the prompt has {len(prompt)} tokens, more than block_size 32" in result.stderr
    assert enc.encode(result.stdout)[:32] == prompt[-32:]  # what the model saw is what is shown
    piped = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--out_dir={tmp_path}", "--start=-",
                            "--max_new_tokens=3", "--temperature=0"], input="From stdin", cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.startswith("From stdin") and "warning" not in piped.stderr


@pytest.mark.slow
def test_sample_script_merges_multipliers_and_reads_nanogpt_checkpoints(tmp_path, enc):
    prompt = enc.encode("The cat")
    cfg = SampleConfig(num_samples=1, max_new_tokens=8, temperature=0)
    # learnable multipliers, away from their init of 1: sample.py folds them into the weights first
    mult = gpt2_vocab_model(multipliers="vector")
    with torch.no_grad():
        for p in mult.multiplier_parameters():
            p.uniform_(0.5, 1.5)
    (tmp_path / "mult").mkdir()
    save(tmp_path / "mult" / "best.pt", mult)
    expected, _ = generate_samples(mult, prompt, cfg, vocab_limit=completion_vocab(enc), stop=EOT)
    # a nanoGPT ckpt.pt: its model_args keys, torch.compile's prefixes, its causal-mask buffers
    plain = gpt2_vocab_model(seed=1, bias=True)
    state = {f"_orig_mod.{k}": v for k, v in plain.state_dict().items()}
    state.update({f"_orig_mod.transformer.h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)})
    (tmp_path / "nano").mkdir()
    torch.save({"model_args": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=50304,
                                   dropout=0.0),
                "model": state, "iter_num": 500, "best_val_loss": torch.tensor(3.5), "config": {"dataset": "owt"}},
               tmp_path / "nano" / "ckpt.pt")
    expected_nano, _ = generate_samples(plain, prompt, cfg, vocab_limit=completion_vocab(enc), stop=EOT)
    for name, tokens in (("mult", expected), ("nano", expected_nano)):
        result = run_script("sample.py", f"--out_dir={tmp_path / name}", "--start=The cat", "--max_new_tokens=8",
                            "--temperature=0")
        assert result.stdout == enc.decode(prompt + tokens[0]) + "\n"
    assert "ckpt.pt: iter 500, best val loss 3.5000" in result.stderr


@pytest.mark.slow
@needs_tokenizer  # sample.py loads it first
def test_sample_script_errors_are_one_line(tmp_path):
    good = gpt2_vocab_model()
    for name in ("empty", "unknown_key", "wrong_shape", "char_level"):
        (tmp_path / name).mkdir()
    save(tmp_path / "unknown_key" / "best.pt", good, model_args={**asdict(good.config), "rotary": True})
    save(tmp_path / "wrong_shape" / "best.pt", good, model_args={**asdict(good.config), "n_embd": 64})
    char = tiny_model(vocab_size=65, block_size=32)
    save(tmp_path / "char_level" / "best.pt", char)
    cases = [
        ([f"--out_dir={tmp_path / 'missing'}"], "no such checkpoint or directory"),
        ([f"--out_dir={tmp_path / 'empty'}"], "no checkpoint (best.pt, last.pt or ckpt.pt)"),
        ([f"--out_dir={tmp_path / 'unknown_key'}"], "model settings this code does not know: rotary"),
        ([f"--out_dir={tmp_path / 'wrong_shape'}"], "does not match its model settings"),
        ([f"--out_dir={tmp_path / 'char_level'}"], "vocab_size 65, fewer than the 50257 tokens of its tokenizer (gpt2)"),
        ([f"--out_dir={tmp_path / 'char_level'}", "--which=worst"], "which must be best or last"),
        ([f"--start=FILE:{tmp_path / 'nothing.txt'}"], "cannot read prompt file"),
        ([f"--out_dir={tmp_path / 'char_level'}", f"--start=FILE:{tmp_path / 'latin1.txt'}"], "not UTF-8 text"),
        ([f"--out_dir={tmp_path / 'char_level'}", "--seed=-1"], "seed must be in [0, 2**63 - num_samples)"),
        ([f"--out_dir={tmp_path / 'char_level'}", "--temperature=1e999"], "temperature must be a finite number >= 0"),
        ([f"--out_dir={tmp_path / 'char_level'}", str(tmp_path / "nan.py")], "finite number >= 0 (0 = greedy), not nan"),
    ]
    (tmp_path / "nan.py").write_text("temperature = float('nan')\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for args, message in cases:  # in-process: every message
        with pytest.raises((DataError, ConfigError), match=re.escape(message)):
            sample.main(args)
    # through the real entry point: one line, no traceback, a non-zero exit (started together: most of each run
    # is importing torch)
    procs = [subprocess.Popen([sys.executable, str(REPO / "sample.py"), *cases[i][0]], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 2, 5, 10)]
    for proc, i in zip(procs, (0, 2, 5, 10)):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and err.startswith("sample.py: ") and cases[i][1] in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_bench_sample_quick():
    # the benchmark checks that both paths generate the same tokens, also past block_size (80 tokens, block 64)
    result = run_script("bench.bench_sample", "--quick", "--threads=1")
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 16 |") or line.startswith("| 80 (")]
    assert len(rows) == 2 and "merged / plain time" in result.stdout
