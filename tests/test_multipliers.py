"""
Learnable multipliers (arXiv 2601.04890; spec: ../shared/specs/learnable-multipliers.md), tested against the
plain model as the oracle: at init they compute exactly the plain model; merged they are the plain model;
their gradients never reach the clip factor of the matrices; they decay at their own rate; and a multiplier
run resumes bit for bit through the real train.py.
"""
import copy
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import pytest
import torch

from model import GPT, MULTIPLIER_SUFFIX, GPTConfig, _RowColumnScaled
from smallgpt.checkpoint import load_checkpoint
from smallgpt.shards import open_split
from smallgpt.tokens import stack_windows
from smallgpt.config import ConfigError, TrainConfig, load_train_config
from conftest import run_script
import train
from smallgpt.optim import configure_optimizer as make_optimizer
from train import train_step

TINY = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)  # GPT-2's vocabulary, real tokens
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def tiny_model(multipliers="vector", bias=False, seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY, multipliers=multipliers, bias=bias, **overrides))


def clip_params(model):
    """The selection train.py makes: everything except the multipliers."""
    return [p for n, p in model.named_parameters() if not n.endswith(MULTIPLIER_SUFFIX)]


def multipliers(model):
    return {n: p for n, p in model.named_parameters() if n.endswith(MULTIPLIER_SUFFIX)}


@pytest.fixture(scope="module")
def batches(token_dir):
    """Four real (x, y) batches of 4 windows of 32 tokens from the train split."""
    tokens, _ = open_split(token_dir, "train")
    return [stack_windows(tokens, [s + 4001 * i for i in range(4)], TINY["block_size"]) for s in range(0, 4000, 1000)]


def train_a_few_steps(model, batches, **cfg):
    """A few real optimizer steps (train.py's make_optimizer and train_step) so the multipliers leave 1."""
    cfg = TrainConfig(**{**dict(learning_rate=1e-2, weight_decay=0.1, grad_clip=1.0), **cfg})
    optimizer = make_optimizer(model, cfg, "cpu")
    for x, y in batches:
        train_step(model, optimizer, NO_SCALER, nullcontext(), lambda m: (x, y), 1, clip_params(model), cfg.grad_clip)
    return model


# -----------------------------------------------------------------------------
# Placement and config keys

def test_placement_vector():
    """Row and column multipliers on every block matrix, a channel and a per-token multiplier on the embedding
    lookup, and nothing on the tied LM head."""
    model = tiny_model("vector")
    C = TINY["n_embd"]
    expected = {"wte_mult": (C,), "wte_token_mult": (model.config.vocab_size,)}
    for i in range(TINY["n_layer"]):
        for name, (d_out, d_in) in {"attn.c_q": (C, C), "attn.c_k": (C, C), "attn.c_v": (C, C), "attn.c_proj": (C, C),
                                    "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}.items():
            expected[f"transformer.h.{i}.{name}.row_mult"] = (d_out,)
            expected[f"transformer.h.{i}.{name}.col_mult"] = (d_in,)
    assert {n: tuple(p.shape) for n, p in multipliers(model).items()} == expected
    assert all(torch.equal(p, torch.ones_like(p)) for p in multipliers(model).values())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, no multiplier in between
    expected.pop("wte_token_mult")
    assert {n: tuple(p.shape) for n, p in multipliers(tiny_model("vector", token_multipliers=False)).items()} == expected


def test_placement_scalar_and_none():
    names = set(multipliers(tiny_model("scalar")))
    assert names == {"wte_mult"} | {f"transformer.h.{i}.{m}.scale_mult" for i in range(TINY["n_layer"])
                                    for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert not multipliers(tiny_model("none"))


def test_config_keys():
    cfg = TrainConfig()
    assert (cfg.multipliers, cfg.multiplier_weight_decay, cfg.multiplier_lr_scale) == ("none", 2e-3, 1.0)
    cfg = load_train_config(["--multipliers=scalar", "--multiplier_weight_decay=0.01", "--multiplier_lr_scale=3"])
    assert (cfg.multipliers, cfg.multiplier_weight_decay, cfg.multiplier_lr_scale) == ("scalar", 0.01, 3.0)
    with pytest.raises(ConfigError, match="multipliers must be"):
        load_train_config(["--multipliers=row"])


# -----------------------------------------------------------------------------
# Equivalence with the plain model

@pytest.mark.parametrize("kind,bias", [("vector", False), ("vector", True), ("scalar", True)])
def test_multipliers_at_one_equal_plain_model(batches, kind, bias):
    """At init the multiplier model computes exactly (bit for bit) what the plain model with the same matrices
    computes: logits, loss, and the gradients of the matrices."""
    plain = tiny_model("none", bias)
    model = tiny_model(kind, bias, seed=1)  # other random matrices, then the plain model's
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith(MULTIPLIER_SUFFIX) for k in missing)
    x, y = batches[0]
    assert torch.equal(model(x)[0], plain(x)[0])
    for m in (plain, model):
        m(x, y)[1]["loss"].backward()
    grads = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(grads[name].grad, p.grad), name


def test_row_column_scaling_gradients_match_autograd():
    """The vector multipliers' hand-written backward: float64 gradcheck, and the same gradients as autograd's
    W * r * c in float32 (also inside bf16 autocast, where they must stay float32)."""
    torch.manual_seed(0)
    w, r, c = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in [(5, 3), (5,), (3,)])
    assert torch.autograd.gradcheck(_RowColumnScaled.apply, (w, r, c))
    w, r, c = (t.detach().float().requires_grad_() for t in (w, r, c))
    grad = torch.randn(5, 3)
    expected = torch.autograd.grad(w * r[:, None] * c[None, :], (w, r, c), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _RowColumnScaled.apply(w, r, c)
        got = torch.autograd.grad(out, (w, r, c), grad)
    assert torch.equal(out, w * r[:, None] * c[None, :])
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,bias", [("vector", False), ("vector", True), ("scalar", False)])
def test_merged_model_is_the_plain_model(batches, kind, bias):
    """After training, merging folds the multipliers into plain weights: the same logits (float32, tight
    tolerance), exactly the plain model's parameters, loadable by a plain GPT. (Per-token multipliers, which a
    tied plain model cannot hold, have their own test below.)"""
    model = train_a_few_steps(tiny_model(kind, bias, token_multipliers=False), batches[:3], learning_rate=2e-2).eval()
    moved = max((p - 1).abs().max().item() for p in multipliers(model).values())
    assert moved > 1e-2, "the multipliers should have left 1, or the merge test proves nothing"
    merged = copy.deepcopy(model).merge_multipliers()
    x, _ = batches[0]
    with torch.no_grad():
        logits, merged_logits = model(x)[0], merged(x)[0]
    torch.testing.assert_close(merged_logits, logits, rtol=1e-5, atol=1e-5)

    plain = tiny_model("none", bias)
    assert merged.config.multipliers == "none"
    assert {n: p.shape for n, p in merged.named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    assert merged.state_dict().keys() == plain.state_dict().keys()
    assert merged.lm_head.weight is merged.transformer.wte.weight
    plain.load_state_dict(merged.state_dict())  # strict
    with torch.no_grad():
        assert torch.equal(plain.eval()(x)[0], merged_logits)
    if bias:  # the KV-cache decode of the merged model follows the unmerged model's greedy tokens
        prompt = x[:2, :8]
        tokens = torch.stack(list(model.generate(prompt, 4, temperature=0)), 1)
        assert torch.equal(torch.stack(list(merged.generate(prompt, 4, temperature=0)), 1), tokens)


@pytest.mark.parametrize("tied", [True, False])
def test_token_multipliers_merge_exactly_both_ways(batches, tied):
    """The per-token embedding multiplier after training: merged as a (vocab_size,) lookup vector (tied: the
    only form a tied model can hold; untied: folded into the embedding rows), and merged with untie=True into a
    plain untied GPT. Same logits and greedy tokens every way; the merged models load into plain GPTs."""
    model = train_a_few_steps(tiny_model("vector", tie_embeddings=tied), batches[:3], learning_rate=2e-2).eval()
    r = model.wte_token_mult.detach()
    x, _ = batches[0]
    assert (r[x.unique()] - 1).abs().max() > 1e-2, "the per-token multipliers of seen tokens should have moved"
    seen = set(torch.cat([b[0].flatten() for b in batches[:3]]).tolist())
    unseen = r[[t for t in range(r.numel()) if t not in seen]]
    assert torch.equal(unseen, torch.full_like(unseen, unseen[0])), "unseen tokens: weight decay alone"
    with torch.no_grad():
        logits = model(x)[0]
    for untie in (False, True):
        merged = copy.deepcopy(model).merge_multipliers(untie=untie)
        keeps_vector = tied and not untie
        assert merged.config.multipliers == "none" and merged.config.tie_embeddings == (tied and not untie)
        assert (merged.token_scale is not None) == keeps_vector
        with torch.no_grad():
            torch.testing.assert_close(merged(x)[0], logits, rtol=1e-5, atol=1e-5)
        plain = tiny_model("none", tie_embeddings=merged.config.tie_embeddings)
        if keeps_vector:  # a plain tied GPT plus the one buffer
            assert merged.state_dict().keys() - plain.state_dict().keys() == {"token_scale"}
            assert torch.equal(merged.token_scale, r)
        else:
            plain.load_state_dict(merged.state_dict())  # strict: exactly a plain model
            with torch.no_grad():
                torch.testing.assert_close(plain.eval()(x)[0], logits, rtol=1e-5, atol=1e-5)
        prompt = x[:2, :8]
        assert torch.equal(torch.stack(list(merged.generate(prompt, 4, temperature=0)), 1),
                           torch.stack(list(model.generate(prompt, 4, temperature=0)), 1))


@pytest.mark.parametrize("new_multipliers", ["none", "vector"])
def test_init_from_a_token_multiplier_checkpoint_unties_to_keep_them(batches, tmp_path, capsys, new_multipliers):
    """--init_from a tied checkpoint whose per-token multipliers trained: they fold into an untied embedding (said
    on the console), so the new run starts from exactly the old function, with fresh multipliers at 1 if it has any."""
    from dataclasses import asdict
    source = train_a_few_steps(tiny_model("vector"), batches[:3], learning_rate=2e-2).eval()
    torch.save({"model": source.state_dict(), "model_args": asdict(source.config)}, tmp_path / "last.pt")
    model = train.build_model(TrainConfig(**TINY, init_from=str(tmp_path), multipliers=new_multipliers), None).eval()
    assert "tie_embeddings=False" in capsys.readouterr().out
    assert not model.config.tie_embeddings and model.lm_head.weight is not model.transformer.wte.weight
    assert all(torch.equal(p, torch.ones_like(p)) for p in multipliers(model).values())
    x, _ = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], source(x)[0], rtol=1e-5, atol=1e-5)


def test_token_multipliers_scale_each_tokens_embedding():
    """The per-token multiplier scales the lookup of its token only: r[t] = 2 doubles token t's embedding
    (layer 0 of the hidden states) and leaves every other token's alone."""
    model = tiny_model("vector")
    idx = torch.tensor([[5, 7, 5, 9]])
    _, before = model.hidden_states(idx, collect=[0])
    with torch.no_grad():
        model.wte_token_mult[5] = 2.0
    _, after = model.hidden_states(idx, collect=[0])
    emb = model.transformer.wte.weight * model.wte_mult
    torch.testing.assert_close(after[0] - before[0], torch.stack([emb[5], 0 * emb[7], emb[5], 0 * emb[9]])[None])


def test_checkpoints_from_before_token_multipliers_still_load(tmp_path):
    """A multipliers='vector' checkpoint written before the key existed (no wte_token_mult, no token_multipliers
    in model_args) loads as the model it was; resuming it with the new default is refused with one line."""
    from smallgpt.checkpoint import model_from_checkpoint
    old = tiny_model("vector", token_multipliers=False)
    args = {k: v for k, v in vars(old.config).items() if k != "token_multipliers"}
    torch.save({"model": old.state_dict(), "model_args": args}, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    loaded = model_from_checkpoint(ckpt)
    assert loaded.config.token_multipliers is False and not hasattr(loaded, "wte_token_mult")
    with pytest.raises(ConfigError, match="token_multipliers \\(config True, checkpoint False\\)"):
        train.build_model(TrainConfig(**TINY, multipliers="vector"), ckpt)


def test_multiplier_stats():
    """The logged statistics are the quantities the README says they are."""
    assert tiny_model("none").multiplier_stats() == {}
    model = tiny_model("vector")
    C = TINY["n_embd"]
    with torch.no_grad():
        attn = model.transformer.h[1].attn
        attn.c_q.row_mult[:] = 2.0  # Q rows
        attn.c_k.row_mult[:] = 0.5  # K rows: only the product with Q enters the scores
        attn.c_proj.row_mult[:] = 3.0
        model.transformer.h[0].mlp.c_proj.row_mult[0] = 0.1
    stats = model.multiplier_stats()
    assert stats["mult/h0.qk_ratio"] == 1.0 and stats["mult/h1.qk_ratio"] == pytest.approx(4.0)
    assert stats["mult/h1.attn_out_rms"] == pytest.approx(3.0) and stats["mult/h0.attn_out_rms"] == 1.0
    assert stats["mult/h0.mlp_out_rms"] == pytest.approx(((C - 1 + 0.01) / C) ** 0.5)
    assert (stats["mult/min"], stats["mult/max"]) == (pytest.approx(0.1), 3.0)
    flat = torch.cat([p.flatten() for p in multipliers(model).values()])
    assert stats["mult/rms"] == pytest.approx(flat.square().mean().sqrt().item())


# -----------------------------------------------------------------------------
# Optimizer rules: clipping without the multipliers, their own weight decay

def inflate_multiplier_grads(model, factor=1e6):
    for p in model.multiplier_parameters():
        p.register_hook(lambda g: g * factor)


def test_clip_factor_ignores_multiplier_gradients(batches):
    """train_step with train.py's clip selection: making the multipliers' gradients a million times larger
    changes neither the reported norm nor the update of any other parameter. Control: had the multipliers
    been in the clip set, the other parameters' update would have changed."""
    x, y = batches[0]
    base = tiny_model("vector")
    cfg = TrainConfig(learning_rate=1e-2, grad_clip=0.05)
    results = []
    for inflate, selection in ((False, clip_params), (True, clip_params), (True, lambda m: list(m.parameters()))):
        model = copy.deepcopy(base)
        if inflate:
            inflate_multiplier_grads(model)
        optimizer = make_optimizer(model, cfg, "cpu")
        _, norm = train_step(model, optimizer, NO_SCALER, nullcontext(), lambda m: (x, y), 1, selection(model), cfg.grad_clip)
        results.append((norm, {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(MULTIPLIER_SUFFIX)}))
    (norm, params), (norm_inflated, params_inflated), (_, params_control) = results
    assert norm > cfg.grad_clip, "clipping must be active for this test to mean anything"
    assert torch.equal(norm_inflated, norm)
    for name, p in params.items():
        assert torch.equal(params_inflated[name], p), name
    assert not torch.equal(params_control["transformer.h.0.attn.c_q.weight"], params["transformer.h.0.attn.c_q.weight"])


def test_clip_in_train_main_ignores_multiplier_gradients(token_dir, tmp_path, monkeypatch):
    """The same through train.main itself (its own clip_params selection): one step with and without
    inflated multiplier gradients gives the same logged grad norm and the same matrices in last.pt."""

    class InflatedGPT(GPT):
        def __init__(self, config):
            super().__init__(config)
            inflate_multiplier_grads(self)

    def run(out_dir):
        train.main(["config/train_tiny.py", f"--data_dir={token_dir}", f"--out_dir={out_dir}", "--max_iters=1",
                    "--multipliers=vector", "--grad_clip=0.05", "--device=cpu", "--dtype=float32", "--eval_iters=1",
                    "--condensation_seqs=0", "--log_interval=1", "--n_layer=2", "--n_embd=32", "--n_head=2",
                    "--block_size=32", "--batch_size=4"])
        with open(out_dir / "metrics.jsonl") as f:
            norm = [r["grad_norm"] for r in map(json.loads, f) if r["type"] == "train"]
        return norm, load_checkpoint(out_dir / "last.pt")["model"]

    monkeypatch.chdir(train.__file__.rsplit("/", 1)[0])
    norm, weights = run(tmp_path / "plain_grads")
    monkeypatch.setattr(train, "GPT", InflatedGPT)
    norm_inflated, weights_inflated = run(tmp_path / "inflated_grads")
    assert norm == norm_inflated and norm[0] > 0.05
    for name, w in weights.items():
        if not name.endswith(MULTIPLIER_SUFFIX):
            assert torch.equal(weights_inflated[name], w), name


def test_multipliers_decay_at_their_own_rate():
    """With zero gradients an AdamW step is pure decoupled decay, p <- p * (1 - lr * wd), per group: matrices
    at weight_decay, multipliers at multiplier_weight_decay with lr x multiplier_lr_scale, vectors not at all."""
    model = tiny_model("vector", bias=True)
    with torch.no_grad():  # away from 1 (and 0), so decay is visible everywhere
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    cfg = TrainConfig(learning_rate=0.5, weight_decay=0.3, multiplier_weight_decay=0.02, multiplier_lr_scale=2.0)
    optimizer = make_optimizer(model, cfg, "cpu")
    lr = train.get_lr(cfg.warmup_iters, cfg)  # the peak lr, set per group as train.py does
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        if name.endswith(MULTIPLIER_SUFFIX):
            factor = 1 - lr * cfg.multiplier_lr_scale * cfg.multiplier_weight_decay  # 0.98
        elif p.dim() >= 2:
            factor = 1 - lr * cfg.weight_decay  # 0.85
        else:  # LayerNorm gains, biases
            factor = 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=0, msg=name)


# -----------------------------------------------------------------------------
# Together with the rest of training: bf16 autocast, the dispersion loss, torch.compile, exact resume

def test_bf16_autocast_with_dispersion_loss(batches):
    """Multipliers under bf16 autocast together with the dispersion loss: finite losses, float32 multiplier
    gradients that are finite and non-zero, and a few finite training steps."""
    model = tiny_model("vector", dispersion_coeff=0.1, dispersion_max_tokens=16)
    x, y = batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = model(x, y)
    assert "dispersion" in losses and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for name, p in multipliers(model).items():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    cfg = TrainConfig(learning_rate=1e-2)
    optimizer = make_optimizer(model, cfg, "cpu")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    for x, y in batches:
        sums, norm = train_step(model, optimizer, NO_SCALER, ctx, lambda m: (x, y), 1, clip_params(model), 1.0)
        assert torch.isfinite(sums).all() and torch.isfinite(norm)


def test_torch_compile(batches):
    """torch.compile traces the multiplier model in one graph (fullgraph) with the same loss and gradients.
    aot_eager: Dynamo + AOTAutograd as on a GPU, without Inductor's C++ build (~70 s on 2 CPU cores)."""
    model = tiny_model("vector")
    x, y = batches[0]
    model(x, y)[1]["loss"].backward()
    eager = {n: p.grad.clone() for n, p in multipliers(model).items()}
    model.zero_grad(set_to_none=True)
    _, losses = torch.compile(model, backend="aot_eager", fullgraph=True)(x, y)
    losses["loss"].backward()
    for name, p in multipliers(model).items():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-7)


def test_resume_is_exact(token_dir, tmp_path):
    """train.py with multipliers and gradient accumulation, 4 steps in one go vs 2 steps + resume to 4: the same
    logged losses, grad norms and multiplier statistics, and the same weights, multipliers and optimizer state."""
    common = ["config/train_tiny.py", f"--data_dir={token_dir}", "--multipliers=vector", "--compile=False",
              "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32",
              "--batch_size=4", "--gradient_accumulation_steps=2", "--learning_rate=2e-2", "--warmup_iters=1",
              "--lr_decay_iters=4", "--eval_interval=2", "--eval_iters=1", "--condensation_seqs=0",
              "--log_interval=1", "--deterministic"]  # bit-exact whatever the load: docs/reproducibility.md
    with ThreadPoolExecutor(2) as pool:  # the uninterrupted run and the first half are independent
        list(pool.map(lambda args: run_script("train.py", *common, *args),
                      [(f"--out_dir={tmp_path / 'whole'}", "--max_iters=4"), (f"--out_dir={tmp_path / 'split'}", "--max_iters=2")]))
    run_script("train.py", *common, f"--out_dir={tmp_path / 'split'}", "--max_iters=4", "--init_from=resume")

    def train_records(run):
        with open(tmp_path / run / "metrics.jsonl") as f:
            records = [r for r in map(json.loads, f) if r["type"] == "train"]
        return [{k: v for k, v in r.items() if k not in ("ms", "tok_s", "mfu", "time_s")} for r in records]

    whole, split = train_records("whole"), train_records("split")
    assert [r["iter"] for r in whole] == list(range(4)) and "mult/h1.qk_ratio" in whole[-1]
    assert split == whole
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in ("whole", "split"))
    assert a["model"].keys() == b["model"].keys() and "wte_mult" in a["model"]  # checkpoints keep the unmerged form
    for name, w in a["model"].items():
        assert torch.equal(b["model"][name], w), name
    assert (a["model"]["wte_mult"] - 1).abs().max() > 1e-3
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.mark.parametrize("multipliers, mlp", [("none", "gelu"), ("vector", "swiglu")])
def test_weight_norms_and_residual_rms(multipliers, mlp):
    """The per-layer norms are those of the raw matrices (multipliers left out) and the residual RMS that of the
    hidden states."""
    from smallgpt.condensation import residual_rms
    model = tiny_model(multipliers, mlp=mlp)
    with torch.no_grad():
        for p in model.multiplier_parameters():
            p.fill_(3.0)  # must not show in the norms
    stats = model.weight_norms()
    assert len(stats) == 4 * TINY["n_layer"]
    attn, block_mlp = model.transformer.h[1].attn, model.transformer.h[1].mlp
    qkv = torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight])
    assert stats["norm/h1.qkv"] == pytest.approx(qkv.norm().item(), rel=1e-6)
    fc = [block_mlp.c_fc.weight] + ([block_mlp.c_gate.weight] if mlp == "swiglu" else [])
    assert stats["norm/h1.fc"] == pytest.approx(torch.cat(fc).norm().item(), rel=1e-6)
    assert stats["norm/h1.mlp_out"] == pytest.approx(block_mlp.c_proj.weight.norm().item(), rel=1e-6)
    idx = torch.randint(0, 50257, (3, 16))
    _, hidden = model.eval().hidden_states(idx, collect=range(3))
    expected = [hidden[layer].square().mean().sqrt().item() for layer in range(3)]
    assert residual_rms(model, idx) == pytest.approx(expected)
