# GPT-2 small's size (config/train_fineweb.py) with the modern block, on a single 12 GB card: exactly a Qwen3
# architecture (RoPE, RMSNorm, SwiGLU, QK-norm, no biases, tied head), so the checkpoint maps 1:1 onto
# transformers' Qwen3ForCausalLM (docs/model.md). Same data, tokens per step, steps and schedule as the GPT-2 run.
# 12 layers x 768 wide, 12 heads of 64. SwiGLU hidden 2048 = 8/3 x 768 (the parameters of GELU's 4x MLP).
# 123.6M parameters: 85.0M in the blocks + 38.6M in the tied embedding.
# Micro-batch 8 (not GPT-2's 16): `--plan` gives 5.5 GiB of live tensors at 8, 6.5 GiB with its assumed allowance;
# at 16 it gives 10.1 GiB of 12, which fits on paper (up to 20 would) with little margin while no GPU has checked
# the plan (eager PyTorch's figures, exact on a CPU). After a GPU check: --batch_size=16 --gradient_accumulation_steps=32,
# or --batch_size=auto.
# Learning rate: the GPT-2 run's 6e-4 (GPT-3 small's), untuned for this block; QK-norm tolerates larger ones
# (Wortsman et al. 2023), so a higher value may be better: an estimate until a sweep has measured it.
out_dir = "out/fineweb-124m-modern"
data_dir = "data/fineweb"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
pos_emb = "rope"
rope_theta = 10000.0  # Llama 2's value; the 1024-token context needs no larger base
norm = "rmsnorm"
qk_norm = True
mlp = "swiglu"
mlp_hidden = 2048
bias = False
tie_embeddings = True
batch_size = 8
gradient_accumulation_steps = 64  # 8 batch * 1024 tokens * 64 accum = 524,288 tokens per step
max_iters = 19073
learning_rate = 6e-4
warmup_iters = 715  # 375M tokens, as in GPT-3 small
lr_decay_iters = 19073
min_lr = 6e-5
eval_interval = 250
eval_iters = 100  # 100 x 8 x 1024 = 819,200 validation tokens, as the GPT-2 run
# Optimizer: Muon on the block matrices, AdamW on the tied embedding and the gains (docs/muon.md). Muon lr 0.02,
# Nesterov momentum 0.85 -> 0.95 over the first 300 steps and no Muon weight decay are modded-nanogpt's published
# values at 124M on 524k-token steps (nanochat d12 uses the same lr); the tied embedding's AdamW lr 3.6e-3 is
# modded-nanogpt record #7's (tied head, Muon 0.02). learning_rate above stays the gains' lr and the schedule's
# peak: every group follows its warm-up and decay. Estimates for this size, not tuned on a GPU; the CPU comparison
# in BENCHMARKS.md ("The 2026 recipe") is far smaller.
optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.95
muon_momentum_start = 0.85
muon_momentum_warmup = 300
muon_weight_decay = 0.0
adam_embed_lr = 3.6e-3
