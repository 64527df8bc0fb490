# Ablation overlay: learnable multipliers without the per-token embedding multiplier (the channel multiplier
# only), to measure what the per-token one changes against config/ablate_multipliers.py (docs/RESULTS.md).
#   python train.py config/train_fineweb_40m.py config/ablate_multipliers_no_token.py
out_dir = "out/fineweb-40m-multipliers-no-token"
multipliers = "vector"
token_multipliers = False
multiplier_weight_decay = 2e-3
multiplier_lr_scale = 1.0
