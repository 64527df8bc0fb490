# Ablation overlay: the dispersion loss on, as the authors' published command runs it (every block). Use after a
# base config, e.g.
#   python train.py config/train_fineweb_40m.py                                # baseline
#   python train.py config/train_fineweb_40m.py config/ablate_dispersion.py   # + dispersion on all blocks
# lambda 0.1 and tau 1.0 are the authors' defaults. config/ablate_dispersion_late.py applies it to the late half
# of the blocks only, the best setting of the paper's layer ablation. Step time +0.6% on the 40M config on CPU
# (BENCHMARKS.md; GPU not measured).
out_dir = "out/fineweb-40m-dispersion"
dispersion_coeff = 0.1
dispersion_tau = 1.0
dispersion_layers = "all"
