"""
Will it fit, and how long will it take? The plan of a training run from its config alone, before anything is
allocated (`python train.py CONFIG --plan`, docs/training.md "Will it fit?"):

- parameters by kind, from model.py's own modules built on the meta device (shapes only, no memory);
- memory by category: weights, gradients, optimizer state per group (optim.py's groups), the activations a
  micro-batch saves for backward, the transient peak above them, and an allowance for the CUDA context and the
  caching allocator (assumed, stated as such);
- the verdict for a memory budget: fits or not, the largest micro-batch that fits with and without activation
  checkpointing, and the batch_size x gradient_accumulation_steps that keeps the config's tokens per step;
- FLOPs per token, predicted step and run times on named cards at an MFU assumption, tokens per parameter.

The activation formulas were derived op by op from eager PyTorch 2.13 (what autograd saves, what bf16 autocast
casts and caches, the chunked loss's buffers) and are checked against the measured peak of live tensor bytes in
tests/test_plan.py; `python -m bench.bench_plan` measures any config. They model eager mode: torch.compile
usually saves less (unverified on a GPU), so on a GPU the figures are meant as an upper bound. Not modelled:
dropout, the dispersion loss, learnable multipliers' activations (their parameters and state are counted).

Notation of the formulas: N = B*T tokens of a micro-batch, C = n_embd, h = n_head, d = C/h, K = the width of the
keys and of the values (n_kv_head * d: C, or less with grouped-query attention), H = MLP hidden, V = vocab_size,
L = n_layer, a = bytes of the compute dtype (2 under bf16/fp16 autocast, 4 in float32).
"""
import math
from dataclasses import dataclass, replace

import torch

from model import GPT, GPTConfig
from .config import model_args
from .device import GPU_PEAK_FLOPS, autocast
from .errors import ConfigError
from .monitor import count, duration
from .optim import adamw_groups, split_parameters

GIB = 2 ** 30
DEFAULT_BUDGET_GIB = 12.0  # without a GPU to detect: an RTX 4070's 12 GiB, the card the configs are made for
CONTEXT_GIB = 0.5  # the CUDA context and kernels, outside PyTorch's allocator: an assumption (0.3-0.7 GiB is usual)
ALLOCATOR_SHARE = 0.10  # the caching allocator's rounding and fragmentation over the live tensors: an assumption
ASSUMED_MFU = 0.35  # model FLOP/s over the card's dense bf16 peak: an assumption until a GPU has measured it
MEASURED_MFU = None  # bench/gpu_suite.py's measured MFU (BENCHMARKS.md section 3) replaces the assumption here
CARDS = ("rtx 4070", "rtx 3090", "rtx 4090", "a100", "h100")  # the cards the plan times (device.GPU_PEAK_FLOPS)
COMPUTE_OPTIMAL_TOKENS = 20  # tokens per parameter of compute-optimal training (Hoffmann et al. 2022)
FSDP_GPUS = (2, 4, 8)  # the numbers of cards a parallel='fsdp' plan shows


# -----------------------------------------------------------------------------
# Parameters and persistent state: from model.py's modules on the meta device

def meta_model(cfg):
    """The GPT of cfg with meta tensors: every parameter's name and shape, no memory."""
    with torch.device("meta"):
        return GPT(GPTConfig(**model_args(cfg)))


def parameter_counts(model):
    """Parameters by kind; a tied head is the token embedding (counted once, as the embedding)."""
    kinds = dict.fromkeys(("token embedding", "position embedding", "LM head", "attention", "MLP", "norms",
                           "multipliers"), 0)
    for name, p in model.named_parameters():
        if name.endswith("_mult"):
            kind = "multipliers"
        elif name.startswith("transformer.wte"):
            kind = "token embedding"
        elif name.startswith("transformer.wpe"):
            kind = "position embedding"
        elif name.startswith("lm_head"):
            kind = "LM head"
        elif ".attn.c_" in name:
            kind = "attention"
        elif ".mlp." in name:
            kind = "MLP"
        else:
            kind = "norms"  # ln_1, ln_2, ln_f, QK-norm gains (and LayerNorm biases)
        kinds[kind] += p.numel()
    return kinds


def optimizer_state(model, cfg):
    """Bytes of optimizer state per group, as optim.py groups the parameters. AdamW: two float32 moments per
    element and a float32 step count per tensor. Muon: one float32 momentum buffer per element."""
    adam = lambda params: sum(8 * p.numel() + 4 for p in params)
    if cfg.optimizer == "adamw":
        return {f"AdamW {g['name']}": adam(g["params"]) for g in adamw_groups(model, cfg)}
    groups = {f"AdamW {kind}": adam(p for _, p in params) for kind, params in split_parameters(model).items()
              if params and kind != "muon"}
    return {"Muon matrices": sum(4 * p.numel() for _, p in split_parameters(model)["muon"]), **groups}


# -----------------------------------------------------------------------------
# Activations: what one micro-batch saves for backward, and the transient peaks of forward and backward

@dataclass(frozen=True)
class Dims:
    """The sizes and switches the activation formulas read."""
    C: int
    h: int
    d: int
    K: int  # keys' and values' width: grouped-query attention's n_kv_head heads of d
    H: int
    V: int
    L: int
    T: int
    a: int  # bytes of the compute dtype
    layernorm: bool
    rope: bool
    qk_norm: bool
    swiglu: bool
    tied: bool
    checkpointing: bool
    chunk: int

    @classmethod
    def of(cls, cfg, dtype):
        C, h = cfg.n_embd, cfg.n_head
        return cls(C, h, C // h, (cfg.n_kv_head or h) * (C // h), cfg.mlp_hidden or 4 * C, cfg.vocab_size,
                   cfg.n_layer, cfg.block_size,
                   4 if dtype == "float32" else 2, cfg.norm == "layernorm", cfg.pos_emb == "rope", cfg.qk_norm,
                   cfg.mlp == "swiglu", cfg.tie_embeddings, cfg.activation_checkpointing, cfg.loss_chunk_size)


def norm_saved(D, N):
    """A residual norm's saved set, float32 in both dtypes: x and rstd (LayerNorm: and the mean)."""
    return 4 * N * D.C + (8 * N if D.layernorm else 4 * N)


def block_saved(D, N):
    """Bytes one block saves for backward, by term (no checkpointing)."""
    C, K, H, a, bf16 = D.C, D.K, D.H, D.a, D.a == 2
    t = {"norms": 2 * norm_saved(D, N)}
    t["attn.input"] = a * N * C  # the normed input in the compute dtype, saved by the QKV matmul
    # grouped-query attention: c_k and c_v are (K, C), K = C * n_kv_head / n_head
    t["attn.qkv_weight"] = a * (C + 2 * K) * C  # torch.cat of c_q, c_k, c_v (or its bf16 cast): not a leaf, not cached
    t["attn.qkv"] = a * N * (C + 2 * K)  # q, k and v are views of one (N, C + 2K) product
    if D.qk_norm:  # RMSNorm over head_dim of q and k: a float32 rstd per head and token (x is the product's view)
        t["attn.qk_norm"] = 4 * (C + K) // D.d * N
    if D.rope or D.qk_norm:  # the q and k that SDPA gets are new tensors, not views of the product
        t["attn.q_k"] = a * N * (C + K)
    if D.rope and bf16:  # cos and sin cast to bf16 in each of the two apply_rope calls
        t["attn.rope_casts"] = 8 * D.T * D.d
    # its output (c_proj's input as it is) and logsumexp (float32); grouped-query attention's shared k and v are
    # read in place, not repeated per query head (enable_gqa; measured on CPU)
    t["attn.sdpa"] = a * N * C + 4 * D.h * N
    if bf16:
        t["attn.proj_weight"] = 2 * C * C  # autocast's cached bf16 copy of c_proj.weight
    t["mlp.input"] = a * N * C
    if D.swiglu:  # gate and up: one (N, 2H) product; silu's output; their product (c_proj's input)
        t["mlp.hidden"] = a * 4 * N * H + a * 2 * H * C  # + the cat of c_gate and c_fc (or its bf16 cast)
    else:  # GELU keeps its input, c_proj its output (relu^2: relu's output and its square, the same bytes)
        t["mlp.hidden"] = a * 2 * N * H + (2 * H * C if bf16 else 0)  # + the cached bf16 c_fc.weight
    if bf16:
        t["mlp.proj_weight"] = 2 * H * C  # the cached bf16 c_proj.weight
    return t


def block_backward_transient(D, N):
    """The most one block's backward holds over what was live when it started: its MLP's first steps."""
    if D.swiglu:  # the gradients of silu's output and of up, and c_proj's weight gradient
        return 2 * D.a * N * D.H + D.a * D.H * D.C
    # c_proj: the gradient of its input and of its weight (bf16: and a bf16 copy of the incoming gradient)
    return D.a * N * D.H + D.a * D.H * D.C + (2 * N * D.C if D.a == 2 else 0)


def loss_forward_transient(D, N):
    """The chunked cross-entropy's most at once in forward, over h and the trunk's saved tensors: grad_h and
    grad_w (4NC + 4VC), and one chunk of n rows at a time (the largest is the first)."""
    V, C, n = D.V, D.C, min(D.chunk, N)
    if D.a == 2:  # the bf16 logits and their float32 copy, or later that copy and the bf16 gradient made of it;
        # then the bf16 gradient, h_c's bf16 cast and the bf16 weight-gradient product
        chunk = max(6 * n * V, 2 * n * V + 2 * n * C + 2 * V * C)
    else:  # the float32 logits, which become the gradient, and its product with h_c (V, C) or with the weight
        chunk = 4 * n * V + max(4 * V * C, 4 * n * C)
    return 4 * N * C + 4 * V * C + chunk


def micro_batch(D, N, block_params, all_params, grads_exist):
    """One micro-batch's forward and backward: bytes saved for backward, and the peaks above what was live
    before it, each with where it is. grads_exist: a later micro-batch of gradient accumulation."""
    S_blk = sum(block_saved(D, N).values())
    rope_once = 8 * D.T * D.d if D.rope and (D.a == 4 or D.checkpointing) else 0  # float32 cos, sin held once
    embedding = 8 * N + (0 if D.rope else 8 * D.T) + rope_once  # token ids (and positions)
    blocks = D.L * (4 * N * D.C if D.checkpointing else S_blk)  # checkpointing keeps each block's input only
    loss = 4 * N * D.C + 4 * D.V * D.C  # grad_h and grad_w, computed in forward
    saved = embedding + blocks + norm_saved(D, N) + loss
    # forward: inside the loss, with h (4NC) and in bf16 autocast's cached copy of the head matrix (2VC)
    before_loss = saved - loss + 4 * N * D.C + (2 * D.V * D.C if D.a == 2 else 0)
    if D.a == 2 and D.checkpointing:  # checkpointed blocks' cached bf16 weights live until autocast exits
        before_loss += D.L * (2 * D.C * D.C + 2 * D.H * D.C + (0 if D.swiglu else 2 * D.H * D.C))
    forward = before_loss + loss_forward_transient(D, N)
    # backward: the gradients are created here (or, later in the accumulation, added into existing ones)
    T_blk, head, residual = block_backward_transient(D, N), 4 * D.V * D.C, 4 * N * D.C
    done_blocks = 0 if grads_exist else (D.L - 1) * 4 * block_params  # gradients made before block 0's backward
    kept = 4 * N * D.C if D.checkpointing else S_blk  # per block, while the blocks above run backward
    recomputed = S_blk - 4 * N * D.C if D.checkpointing else 0  # its input is the kept one (ln_1 saves it)
    backward = {"loss backward": saved + 4 * N * D.C + 4 * D.V * D.C,  # grad_h, grad_w scaled
                # RMSNorm's backward (model._RMSNorm): x_hat, its gradient and one product, float32, while the loss
                # gradients take the place of the saved ones (LayerNorm's fused kernel holds less than the loss)
                "final norm backward": saved + (0 if D.layernorm else 12 * N * D.C),
                "top block backward": embedding + D.L * kept + recomputed + head + residual + T_blk,
                "bottom block backward": embedding + kept + recomputed + head + residual + done_blocks + T_blk,
                # tied: a dense (V, C) embedding gradient, added out of place to the head's: three at once
                "embedding backward": (12 if D.tied else 4) * D.V * D.C if grads_exist
                else 4 * all_params + (8 * D.V * D.C if D.tied else 0)}
    where = max(backward, key=backward.get)
    return saved, (forward, "loss forward"), (backward[where], where)


# -----------------------------------------------------------------------------
# The memory of a training step, and what fits a budget

@dataclass
class Memory:
    """Bytes of one training step at a micro-batch, by category; peak = the most live at once (steady state:
    the optimizer state exists), needed = peak + the allowance for the CUDA context and the allocator."""
    batch_size: int
    weights: int
    gradients: int
    optimizer: dict  # group -> bytes
    activations: int  # saved for backward by one micro-batch
    transient: int  # the most above weights, gradients (if any), optimizer state and saved activations
    peak: int
    where: str  # the phase of the peak
    allowance: int

    @property
    def needed(self):
        return self.peak + self.allowance


def plan_dtype(cfg):
    """The compute dtype the plan assumes: dtype='auto' means bf16 autocast on the GPUs the plan is for."""
    return "bfloat16" if cfg.dtype == "auto" else cfg.dtype


def step_memory(cfg, batch_size, model=None):
    """The Memory of a training step of cfg at this micro-batch (the accumulation as the config's tokens per
    step imply), as train.py runs it: micro-batch 1 creates the gradients, later ones add into them, then the
    optimizer steps and the gradients are freed."""
    model = model or meta_model(cfg)
    D, N = Dims.of(cfg, plan_dtype(cfg)), batch_size * cfg.block_size
    params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.transformer.h[0].parameters())
    weights = grads = 4 * params  # float32 master weights; autocast never changes them; .grad alike
    optimizer = optimizer_state(model, cfg)
    saved, fwd, bwd = micro_batch(D, N, block_params, params, grads_exist=False)
    phases = {f"micro-batch 1, {where}": peak for peak, where in (fwd, bwd)}
    if sequences_per_step(cfg) > batch_size:  # gradient accumulation: later micro-batches find the gradients
        _, fwd, bwd = micro_batch(D, N, block_params, params, grads_exist=True)
        phases.update({f"micro-batch 2+, {where}": grads + peak for peak, where in (fwd, bwd)})
    if cfg.optimizer == "muon":  # Newton-Schulz of the largest matrix in bf16: ~10 B per element (measured 9-9.5)
        phases["optimizer step"] = grads + 10 * max(p.numel() for _, p in split_parameters(model)["muon"])
    where = max(phases, key=phases.get)
    peak = weights + sum(optimizer.values()) + phases[where]
    held = weights + sum(optimizer.values()) + saved + (grads if "2+" in where else 0)
    return Memory(batch_size, weights, grads, optimizer, saved, max(0, peak - held), peak, where,
                  int(CONTEXT_GIB * GIB + ALLOCATOR_SHARE * peak))


def sequences_per_step(cfg):
    """Sequences per optimizer step; batch_size='auto' counts as 1 until resolved (config.parse_args)."""
    return (1 if cfg.batch_size == "auto" else cfg.batch_size) * cfg.gradient_accumulation_steps


def largest_micro_batch(cfg, budget, checkpointing, limit=2 ** 16):
    """The largest micro-batch whose step needs at most budget bytes (0 if not even 1 fits)."""
    cfg, model = replace(cfg, activation_checkpointing=checkpointing), meta_model(cfg)
    fits = lambda b: step_memory(cfg, b, model).needed <= budget
    good, bad = 0, limit + 1
    while bad - good > 1:  # needed memory grows with the micro-batch: bisect
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def keep_tokens_per_step(sequences, largest):
    """(batch_size, gradient_accumulation_steps) with the same sequences per step: the largest micro-batch up to
    `largest` that divides them (None if none: largest 0)."""
    b = next((b for b in range(min(largest, sequences), 0, -1) if sequences % b == 0), None)
    return (b, sequences // b) if b else None


def budget_gib(cfg):
    """gpu_memory_gb, else the memory of the GPU this machine has, else 12 GiB (an RTX 4070)."""
    if cfg.gpu_memory_gb > 0:
        return cfg.gpu_memory_gb, "gpu_memory_gb"
    if torch.cuda.is_available():  # reads the card's properties; allocates nothing
        props = torch.cuda.get_device_properties(torch.cuda.current_device())  # under torchrun: this rank's
        return props.total_memory / GIB, props.name
    return DEFAULT_BUDGET_GIB, "no GPU here: an RTX 4070's"


# -----------------------------------------------------------------------------
# The plan as text: --plan's report and the one line every CUDA run prints at start

def planned_batch(cfg, budget):
    """The micro-batch to plan for: the config's, or what batch_size='auto' takes before a GPU confirms it."""
    if cfg.batch_size != "auto":
        return cfg.batch_size
    kept = keep_tokens_per_step(sequences_per_step(cfg),
                                largest_micro_batch(cfg, budget * GIB, cfg.activation_checkpointing))
    return kept[0] if kept else 1


def describe_model(cfg):
    block = "modern block" if cfg.pos_emb == "rope" or cfg.norm == "rmsnorm" or cfg.mlp == "swiglu" else "GPT-2 block"
    switches = f"{cfg.pos_emb} positions, {cfg.norm}{', QK-norm' if cfg.qk_norm else ''}, {cfg.mlp} MLP"
    kv = f", {cfg.n_kv_head} key/value heads" if cfg.n_kv_head not in (0, cfg.n_head) else ""
    return (f"{cfg.n_layer} layers x {cfg.n_embd} ({cfg.n_head} heads{kv}), block {cfg.block_size}, "
            f"vocab {cfg.vocab_size}; {block} ({switches}), {'tied' if cfg.tie_embeddings else 'untied'} head")


def memory_lines(cfg, mem, budget, source):
    gib = lambda n: f"{n / GIB:8.3f}"
    optimizer = ", ".join(f"{name} {b / GIB:.3f}" for name, b in mem.optimizer.items())
    verdict = "fits" if mem.needed <= budget * GIB else "does NOT fit"
    accum = max(1, sequences_per_step(cfg) // mem.batch_size)
    return [f"memory at micro-batch {mem.batch_size} ({mem.batch_size * cfg.block_size:,} tokens, {accum} per step), "
            f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, GiB:",
            f"  weights (float32)                  {gib(mem.weights)}",
            f"  gradients (float32)                {gib(mem.gradients)}",
            f"  optimizer state                    {gib(sum(mem.optimizer.values()))}   ({optimizer})",
            f"  activations saved for backward     {gib(mem.activations)}   (one micro-batch)",
            f"  transient above all that           {gib(mem.transient)}",
            f"  peak of live tensors               {gib(mem.peak)}   (at {mem.where})",
            f"  allowance, assumed                 {gib(mem.allowance)}   (CUDA context {CONTEXT_GIB:g} + allocator "
            f"{ALLOCATOR_SHARE:.0%} of the peak)",
            f"  needed                             {gib(mem.needed)}   of {budget:.2f} ({source}): {verdict}"]


def fit_lines(cfg, budget):
    largest = {ckpt: largest_micro_batch(cfg, budget * GIB, ckpt) for ckpt in (False, True)}
    lines = [f"largest micro-batch under {budget:.2f} GiB: {largest[False]} without activation checkpointing, "
             f"{largest[True]} with it"]
    sequences = sequences_per_step(cfg)
    for ckpt in (False, True):
        kept = keep_tokens_per_step(sequences, largest[ckpt])
        if kept:
            lines.append(f"  {sequences * cfg.block_size:,} tokens per step {'with' if ckpt else 'without'} "
                         f"checkpointing: --batch_size={kept[0]} --gradient_accumulation_steps={kept[1]}"
                         + (" --activation_checkpointing=True" if ckpt and not cfg.activation_checkpointing else ""))
            if not ckpt and not cfg.activation_checkpointing:
                break  # it fits without: no need for checkpointing
    return lines


def time_lines(cfg, model):
    flops = model.flops_per_token()  # the PaLM formula train.py's MFU uses
    tokens_per_step = sequences_per_step(cfg) * cfg.block_size
    tokens = cfg.max_iters * tokens_per_step
    mfu = MEASURED_MFU or ASSUMED_MFU
    lines = [f"compute: {flops / 1e9:.3f} GFLOP per token (forward + backward) x {count(tokens)} tokens "
             f"({cfg.max_iters:,} steps x {tokens_per_step:,}); at {mfu:.0%} MFU "
             f"({'measured by bench/gpu_suite.py' if MEASURED_MFU else 'assumed: no GPU has measured it yet'}):"]
    peaks = dict(GPU_PEAK_FLOPS)
    for card in CARDS:
        step = tokens_per_step * flops / (peaks[card] * mfu)
        run = cfg.max_iters * step
        lines.append(f"  {card.upper():9s} {peaks[card] / 1e12:6.1f} TFLOP/s bf16: {duration(step):>7s} per step, "
                     f"{duration(run):>7s}{f' ({run / 86400:.1f} days)' if run >= 86400 else ''} for the run "
                     f"(evaluations not counted)")
    params = sum(p.numel() for p in model.parameters())
    lines.append(f"tokens per parameter: {tokens / params:.1f} (compute-optimal: ~{COMPUTE_OPTIMAL_TOKENS}, "
                 f"Hoffmann et al. 2022)")
    return lines


def fsdp_card_bytes(cfg, mem, model, gpus):
    """parallel='fsdp': what one of `gpus` cards needs at mem's peak (allowance included), by arithmetic: FSDP's
    own buffers are estimated, not measured. Weights, optimizer state and, with fsdp_sync_every_micro_batch, the
    gradients are split over the cards (without it each card keeps a whole float32 gradient between
    micro-batches); added: the weights FSDP gathers in the compute dtype, the root unit (embedding, head, final
    norm: gathered from forward to backward) and two blocks (the one computing and the next, prefetched), and one
    block's whole float32 gradient before its reduce-scatter. The activations stay autocast's: FSDP's bf16
    weights keep the residual stream in bf16 too, so they are an upper bound there."""
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - cfg.n_layer * block
    grads_sharded = cfg.fsdp_sync_every_micro_batch and "2+" in mem.where  # the peak holds the gradients
    sharded = mem.weights + sum(mem.optimizer.values()) + (mem.gradients if grads_sharded else 0)
    peak = mem.peak - sharded + sharded // gpus + Dims.of(cfg, plan_dtype(cfg)).a * (root + 2 * block) + 4 * block
    return int(peak + CONTEXT_GIB * GIB + ALLOCATOR_SHARE * peak)


def fsdp_line(cfg, mem, model, budget):
    needed = {n: fsdp_card_bytes(cfg, mem, model, n) / GIB for n in FSDP_GPUS}
    return (f"parallel=fsdp, per card (weights, optimizer state{', gradients' * cfg.fsdp_sync_every_micro_batch} "
            f"split; FSDP's gathered weights added; by arithmetic): " + ", ".join(
                f"{n} GPUs {gib:.1f} GiB ({'fits' if gib <= budget else 'does NOT fit'})" for n, gib in needed.items())
            + f" of {budget:.2f}")


def kv_cache_bytes(cfg, batch_size=1, dtype_bytes=2):
    """model.KVCache's bytes for sampling (sample.py, serve.py): keys and values of every layer for block_size
    positions; grouped-query attention keeps n_kv_head heads, not n_head."""
    head_dim = cfg.n_embd // cfg.n_head
    return 2 * cfg.n_layer * batch_size * (cfg.n_kv_head or cfg.n_head) * cfg.block_size * head_dim * dtype_bytes


def plan_report(cfg):
    """The plan of cfg, as `train.py --plan` prints it."""
    model = meta_model(cfg)
    kinds = parameter_counts(model)
    embedding = kinds["token embedding"] + kinds["position embedding"]
    rest = {k: n for k, n in kinds.items() if "embedding" not in k and n}
    budget, source = budget_gib(cfg)
    batch = planned_batch(cfg, budget)
    lines = [f"plan: {describe_model(cfg)}",
             f"  {plan_dtype(cfg)}{' autocast' if plan_dtype(cfg) != 'float32' else ''}, {cfg.optimizer}, eager "
             f"(torch.compile usually keeps less: not modelled)",
             f"parameters: {count(embedding + sum(rest.values()))} = embeddings {count(embedding)} (token "
             f"{count(kinds['token embedding'])}, position {count(kinds['position embedding'])}) + non-embedding "
             f"{count(sum(rest.values()))} ({', '.join(f'{k} {count(n)}' for k, n in rest.items())})"]
    if cfg.batch_size == "auto":
        lines.append(f"batch_size='auto': micro-batch {batch}, the largest that fits and divides the step's "
                     f"{sequences_per_step(cfg)} sequences (on a GPU, confirmed at start by a forward and backward)")
    mem = step_memory(cfg, batch, model)
    lines += memory_lines(cfg, mem, budget, source) + fit_lines(cfg, budget)
    if cfg.parallel == "fsdp":  # the lines above are one card holding everything, as DDP and one process do
        lines.append(fsdp_line(cfg, mem, model, budget))
    lines += time_lines(cfg, model)
    kv = cfg.n_kv_head or cfg.n_head
    lines.append(f"sampling (sample.py, serve.py): KV cache {kv_cache_bytes(cfg) / 2 ** 20:,.1f} MiB per sequence of "
                 f"{cfg.block_size} tokens in bf16 ({kv} key/value head{'s' * (kv > 1)} x {cfg.n_layer} layers)")
    unmodelled = {"dropout": cfg.dropout > 0, "the dispersion loss": cfg.dispersion_coeff > 0,
                  "the multipliers' activations": cfg.multipliers != "none", "logit_softcap": cfg.logit_softcap > 0,
                  "the plain loss (loss_chunk_size=0)": cfg.loss_chunk_size == 0}
    if any(unmodelled.values()):
        lines.append(f"note: not modelled here: {', '.join(k for k, on in unmodelled.items() if on)}: this config "
                     f"needs more than the plan says")
    return "\n".join(lines)


def plan_summary(cfg, world=1):
    """One line for the start of a CUDA run (world: its processes)."""
    budget, source = budget_gib(cfg)
    batch = planned_batch(cfg, budget)
    mem = step_memory(cfg, batch)
    if cfg.parallel == "fsdp" and world > 1:
        needed = fsdp_card_bytes(cfg, mem, meta_model(cfg), world) / GIB
        return (f"plan: {needed:.1f} GiB needed per card of {budget:.1f} at micro-batch {batch} under FSDP on {world} "
                f"GPUs (by arithmetic; details: --plan): {'fits' if needed <= budget else 'does NOT fit'}")
    return (f"plan: {mem.needed / GIB:.1f} GiB needed of {budget:.1f} at micro-batch {batch} (peak of tensors "
            f"{mem.peak / GIB:.1f}, eager; + {mem.allowance / GIB:.1f} assumed for the CUDA context and allocator): "
            f"{'fits' if mem.needed <= budget * GIB else 'does NOT fit'}; largest micro-batch "
            f"{largest_micro_batch(cfg, budget * GIB, cfg.activation_checkpointing)}; details: --plan")


# -----------------------------------------------------------------------------
# batch_size='auto': the largest micro-batch the plan fits, confirmed on the device

def choose_batch_size(cfg, model, rt, resumed=None, trial=None):
    """cfg with batch_size='auto' resolved (any other cfg as it is). Resuming (resumed: the checkpoint's config)
    keeps the checkpoint's numbers. Otherwise: the largest micro-batch that the plan fits in the budget and that
    divides this rank's sequences per step, confirmed on a GPU by trial(b) (fits_on_device: a real forward and
    backward), stepping down when it runs out of memory; the accumulation follows, so the tokens per step stay
    the config's. rt: train.py's Runtime (device, dtype, world, ddp, log)."""
    if cfg.batch_size != "auto":
        return cfg
    if resumed is not None:
        rt.log(f"batch_size='auto': the resumed run's micro-batch {resumed['batch_size']} x "
               f"{resumed['gradient_accumulation_steps']} accumulation")
        return replace(cfg, batch_size=resumed["batch_size"],
                       gradient_accumulation_steps=resumed["gradient_accumulation_steps"])
    budget, source = budget_gib(cfg)
    planned = largest_micro_batch(cfg, budget * GIB, cfg.activation_checkpointing)
    per_rank = cfg.gradient_accumulation_steps // rt.world  # sequences per step on this rank ('auto' counted 1)
    if trial is None:  # a CPU has no out-of-memory to catch: the plan decides there
        reserve = sum(optimizer_state(meta_model(cfg), cfg).values())
        trial = (lambda b: fits_on_device(model, cfg, b, rt.device, rt.dtype, reserve)) \
            if rt.device.startswith("cuda") else (lambda b: True)
    # the plan's allowance is an assumption: when it says nothing fits, a micro-batch of 1 is still tried
    batch = next((b for b in range(min(max(planned, 1), per_rank), 0, -1) if per_rank % b == 0 and trial(b)), 0)
    if rt.ddp:  # every rank takes the same micro-batch: the smallest that fits everywhere
        agreed = torch.tensor([batch], device=rt.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        batch = int(agreed)
    if batch == 0:
        raise ConfigError(f"batch_size='auto': not even a micro-batch of 1 fits in {budget:.1f} GiB ({source}): "
                          f"try activation_checkpointing=True or a smaller model")
    accum = cfg.gradient_accumulation_steps // batch
    rt.log(f"batch_size='auto': micro-batch {batch} x {accum} accumulation = "
           f"{batch * accum * cfg.block_size:,} tokens per step (the plan fits up to {planned} in {budget:.1f} GiB, "
           f"{source}{'; confirmed by a forward and backward' if rt.device.startswith('cuda') else ''})")
    return replace(cfg, batch_size=batch, gradient_accumulation_steps=accum)


def fits_on_device(model, cfg, batch_size, device, dtype, reserve):
    """Whether two micro-batches' forward and backward run on the device at this size with `reserve` bytes held
    aside (the optimizer state the first step will create). Leaves no gradients and no random draws behind."""
    try:
        with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
            _forward_backward(model, cfg, batch_size, device, dtype, reserve)
        fits = True
    except torch.OutOfMemoryError:
        fits = False
    model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the trial's blocks back to the card: the run starts from a clean allocator
    return fits


def _forward_backward(model, cfg, batch_size, device, dtype, reserve):
    held = torch.empty(reserve, dtype=torch.uint8, device=device)  # noqa: F841 (held while the trial runs)
    x = torch.randint(min(cfg.vocab_size, 50257), (batch_size, cfg.block_size), device=device)
    for _ in range(2):  # the second micro-batch finds the first one's gradients, as in training
        with autocast(device, dtype):
            _, losses = model(x, x)
        losses["loss"].backward()
