"""
A GPT language model in one file, GPT-2 architecture with nanoGPT's parameter names.

Features (all off or plain by default, switched on through GPTConfig):
- GPT-2: learned position embeddings, pre-LayerNorm blocks, causal attention through
  F.scaled_dot_product_attention, 4x GELU MLP, final LayerNorm, LM head tied to the token embedding.
- The modern block, computed as HF transformers computes it, so that a model maps 1:1 onto LlamaForCausalLM
  (or Qwen3ForCausalLM with qk_norm; docs/model.md has the table): RoPE (pos_emb), RMSNorm (norm), QK-norm,
  SwiGLU (mlp), an untied head (tie_embeddings), grouped-query attention (n_kv_head: fewer key/value heads, a
  smaller KV cache); plus relu^2 and a logit soft-cap for experiments.
- Memory-light loss: the cross-entropy is computed chunk by chunk together with its gradient, so the
  full (tokens x vocab) float32 logits are never held in memory (loss_chunk_size; 0 = plain).
- Activation checkpointing per block (activation_checkpointing).
- Dispersion loss against embedding condensation (arXiv 2602.00217): dispersion_coeff > 0.
- Learnable multipliers freeing the scale of every matrix (arXiv 2601.04890): multipliers = scalar | vector,
  folded into plain weights by merge_multipliers() for inference.
- KV-cache generation (generate), nanoGPT checkpoint keys, and HF GPT-2 weights (from_pretrained).
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

MULTIPLIER_SUFFIX = "_mult"  # every learnable multiplier's parameter name ends with this
DISPERSION_VARIANTS = ("angular_spread", "decorrelation", "l2_repel", "orthogonal")
# the keys that define the weights' shapes and meaning: fixed for a checkpoint, unlike training-time options
ARCH_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "bias", "gelu_approximate",
             "multipliers",
             "token_multipliers",
             "pos_emb", "rope_theta", "norm", "qk_norm", "mlp", "mlp_hidden", "tie_embeddings", "logit_softcap")
KEY_CHOICES = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "relu2"),
               "multipliers": ("none", "scalar", "vector"), "gelu_approximate": ("none", "tanh"),
               "dispersion_variant": DISPERSION_VARIANTS}


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length in tokens
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads (n_embd must divide by it)
    n_kv_head: int = 0  # key/value heads shared by groups of query heads (must divide n_head); 0 = n_head (no grouping)
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout probability in training (0 for small knowledge/reasoning models)
    bias: bool = False  # biases in Linear layers and LayerNorms (GPT-2 had them)
    gelu_approximate: str = "none"  # 'none' (exact GELU, nanoGPT) or 'tanh' (original GPT-2 / HF)
    pos_emb: str = "learned"  # 'learned' (GPT-2's position table) | 'rope' (rotary as HF Llama, no position table)
    rope_theta: float = 10000.0  # RoPE base: channel pair i turns at rope_theta^(-2i/head_dim) radians per position
    norm: str = "layernorm"  # 'layernorm' (GPT-2) | 'rmsnorm' (HF Llama's: learned gain, eps 1e-5, never a bias)
    qk_norm: bool = False  # RMSNorm with a learned gain over head_dim on queries and keys before RoPE (Qwen3)
    mlp: str = "gelu"  # 'gelu' (GPT-2) | 'swiglu' (down(silu(gate x) * up x), Llama) | 'relu2' (no HF model has it)
    mlp_hidden: int = 0  # MLP hidden width; 0 = 4 * n_embd (GPT-2); for swiglu the width of gate and up
    tie_embeddings: bool = True  # the LM head is the token embedding matrix (GPT-2); False = a separate head matrix
    logit_softcap: float = 0.0  # logits -> c * tanh(logits / c) (Gemma 2); 0 = off; no HF Llama/Qwen3 has it
    loss_chunk_size: int = 1024  # tokens per cross-entropy chunk (~6 bytes x vocab each in bf16); 0 = plain F.cross_entropy
    activation_checkpointing: bool = False  # recompute each block in backward: ~10% slower on CPU, far less memory
    multipliers: str = "none"  # learnable multipliers: 'none' | 'scalar' | 'vector' (rows and columns)
    token_multipliers: bool = True  # multipliers='vector': one more per token on the embedding lookup, as the paper has
    dispersion_coeff: float = 0.0  # lambda of the dispersion loss; 0 = off
    dispersion_tau: float = 1.0  # temperature tau of the dispersion loss
    dispersion_layers: str = "all"  # blocks it acts on: 'all' | 'late_half' | 'last' | indices like '6,7,8'
    dispersion_variant: str = "angular_spread"  # or the paper's ablations: decorrelation, l2_repel (all pairs), orthogonal
    dispersion_max_tokens: int = 256  # positions subsampled per sequence (one random subset per call)
    dispersion_clamp: float = 0.1  # cosine clamped to [-1+t, 1-t] (straight-through) so arccos' stays finite
    dispersion_eps: float = 1e-2  # z / (||z|| + eps)

    def __post_init__(self):
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, not {getattr(self, key)}")
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be >= 0 (0 = plain cross-entropy), not {self.loss_chunk_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}); 0 = n_head")
        for key, allowed in KEY_CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {getattr(self, key)!r}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos_emb='rope' needs an even head dimension n_embd / n_head, not "
                             f"{self.n_embd} / {self.n_head} = {self.n_embd // self.n_head}")
        if self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden must be >= 0 (0 = 4 * n_embd), not {self.mlp_hidden}")
        if not self.rope_theta > 0 or self.logit_softcap < 0:
            raise ValueError(f"rope_theta must be positive and logit_softcap >= 0 (0 = off), not "
                             f"{self.rope_theta} and {self.logit_softcap}")
        if self.dispersion_coeff < 0 or self.dispersion_tau <= 0 or not 0 <= self.dispersion_clamp < 1 or self.dispersion_eps < 0:
            raise ValueError("dispersion_coeff must be >= 0, dispersion_tau > 0, dispersion_clamp in [0, 1), dispersion_eps >= 0")
        if self.dispersion_max_tokens < 2:
            raise ValueError("dispersion_max_tokens must be at least 2: the loss needs token pairs")
        self.dispersion_block_indices()  # validates dispersion_layers

    @property
    def kv_heads(self):
        """The number of key/value heads: n_kv_head, or n_head when it is 0 (every query head has its own)."""
        return self.n_kv_head or self.n_head

    def dispersion_block_indices(self):
        """The blocks whose outputs the dispersion loss acts on."""
        n, spec = self.n_layer, self.dispersion_layers.strip()
        named = {"all": range(n), "late_half": range(n // 2, n), "last": [n - 1]}
        if spec in named:
            return list(named[spec])
        try:
            indices = sorted({int(s) for s in spec.split(",")})
        except ValueError:
            raise ValueError(f"dispersion_layers must be all, late_half, last or block indices like '6,7', not {spec!r}")
        if not indices or indices[0] < 0 or indices[-1] >= n:
            raise ValueError(f"dispersion_layers {spec!r}: block indices must lie in 0..{n - 1}")
        return indices


# -----------------------------------------------------------------------------
# Layers with optional learnable multipliers

class _RowColumnScaled(torch.autograd.Function):
    """W * r[:, None] * c[None, :] with a hand-written backward. Autograd's would keep the intermediate W * r
    alive and reduce with broadcast sums; this saves nothing new and makes fewer passes over the matrix, which
    is most of the multipliers' cost in an eager training step (torch.compile fuses either form)."""

    @staticmethod
    def forward(ctx, weight, r, c):
        ctx.save_for_backward(weight, r, c)  # the inputs only: the scaled matrix is recomputed in backward
        return (weight * r[:, None]).mul_(c)  # one temporary, scaled in place

    @staticmethod
    def backward(ctx, grad):
        weight, r, c = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):  # float32 multiplier gradients, always
            grad_times_weight = grad * weight
            # dW = g r c; dr = (g W) c; dc = r (g W)
            return (grad * r[:, None]).mul_(c), grad_times_weight @ c, r @ grad_times_weight


class Linear(nn.Linear):
    """nn.Linear with optional learnable multipliers (init 1): y = r * (W (c * x)) + b, or y = s * (W x) + b."""

    def __init__(self, d_in, d_out, bias, multipliers="none"):
        super().__init__(d_in, d_out, bias=bias)
        self.multipliers = multipliers
        if multipliers == "vector":
            self.row_mult = nn.Parameter(torch.ones(d_out))  # init 1: the layer starts as the plain one
            self.col_mult = nn.Parameter(torch.ones(d_in))
        elif multipliers == "scalar":
            self.scale_mult = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)

    def effective_weight(self):
        """r[:, None] * W * c[None, :] (or s * W). Scaling the weight rather than the activations computes
        the same y = r * (W (c * x)) but saves exactly the plain layer's activations for backward (scaling
        bf16 activations by float32 multipliers would keep float32 copies of every output)."""
        if self.multipliers == "vector":
            return _RowColumnScaled.apply(self.weight, self.row_mult, self.col_mult)
        if self.multipliers == "scalar":
            return self.weight * self.scale_mult
        return self.weight

    @torch.no_grad()
    def merge_multipliers(self):
        """Fold the multipliers into the weight: afterwards a plain Linear computing the same function."""
        self.weight.copy_(self.effective_weight())
        for name in ("row_mult", "col_mult", "scale_mult"):
            if hasattr(self, name):
                delattr(self, name)
        self.multipliers = "none"


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1, and nanoGPT's keys match this)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)  # eps 1e-5, as GPT-2 and PyTorch


class _RMSNorm(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 and returned in x's dtype. Backward needs only x
    and the float32 rsqrt per row: it recomputes x * rsqrt. For q and k, x is a view of the QKV product, which
    attention keeps anyway, so QK-norm saves nothing but the rsqrt; PyTorch's F.rms_norm under bf16 autocast
    kept a float32 copy of q and k, and on a CPU (no fused kernel) x * rsqrt in float32 for every norm
    (BENCHMARKS.md, section 6). Eager on a GPU this is a few kernels where F.rms_norm had one; torch.compile, on by
    default there, fuses them."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()  # a no-op for the float32 residual stream
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x_hat, grad = x.float() * rstd, grad.float()  # grad.float(): the same tensor in float32, never changed
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0)
        grad_x_hat = grad * weight
        # d/dx of x * rstd(x) is rstd * (g - x_hat * mean(g * x_hat)), g the gradient of x_hat: in place
        dot = (grad_x_hat * x_hat).mean(-1, keepdim=True)
        grad_x = grad_x_hat.sub_(x_hat.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """HF Llama / Qwen3's RMSNorm, x * rsqrt(mean(x^2) + eps) * weight with float32 statistics, no bias: in float32
    HF's formula up to float rounding (tests/test_modern.py). The output keeps x's dtype under autocast (q, k and v
    must agree for attention); in bf16 it rounds once where HF rounds twice (about one bf16 ulp apart)."""

    def __init__(self, ndim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x):
        return _RMSNorm.apply(x, self.weight, self.eps)


def make_norm(config, ndim):
    return RMSNorm(ndim) if config.norm == "rmsnorm" else LayerNorm(ndim, bias=config.bias)


def rope_cos_sin(pos, head_dim, theta):
    """cos and sin (T, head_dim) of HF Llama's rotary embedding at positions pos (T,): inv_freq = theta^(-2i/d),
    angles duplicated over the two halves of the head. Always float32 (bf16 angles at position 1000 would be
    off by several radians); computed per call, so any position works and model.to(dtype) cannot round them."""
    with torch.autocast(pos.device.type, enabled=False):
        i2 = torch.arange(0, head_dim, 2, dtype=torch.int64, device=pos.device).float()  # 2i, as HF writes it
        inv_freq = 1.0 / (theta ** (i2 / head_dim))
        angles = torch.outer(pos.float(), inv_freq)  # (T, hs/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
        return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate channel pairs (j, j + hs/2) of x (B, nh, T, hs) by their angles: HF Llama's rotate_half layout."""
    x1, x2 = x.chunk(2, dim=-1)  # HF's rotate_half pairs channel j with j + hs/2 (not j + 1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


def fused_linear(x, layers):
    """Linear layers that read the same input, as one matmul over their concatenated weights (and biases)."""
    # one matmul beats three small ones; the optimizer still sees three
    weight = torch.cat([layer.effective_weight() for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias)


class KVCache:
    """Keys and values of every layer for incremental decoding; pos = tokens already cached."""

    def __init__(self, config, batch_size, device, dtype):
        # grouped-query attention caches only the key/value heads: n_head / n_kv_head times less memory
        shape = (batch_size, config.kv_heads, config.block_size, config.n_embd // config.n_head)
        # empty, not zeros: attention only reads positions already written (zeroing took ~0.1 s per generate
        # call for the 40M model on our 2-core CPU)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.n_embd = config.n_head, config.kv_heads, config.n_embd
        self.dropout = config.dropout
        head_dim = config.n_embd // config.n_head
        kv_dim = self.n_kv_head * head_dim  # n_embd, or less with grouped-query attention
        # Q, K and V are three Linear layers (keys attn.c_q / c_k / c_v): Muon orthogonalises each matrix on its
        # own, each has its own row and column multipliers, and Linear's multipliers and merge serve them
        # unchanged. forward still makes one matmul of the concatenated (3C, C) weight, which is nanoGPT's fused
        # c_attn weight value for value, so the default model computes bit for bit what the fused layer did.
        # Fused c_attn checkpoints (ours before, nanoGPT's, HF GPT-2's) are split in load_nanogpt_state_dict.
        self.c_q = Linear(config.n_embd, config.n_embd, config.bias, config.multipliers)
        self.c_k = Linear(config.n_embd, kv_dim, config.bias, config.multipliers)
        self.c_v = Linear(config.n_embd, kv_dim, config.bias, config.multipliers)
        self.c_proj = Linear(config.n_embd, config.n_embd, config.bias, config.multipliers)
        self.q_norm = RMSNorm(head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(head_dim) if config.qk_norm else None
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.size()
        hs = C // self.n_head
        kv_dim = self.n_kv_head * hs  # C, or less with grouped-query attention
        q, k, v = fused_linear(x, (self.c_q, self.c_k, self.c_v)).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, hs)  # (B, T, nh, hs)
        k, v = k.view(B, T, self.n_kv_head, hs), v.view(B, T, self.n_kv_head, hs)  # (B, T, n_kv, hs)
        if self.q_norm is not None:  # per head, before RoPE, as Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs), (B, n_kv, T, hs) x 2
        if rope is not None:  # cached keys are stored rotated, at their absolute positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        is_causal = True
        if cache is not None:  # write this step's keys/values, attend over everything cached so far
            assert T == 1 or cache.pos == 0, "the cache takes a prefill from position 0, then one token at a time"
            # a prefill is causal within itself; a single new token sees every cached position. An if on pos,
            # not is_causal = T > 1: under torch.compile T and pos may be symbolic, and is_causal must be a bool
            is_causal = True if cache.pos == 0 else False
            end = cache.pos + T
            cache.k[layer][:, :, cache.pos:end] = k
            cache.v[layer][:, :, cache.pos:end] = v
            # every position cached so far, this one included
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        dropout = self.dropout if self.training else 0.0  # SDPA's dropout_p ignores eval(): switch it off here
        # grouped-query attention: query head h reads key/value head h // (nh / n_kv), as HF Llama's repeat_kv
        gqa = self.n_kv_head != self.n_head
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal,
                                           enable_gqa=gqa)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # the heads side by side again: (B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """gelu: c_proj(gelu(c_fc x)); relu2: c_proj(relu(c_fc x)^2); swiglu: c_proj(silu(c_gate x) * c_fc x), which is
    HF Llama's down(silu(gate x) * up x) with c_gate = gate_proj, c_fc = up_proj, c_proj = down_proj."""

    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.kind, self.gelu_approximate = config.mlp, config.gelu_approximate
        self.c_fc = Linear(config.n_embd, hidden, config.bias, config.multipliers)
        self.c_gate = Linear(config.n_embd, hidden, config.bias, config.multipliers) if config.mlp == "swiglu" else None
        self.c_proj = Linear(hidden, config.n_embd, config.bias, config.multipliers)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.kind == "swiglu":  # gate and up in one matmul: one bf16 copy of x under autocast, one kernel
            gate, h = fused_linear(x, (self.c_gate, self.c_fc)).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * h))
        h = self.c_fc(x)
        if self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)  # pre-norm: the residual stream itself is never normalised
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# Losses

class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of (h @ weight.T) against targets, chunk by chunk. The gradients are computed in the forward
    pass (softmax - onehot), so only one chunk of logits exists at a time and no logits are kept for
    backward; the matmul count is the same as the plain path (logits, grad_h, grad_weight). With softcap > 0 the
    logits are c * tanh(logits / c), and the gradient goes through the tanh: d/dz = 1 - tanh^2."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, softcap=0.0):
        valid = targets != -1  # -1 marks an ignored target, as F.cross_entropy's ignore_index
        n_valid = valid.sum().clamp(min=1)  # all targets ignored: a loss of 0, not 0 / 0
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h)
        # summed over chunks in float32: bf16 sums would drop small chunks
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for s in range(0, h.size(0), chunk_size):
            h_c, t_c, v_c = h[s:s + chunk_size], targets[s:s + chunk_size], valid[s:s + chunk_size]
            # (n, V) in the autocast dtype (bf16) or float32. F.linear, not h_c @ weight.t(): autocast caches its
            # bf16 copy of the weight itself, while the view weight.t() would be cast afresh for every chunk
            logits = F.linear(h_c, weight)
            dtype = logits.dtype
            logits = logits.float()  # the bf16 product is freed here; in float32 this is the same tensor
            if softcap > 0:
                tanh = torch.tanh(logits / softcap)  # kept for the gradient: one more (n, V) float32 buffer
                logits = tanh * softcap
            t_safe = t_c.clamp(min=0).unsqueeze(1)
            target = logits.gather(1, t_safe).squeeze(1)
            m = logits.amax(dim=1)  # log-sum-exp with the max subtracted: exp never overflows
            grad = logits.sub_(m.unsqueeze(1)).exp_()  # exp(logits - max), in place: no second (n, V) buffer
            del logits  # the same buffer as grad: in bf16 nothing keeps it once grad is cast below
            z = grad.sum(dim=1)
            loss += ((z.log() + m - target) * v_c).sum()
            grad.div_(z.unsqueeze(1))  # softmax
            grad.scatter_add_(1, t_safe, -torch.ones_like(t_safe, dtype=grad.dtype))  # minus one-hot
            if softcap > 0:
                grad.mul_(1 - tanh.square())
                del tanh
            grad = grad.mul_(v_c.unsqueeze(1)).to(dtype)  # ignored targets contribute nothing; bf16: float32 freed
            grad_h[s:s + chunk_size] = grad @ weight
            grad_w.add_(grad.t() @ h_c)  # bf16 product added into float32 in place: no float32 copy of it
            del grad  # before the next chunk's logits, not after them
        # gradients of the mean, divided in place: backward only scales them
        ctx.save_for_backward(grad_h.div_(n_valid), grad_w.div_(n_valid).to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # grad_out: the loss's scale (1 / accum, GradScaler)
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def softcap_logits(logits, softcap):
    """c * tanh(logits / c): logits smoothly bounded to (-c, c); softcap 0 = unchanged."""
    return softcap * torch.tanh(logits / softcap) if softcap > 0 else logits


def cross_entropy(h, weight, targets, chunk_size, softcap=0.0):
    """Mean CE over targets != -1 of the logits h @ weight.T (soft-capped if softcap > 0); h: (N, C), targets: (N,)."""
    if chunk_size <= 0:
        return F.cross_entropy(softcap_logits((h @ weight.t()).float(), softcap), targets, ignore_index=-1)
    if torch.is_grad_enabled():  # training: the fused path; without gradients no gradient buffers are needed
        return _ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk_size, softcap)
    return token_losses(h, weight, targets, chunk_size, softcap).sum() / (targets != -1).sum().clamp(min=1)


@torch.no_grad()
def token_losses(h, weight, targets, chunk_size, softcap=0.0):
    """The CE of every target (N,) (float32, 0 where the target is -1), one chunk of logits at a time: what an
    evaluation sums as it likes (bits per byte weighs the targets by their bytes) from a single forward pass."""
    chunk_size = chunk_size if chunk_size > 0 else h.size(0)
    return torch.cat([F.cross_entropy(softcap_logits((h[s:s + chunk_size] @ weight.t()).float(), softcap),
                                      targets[s:s + chunk_size], ignore_index=-1, reduction="none")
                      for s in range(0, h.size(0), chunk_size)])


def dispersion_loss(z, variant="angular_spread", tau=1.0, max_tokens=256, clamp=0.1, eps=1e-2):
    """Dispersion loss of one layer's hidden states z: (B, L, C) -> scalar (mean over the batch).
    Purely repulsive: lower when the token directions of each sequence are spread apart."""
    with torch.autocast(z.device.type, enabled=False):
        z = z.float()  # in bf16, 1 - 1e-4 rounds to 1 and arccos' blows up
        L = z.size(1)
        if L > max_tokens:  # one random subset of positions, shared by the batch
            z = z[:, torch.randperm(L, device=z.device)[:max_tokens]]
            L = max_tokens
        off_diagonal = ~torch.eye(L, dtype=torch.bool, device=z.device)
        log_pairs = math.log(L * (L - 1))  # logsumexp - log(pairs): the log of the mean over the pairs i != j
        if variant in ("angular_spread", "orthogonal"):
            u = z / (z.norm(dim=-1, keepdim=True) + eps)
            cos = u @ u.transpose(1, 2)  # (B, L, L)
            cos = cos + (cos.clamp(-1 + clamp, 1 - clamp) - cos).detach()  # straight-through clamp
            dist = torch.arccos(cos) / math.pi  # angular distance in [0, 1]
            if variant == "orthogonal":  # hinge: only acute pairs are pushed
                return ((0.5 - dist).clamp(min=0).square() * off_diagonal).sum((1, 2)).div(L * (L - 1)).mean()
            scores = (-dist / tau).masked_fill(~off_diagonal, float("-inf"))
            return (torch.logsumexp(scores.flatten(1), dim=1) - log_pairs).mean()
        if variant == "l2_repel":  # over ALL pairs, as the authors' code: the diagonal's exp(0) = 1 terms bound
            # it below by -log L; without them the model lowers it without limit by growing the residual stream
            sq_norm = z.square().sum(-1)
            sq_dist = (sq_norm.unsqueeze(2) + sq_norm.unsqueeze(1) - 2 * z @ z.transpose(1, 2)).clamp(min=0)
            return (torch.logsumexp((-sq_dist / tau).flatten(1), dim=1) - 2 * math.log(L)).mean() + 0.1 * z.square().mean()
        # decorrelation: squared off-diagonal correlations between tokens (each standardised over features)
        zs = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True, correction=0) + 1e-5)  # population std
        corr = zs @ zs.transpose(1, 2) / z.size(-1)
        return (corr.square() * off_diagonal).sum((1, 2)).div(L * (L - 1)).mean()


# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":  # with RoPE, positions enter through the rotation of q and k only
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # logits = h @ W.T: no bias, as GPT-2
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        # Embedding multipliers act on the lookup output only: on a tied weight they would land on the LM
        # head. The paper has them per channel and per token (x = W[t] * c * r[t]).
        if config.multipliers == "vector":
            self.wte_mult = nn.Parameter(torch.ones(config.n_embd))
            if config.token_multipliers:
                self.wte_token_mult = nn.Parameter(torch.ones(config.vocab_size))
        elif config.multipliers == "scalar":
            self.wte_mult = nn.Parameter(torch.ones(1))
        # a merged tied model keeps its per-token multipliers here (merge_multipliers); None otherwise
        self.register_buffer("token_scale", None)
        self.apply(self._init_weights)  # GPT-2's init: N(0, 0.02) for every matrix and table
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; by default without the lookup tables: the position embedding, and the token embedding
        unless it is tied (then it is the LM head too, a matmul per token)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def hidden_states(self, idx, cache=None, collect=()):
        """Run the trunk. Returns the final post-LayerNorm states (B, T, C) and a dict {layer: states} for the
        requested layers, numbered 0 = embedding output, i + 1 = output of block i."""
        B, T = idx.size()
        start = 0 if cache is None else cache.pos
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size {self.config.block_size}"
        cfg = self.config
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        if cfg.multipliers != "none":
            x = x * self.wte_mult  # the lookup's channel (or scalar) multiplier; W itself stays the head's
        # trained per-token multipliers, or their merged copy
        token_scale = getattr(self, "wte_token_mult", self.token_scale)
        if token_scale is not None:
            x = x * token_scale[idx].unsqueeze(-1)
        rope = None
        if cfg.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            rope = rope_cos_sin(pos, cfg.n_embd // cfg.n_head, cfg.rope_theta)  # (T, hs) each, for every block
        x = self.transformer.drop(x)
        collected = {0: x} if 0 in collect else {}
        for i, block in enumerate(self.transformer.h):
            # recompute in backward, keep no activations
            if cfg.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache, i)
            if i + 1 in collect:
                collected[i + 1] = x
        if cache is not None:
            cache.pos += T  # after all layers: each wrote its keys at the same positions
        return self.transformer.ln_f(x), collected

    def logits(self, x):
        """The LM head on final states x (..., C), soft-capped when logit_softcap > 0."""
        return softcap_logits(self.lm_head(x), self.config.logit_softcap)

    def forward(self, idx, targets=None, per_token=False):
        """idx, targets: (B, T) token ids. Without targets: returns (logits (B, T, V), None).
        With targets: returns (None, losses), losses = {'loss': what to backpropagate, 'ce': cross-entropy,
        and 'dispersion' when that loss is active (training only; evaluation is CE alone)}. per_token=True (no
        gradients): losses = {'ce_tokens': the CE of every target, (B * T,)}."""
        cfg = self.config
        use_dispersion = self.training and cfg.dispersion_coeff > 0 and targets is not None
        # block i's output is layer i + 1
        layers = [i + 1 for i in cfg.dispersion_block_indices()] if use_dispersion else []
        x, hidden = self.hidden_states(idx, collect=layers)
        if targets is None:
            return self.logits(x), None
        if per_token:
            return None, {"ce_tokens": token_losses(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                                    cfg.loss_chunk_size, cfg.logit_softcap)}
        # (B * T, C): every position is one row of the loss
        ce = cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), cfg.loss_chunk_size,
                           cfg.logit_softcap)
        losses = {"loss": ce, "ce": ce}
        if use_dispersion:
            # for the last block the authors' code sees the post-final-LayerNorm output; we follow them
            hidden = {i: (x if i == cfg.n_layer else h) for i, h in hidden.items()}
            disp = torch.stack([dispersion_loss(h, cfg.dispersion_variant, cfg.dispersion_tau,
                                                cfg.dispersion_max_tokens, cfg.dispersion_clamp, cfg.dispersion_eps)
                                for h in hidden.values()]).mean()
            losses.update(loss=ce + cfg.dispersion_coeff * disp, dispersion=disp)
        return None, losses

    # -------------------------------------------------------------------------
    # Learnable multipliers: optimizer groups, statistics, merging

    def multiplier_parameters(self):
        return [p for n, p in self.named_parameters() if n.endswith(MULTIPLIER_SUFFIX)]

    def parameters_to_clip(self):
        """Everything but the multipliers: the paper computes the clipping norm without them (including
        them made early clipping far too aggressive) and does not clip them."""
        return [p for n, p in self.named_parameters() if not n.endswith(MULTIPLIER_SUFFIX)]

    @torch.no_grad()
    def multiplier_stats(self):
        """Per-layer multiplier statistics that make symmetry drift visible (empty without multipliers):
        qk_ratio = |r_Q| / |r_K| (Q and K row scales only enter as a product), attn_out / mlp_out = RMS of
        the row multipliers writing into the residual stream, plus the extremes over all multipliers."""
        mults = self.multiplier_parameters()
        if not mults:
            return {}
        flat = torch.cat([p.detach().float().flatten() for p in mults])
        stats = {"mult/min": flat.min(), "mult/max": flat.max(), "mult/rms": flat.square().mean().sqrt()}
        rms = lambda v: v.float().square().mean().sqrt()
        if self.config.multipliers == "vector":
            for i, block in enumerate(self.transformer.h):
                stats[f"mult/h{i}.qk_ratio"] = block.attn.c_q.row_mult.float().norm() / block.attn.c_k.row_mult.float().norm()
                stats[f"mult/h{i}.attn_out_rms"] = rms(block.attn.c_proj.row_mult)
                stats[f"mult/h{i}.mlp_out_rms"] = rms(block.mlp.c_proj.row_mult)
        values = torch.stack(list(stats.values())).tolist()  # one GPU sync, not one per statistic
        stats = dict(zip(stats, values))
        return stats

    @torch.no_grad()
    def weight_norms(self):
        """Frobenius norm of each block's weight matrices by kind: norm/h{i}.qkv, .attn_out, .fc (with SwiGLU's
        gate), .mlp_out. The raw W, which weight decay acts on: with learnable multipliers the scale they carry
        is not in it, so a run shows W settling where weight decay puts it while the multipliers move."""
        stats = {}
        for i, block in enumerate(self.transformer.h):
            attn, mlp = block.attn, block.mlp
            kinds = {"qkv": (attn.c_q, attn.c_k, attn.c_v), "attn_out": (attn.c_proj,),
                     "fc": (mlp.c_fc,) + ((mlp.c_gate,) if mlp.c_gate is not None else ()), "mlp_out": (mlp.c_proj,)}
            for kind, layers in kinds.items():
                stats[f"norm/h{i}.{kind}"] = sum(layer.weight.float().square().sum() for layer in layers).sqrt()
        return dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one GPU sync

    @torch.no_grad()
    def merge_multipliers(self, untie=False):
        """Fold every multiplier into plain weights; afterwards config.multipliers = none and the logits are the
        same. An untied embedding takes its channel multiplier c and per-token multiplier r directly
        (W[t] * c * r[t] = (r[:, None] * W * c)[t]). A tied W cannot take c alone (the head would see it), so
        W <- W * c and the final norm's gain (and bias) are divided by c: the head then computes
        (ln_f(x) / c) @ (W * c).T = ln_f(x) @ W.T, exactly as before. Nor can a tied W take r: it stays a
        (vocab_size,) vector applied at lookup (token_scale, one multiply per token), unless untie=True, which
        gives the head its own copy of W so that the embedding can take r (a plain untied model, for export)."""
        if self.config.multipliers == "none":
            return self
        for module in self.modules():
            if isinstance(module, Linear):
                module.merge_multipliers()
        # per-token multipliers (vector with token_multipliers)
        r = self.wte_token_mult.detach() if hasattr(self, "wte_token_mult") else None
        if r is not None:
            del self.wte_token_mult
            r = None if bool((r == 1).all()) else r  # never trained: nothing to keep
        if r is not None and untie and self.config.tie_embeddings:
            # the head keeps W; the embedding takes r below
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone())
            self.config = replace(self.config, tie_embeddings=False)  # a copy: the config may be shared
        c = self.wte_mult.detach()
        ln_f = self.transformer.ln_f
        if self.config.tie_embeddings:
            if c.abs().min() < 1e-6:
                raise ValueError("an embedding multiplier is ~0: merging would divide the final norm by it")
            ln_f.weight.div_(c)  # (ln_f(x) / c) @ (W * c).T = ln_f(x) @ W.T
            if getattr(ln_f, "bias", None) is not None:
                ln_f.bias.div_(c)
        self.transformer.wte.weight.mul_(c)
        if r is not None and self.config.tie_embeddings:
            self.token_scale = r
        elif r is not None:
            self.transformer.wte.weight.mul_(r[:, None])
        del self.wte_mult
        self.config = replace(self.config, multipliers="none")
        return self

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                 vocab_limit=None, generators=None):
        """Yield the next token of every sequence in idx (B, T), max_new_tokens times, with a KV cache: one
        prefill of the prompt, then one token per step. The context is always the last block_size tokens,
        exactly as full recomputation would use; once the window must slide, it is prefilled again. With learned
        positions every position changes. With RoPE, attention sees only relative positions, yet keeping the cache
        (dropping the oldest entry) would still differ from recomputing the window: the keys and values of blocks
        >= 1 were computed from tokens that have left the window. temperature 0 = greedy. generators: one
        torch.Generator per sequence, so each row's sample depends only on its own seed. Stops early once
        every row has produced stop_token (finished rows keep emitting stop_token)."""
        B, block = idx.size(0), self.config.block_size
        device_type = idx.device.type  # is_autocast_enabled() without it asks about CUDA only
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.lm_head.weight.dtype
        cache = KVCache(self.config, B, idx.device, dtype)  # in the dtype the layers produce: writes need no cast
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        context = idx[:, -block:]  # a longer prompt keeps its last block_size tokens
        x, _ = self.hidden_states(context, cache)
        for step in range(max_new_tokens):
            logits = self.logits(x[:, -1, :]).float()  # (B, V)
            # padded vocab slots are not real tokens: cut them off (a -inf mask would not hold against NaN logits)
            logits = logits[:, :vocab_limit]  # (B, vocab_limit); all of them when vocab_limit is None
            token = sample_token(logits, temperature, top_k, top_p, generators)
            if stop_token is not None:
                token = token.masked_fill(finished, stop_token)
                finished |= token == stop_token
            yield token
            if step == max_new_tokens - 1 or (stop_token is not None and finished.all()):
                return  # no forward pass for a token nobody will read
            context = torch.cat([context, token.unsqueeze(1)], dim=1)
            if context.size(1) <= block:
                x, _ = self.hidden_states(context[:, -1:], cache)  # one new token: its keys and values join the cache
            else:  # the window slides: every position shifts, so the whole window is prefilled again (as costly
                # as a step of full recomputation; exact, unlike reusing keys computed at other positions)
                context = context[:, -block:]
                cache.pos = 0  # refill the cache from position 0 with the slid window
                x, _ = self.hidden_states(context, cache)

    # -------------------------------------------------------------------------
    # Loading weights from elsewhere

    def load_nanogpt_state_dict(self, state_dict):
        """Load a state dict from this project or from nanoGPT (strips torch.compile's '_orig_mod.' and DDP's
        'module.' prefixes, drops nanoGPT's causal-mask buffers, and splits a fused attn.c_attn into c_q, c_k, c_v:
        its rows, bias and row multipliers in thirds; its column or scalar multiplier, which acted on all three,
        copied to each)."""
        clean = {}
        for key, value in state_dict.items():
            for prefix in ("_orig_mod.", "module."):
                key = key[len(prefix):] if key.startswith(prefix) else key
            # nanoGPT's and HF's causal-mask buffers: SDPA needs none
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if ".attn.c_attn." in key:
                head, name = key.split(".attn.c_attn.")
                parts = value.chunk(3) if name in ("weight", "bias", "row_mult") else [value] * 3
                clean.update({f"{head}.attn.c_{x}.{name}": part.clone() for x, part in zip("qkv", parts)})
            else:
                clean[key] = value
        self.load_state_dict(clean)

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """GPT-2 weights from HuggingFace transformers: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a
        local directory holding a GPT2LMHeadModel. Requires `pip install transformers`."""
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise ImportError("from_pretrained needs the transformers package: pip install transformers")
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)  # downloads once into HF's cache
        hc = hf.config
        args = dict(n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, block_size=hc.n_positions,
                    vocab_size=hc.vocab_size, bias=True,
                    gelu_approximate="tanh" if hc.activation_function in ("gelu_new", "gelu_pytorch_tanh") else "none")
        args.update(overrides)
        model = cls(GPTConfig(**args))
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        # HF uses Conv1D (in, out) where we use Linear (out, in); otherwise its keys are nanoGPT's
        model.load_nanogpt_state_dict({k: v.t() if k.endswith(transposed) else v for k, v in hf.state_dict().items()})
        return model

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        # 6N: matmuls forward + backward; 12LHQT: attention scores
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generators=None):
    """Pick one token per row of logits (B, V): greedy at temperature 0, else softmax(logits / temperature)
    restricted to the top_k tokens and the smallest set holding top_p of the probability."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # the k-th largest logit of each row
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is already full
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)  # renormalise the nucleus
    # inverse-CDF sampling with one uniform per row from that row's own generator
    if generators is None:
        u = torch.rand(probs.size(0), 1, device=probs.device, dtype=torch.float64)
    else:
        u = torch.stack([torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in generators])
        u = u.to(probs.device)
    cdf = probs.double().cumsum(-1)
    # right=True: the first cdf entry strictly above the draw, so a zero-probability token (a flat step of the
    # cdf) can never be picked, not even when the draw is exactly 0
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return token.clamp(max=probs.size(-1) - 1)  # a draw of exactly 1.0 lands past the end: the last token
