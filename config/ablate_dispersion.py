# Ablation overlay: the dispersion loss on. Use after a base config, e.g.
#   python train.py config/train_fineweb_40m.py                                # baseline
#   python train.py config/train_fineweb_40m.py config/ablate_dispersion.py   # + dispersion
# lambda 0.1 and tau 1.0 are the authors' defaults; late_half (blocks n/2..n-1) was best in their layer
# ablation. Step time +0.6% on the 40M config on CPU (BENCHMARKS.md; GPU not measured).
out_dir = "out/fineweb-40m-dispersion"
dispersion_coeff = 0.1
dispersion_tau = 1.0
dispersion_layers = "late_half"
