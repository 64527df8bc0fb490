"""The config system: files, overrides, types, and one clear line for every mistake."""
import ast
import re
from dataclasses import fields

import pytest
from conftest import REPO, run_script

from smallgpt.config import ConfigError, TrainConfig, describe, load_train_config, parse_args

NANOGPT_CONFIG = '''
# config/train_shakespeare_char.py as nanoGPT ships it
import time
out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10
always_save_checkpoint = False
wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt' + str(2)
dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
'''


def test_defaults_and_every_key_documented():
    cfg = load_train_config([])
    assert cfg == TrainConfig()
    text = describe(TrainConfig)
    for key in TrainConfig.__dataclass_fields__:
        line = next(line for line in text.splitlines() if line.strip().startswith(f"--{key}="))
        assert len(line.split(None, 1)[1].strip()) > 10, f"{key} has no documented meaning"


def test_nanogpt_config_file_works(tmp_path):
    path = tmp_path / "train_shakespeare_char.py"
    path.write_text(NANOGPT_CONFIG)
    cfg = load_train_config([str(path), "--batch_size=32", "--learning_rate=1", "--compile=False"])
    assert cfg.n_layer == 6 and cfg.dropout == 0.2 and cfg.wandb_run_name == "mini-gpt2"
    assert cfg.batch_size == 32 and cfg.compile is False
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # nanoGPT failed on --lr=1
    assert cfg.data_dir == "data/shakespeare_char"


def test_files_apply_in_order_then_overrides():
    cfg = load_train_config([str(REPO / "config/train_fineweb_40m.py"), str(REPO / "config/ablate_dispersion.py"),
                             "--out_dir=x=y", "--dispersion_layers=3,4"])
    assert cfg.n_embd == 384 and cfg.dispersion_coeff == 0.1 and cfg.out_dir == "x=y"  # split on the first '='
    assert cfg.dispersion_block_indices() == [3, 4]


@pytest.mark.parametrize("args, message", [
    (["--learning_rat=1e-3"], "unknown key 'learning_rat' in the command line (did you mean 'learning_rate'?)"),
    (["--batch_size=1.5"], "batch_size expects int or 'auto', got 1.5"),
    (["--batch_size=many"], "batch_size expects int or 'auto', got 'many'"),
    (["--batch_size=Auto"], "batch_size expects int or 'auto', got 'Auto'"),
    (["--n_layer=auto"], "n_layer expects int, got 'auto'"),  # only batch_size takes 'auto'
    (["--gpu_memory_gb=-1"], "gpu_memory_gb must not be negative"),
    (["--compile=yes"], "compile expects bool"),
    (["--n_embd=100", "--n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
    (["--lr_schedule=linear"], "lr_schedule must be one of cosine, wsd"),
    (["--multipliers=matrix"], "multipliers must be"),
    (["--batch_size=0"], "batch_size must be positive"),
    (["--max_iters"], "--max_iters needs a value"),
    (["no/such/config.py"], "cannot read config file no/such/config.py"),
    (["--n_head=0"], "n_head must be positive, not 0"),
    (["--learning_rate=-1"], "learning_rate must be positive"),
    (["--learning_rate=1e400"], "learning_rate must be a finite number"),
    (["--beta2=1.5"], "beta2 must be in [0, 1)"),
    (["--min_lr=-1e-4"], "min_lr must not be negative"),
    (["--weight_decay=-0.1"], "weight_decay must not be negative"),
    (["--grad_clip=-1"], "grad_clip must not be negative"),
    (["--seed=-1"], "seed must not be negative"),
    (["--wsd_decay_frac=2"], "wsd_decay_frac must be in [0, 1]"),
    (["--loss_spike_factor=0.9"], "loss_spike_factor must be above 1 (a multiple of the recent median) or 0 (off)"),
    (["--grad_spike_factor=-2"], "grad_spike_factor must not be negative"),
    (["--loss_chunk_size=-5"], "loss_chunk_size must be >= 0"),
])
def test_mistakes_name_the_key(args, message):
    with pytest.raises(ConfigError) as e:
        load_train_config(args)
    assert message in str(e.value)


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("n_layer = '12'\nwarmup = 5\n")
    with pytest.raises(ConfigError, match="n_layer expects int, got '12'"):
        load_train_config([str(path)])
    path.write_text("n_layer = 12\nwarmup = 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'warmup' in .*c.py \(did you mean 'warmup_iters'\?\)"):
        load_train_config([str(path)])


def test_batch_size_auto_keeps_the_tokens_per_step(tmp_path):
    """'auto' (from a file or the command line) replaces the micro-batch in effect; until train.py resolves it, the
    accumulation counts every sequence of the step, so batch x accumulation stays the config's."""
    base = str(REPO / "config/train_fineweb_40m.py")  # 16 x 32
    cfg = load_train_config([base, "--batch_size=auto"])
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == ("auto", 16 * 32)
    cfg = load_train_config([base, "--batch_size=auto", "--gradient_accumulation_steps=8"])
    assert cfg.gradient_accumulation_steps == 16 * 8  # the accumulation given after 'auto' counts too
    path = tmp_path / "auto.py"
    path.write_text("batch_size = 'auto'\ngradient_accumulation_steps = 4\n")
    assert load_train_config([str(path)]).gradient_accumulation_steps == 12 * 4  # it replaced the default 12
    assert load_train_config([base, str(path), "--batch_size=auto"]).gradient_accumulation_steps == 16 * 4
    assert load_train_config([base, "--batch_size=auto", "--batch_size=8"]).gradient_accumulation_steps == 32
    import eval as eval_script  # a script whose batch_size is no micro-batch of training: 'auto' means nothing there
    with pytest.raises(ConfigError, match="batch_size expects int, got 'auto'"):
        parse_args(eval_script.EvalConfig, ["--batch_size=auto"])


def test_config_file_that_is_not_text(tmp_path):
    path = tmp_path / "c.py"
    path.write_bytes(b"\xff\xfe n_layer = 2")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_train_config([str(path)])


@pytest.mark.parametrize("device, message", [("tpu", "is not a device name"), ("", "is not a device name"),
                                             ("cuda:99", "is not available on this machine")])
def test_unusable_device_is_a_config_error(device, message):
    from smallgpt.device import select_device
    with pytest.raises(ConfigError, match=message):
        select_device(device)
    assert select_device("cpu") == "cpu"


def test_bool_flag_without_value():
    assert parse_args(TrainConfig, ["--eval_only"]).eval_only is True


@pytest.mark.slow
def test_train_py_reports_one_line(tmp_path):
    result = run_script("train.py", "config/train_tiny.py", "--n_layr=2", check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == ("train.py: config error: unknown key 'n_layr' in the command line "
                                     "(did you mean 'n_layer'?)")
    result = run_script("train.py", "config/train_tiny.py", f"--data_dir={tmp_path}", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no token data" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_config_file_calling_sys_exit_is_reported(tmp_path):
    """exec of a config file that calls sys.exit(0) must not end train.py silently with status 0."""
    path = tmp_path / "exits.py"
    path.write_text("import sys\nn_layer = 2\nsys.exit(0)\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} called sys.exit(0) while being read")):
        load_train_config([str(path)])
    result = run_script("train.py", str(path), check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"train.py: config error: {path} called sys.exit(0) while being read"


@pytest.mark.slow
def test_help_lists_keys():
    result = run_script("train.py", "--help")
    assert "--dispersion_coeff=0.0" in result.stdout and "--learning_rate=0.0006" in result.stdout


def test_every_key_is_documented_in_help():
    """--help is the reference of the keys (the README does not repeat them): each has its default and a meaning."""
    text = describe(TrainConfig)
    for f in fields(TrainConfig):
        row = re.search(rf"^  --{f.name}=(.*?)\s{{2,}}(.*)$", text, re.M)
        assert row, f"--help lacks {f.name}"
        assert ast.literal_eval(row.group(1)) == f.default and row.group(2).strip(), f"--help row of {f.name}"