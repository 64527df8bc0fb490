# A 1.2B model for 2 to 8 GPUs of 12 GB with FSDP: too big for DDP, which keeps a whole copy per card. Run it as
#   torchrun --standalone --nproc_per_node=4 train.py config/train_fineweb_1b_fsdp.py      (2, 4 or 8 GPUs)
# The modern block with grouped-query attention (a Qwen3 architecture: exports to Qwen3ForCausalLM), Muon.
# 24 layers x 2048 wide, 16 query heads of 128 sharing 4 key/value heads, SwiGLU hidden 5632 (2.75 x 2048).
# 1185.3M parameters: 1082.2M in the blocks + 103.0M in the tied embedding (tests/test_fsdp.py counts them).
#
# Memory (not measured: no multi-GPU machine has run it yet). Training state: float32 weights 4.7 GB + float32
# gradients 4.7 GB + Muon's momentum on the block matrices 4.3 GB + AdamW's two moments on the embedding 0.8 GB =
# 14.6 GB (13.6 GiB; tests/test_fsdp.py adds it up).
# - DDP holds all of it on every card: more than a 12 GB card (12 GiB) has before the first activation
#   (`python train.py config/train_fineweb_1b_fsdp.py --plan`: 18.2 GiB needed on one card at micro-batch 4).
# - FSDP holds 1/N of it, plus the weights it gathers for the units being computed and a block's gradient before
#   its reduce-scatter. --plan, per card at micro-batch 4 with activation checkpointing: 11.2 GiB on 2 GPUs, 7.5
#   on 4, 5.6 on 8 (micro-batch 8 would need 12.2 on 2: it suits 4 GPUs and more). These are the planner's
#   activations (measured on CPU) and FSDP's buffers by arithmetic, not a GPU measurement: check with a short run.
# - fsdp_sync_every_micro_batch: reduce-scatter after each micro-batch. Otherwise every card would keep a whole
#   float32 gradient (4.4 GiB) between micro-batches, and 2 cards would no longer suffice (--plan: 13.7 GiB).
out_dir = "out/fineweb-1b-fsdp"
data_dir = "data/fineweb"
parallel = "fsdp"
fsdp_sync_every_micro_batch = True
activation_checkpointing = True
n_layer = 24
n_head = 16
n_kv_head = 4
n_embd = 2048
block_size = 1024
pos_emb = "rope"
rope_theta = 10000.0
norm = "rmsnorm"
qk_norm = True
mlp = "swiglu"
mlp_hidden = 5632
bias = False
tie_embeddings = True
batch_size = 4  # 8 fits on 4 GPUs and more (--plan): with --batch_size=8 --gradient_accumulation_steps=64
gradient_accumulation_steps = 128  # 4 batch * 1024 tokens * 128 accum = 524,288 tokens per step (over all GPUs:
# 64 micro-batches per GPU on 2, 16 on 8)
max_iters = 19073  # 10B tokens: one pass over FineWeb's sample/10BT (8 tokens per parameter; Chinchilla's is 20)
learning_rate = 3e-4  # the gains' lr and the schedule's peak; half the 124M run's (larger models take smaller)
warmup_iters = 715
lr_decay_iters = 19073
min_lr = 3e-5
eval_interval = 500  # each evaluation also writes the sharded last checkpoint (~14.6 GB)
eval_iters = 192  # 192 x 4 x 1024 = 786,432 validation tokens
# Optimizer: Muon on the block matrices, AdamW on the tied embedding and the gains (docs/muon.md), with the
# defaults (muon_lr 0.02, momentum 0.85 -> 0.95 over 300 steps, adam_embed_lr 3.6e-3): modded-nanogpt's values at
# 124M, as the 124M modern run uses them; untuned at 1.2B (an estimate, not a measurement).
optimizer = "muon"
