"""
A data directory that grows (smallgpt/shards.py, prepare.py): shards read as one stream; "prepare A, then add B"
equals "prepare A and B together"; SIGKILL at random moments of a prepare, each followed by a rerun, ends
byte-identical to an uninterrupted one; training on shards equals training on their concatenation, and a kill -9
resumed across shard boundaries is exact; a token file of odd length is one line in train.py and eval.py.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, needs_tokenizer, run_script
from test_prepare import PREPARE, out_files, run_main, write_parquet
from test_train import FAST
from smallgpt.checkpoint import load_checkpoint
from smallgpt.errors import DataError
from smallgpt.shards import TOKEN_DTYPE, TokenStream, open_split, read_meta
from smallgpt.tokens import TrainWindows



def stream_bytes(out_dir, split):
    tokens = open_split(out_dir, split)[0]
    return tokens[0:len(tokens)].tobytes()


def test_token_stream_reads_as_the_concatenation():
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 50257, n).astype(TOKEN_DTYPE) for n in (5, 1, 17, 3, 40)]
    whole, stream = np.concatenate(shards), TokenStream(shards)
    assert len(stream) == len(whole) == 66
    for a in range(0, 66):
        for b in (a, a + 1, a + 7, a + 30, 66):
            assert np.array_equal(stream[a:b], whole[a:b]), (a, b)
        assert stream[a] == whole[a]
    windows = [TrainWindows(t, block_size=4, seed=3) for t in (whole, stream)]
    for first in (0, 9, 20):  # the same training batches, epochs and offsets included
        assert all(torch.equal(p, q) for p, q in zip(windows[0].batch(first, 6), windows[1].batch(first, 6)))


@needs_tokenizer
def test_odd_byte_length_is_one_clear_error(tmp_path):
    src = write_parquet(tmp_path / "s.parquet", [f"document {i} " * 30 for i in range(200)])
    assert run_main(src, f"--out_dir={tmp_path / 'out'}", "--val_docs=20", "--num_proc=1") is None
    with open(tmp_path / "out" / "val_000000.bin", "ab") as f:
        f.write(b"\x01")  # a copy cut (or padded) mid-token
    with pytest.raises(DataError, match=r"val_000000.bin has an odd number of bytes \([\d,]+\), so it is not whole "
                                        r"2-byte tokens: the file is cut or damaged; re-run prepare.py"):
        open_split(tmp_path / "out", "val")


@pytest.mark.slow
def test_odd_byte_length_entry_points(tmp_path, token_dir):
    """train.py and eval.py: one line naming the file, no numpy ValueError traceback."""
    data = tmp_path / "data"
    shutil.copytree(token_dir, data)
    with open(data / "train_000000.bin", "ab") as f:
        f.write(b"\x00")
    train = run_script("train.py", "config/train_tiny.py", *FAST, f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}",
                       "--max_iters=1", check=False)
    assert train.returncode == 1 and "Traceback" not in train.stderr, train.stderr
    assert train.stderr.strip() == (f"train.py: error: {data / 'train_000000.bin'} has an odd number of bytes "
                                    f"({os.path.getsize(data / 'train_000000.bin'):,}), so it is not whole 2-byte "
                                    f"tokens: the file is cut or damaged; re-run prepare.py")
    shutil.copyfile(token_dir / "train_000000.bin", data / "train_000000.bin")
    with open(data / "val_000000.bin", "ab") as f:
        f.write(b"\x00")
    run_script("train.py", "config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={tmp_path / 'o'}",
               "--max_iters=1")
    evaluated = run_script("eval.py", f"--model={tmp_path / 'o'}", f"--data_dir={data}", "--hellaswag_items=0",
                           check=False)
    assert evaluated.returncode == 1 and "Traceback" not in evaluated.stderr, evaluated.stderr
    line = evaluated.stderr.strip().splitlines()[-1]
    assert line.startswith(f"eval.py: error: {data / 'val_000000.bin'} has an odd number of bytes"), evaluated.stderr


@needs_tokenizer
def test_missing_data_dir_names_the_prepared_ones(tmp_path, monkeypatch):
    """train.py config/train_tiny.py with data prepared elsewhere: the error lists the prepared directories."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^no token data in 'data/fineweb' \(no manifest.json or meta.json\): run "
                                        r"data/fineweb/prepare.py first$"):
        read_meta("data/fineweb")
    src = write_parquet(tmp_path / "s.parquet", ["one document", "and another"])
    assert run_main(src, "--out_dir=data/sample", "--num_proc=1") is None
    assert run_main(src, "--out_dir=data/more/mine", "--num_proc=1") is None
    with pytest.raises(DataError, match=r"^no token data in 'data/fineweb' \(no manifest.json or meta.json\): prepared "
                                        r"data is in data/more/mine, data/sample: pass --data_dir=...$"):
        read_meta("data/fineweb")


# -----------------------------------------------------------------------------
# adding data

@needs_tokenizer
def test_adding_data_equals_preparing_it_together(tmp_path):
    """A then B == A and B together: the same train and val token streams, so the same training batches; the val
    split is that of the first argument, unchanged by B; A is skipped with a line saying so."""
    a = write_parquet(tmp_path / "a.parquet", [f"alpha {i} " * (1 + i % 13) for i in range(700)])
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    (b_dir / "b.jsonl").write_text("".join(json.dumps({"text": f"beta {i} " * (1 + i % 5)}) + "\n" for i in range(500)))
    (b_dir / "c.txt").write_text("a book of its own\n" * 40)
    flags = ["--val_docs=30", "--seed=4", "--shard_tokens=3000", "--num_proc=2"]
    together, grown = tmp_path / "together", tmp_path / "grown"
    assert run_main(a, b_dir, f"--out_dir={together}", *flags) is None
    assert run_main(a, f"--out_dir={grown}", *flags) is None
    val_before = stream_bytes(grown, "val")
    code = run_main(b_dir, f"--out_dir={grown}", "--shard_tokens=3000", "--num_proc=1")  # split flags not repeated
    assert code is None
    assert stream_bytes(grown, "val") == val_before == stream_bytes(together, "val")
    assert stream_bytes(grown, "train") == stream_bytes(together, "train")
    m1, m2 = read_meta(together), read_meta(grown)
    assert m1["splits"] == m2["splits"] and m1["split"] == m2["split"] and m1["split"]["population_inputs"] == 1
    strip = lambda entries: [{k: v for k, v in e.items() if k != "shards"} for e in entries]
    assert strip(m1["inputs"]) == strip(m2["inputs"])
    assert m1["splits"]["val"]["documents"] == 30 and all(e["splits"]["val"]["documents"] == 0 for e in m1["inputs"][1:])
    windows = [TrainWindows(open_split(d, "train")[0], 16, seed=7) for d in (together, grown)]
    for first in (0, 100, windows[0].per_epoch - 3):
        assert all(torch.equal(p, q) for p, q in zip(windows[0].batch(first, 8), windows[1].batch(first, 8)))


@needs_tokenizer
def test_val_population_rows_are_numbered_across_its_files(tmp_path):
    """A folder as the first argument: its files' rows are numbered in order, so its split equals that of one file
    holding all of them (with several batches in flight across the files' boundary)."""
    docs = [f"document {i} " * (1 + i % 11) for i in range(3000)]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_parquet(folder / "a.parquet", docs[:1400])
    write_parquet(folder / "b.parquet", docs[1400:])
    one = write_parquet(tmp_path / "one.parquet", docs)
    for i, flags in enumerate((["--val_fraction=0.05"], ["--val_docs=120", "--seed=2"])):
        outs = [tmp_path / f"from_folder{i}", tmp_path / f"from_one{i}"]
        for src, out in zip((folder, one), outs):
            assert run_main(src, f"--out_dir={out}", "--num_proc=2", "--shard_tokens=5000", *flags) is None
        for split in ("train", "val"):
            assert stream_bytes(outs[0], split) == stream_bytes(outs[1], split), (flags, split)
        assert read_meta(outs[0])["split"]["population_inputs"] == 2 and read_meta(outs[0])["splits"]["val"]["documents"] > 50


@needs_tokenizer
def test_rerun_skips_what_is_done_and_refuses_another_split(tmp_path, capsys):
    a = write_parquet(tmp_path / "a.parquet", [f"doc {i}" for i in range(300)])
    out = tmp_path / "out"
    assert run_main(a, f"--out_dir={out}", "--num_proc=1", "--val_fraction=0.1") is None
    files = {name: (out / name).read_bytes() for name in out_files(out)}
    capsys.readouterr()
    assert run_main(a, f"--out_dir={out}", "--num_proc=1") is None
    assert f"skipping {a}: already in the manifest (300 rows)" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in out_files(out)} == files
    code = run_main(a, f"--out_dir={out}", "--val_fraction=0.2")
    assert code == (f"prepare.py: error: {out} was made with --val_fraction=0.1: the train/val split is fixed when a "
                    f"directory is created (drop --val_fraction, or prepare into another --out_dir)")
    (out / "meta.json").write_text("{}")  # a directory of the single-file format is not grown
    os.remove(out / "manifest.json")
    assert "holds the single-file output of an older prepare.py" in run_main(a, f"--out_dir={out}")


@needs_tokenizer
def test_a_cap_stops_and_a_later_run_continues(tmp_path):
    """--max_docs counts the directory's documents: a capped run leaves its input unfinished, a run with a higher
    cap continues it; the tokens equal one run with the higher cap."""
    a = write_parquet(tmp_path / "a.parquet", [f"doc {i} " * (i % 9 + 1) for i in range(400)])
    flags = ["--val_fraction=0.05", "--num_proc=1", "--shard_tokens=500"]
    assert run_main(a, f"--out_dir={tmp_path / 'steps'}", "--max_docs=150", *flags) is None
    assert read_meta(tmp_path / "steps")["inputs"][0]["complete"] is False
    assert run_main(a, f"--out_dir={tmp_path / 'steps'}", "--max_docs=150", *flags) is None  # nothing to add
    assert read_meta(tmp_path / "steps")["splits"]["train"]["documents"] + \
        read_meta(tmp_path / "steps")["splits"]["val"]["documents"] == 150
    assert run_main(a, f"--out_dir={tmp_path / 'steps'}", "--max_docs=320", *flags) is None
    assert run_main(a, f"--out_dir={tmp_path / 'once'}", "--max_docs=320", *flags) is None
    for split in ("train", "val"):
        assert stream_bytes(tmp_path / "steps", split) == stream_bytes(tmp_path / "once", split)


# -----------------------------------------------------------------------------
# kills

def listed_shards(out_dir):
    try:
        return len(json.loads((out_dir / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):  # not there yet (it is replaced atomically, never seen half-written)
        return 0


def check_listed_shards_are_whole(out_dir):
    """The manifest lists only complete shards: each one exists with exactly its token count."""
    if not (out_dir / "manifest.json").exists():
        return
    meta = json.loads((out_dir / "manifest.json").read_text())
    for shard in meta["shards"]:
        assert os.path.getsize(out_dir / shard["file"]) == shard["tokens"] * 2, shard


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_is_byte_identical(sample_parquet, tmp_path):
    args = [str(sample_parquet), "--max_docs=6000", "--val_docs=100", "--shard_tokens=150000", "--num_proc=2"]
    assert run_main(*args, f"--out_dir={tmp_path / 'whole'}") is None
    whole = {name: (tmp_path / "whole" / name).read_bytes() for name in out_files(tmp_path / "whole")}
    total = listed_shards(tmp_path / "whole")
    assert total > 10  # several shards of each split
    out, rng, progress = tmp_path / "killed", random.Random(5), [0]
    for kill in range(6):
        proc = subprocess.Popen([sys.executable, str(PREPARE), *args, f"--out_dir={out}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        if kill % 3 == 0:  # during start-up, registration or the first batches
            time.sleep(rng.uniform(0.05, 0.3))
        else:  # just after a chosen shard is listed (mid-shard, mid-rename or mid-manifest), whatever the machine's speed
            target = min(total - 1, progress[-1] + rng.randint(1, max(1, (total - progress[-1]) // 3)))
            deadline = time.time() + 120
            while listed_shards(out) < target and proc.poll() is None and time.time() < deadline:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.01))
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers
        except ProcessLookupError:  # it had finished
            pass
        proc.wait()
        check_listed_shards_are_whole(out)
        progress.append(listed_shards(out))
    print("shards listed after each kill:", progress[1:], "of", total)
    assert run_main(*args, f"--out_dir={out}") is None
    assert {name: (out / name).read_bytes() for name in out_files(out)} == whole  # no stray file, same bytes
    assert progress[1] < progress[-1] < total, progress  # the kills came at different points, before the end


# -----------------------------------------------------------------------------
# training on shards

@pytest.fixture(scope="module")
def small_shards(sample_parquet, tmp_path_factory):
    """~250 shards of ~1,000 tokens from 600 documents, and the same tokens as one file of the single-file format."""
    root = tmp_path_factory.mktemp("shards")
    sharded, single = root / "sharded", root / "single"
    subprocess.run([sys.executable, str(PREPARE), str(sample_parquet), f"--out_dir={sharded}", "--max_docs=600",
                    "--val_docs=40", "--shard_tokens=1000", "--num_proc=2"], check=True, capture_output=True)
    meta = read_meta(sharded)
    single.mkdir()
    for split in ("train", "val"):
        (single / f"{split}.bin").write_bytes(stream_bytes(sharded, split))
    (single / "meta.json").write_text(json.dumps({key: meta[key] for key in ("format", "dtype", "vocab_size",
                                                                               "eot_token", "splits")} | {"version": 1}))
    return sharded, single


@pytest.mark.slow
def test_training_on_shards_equals_training_on_their_concatenation(tmp_path, small_shards):
    sharded, single = small_shards
    assert len(read_meta(sharded)["files"]["train"]) > 100
    common = ["config/train_tiny.py", *FAST, "--max_iters=6", "--eval_interval=3", "--deterministic"]
    for name, data in (("a", sharded), ("b", single)):
        run_script("train.py", *common, f"--data_dir={data}", f"--out_dir={tmp_path / name}")
    strip = lambda path: [{k: v for k, v in r.items() if k not in ("ms", "tok_s", "time_s")}
                          for r in map(json.loads, path.read_text().splitlines())]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")
    a, b = load_checkpoint(str(tmp_path / "a" / "last.pt")), load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_kill_9_resumed_across_shard_boundaries_is_exact(tmp_path, small_shards):
    sharded, _ = small_shards
    common = ["config/train_tiny.py", *FAST, f"--data_dir={sharded}", "--max_iters=12", "--eval_interval=4",
              "--lr_decay_iters=12", "--warmup_iters=2", "--deterministic"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *common, f"--out_dir={killed}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("iter      6"):  # past the checkpoint of iter 4
            break
    proc.kill()
    proc.wait()
    assert load_checkpoint(str(killed / "last.pt"))["iter_num"] == 4
    run_script("train.py", *common, f"--out_dir={killed}", "--init_from=resume")
    run_script("train.py", *common, f"--out_dir={tmp_path / 'whole'}")
    a, b = load_checkpoint(str(tmp_path / "whole" / "last.pt")), load_checkpoint(str(killed / "last.pt"))
    assert a["iter_num"] == b["iter_num"] == 12 and a["data_position"] == b["data_position"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the windows of the resumed steps (4..11) are drawn from many shards, some across a boundary between two
    tokens = open_split(sharded, "train")[0]
    windows = TrainWindows(tokens, 32, seed=1337)
    starts = [windows.start(i) for i in range(4 * 8, 12 * 8)]
    shards = {tokens.shard_of(s) for s in starts}
    assert len(shards) > 30 and any(tokens.shard_of(s) != tokens.shard_of(s + 32) for s in starts)
