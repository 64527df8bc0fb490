# Ablation overlay: the dispersion loss and learnable multipliers together. Use after a base config:
#   python train.py config/train_fineweb_40m.py config/ablate_both.py
out_dir = "out/fineweb-40m-both"
dispersion_coeff = 0.1
dispersion_tau = 1.0
dispersion_layers = "all"  # the authors' published setting, as config/ablate_dispersion.py
multipliers = "vector"
multiplier_weight_decay = 2e-3
