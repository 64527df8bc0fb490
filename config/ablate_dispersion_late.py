# Ablation overlay: the dispersion loss on the late half of the blocks (n/2 .. n-1), the best setting of the
# paper's layer ablation; config/ablate_dispersion.py is the authors' published command (every block).
#   python train.py config/train_fineweb_40m.py config/ablate_dispersion_late.py
out_dir = "out/fineweb-40m-dispersion-late"
dispersion_coeff = 0.1
dispersion_tau = 1.0
dispersion_layers = "late_half"
