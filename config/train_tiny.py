# A tiny GPT that trains on a laptop CPU in a minute or two: the CPU quick start and the tests use it.
# Cost: ~0.4 s per step on 2 CPU cores, ~1.5 minutes in all; measured on 5,000 documents of the English sample:
# val loss 10.56 at step 0, 5.23 at 50, 4.59 at 200.
# Data: where the README's quick start prepares it (python data/fineweb/prepare.py --max_docs=5000 --val_docs=200
# --out_dir=data/sample).
data_dir = "data/sample"
out_dir = "out/tiny"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 8
gradient_accumulation_steps = 2  # 8 batch * 64 tokens * 2 accum = 1,024 tokens per step
max_iters = 200
learning_rate = 2e-3
warmup_iters = 20
lr_decay_iters = 200
min_lr = 2e-4
eval_interval = 50
eval_iters = 8
log_interval = 10
condensation_seqs = 8
compile = False  # compiling takes longer than this whole run on a CPU
