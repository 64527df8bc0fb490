"""
The modern block switches (pos_emb, norm, qk_norm, mlp, mlp_hidden, tie_embeddings, logit_softcap), each against
a plain reference: all off == a written-out GPT-2 forward on nanoGPT's fused keys, bit for bit; RoPE == a complex
rotation; RMSNorm == its formula; the modern model == transformers' LlamaForCausalLM / Qwen3ForCausalLM with the
same weights; KV-cache decoding == full recomputation; merged multipliers == unmerged; old fused checkpoints load;
grouped-query attention == every query head with its own copy of its group's key and value head.
"""
import copy
import re

import pytest
import torch
from torch.nn import functional as F

from bench.bench_plan import LiveTensors
from model import GPT, MULTIPLIER_SUFFIX, GPTConfig, RMSNorm, apply_rope, cross_entropy, rope_cos_sin
from smallgpt.checkpoint import load_checkpoint, model_from_checkpoint
from smallgpt.config import ConfigError, load_train_config, with_vocab_size
from conftest import run_script
from test_model import nanogpt_layout

TINY = dict(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=48, rope_theta=500.0)
SWITCHES = {  # each switch alone, and the exportable combinations
    "rope": dict(pos_emb="rope"), "rmsnorm": dict(norm="rmsnorm"), "qk_norm": dict(qk_norm=True),
    "swiglu": dict(mlp="swiglu"), "relu2": dict(mlp="relu2", mlp_hidden=40), "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=3.0), "llama": LLAMA, "qwen3": dict(LLAMA, qk_norm=True),
    "qwen3_untied_bias": dict(LLAMA, qk_norm=True, tie_embeddings=False, bias=True),
    "gqa": dict(LLAMA, qk_norm=True, n_head=4, n_kv_head=2),  # grouped-query attention: 2 query heads per kv head
    "gqa_mqa_untied_bias": dict(LLAMA, n_head=4, n_kv_head=1, tie_embeddings=False, bias=True),  # one kv head
}


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def randomize(model, seed=1):
    """Move every gain, bias and multiplier away from its init (1 or 0), so that none of them is a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
    return model


def tokens(B=2, T=16, seed=3):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# Every switch off: today's GPT-2 forward, bit for bit

def reference_gpt2_logits(sd, idx, n_layer, n_head, approximate="none"):
    """nanoGPT's GPT-2 forward written out on its own keys (fused c_attn), independent of model.py."""
    B, T = idx.shape
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd.get(name + ".bias"), 1e-5)
    lin = lambda x, name: F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))
    x = F.embedding(idx, sd["transformer.wte.weight"]) + F.embedding(torch.arange(T), sd["transformer.wpe.weight"])
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").split(x.size(-1), dim=2)
        q, k, v = (t.view(B, T, n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, -1)
        x = x + lin(y, p + "attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, p + "ln_2"), p + "mlp.c_fc"), approximate=approximate), p + "mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), sd["lm_head.weight"])


@pytest.mark.parametrize("overrides", [dict(), dict(bias=True), dict(bias=True, gelu_approximate="tanh")])
def test_switches_off_is_gpt2_bit_for_bit(overrides):
    """The default model equals the written-out GPT-2 forward exactly, after loading nanoGPT's fused layout."""
    source = randomize(tiny(**overrides))
    sd = nanogpt_layout(source.state_dict())
    model = tiny(seed=5, **overrides).eval()
    model.load_nanogpt_state_dict(sd)
    idx = tokens()
    with torch.no_grad():
        expected = reference_gpt2_logits(sd, idx, TINY["n_layer"], TINY["n_head"], overrides.get("gelu_approximate", "none"))
        assert torch.equal(model(idx)[0], expected)


def test_defaults_are_gpt2():
    cfg = GPTConfig()
    assert (cfg.pos_emb, cfg.norm, cfg.qk_norm, cfg.mlp, cfg.mlp_hidden, cfg.tie_embeddings, cfg.logit_softcap) == \
        ("learned", "layernorm", False, "gelu", 0, True, 0.0)
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight and "wpe" in model.transformer
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (4 * 32, 32)


# -----------------------------------------------------------------------------
# Each switch against a small reference

def test_rope_is_a_complex_rotation():
    """HF's rotate_half RoPE == multiplying the complex numbers (x_j + i x_{j+d/2}) by exp(i pos theta^(-2j/d))."""
    hs, theta = 8, 500.0
    x = torch.randn(2, 3, 40, hs, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(100, 140)  # beyond any block_size: angles of large positions too
    got = apply_rope(x, *rope_cos_sin(pos, hs, theta))
    freqs = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    z = torch.complex(x[..., :hs // 2].double(), x[..., hs // 2:].double())
    z = z * torch.polar(torch.ones(40, hs // 2, dtype=torch.float64), pos[:, None].double() * freqs)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1).float(), rtol=1e-5, atol=1e-5)


def test_rope_attention_sees_relative_positions_only():
    """q . k after RoPE depends on the position difference only (a shift of both by 1000 changes nothing)."""
    q, k = torch.randn(2, 1, 1, 16, generator=torch.Generator().manual_seed(1)).unbind(0)
    score = lambda m, n: (apply_rope(q, *rope_cos_sin(torch.tensor([m]), 16, 10000.0))
                          * apply_rope(k, *rope_cos_sin(torch.tensor([n]), 16, 10000.0))).sum()
    torch.testing.assert_close(score(7, 3), score(1007, 1003), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 4), rtol=1e-3)


def test_rmsnorm_formula():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2)) * 3
    norm = randomize(RMSNorm(16))
    expected = x.double() / (x.double().square().mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight.double()
    torch.testing.assert_close(norm(x), expected.float(), rtol=1e-6, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16  # q, k and v must keep one dtype under autocast


def test_rmsnorm_gradients_and_what_it_saves():
    """The hand-written backward against autograd through the formula in float64; under bf16 autocast, QK-norm on a
    view of the QKV product keeps only a float32 rsqrt per row (F.rms_norm kept float32 copies of q and k)."""
    gen = torch.Generator().manual_seed(3)
    norm = randomize(RMSNorm(16))
    x, g = (torch.randn(3, 5, 16, generator=gen) * 3).requires_grad_(), torch.randn(3, 5, 16, generator=gen)
    norm(x).backward(g)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    (x64 / (x64.square().mean(-1, keepdim=True) + 1e-5).sqrt() * w64).backward(g.double())
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad, w64.grad.float(), rtol=1e-5, atol=1e-5)
    qkv = torch.randn(4, 8, 3 * 16, dtype=torch.bfloat16, requires_grad=True)  # alive before: not counted
    with LiveTensors() as live, torch.autocast("cpu", dtype=torch.bfloat16):
        q = norm(qkv[..., :16])  # q is a view of the product, as in attention
        assert q.dtype == torch.bfloat16 and live.live - q.untyped_storage().nbytes() == 4 * 8 * 4  # rstd only


@pytest.mark.parametrize("kind", ["swiglu", "relu2"])
def test_mlp_formulas(kind):
    model = tiny(mlp=kind, mlp_hidden=24, bias=True)
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    lin = lambda layer, x: x @ layer.weight.t() + layer.bias
    if kind == "swiglu":  # HF Llama: down(silu(gate(x)) * up(x))
        expected = lin(mlp.c_proj, F.silu(lin(mlp.c_gate, x)) * lin(mlp.c_fc, x))
    else:
        expected = lin(mlp.c_proj, torch.relu(lin(mlp.c_fc, x)) ** 2)
    assert mlp.c_fc.weight.shape == (24, 32)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_softcap_loss_and_gradients(chunk_size):
    """The chunked CE with its hand-written softcap gradient == autograd through c * tanh(logits / c)."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(20, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (20,), generator=gen)
    targets[3] = -1
    loss = cross_entropy(h, w, targets, chunk_size, softcap=2.0)
    grads = torch.autograd.grad(loss, (h, w))
    logits = 2.0 * torch.tanh(h @ w.t() / 2.0)
    expected = F.cross_entropy(logits, targets, ignore_index=-1)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, torch.autograd.grad(expected, (h, w))):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the evaluation path
        torch.testing.assert_close(cross_entropy(h, w, targets, chunk_size, softcap=2.0), expected)


def test_untied_head_is_a_separate_matrix():
    model = tiny(tie_embeddings=False, pos_emb="rope")
    assert model.lm_head.weight is not model.transformer.wte.weight and "wpe" not in model.transformer
    n_all = sum(p.numel() for p in model.parameters())
    assert model.num_params() == n_all - 97 * 32  # the lookup table is not compute
    assert tiny().num_params() == sum(p.numel() for p in tiny().parameters()) - 16 * 32  # wpe only, as before


# -----------------------------------------------------------------------------
# The exportable combinations are HF's Llama and Qwen3, weight for weight

HF_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_q": "self_attn.q_proj",
            "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj", "attn.c_proj": "self_attn.o_proj",
            "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm", "mlp.c_gate": "mlp.gate_proj",
            "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


def to_hf(state_dict):
    """Our keys -> HF Llama / Qwen3 keys (the table in docs/model.md)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("transformer.h."):
            _, _, i, rest = key.split(".", 3)
            module, param = rest.rsplit(".", 1)
            key = f"model.layers.{i}.{HF_NAMES[module]}.{param}"
        else:
            key = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
                   "lm_head.weight": "lm_head.weight"}[key]
        out[key] = value
    return out


@pytest.mark.slow  # imports transformers' model classes / starts a Python process
@pytest.mark.parametrize("qk_norm,tie", [(False, True), (False, False), (True, True), (True, False)])
def test_matches_transformers_llama_and_qwen3(qk_norm, tie):
    transformers = pytest.importorskip("transformers")
    model = randomize(tiny(**LLAMA, qk_norm=qk_norm, tie_embeddings=tie)).eval()
    args = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=500.0,
                tie_word_embeddings=tie, attention_bias=False, mlp_bias=False, hidden_act="silu")
    if qk_norm:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{k: v for k, v in args.items() if k != "mlp_bias"}))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args))
    hf.load_state_dict(to_hf(model.state_dict()), strict=True)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf.eval()(idx).logits, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# KV cache, hidden states, activation checkpointing: with every switch

def naive_generate(model, idx, n):
    """Greedy decoding by full recomputation of the last block_size tokens at every step."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, -n:]


@pytest.mark.parametrize("name", list(SWITCHES))
def test_kv_cache_equals_recomputation(name):
    """Prefill + one token at a time == the full forward (float32 tolerance), and greedy generation with the
    cache == full recomputation, also 10 tokens past block_size (where the window slides)."""
    model = randomize(tiny(**SWITCHES[name])).eval()
    idx = tokens(T=12)
    with torch.no_grad():
        full, _ = model(idx)
        from model import KVCache
        cache = KVCache(model.config, 2, "cpu", torch.float32)
        x, _ = model.hidden_states(idx[:, :5], cache)
        steps = [model.logits(x)] + [model.logits(model.hidden_states(idx[:, t:t + 1], cache)[0]) for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        generated = torch.stack(list(model.generate(idx, 14, temperature=0)), 1)
        assert torch.equal(generated, naive_generate(model, idx, 14))


@pytest.mark.parametrize("name", ["llama", "qwen3_untied_bias", "relu2"])
def test_hidden_states_collect(name):
    model = tiny(**SWITCHES[name]).eval()
    idx = tokens()
    final, hidden = model.hidden_states(idx, collect=range(3))
    assert sorted(hidden) == [0, 1, 2] and all(h.shape == (2, 16, 32) for h in hidden.values())
    assert torch.equal(model.transformer.ln_f(hidden[2]), final)
    assert torch.equal(model.logits(final), model(idx)[0])


def test_activation_checkpointing_same_gradients():
    idx = tokens()
    grads = []
    for ac in (False, True):
        model = randomize(tiny(**SWITCHES["qwen3"], activation_checkpointing=ac))
        model(idx, idx)[1]["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", ["gqa", "gqa_mqa_untied_bias"])
def test_grouped_query_attention_is_repeated_key_value_heads(name):
    """A model with n_kv_head < n_head computes what the plain model computes when each kv head's rows of c_k and
    c_v are repeated for the n_head / n_kv_head query heads that read it (head h reads kv head h // group, HF
    Llama's repeat_kv layout; a tiling instead would pair other heads). Its KV cache holds n_kv_head heads only."""
    gqa = randomize(tiny(**SWITCHES[name])).eval()
    cfg = gqa.config
    assert gqa.transformer.h[0].attn.c_k.weight.shape == (cfg.n_kv_head * 8, 32)  # head_dim 32 / 4 = 8
    full = tiny(**{**SWITCHES[name], "n_kv_head": 0}).eval()
    group, hs = cfg.n_head // cfg.n_kv_head, cfg.n_embd // cfg.n_head
    repeat = lambda t: t.unflatten(0, (cfg.n_kv_head, hs)).repeat_interleave(group, dim=0).flatten(0, 1)
    sd = {k: repeat(v) if ".attn.c_k." in k or ".attn.c_v." in k else v for k, v in gqa.state_dict().items()}
    full.load_state_dict(sd)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], full(idx)[0], rtol=1e-5, atol=1e-5)
    from model import KVCache
    assert KVCache(cfg, 2, "cpu", torch.float32).k[0].shape == (2, cfg.n_kv_head, 16, hs)


# -----------------------------------------------------------------------------
# Learnable multipliers on the modern block

def test_qkv_have_their_own_row_and_column_multipliers():
    model = tiny(multipliers="vector", **SWITCHES["qwen3"])
    names = {n for n, _ in model.named_parameters() if n.endswith(MULTIPLIER_SUFFIX) and ".h.0." in n}
    assert names == {f"transformer.h.0.{m}.{k}_mult" for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj",
                                                               "mlp.c_fc", "mlp.c_gate", "mlp.c_proj") for k in ("row", "col")}
    assert model.transformer.h[0].attn.c_q.col_mult is not model.transformer.h[0].attn.c_k.col_mult


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_untied_bias", "untied", "relu2", "gqa"])
@pytest.mark.parametrize("kind", ["vector", "scalar"])
def test_merge_exact_on_modern_block(name, kind):
    """Random multipliers (and gains) folded into plain weights: the same logits, and exactly a plain model's keys.
    untie=True: a tied model's per-token embedding multipliers (vector) fold into an untied embedding."""
    model = randomize(tiny(multipliers=kind, **SWITCHES[name])).eval()
    merged = copy.deepcopy(model).merge_multipliers(untie=True)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(merged(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-5)
    assert merged.config.tie_embeddings == (model.config.tie_embeddings and kind != "vector")
    plain = tiny(**{**SWITCHES[name], "tie_embeddings": merged.config.tie_embeddings}).eval()
    plain.load_state_dict(merged.state_dict())  # strict: exactly the plain model's parameters
    assert (merged.lm_head.weight is merged.transformer.wte.weight) == merged.config.tie_embeddings
    with torch.no_grad():
        assert torch.equal(plain(idx)[0], merged(idx)[0])


def test_multiplier_stats_qk_ratio():
    model = tiny(multipliers="vector", **SWITCHES["llama"])
    with torch.no_grad():
        model.transformer.h[1].attn.c_q.row_mult.fill_(2.0)
        model.transformer.h[1].attn.c_k.row_mult.fill_(0.5)
    stats = model.multiplier_stats()
    assert stats["mult/h0.qk_ratio"] == 1.0 and stats["mult/h1.qk_ratio"] == pytest.approx(4.0)


# -----------------------------------------------------------------------------
# Old checkpoints: fused c_attn (ours before the split, with multipliers; nanoGPT's)

def test_old_fused_multiplier_checkpoint_loads(tmp_path):
    """Our pre-split layout: c_attn weight (3C, C), row_mult (3C,) and ONE col_mult (C,) shared by Q, K and V.
    Through model_from_checkpoint (model_args without the new keys) it computes what the fused model computed."""
    source = randomize(tiny(multipliers="vector", bias=True, token_multipliers=False))
    with torch.no_grad():  # the old layout had one column multiplier for all three
        for block in source.transformer.h:
            block.attn.c_k.col_mult.copy_(block.attn.c_q.col_mult)
            block.attn.c_v.col_mult.copy_(block.attn.c_q.col_mult)
    sd = nanogpt_layout(source.state_dict())
    assert sd["transformer.h.0.attn.c_attn.row_mult"].shape == (96,) and sd["transformer.h.0.attn.c_attn.col_mult"].shape == (32,)
    torch.save({"model": sd, "model_args": {**TINY, "bias": True, "multipliers": "vector"}}, tmp_path / "old.pt")
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "old.pt")).eval()
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], source.eval()(idx)[0])


# -----------------------------------------------------------------------------
# Configuration: bad combinations, the shipped configs

@pytest.mark.parametrize("args,message", [
    (["--pos_emb=rope", "--n_embd=36", "--n_head=4"], "pos_emb='rope' needs an even head dimension n_embd / n_head"),
    (["--mlp_hidden=-1"], "mlp_hidden must be >= 0"),
    (["--n_head=4", "--n_kv_head=3"], "n_kv_head (3) must divide n_head (4)"),
    (["--n_kv_head=-2"], "n_kv_head (-2) must divide n_head (12)"),
    (["--pos_emb=alibi"], "pos_emb must be one of learned, rope"),
    (["--norm=batchnorm"], "norm must be one of layernorm, rmsnorm"),
    (["--mlp=geglu"], "mlp must be one of gelu, swiglu, relu2"),
    (["--rope_theta=0"], "rope_theta must be positive"),
    (["--logit_softcap=-1"], "logit_softcap >= 0"),
])
def test_bad_combinations(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(args)


@pytest.mark.slow  # imports transformers' model classes / starts a Python process
def test_bad_combination_is_one_line_from_train_py():
    result = run_script("train.py", "--pos_emb=rope", "--n_embd=36", "--n_head=4", check=False)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "pos_emb='rope' needs an even head dimension" in result.stderr


@pytest.mark.parametrize("path,millions", [("config/train_fineweb_40m_modern.py", 40.6),
                                           ("config/train_fineweb_124m_modern.py", 123.6)])
def test_modern_configs_are_qwen3(path, millions):
    """The shipped modern configs are the exportable Qwen3 block, with the parameter count their comment gives."""
    cfg = with_vocab_size(load_train_config([path]), 50257)  # GPT-2's tokens, as train.py resolves vocab_size=0
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.qk_norm, cfg.bias, cfg.tie_embeddings, cfg.logit_softcap) == \
        ("rope", "rmsnorm", "swiglu", True, False, True, 0.0)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in GPTConfig.__dataclass_fields__}))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


# -----------------------------------------------------------------------------
# Through the real scripts: train a tiny modern model, sample from it, draw its condensation picture

@pytest.mark.slow
def test_sample_and_condensation_on_modern_checkpoint(token_dir, tmp_path):
    out = tmp_path / "modern"
    run_script("train.py", "config/train_tiny.py", f"--data_dir={token_dir}", f"--out_dir={out}", "--device=cpu",
               "--dtype=float32", "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4",
               "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--condensation_seqs=4", "--log_interval=2",
               "--pos_emb=rope", "--norm=rmsnorm", "--mlp=swiglu", "--mlp_hidden=64", "--qk_norm=True",
               "--tie_embeddings=False", "--multipliers=vector")
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["model_args"]["pos_emb"] == "rope" and "transformer.h.0.attn.q_norm.weight" in ckpt["model"]
    result = run_script("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=40",
                        "--start=Hello", "--seed=1")
    assert result.stdout.strip()
    run_script("condensation.py", f"--out_dir={out}", "--device=cpu", "--num_seqs=4", "--seq_len=32",
               f"--data_dir={token_dir}", f"--out={tmp_path / 'c.png'}")
    assert (tmp_path / "c.png").stat().st_size > 0
    # a run saved before the Q/K/V split (fused c_attn) does not resume: one line with the way out
    ckpt["model"] = nanogpt_layout(ckpt["model"])
    (tmp_path / "old").mkdir()
    torch.save(ckpt, tmp_path / "old" / "last.pt")
    result = run_script("train.py", "config/train_tiny.py", f"--data_dir={token_dir}", f"--out_dir={tmp_path / 'old'}",
                        "--device=cpu", "--init_from=resume", check=False)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "predates the split attention matrices" in result.stderr and "--init_from=" in result.stderr


@pytest.mark.slow
def test_torch_compile_modern_block():
    """torch.compile traces the modern block with multipliers and soft-cap in one graph (fullgraph): same loss and
    gradients. aot_eager: Dynamo + AOTAutograd as on a GPU, without Inductor's C++ build."""
    model = randomize(tiny(**SWITCHES["qwen3"], multipliers="vector", logit_softcap=3.0, tie_embeddings=False))
    idx = tokens()
    eager_loss = model(idx, idx)[1]["loss"]
    eager_loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, idx)[1]["loss"]
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-7, msg=name)
