# The base of the CPU ablation in docs/RESULTS.md: a 6 x 256 GPT (17.6M parameters, 4.7M outside the tied
# embedding) trained for 120 steps of 2,048 tokens (246k tokens) on the shared English sample. One run took
# 6.4-7.7 minutes on one CPU thread, two runs side by side on 2 cores; docs/RESULTS.md has the sweep's commands:
#   python ablate.py --base=config/train_cpu_ablation.py --data_dir=data/sample --seeds=1,2,3 --variants=...
out_dir = "out/cpu-ablation"
n_layer = 6
n_head = 4
n_embd = 256
block_size = 256
batch_size = 8
gradient_accumulation_steps = 1  # 8 x 256 = 2,048 tokens per step
max_iters = 120
learning_rate = 2e-3
warmup_iters = 12
lr_decay_iters = 120
min_lr = 2e-4
eval_interval = 60
eval_iters = 12  # 24,576 held-out tokens, the same windows for every run: paired differences compare like with like
log_interval = 20
condensation_seqs = 16
device = "cpu"
dtype = "float32"
compile = False  # compiling costs more than a 120-step CPU run
