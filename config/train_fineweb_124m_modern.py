# GPT-2 small's size (config/train_fineweb.py) with the modern block, on a single 12 GB card: exactly a Qwen3
# architecture (RoPE, RMSNorm, SwiGLU, QK-norm, no biases, tied head), so the checkpoint maps 1:1 onto
# transformers' Qwen3ForCausalLM (docs/model.md). Same data, tokens per step, steps and schedule as the GPT-2 run.
# 12 layers x 768 wide, 12 heads of 64. SwiGLU hidden 2048 = 8/3 x 768 (the parameters of GELU's 4x MLP).
# 123.6M parameters: 85.0M in the blocks + 38.6M in the tied embedding.
# Micro-batch 16: an estimate, not measured on a GPU. BENCHMARKS.md ("modern block") has the CPU bf16 activation
# measurement it rests on. If it does not fit: --batch_size=8 --gradient_accumulation_steps=64 (same tokens per
# step), then --activation_checkpointing=True.
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
batch_size = 16
gradient_accumulation_steps = 32  # 16 batch * 1024 tokens * 32 accum = 524,288 tokens per step
max_iters = 19073
learning_rate = 6e-4
warmup_iters = 715  # 375M tokens, as in GPT-3 small
lr_decay_iters = 19073
min_lr = 6e-5
eval_interval = 250
eval_iters = 50
