"""plot.py and metrics.py: the reader of metrics.jsonl, and the picture and table from real tiny runs (one run,
three overlaid, one still being written)."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_script

from smallgpt.errors import ConfigError, DataError
from smallgpt.metrics import read_records, summarize
from smallgpt.monitor import duration
from plot import PANELS, Run, draw_panel, main, options, panels_with_data, smooth, spread, table_rows

# three few-second runs of config/train_tiny.py: a baseline and the two research features (their panels)
TINY = ["config/train_tiny.py", "--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--eval_iters=2", "--condensation_seqs=2", "--log_interval=2",
        "--max_iters=8", "--eval_interval=4", "--warmup_iters=2", "--lr_decay_iters=8", "--compile=False"]
VARIANTS = {"base": [], "disp": ["--dispersion_coeff=0.1"], "mult": ["--multipliers=vector"]}


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, token_dir):
    """out_dirs of the three runs, trained once per session; treat as read-only."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in VARIANTS.items():
        run_script("train.py", *TINY, *extra, f"--data_dir={token_dir}", f"--out_dir={root / name}")
    return {name: root / name for name in VARIANTS}


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def markdown_rows(stdout):
    """The markdown table's cells, header first (the separator row dropped)."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for i, line in enumerate(lines) if i != 1]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a real picture with panels, not an empty figure


# --- units

def test_reader_skips_only_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"type": "train", "iter": 0, "loss": 10.0}, {"type": "eval", "iter": 1, "val_loss": 9.0}]
    text = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(text + '{"type": "train", "it')  # what a writer killed (or still writing) leaves
    assert read_records(tmp_path) == good == read_records(str(path))
    path.write_text('{"type": "train", "it\n' + text)  # damage in the middle is not a run being written
    with pytest.raises(DataError, match="line 1 is not a JSON record"):
        read_records(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metrics.jsonl in"):
        read_records(tmp_path / "empty")


def test_summary_and_estimated_wall_time():
    records = [{"type": "train", "iter": 1, "ms": 100.0, "tokens": 200}, {"type": "eval", "iter": 2, "val_loss": 5.0,
               "val_bpb": 2.0}, {"type": "train", "iter": 3, "ms": 300.0, "tokens": 400},
               {"type": "eval", "iter": 4, "val_loss": 6.0, "val_bpb": 2.5}]
    s = summarize(records, at=(2, 3))
    assert (s["best_val_loss"], s["best_iter"], s["last_val_loss"], s["last_iter"]) == (5.0, 2, 6.0, 4)
    assert (s["best_val_bpb"], s["last_val_bpb"], s["tokens"], s["iters"]) == (2.0, 2.5, 400, 4)
    assert s["val_loss_at"] == {2: 5.0, 3: None}
    assert (s["wall_s"], s["wall_exact"]) == (pytest.approx(0.1 * 2 + 0.3 * 2), False)  # ms x steps, evals not counted
    s = summarize(records + [{"type": "eval", "iter": 4, "time_s": 12.5, "val_loss": 6.0, "val_bpb": 2.5}])
    assert (s["wall_s"], s["wall_exact"]) == (12.5, True)


def test_smoothing_and_column_choice():
    assert smooth(np.array([3.0, 3.0, 3.0]), 0.9).tolist() == pytest.approx([3.0, 3.0, 3.0])  # bias-corrected
    assert smooth(np.array([0.0, 10.0]), 0.5)[1] == pytest.approx(10 * 0.5 / 0.75)
    assert spread([1, 2, 3], 4) == [1, 2, 3]
    assert spread(list(range(10, 110, 10)), 4) == [10, 40, 70, 100]


# --- through the real entry point, on real runs

@pytest.mark.slow
def test_one_run_picture_and_table_match_the_jsonl(tiny_runs):
    run = tiny_runs["base"]
    result = run_script("plot.py", run, "--markdown", "--smooth=0.5")
    assert_png(run / "plot.png")
    header, row = markdown_rows(result.stdout)
    cells = dict(zip(header, row))
    records = jsonl(run / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "eval"]
    best = min(evals, key=lambda r: r["val_loss"])
    assert cells["run"] == str(run) and cells["steps"] == "8"
    assert cells["tokens"] == f"{records[-2]['tokens']:,}" == f"{8 * 4 * 32 * 2:,}"
    assert cells["best val loss (iter)"] == f"{best['val_loss']:.4f} ({best['iter']})"
    assert cells["last val loss (iter)"] == f"{evals[-1]['val_loss']:.4f} (8)"
    assert cells["last bpb"] == f"{evals[-1]['val_bpb']:.4f}"
    assert cells["val loss @4"] == f"{evals[1]['val_loss']:.4f}"
    assert cells["wall time"] == duration(records[-2]["time_s"])  # the run's own clock (train.py's time_s)


@pytest.mark.slow
def test_three_runs_overlay_and_a_run_still_being_written(tiny_runs, tmp_path):
    growing = tmp_path / "growing"
    shutil.copytree(tiny_runs["mult"], growing)
    lines = (growing / "metrics.jsonl").read_text().splitlines(keepends=True)
    (growing / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])  # eval 8, half
    out = tmp_path / "three.png"
    runs = [tiny_runs["base"], tiny_runs["disp"], growing]
    result = run_script("plot.py", *runs, f"--out={out}", "--logx")
    assert_png(out)
    rows = [line.split() for line in result.stdout.splitlines()[1:4]]
    assert [r[0] for r in rows] == list(map(str, runs))
    # the growing run's last complete evaluation is iter 4: the shared columns stop there
    assert "val loss @4" in result.stdout and "@8" not in result.stdout
    for r, run in zip(rows, runs):
        complete = jsonl(run / "metrics.jsonl") if run != growing else [json.loads(l) for l in lines[:-1]]
        assert r[-2] == f"{[e for e in complete if e['type'] == 'eval' and e['iter'] == 4][0]['val_loss']:.4f}"
    table = run_script("plot.py", *runs, "--table").stdout  # the table alone: no picture written
    assert table.splitlines()[1:4] == result.stdout.splitlines()[1:4] and "wrote" not in table


@pytest.mark.slow
def test_user_mistakes_are_one_line(tmp_path):
    result = run_script("plot.py", tmp_path / "missing", check=False)
    assert result.returncode == 1 and "no such file" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "metrics.jsonl").write_text("")
    result = run_script("plot.py", tmp_path, check=False)
    assert result.returncode == 1 and "nothing to plot yet" in result.stderr
    result = run_script("plot.py", tmp_path, "--smooth=1.5", check=False)
    assert result.returncode == 1 and result.stderr == "plot.py: config error: smooth must be in [0, 1), not 1.5\n"


def test_hellaswag_panel_from_eval_downstream_records(tmp_path):
    """eval.py appends records of type eval_downstream; their accuracies get a panel, their counts do not, and their
    val loss does not join the training run's val curve."""
    rows = [{"type": "train", "iter": 9, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "ms": 1.0, "tok_s": 1.0,
             "tokens": 1000}, {"type": "eval", "iter": 10, "val_loss": 4.0, "val_bpb": 2.0},
            {"type": "eval_downstream", "iter": 10, "task": "hellaswag", "hellaswag_acc": 0.26,
             "hellaswag_acc_norm": 0.27, "hellaswag_items": 1000, "time": "2026-12-02T01:00:00"},
            {"type": "eval_downstream", "iter": 10, "task": "val", "val_loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = Run(str(tmp_path))
    panels = {p[0]: p for p in panels_with_data([run], "tokens")}
    assert [label for label, _, _ in panels["HellaSwag"][3]] == ["hellaswag_acc", "hellaswag_acc_norm"]
    x, y = run.series(*panels["HellaSwag"][3][0][1:], "tokens")
    assert x.tolist() == [1000.0] and y.tolist() == [0.26]  # iter 10 = after 10 steps of 100 tokens
    assert run.series(("eval",), "val_loss", "tokens")[1].tolist() == [4.0]


def test_weight_norm_and_residual_panels_average_over_layers(tmp_path):
    """The mechanism the multiplier paper is about, per evaluation: each matrix kind's raw norm averaged over
    layers, and the residual stream's RMS at the embedding and after the last block."""
    ev = {"type": "eval", "iter": 4, "val_loss": 4.0, "val_bpb": 2.0, "resid/rms_l0": 0.5, "resid/rms_l1": 2.0,
          "resid/rms_l2": 3.0, **{f"norm/h{i}.{kind}": 1.0 + i + j for i in range(2)
                                  for j, kind in enumerate(("qkv", "attn_out", "fc", "mlp_out"))}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ev) + "\n")
    run = Run(str(tmp_path))
    panels = {p[0]: p for p in panels_with_data([run], "steps")}
    norms = panels["weight norms (raw W, mean over layers)"][3]
    assert [run.series(kinds, key, "steps")[1].tolist() for _, kinds, key in norms] == [[1.5], [2.5], [3.5], [4.5]]
    resid = panels["residual stream RMS"][3]
    assert [run.series(kinds, key, "steps")[1].tolist() for _, kinds, key in resid] == [[0.5], [3.0]]


@pytest.mark.slow
def test_the_table_needs_no_matplotlib(tmp_path):
    rows = [{"type": "train", "iter": 0, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "ms": 2000.0, "tok_s": 1.0,
             "tokens": 100}, {"type": "eval", "iter": 1, "val_loss": 4.0, "val_bpb": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', *sys.argv[1:]]; import plot; "
            "from smallgpt.errors import run_main; run_main(plot.main)")
    table = subprocess.run([sys.executable, "-c", code, str(tmp_path), "--table"], cwd=REPO, capture_output=True,
                           text=True)
    assert table.returncode == 0 and "4.0000 (1)" in table.stdout and "~2.0s" in table.stdout
    picture = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert picture.returncode == 1 and picture.stderr.strip() == ("plot.py: error: the picture needs matplotlib: "
                                                                  "pip install matplotlib (or print only the table: --table)")


# --- the command line: one dialect with the other scripts

def test_runs_first_then_key_value_options(tmp_path, capsys):
    opt = options(["out/a", "out/b/metrics.jsonl", "--smooth=0.9", "--logx", "--out=ab.svg"])
    assert (opt.runs, opt.smooth, opt.logx, opt.table, opt.out) == (["out/a", "out/b/metrics.jsonl"], 0.9, True, False, "ab.svg")
    assert options([str(tmp_path)]).out == str(tmp_path / "plot.png")  # one run: beside its metrics
    assert options(["out/a", "out/b"]).out == "plot.png"
    for argv, message in [(["out/a", "--smoth=0.5"], "unknown key 'smoth' in the command line (did you mean 'smooth'?)"),
                          (["out/a", "--smooth", "0.5"], "--smooth needs a value: --smooth=..."),
                          (["out/a", "--smooth=strong"], "smooth expects float, got 'strong'"),
                          (["out/a", "--smooth=1"], "smooth must be in [0, 1), not 1.0"),
                          (["out/a", "--out=a.txt"], "out must name a .png, .pdf or .svg file, not 'a.txt'"),
                          (["--table"], "name at least one run")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            options(argv)
    with pytest.raises(SystemExit):
        options(["--help"])
    shown = capsys.readouterr().out
    assert shown.startswith("usage: python plot.py RUN [RUN ...] [--key=value ...]") and "--runs" not in shown
    assert "keys (as --key=value):" in shown and "--smooth=0.0" in shown


# --- records as a person may have edited them

def handmade_records():
    """A run's records as train.py and eval.py write them, every panel's key present."""
    train = [{"type": "train", "iter": i, "loss": 5.0 - i / 10, "lr": 1e-3, "grad_norm": 1.0 + i, "ms": 100.0,
              "tok_s": 1000.0, "mfu": 0.1, "dispersion": 0.5, "tokens": 100 * (i + 1), "time_s": 0.1 * i,
              "mult/min": 0.9, "mult/rms": 1.0, "mult/max": 1.1, "mult/h0.qk_ratio": 1.0, "mult/h1.qk_ratio": 1.2}
             for i in range(4)]
    evals = [{"type": "eval", "iter": i, "val_loss": 5.0 - i / 4, "val_bpb": 2.0 - i / 8, "cond/spearman": 1.0,
              "cond/kendall": 1.0, "cond/mean_cos_l0": 0.1, "cond/mean_cos_l1": 0.3, "resid/rms_l0": 0.5,
              "resid/rms_l1": 2.0, "norm/h0.qkv": 3.0, "time_s": 0.1 * i} for i in (0, 2, 4)]
    return train + evals + [{"type": "eval_downstream", "iter": 4, "task": "hellaswag", "hellaswag_acc": 0.25},
                            {"type": "health", "iter": 3, "what": "loss", "value": 9.0}]


def table_and_series(path):
    """What plot.py computes from a metrics file, short of drawing: the table and every panel's series."""
    run = Run(str(path))
    table_rows([run])
    for panel in panels_with_data([run], "tokens"):
        for _, kinds, key in panel[3]:
            run.series(kinds, key, "tokens")
    return run


def test_hand_edited_records_are_left_out_or_one_error(tmp_path):
    """Each value of each record removed, or replaced by a string, null, a list or NaN: the table and every series
    are still computed (the value is left out), except that a record without a whole-number iter or a type is one
    DataError naming its line."""
    records, path = handmade_records(), tmp_path / "metrics.jsonl"
    for i, record in enumerate(records):
        for key in record:
            for value in (None, "12", [1], float("nan"), 2.5, "missing"):
                edited = dict(record)
                if value == "missing":
                    del edited[key]
                else:
                    edited[key] = value
                path.write_text("".join(json.dumps(r) + "\n" for r in records[:i] + [edited] + records[i + 1:]))
                if key == "iter" or key == "type" and not isinstance(edited.get("type"), str):  # "12" is a type
                    with pytest.raises(DataError, match=f"line {i + 1} is not a metrics record"):
                        Run(str(path))
                else:
                    table_and_series(path)
    evals = [r for r in records if r["type"] == "eval"]
    evals[1].pop("val_loss")  # a hand-edited evaluation without its loss: its column says "-"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cells = table_rows([Run(str(path))])[1][0]
    assert cells[3:5] == [f"{evals[2]['val_loss']:.4f} (4)"] * 2 and cells[7] == "-"


def test_hand_edited_metrics_through_the_entry_point(tmp_path):
    records = handmade_records()
    records[5]["val_loss"] = "n/a"  # the eval at iter 2
    del records[6]["val_loss"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pytest.importorskip("matplotlib")
    main([str(tmp_path), "--markdown"])
    assert (tmp_path / "plot.png").exists()
    records[2]["iter"] = "2"
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_script("plot.py", tmp_path, "--table", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"plot.py: error: {tmp_path / 'metrics.jsonl'} line 3 is not a metrics record")


# --- the picture

def test_rank_correlation_panel_is_drawn_on_its_whole_range(tmp_path):
    """A baseline's condensation scores are 1.00 at every evaluation: on matplotlib's automatic axis that is a flat
    line in a window of a few hundredths, read as noise; on [-1, 1] it reads as the maximum it is. The two scores
    coincide, so each has its own mark."""
    plt = pytest.importorskip("matplotlib.pyplot")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in handmade_records()))
    panel = next(p for p in PANELS if p[0].startswith("condensation"))
    fig, ax = plt.subplots()
    draw_panel(ax, [Run(str(tmp_path))], panel, "tokens", 0.0, plt.get_cmap("tab10").colors)
    assert ax.get_ylim() == (-1.05, 1.05)
    spearman, kendall = ax.get_lines()
    assert spearman.get_ydata().tolist() == kendall.get_ydata().tolist() == [1.0] * 3
    assert spearman.get_marker() != kendall.get_marker() and spearman.get_linestyle() != kendall.get_linestyle()
    plt.close(fig)
