"""The GPT model: causality, learning, nanoGPT checkpoints, HF GPT-2 weights."""
import pytest
import torch

from model import GPT, GPTConfig
from smallgpt.config import TrainConfig
from smallgpt.checkpoint import load_checkpoint, model_from_checkpoint
from smallgpt.errors import DataError
from smallgpt.optim import configure_optimizer


def tiny(**overrides):
    args = dict(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    args.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


@pytest.mark.parametrize("bias", [False, True])
def test_causal(bias):
    model = tiny(bias=bias).eval()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx)
    for t in (0, 7, 14):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
        logits2, _ = model(changed)
        assert torch.equal(logits[:, :t + 1], logits2[:, :t + 1]), "a future token changed past logits"
        assert not torch.allclose(logits[:, t + 1:], logits2[:, t + 1:]), "the changed token had no effect"


def test_overfits_one_batch():
    model = tiny()
    idx = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(2))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = configure_optimizer(model, TrainConfig(learning_rate=3e-3, weight_decay=0.0, beta2=0.95, adam_eps=1e-8), "cpu")
    first = None
    for _ in range(150):
        _, losses = model(x, y)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else losses["ce"].item()
    assert first > 4.0 and losses["ce"].item() < 0.1


def test_init_and_tying():
    model = tiny(n_layer=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 4) ** 0.5) < 0.002  # GPT-2's scaled residual init
    assert GPTConfig().vocab_size == 50304 and 50304 % 64 == 0  # GPT-2's 50257 padded for fast matmuls


def test_forward_without_targets_returns_all_logits():
    model = tiny().eval()
    logits, losses = model(torch.zeros(3, 5, dtype=torch.long))
    assert logits.shape == (3, 5, 97) and losses is None


def test_bad_architecture_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="dispersion_layers"):
        GPTConfig(n_layer=4, dispersion_layers="7")


def nanogpt_layout(state_dict):
    """Our state dict in nanoGPT's (and our pre-split) layout: c_q, c_k, c_v stacked into one attn.c_attn (weight,
    bias, row multipliers); the fused layer had one column or scalar multiplier for all three: Q's is kept."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith((".c_q.col_mult", ".c_q.scale_mult")):
            out[key.replace(".c_q.", ".c_attn.")] = value
        elif ".attn.c_q." in key:
            out[key.replace(".c_q.", ".c_attn.")] = torch.cat([state_dict[key.replace(".c_q.", f".c_{x}.")] for x in "qkv"])
        elif ".attn.c_k." not in key and ".attn.c_v." not in key:
            out[key] = value
    return out


def nanogpt_checkpoint(model):
    """A checkpoint laid out exactly as nanoGPT's train.py writes it (compiled model: '_orig_mod.' keys;
    its model_args know nothing of our newer keys; older nanoGPT also saved the causal-mask buffer)."""
    cfg = model.config
    sd = {"_orig_mod." + k: v for k, v in nanogpt_layout(model.state_dict()).items()}
    for i in range(cfg.n_layer):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
    return {
        "model": sd,
        "optimizer": {"state": {}, "param_groups": []},
        "model_args": dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                           bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.0),
        "iter_num": 5000, "best_val_loss": torch.tensor(3.2), "config": {"dataset": "openwebtext"},
    }


@pytest.mark.parametrize("bias", [False, True])
def test_nanogpt_checkpoint_loads(tmp_path, bias):
    source = tiny(bias=bias).eval()
    path = tmp_path / "ckpt.pt"
    torch.save(nanogpt_checkpoint(source), path)
    loaded = model_from_checkpoint(load_checkpoint(str(path))).eval()
    idx = torch.randint(0, 97, (2, 16))
    assert torch.equal(loaded(idx)[0], source(idx)[0])


def test_checkpoint_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot load checkpoint .*: not a PyTorch checkpoint, or truncated or corrupt"):
        load_checkpoint(str(bad))
    ckpt = nanogpt_checkpoint(tiny())
    ckpt["model_args"]["n_embd"] = 64  # weights no longer match
    with pytest.raises(DataError, match="does not match"):
        model_from_checkpoint(ckpt)
    ckpt["model_args"]["rotary"] = True
    with pytest.raises(DataError, match="rotary"):
        model_from_checkpoint(ckpt)


def test_hf_gpt2_conversion_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=24, vocab_size=101)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        expected = hf(idx).logits
    torch.testing.assert_close(ours(idx)[0], expected, rtol=1e-5, atol=1e-5)


def test_flops_per_token():
    model = tiny()
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 2 * 16 * 16
