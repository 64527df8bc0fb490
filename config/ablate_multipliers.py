# Ablation overlay: learnable multipliers on (row and column multipliers on every block matrix, a channel and a
# per-token multiplier on the embedding lookup; none on the tied LM head). Use after a base config, e.g.
#   python train.py config/train_fineweb_40m.py config/ablate_multipliers.py
# Multiplier weight decay 2e-3 is the paper's; the matrices keep weight_decay.
out_dir = "out/fineweb-40m-multipliers"
multipliers = "vector"
multiplier_weight_decay = 2e-3
multiplier_lr_scale = 1.0
