# The 40M run of config/train_fineweb_40m.py with the modern block, for a 12 GB RTX 4070: exactly a Qwen3
# architecture (RoPE, RMSNorm, SwiGLU, QK-norm, no biases, tied head), so the checkpoint maps 1:1 onto
# transformers' Qwen3ForCausalLM (docs/model.md). Same data, tokens per step, steps and schedule as the GPT-2 run.
# 12 layers x 384 wide, 6 heads of 64. SwiGLU hidden 1024 = 8/3 x 384: three matrices of 384 x 1024 hold the
# parameters of GELU's two of 384 x 1536. 40.6M parameters: 21.2M in the blocks + 19.3M in the tied embedding.
# Micro-batch 16: `--plan` gives 4.2 GiB of live tensors at 16 (3.4 GiB of activations), 5.2 GiB with its assumed
# allowance: fits 12 GiB, up to 46 would (eager PyTorch's figures, exact on a CPU, not yet measured on a GPU).
# Learning rate: the GPT-2 run's 5e-4 (a known-good AdamW value at this size), untuned for this block. QK-norm
# keeps attention logits bounded, which lets larger learning rates train stably (Wortsman et al. 2023), so a
# higher value may well be better: an estimate until the issue-13 comparison has swept it.
out_dir = "out/fineweb-40m-modern"
data_dir = "data/fineweb"
n_layer = 12
n_head = 6
n_embd = 384
block_size = 1024
pos_emb = "rope"
rope_theta = 10000.0  # Llama 2's value; the 1024-token context needs no larger base
norm = "rmsnorm"
qk_norm = True
mlp = "swiglu"
mlp_hidden = 1024
bias = False
tie_embeddings = True
batch_size = 16
gradient_accumulation_steps = 32  # 16 batch * 1024 tokens * 32 accum = 524,288 tokens per step
max_iters = 6000
learning_rate = 5e-4
warmup_iters = 300
lr_decay_iters = 6000
min_lr = 5e-5
eval_interval = 250
eval_iters = 50  # 50 x 16 x 1024 = 819,200 validation tokens (compare the val tokens prepare.py prints)
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
