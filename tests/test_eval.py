"""evaluation.py and eval.py: bits per byte, HellaSwag scoring against brute force, the download, the entry point."""
import errno
import functools
import http.server
import json
import os
import random
import shutil
import threading

import pytest
import torch
from torch.nn import functional as F
from conftest import REPO, run_script, run_with_fault

import eval as eval_script
from model import GPT, GPTConfig
from smallgpt import evaluation
from smallgpt.errors import DataError
from smallgpt.evaluation import (hellaswag_file, hellaswag_predictions, load_hellaswag, loss_sums, read_hellaswag, render,
                                 score_hellaswag, score_rendered, token_bytes)

FIXTURE = REPO / "tests" / "fixtures" / "hellaswag_tiny.jsonl"  # hand-written items in HellaSwag's format
FAST = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--eval_iters=2", "--condensation_seqs=0", "--log_interval=1"]


def tiny(block_size=64, **overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, **overrides)).eval()


# --- bits per byte

def test_token_bytes_count_raw_bytes_and_nothing_for_eot_and_padding(enc):
    table = token_bytes(enc, 50304)
    assert table[50256] == 0 and table[50257:].sum() == 0 and table[:50256].min() >= 1
    text = "naïve café 日本語 🚀, twice:  naïve café"
    assert table[enc.encode_ordinary(text)].sum() == len(text.encode("utf-8"))  # split characters included


@pytest.mark.parametrize("overrides", [dict(loss_chunk_size=7), dict(loss_chunk_size=0),
                                       dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", logit_softcap=15.0)])
def test_train_and_eval_compute_the_same_bits_per_byte(enc, overrides):
    """eval.py sums per-token losses from logits; train.py takes them from one chunked forward
    (per_token=True). Both give the same sums (soft-capped logits included), whose parts are what they say:
    the mean is the model's CE, and the byte-weighted part leaves out the 0-byte EOT targets."""
    model, table = tiny(**overrides), token_bytes(enc, 50304)
    ids = torch.tensor([enc.encode_ordinary("The cat sat on the mat. ") + [50256] + enc.encode_ordinary("A dog ran.")] * 2)
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        logits = model(x)[0]
        per_token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        from_logits = loss_sums(per_token, y, table)
        from_forward = loss_sums(model(x, y, per_token=True)[1]["ce_tokens"], y, table)
        mean_ce = model(x, y)[1]["ce"].item()
    torch.testing.assert_close(from_forward, from_logits, rtol=1e-5, atol=0)
    nats, count, byte_nats, n_bytes = from_forward.tolist()
    assert count == y.numel() and nats / count == pytest.approx(mean_ce, rel=1e-5)
    eot = y.flatten() == 50256
    assert eot.sum() == 2 and n_bytes == table[y].sum().item()
    assert byte_nats == pytest.approx(nats - per_token[eot].sum().item(), rel=1e-5)  # the EOT targets' losses left out


# --- HellaSwag

def test_load_and_render_fixture(enc):
    items = load_hellaswag(FIXTURE)
    assert len(items) == 6 and [it["label"] for it in items] == [0, 1, 2, 3, 0, 1]
    assert items[2]["ctx"] == "A woman sprays soapy water over a dusty red car."  # empty ctx_b
    rows, n_end = render(items[0], enc.encode_ordinary, 64)
    ctx = enc.encode_ordinary(items[0]["ctx"])
    for row, n, ending in zip(rows, n_end, items[0]["endings"]):
        assert row[:len(ctx)] == ctx and n == len(enc.encode_ordinary(" " + ending)) == len(row) - len(ctx)
    rows, n_end = render(items[0], enc.encode_ordinary, 8)  # too long: the context's start is cut
    assert all(len(r) == 8 for r in rows) and n_end == [min(n, 7) for n in render(items[0], enc.encode_ordinary, 64)[1]]


def brute_force(model, item, encode):
    """One item, one ending at a time, no batching or padding: (argmin summed loss, argmin mean loss, sums)."""
    ctx = encode(item["ctx"])
    sums, means = [], []
    for ending in item["endings"]:
        end = encode(" " + ending)
        row = torch.tensor([ctx + end])
        logp = F.log_softmax(model(row)[0][0].float(), dim=-1)
        loss = -sum(logp[len(ctx) + j - 1, t].item() for j, t in enumerate(end))
        sums.append(loss)
        means.append(loss / len(end))
    return min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__), sums


@torch.no_grad()
@pytest.mark.slow
def test_batched_scoring_matches_brute_force(enc):
    model, items = tiny(), load_hellaswag(FIXTURE)
    logits_fn = lambda idx: model(idx)[0]
    expected = [brute_force(model, it, enc.encode_ordinary) for it in items]
    for batch_size in (1, 4):  # batches of items of different lengths, right-padded
        got = hellaswag_predictions(logits_fn, items, enc.encode_ordinary, 64, "cpu", batch_size)
        assert got == [(s, m) for s, m, _ in expected]
    sums, _ = score_rendered(logits_fn, [render(it, enc.encode_ordinary, 64) for it in items], "cpu")
    torch.testing.assert_close(sums, torch.tensor([e[2] for e in expected]), rtol=1e-4, atol=1e-4)
    result = score_hellaswag(logits_fn, items, enc.encode_ordinary, 64, "cpu", batch_size=4)
    labels = [it["label"] for it in items]
    assert result == {"hellaswag_acc": sum(e[0] == l for e, l in zip(expected, labels)) / 6,
                      "hellaswag_acc_norm": sum(e[1] == l for e, l in zip(expected, labels)) / 6, "hellaswag_items": 6}


def test_acc_and_acc_norm_part_ways(enc):
    """A unigram model (the same logits everywhere) that likes ' the' (logit 5) more than ' yes' (logit 3): the
    long ending ' the the the' has the lower mean loss but the higher summed loss than ' yes'."""
    the, yes = enc.encode_ordinary(" the"), enc.encode_ordinary(" yes")
    assert len(the) == len(yes) == 1
    unigram = torch.zeros(50304)
    unigram[the[0]], unigram[yes[0]] = 5.0, 3.0
    logits_fn = lambda idx: unigram.expand(*idx.shape, -1)
    item = {"ctx": "Say it:", "endings": ["yes", "the the the", "zebra crossing lights", "quantum walrus"], "label": 1}
    result = score_hellaswag(logits_fn, [item], enc.encode_ordinary, 64, "cpu")
    assert result["hellaswag_acc"] == 0.0 and result["hellaswag_acc_norm"] == 1.0
    result = score_hellaswag(logits_fn, [{**item, "label": 0}], enc.encode_ordinary, 64, "cpu")
    assert result["hellaswag_acc"] == 1.0 and result["hellaswag_acc_norm"] == 0.0


def test_an_oracle_scores_every_item(enc):
    """A model that puts +50 on the next token of each item's labelled row only: acc = acc_norm = 1."""
    items = load_hellaswag(FIXTURE)
    right = [render(it, enc.encode_ordinary, 64)[0][it["label"]] for it in items]

    def logits_fn(idx):
        logits = torch.zeros(*idx.shape, 50304)
        for i, row in enumerate(idx.tolist()):
            for r in right:
                if row[:len(r)] == r:
                    logits[i, torch.arange(len(r) - 1), torch.tensor(r[1:])] = 50.0
        return logits

    result = score_hellaswag(logits_fn, items, enc.encode_ordinary, 64, "cpu", batch_size=4)
    assert result["hellaswag_acc"] == result["hellaswag_acc_norm"] == 1.0


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        super().do_GET()

    def log_message(self, *args):
        pass


def test_download_once_into_the_cache(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(FIXTURE, served / "hellaswag_val.jsonl")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cache = tmp_path / "cache"
        path = hellaswag_file("", str(cache), f"{base}/hellaswag_val.jsonl")
        assert open(path).read() == FIXTURE.read_text() and CountingHandler.requests == 1
        assert hellaswag_file("", str(cache), f"{base}/hellaswag_val.jsonl") == path and CountingHandler.requests == 1
        assert len(load_hellaswag(path)) == 6
        with pytest.raises(DataError, match="cannot download HellaSwag from .*404.*: pass --it=PATH$"):
            read_hellaswag("", str(tmp_path / "cache2"), remedy="pass --it=PATH", url=f"{base}/missing.jsonl")
        assert not list((tmp_path / "cache2").iterdir())  # no partial file left to be taken for the data
        def full_disk(path, *args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(evaluation, "open", full_disk, raising=False)  # the module's open: the download's file
        with pytest.raises(DataError, match=r"no space left on the device writing .*cache3/hellaswag_val.jsonl"):
            hellaswag_file("", str(tmp_path / "cache3"), f"{base}/hellaswag_val.jsonl")
    finally:
        server.shutdown()


@pytest.mark.parametrize("content,message", [
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}\n{"ctx": "a", "endings"\n', "line 2 is not a HellaSwag item"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 1}\n', "line 1 is not a HellaSwag item"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 2.9}\n', "line 1 is not a HellaSwag item .*label is 2.9"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": true}\n', "line 1 is not a HellaSwag item .*label is True"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": "4"}\n', "line 1 is not a HellaSwag item"),
    ('<html>rate limited</html>\n', "line 1 is not a HellaSwag item"),
    ("", "holds no HellaSwag items"),
])
def test_damaged_hellaswag_file_is_one_error(tmp_path, content, message):
    bad = tmp_path / "hellaswag_val.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        read_hellaswag(str(bad), remedy="REMEDY")
    assert "delete" not in str(e.value) and "REMEDY" not in str(e.value)  # the user's own file: only named
    cache = tmp_path / "cache"
    cache.mkdir()
    bad.rename(cache / "hellaswag_val.jsonl")  # the same file as the cached download: deleting it is the fix
    with pytest.raises(DataError, match=f"{message}.*cached download: delete it to download it again, or REMEDY"):
        read_hellaswag("", str(cache), remedy="REMEDY")


def test_labels_are_integers_0_to_3_or_their_text(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": label}) + "\n"
                            for label in (0, 3, "1", "2")))
    assert [it["label"] for it in load_hellaswag(str(good))] == [0, 3, 1, 2]


# --- eval.py through its entry point

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, token_dir):
    out = tmp_path_factory.mktemp("run")
    run_script("train.py", "config/train_tiny.py", *FAST, f"--data_dir={token_dir}", f"--out_dir={out}", "--device=cpu",
               "--max_iters=4", "--eval_interval=2", "--hellaswag_interval=4", f"--hellaswag_file={FIXTURE}",
               "--hellaswag_items=4")
    return out


@pytest.mark.slow
def test_hellaswag_in_training(tiny_run):
    evals = [r for r in map(json.loads, open(tiny_run / "metrics.jsonl")) if r["type"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 2, 4]
    assert [r.get("hellaswag_items") for r in evals] == [4, None, 4]  # at iterations divisible by hellaswag_interval
    assert all(0 <= r["hellaswag_acc"] <= 1 and 0 <= r["hellaswag_acc_norm"] <= 1 for r in (evals[0], evals[2]))
    assert all(0 < r["val_bpb"] < r["val_loss"] for r in evals)


def test_hellaswag_training_keys_are_checked():
    from smallgpt.config import load_train_config
    from smallgpt.errors import ConfigError
    with pytest.raises(ConfigError, match="hellaswag_interval .* multiple of eval_interval"):
        load_train_config(["--eval_interval=10", "--hellaswag_interval=15"])
    with pytest.raises(ConfigError, match="hellaswag_items must be positive"):
        load_train_config(["--hellaswag_items=0"])


@pytest.fixture(scope="module")
def short_val_dir(tmp_path_factory, token_dir, enc):
    """token_dir with its val split cut to the first 8,000 tokens (the whole split takes minutes at full vocabulary
    width on 2 CPU cores)."""
    import numpy as np
    out = tmp_path_factory.mktemp("short_val")
    val = np.fromfile(token_dir / "val_000000.bin", dtype=np.uint16)[:8000]
    val.tofile(out / "val_000000.bin")
    (out / "train_000000.bin").symlink_to(token_dir / "train_000000.bin")
    meta = json.load(open(token_dir / "manifest.json"))
    [val_shard] = [s for s in meta["shards"] if s["split"] == "val"]
    val_shard["tokens"] = 8000
    meta["splits"]["val"].update(tokens=8000, bytes=int(token_bytes(enc, 50257)[val.astype(np.int64)].sum()))
    json.dump(meta, open(out / "manifest.json", "w"))
    return out


def one_line_error(result, text):
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and text in result.stderr, result.stderr


@pytest.mark.slow
def test_eval_entry_point_on_a_trained_checkpoint(tiny_run, short_val_dir):
    result = run_script("eval.py", f"--model={tiny_run}", f"--data_dir={short_val_dir}", f"--hellaswag={FIXTURE}",
                        "--batch_size=64", "--device=cpu")
    assert "| val       | bpb      |" in result.stdout and "| hellaswag | acc_norm |" in result.stdout
    records = [json.loads(line) for line in open(tiny_run / "metrics.jsonl")]
    val, hella = [r for r in records if r["type"] == "eval_downstream"]
    assert val["task"] == "val" and val["iter"] == 4 and val["val_tokens"] == 8000 - 1  # every target once
    assert 0 < val["val_bpb"] < val["val_loss"] < 11  # ~4.x bytes per token: bpb well below the loss in nats
    assert hella["task"] == "hellaswag" and hella["hellaswag_items"] == 6 and 0 <= hella["hellaswag_acc_norm"] <= 1


@pytest.mark.slow
def test_eval_entry_point_on_an_export(tiny_run, short_val_dir, tmp_path):
    pytest.importorskip("transformers")
    run_script("export.py", f"--model={tiny_run}", f"--out={tmp_path / 'hf'}", "--check=False")  # checked in test_export
    result = run_script("eval.py", f"--model={tmp_path / 'hf'}", f"--data_dir={short_val_dir}", f"--hellaswag={FIXTURE}",
                        "--batch_size=64", "--device=cpu")
    assert "| val       | loss     |" in result.stdout and "| hellaswag | acc      |" in result.stdout
    assert not (tmp_path / "hf" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_model_of_gpt2s_50257_rows_reads_gpt2_data(short_val_dir, tmp_path):
    """HF GPT-2 has rows for GPT-2's 50,257 tokens, none for the reserved chat tokens that a GPT-2 data directory
    now counts (vocab_size 50,267): text data evaluates; data holding a chat token is one line naming it."""
    import shutil
    import numpy as np
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    common = [f"--model={tmp_path / 'hf'}", "--hellaswag_items=0", "--batch_size=64", "--device=cpu",
              "--log_metrics=False"]
    assert "| val       | bpb      |" in run_script("eval.py", *common, f"--data_dir={short_val_dir}").stdout
    chat = tmp_path / "chat"
    shutil.copytree(short_val_dir, chat)
    val = np.memmap(chat / "val_000000.bin", dtype=np.uint16, mode="r+")
    val[100] = 50259  # <|user_start|>
    val.flush()
    result = run_script("eval.py", *common, f"--data_dir={chat}", check=False)  # after the val bar's first line
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"eval.py: error: {chat / 'val_000000.bin'}: token id "
                                                             f"50259 at position 100 is outside the vocabulary (vocab_size 50257)")


@pytest.mark.slow
def test_eval_user_mistakes_are_one_line(tmp_path):
    one_line_error(run_script("eval.py", f"--model={tmp_path}", f"--hellaswag={tmp_path / 'none.jsonl'}", check=False),
                   "no HellaSwag file at")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    one_line_error(run_script("eval.py", f"--model={tmp_path}", f"--hellaswag={bad}", check=False),
                   "line 1 is not a HellaSwag item")
    one_line_error(run_script("eval.py", f"--model={tmp_path}", "--hellaswag_items=0", check=False),
                   "nothing to evaluate")
    one_line_error(run_script("eval.py", f"--model={tmp_path / 'no-run'}", f"--hellaswag={FIXTURE}", check=False),
                   "no-run: no such path")
    bad.write_text('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 2.9}\n')  # int() would have made it 2
    result = run_script("eval.py", f"--model={tmp_path}", f"--hellaswag={bad}", check=False)
    one_line_error(result, "line 1 is not a HellaSwag item")
    assert "delete" not in result.stderr  # the user's file: never "delete the file (it is downloaded again)"
    (tmp_path / "best.pt").write_bytes(os.urandom(5000))  # random bytes: never advise unpickling them
    result = run_script("eval.py", f"--model={tmp_path}", f"--hellaswag={FIXTURE}", check=False)
    one_line_error(result, "best.pt: not a PyTorch checkpoint, or truncated or corrupt")
    assert "weights_only" not in result.stderr


NO_NETWORK = """
import urllib.error, urllib.request
def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
urllib.request.urlopen = offline
"""


@pytest.mark.slow
def test_eval_offline_computes_the_val_loss_then_reports_hellaswag(tiny_run, short_val_dir, tmp_path):
    """The first documented command on a machine without network: the val table (here capped at 5 windows by
    --val_windows) and its metrics record come first, then one line on what was not scored and how to fix it."""
    result = run_with_fault(NO_NETWORK, "eval.py", f"--model={tiny_run}", f"--data_dir={short_val_dir}",
                            f"--cache_dir={tmp_path}", "--val_windows=5", "--device=cpu")
    last = result.stderr.splitlines()[-1]  # after the val pass's progress bar
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("eval.py: error: HellaSwag was not scored: cannot download HellaSwag from")
    assert "--hellaswag=PATH" in last and "--hellaswag_items=0" in last
    assert "| val       | loss     |" in result.stdout and "(5 of " in result.stdout
    val = [json.loads(line) for line in open(tiny_run / "metrics.jsonl")][-1]
    assert val["type"] == "eval_downstream" and val["task"] == "val"
    assert val["val_tokens"] == 5 * 32 and val["val_windows"] == 5 and val["val_windows_total"] == 250  # 7,999 / 32


def test_val_windows_cover_every_target_once_or_an_even_sample():
    batches, total = eval_script.val_batches(100, 32, 2)
    assert total == 4 and batches == [([0, 32], 32), ([64], 32), ([96], 3)]  # targets 1..99, each once
    batches, total = eval_script.val_batches(1000, 32, 4, cap=3)
    starts = [s for b, _ in batches for s in b]
    assert total == 32 and starts == [0, 480, 960] and all(n == 32 for _, n in batches)  # evenly spaced, full
    assert eval_script.val_batches(100, 32, 2, cap=10) == eval_script.val_batches(100, 32, 2)  # a cap above: all


def test_a_corrupt_checkpoint_never_advises_running_its_pickle(tmp_path):
    import argparse
    from smallgpt.checkpoint import load_checkpoint
    # seeded: about one in ten random byte strings makes torch fail otherwise (IndexError...), a longer message
    (tmp_path / "random.pt").write_bytes(random.Random(0).randbytes(5000))
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "objects.pt")
    with pytest.raises(DataError, match="random.pt: not a PyTorch checkpoint, or truncated or corrupt$"):
        load_checkpoint(tmp_path / "random.pt")
    with pytest.raises(DataError, match=r"objects.pt: it holds a Python object \(argparse.Namespace\)") as e:
        load_checkpoint(tmp_path / "objects.pt")
    assert "weights_only" not in str(e.value)


def test_a_full_disk_appending_the_results_names_the_file(tmp_path, monkeypatch):
    def full_disk(path, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(eval_script, "open", full_disk, raising=False)
    loaded = eval_script.Loaded(None, 16, 50304, "run", eval_script.GPT2, run_dir=str(tmp_path))
    with pytest.raises(DataError, match=f"cannot append the results to {tmp_path}/metrics.jsonl: No space left"):
        eval_script.log_results(loaded, {"val": {"val_loss": 1.0}})


def test_train_evaluator_is_the_mean_over_its_windows(enc, token_dir):
    """train.py's evaluation (one chunked forward per batch) against a brute force over the same fixed windows:
    the mean CE of all targets from full logits, and bits per byte over the byte-carrying targets."""
    import math
    from smallgpt.shards import open_split
    from smallgpt.tokens import fixed_windows, stack_windows
    from train import Evaluator, Runtime
    from smallgpt import config
    from smallgpt.tokenizer import open_tokenizer
    tokens, meta = open_split(token_dir, "val")
    cfg = config.with_vocab_size(config.TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=3,
                                                    eval_iters=2, condensation_seqs=0, loss_chunk_size=20), meta["vocab_size"])
    rt = Runtime(ddp=False, rank=0, local_rank=0, world=1, device="cpu", dtype="float32", accum=1)
    model = tiny(block_size=32, loss_chunk_size=20)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    result = Evaluator(cfg, tokens, meta["vocab_size"], rt, open_tokenizer(token_dir).record)(model, model, 0)
    assert len(calls) == cfg.eval_iters  # one forward per batch, both numbers from it
    x, y = stack_windows(tokens, fixed_windows(tokens, 6, 32), 32)
    with torch.no_grad():
        losses = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="none").double()
    table = token_bytes(enc, 50304)[y.flatten()]
    assert result["val_loss"] == pytest.approx(losses.mean().item(), rel=1e-6)
    expected_bpb = losses[table > 0].sum().item() / math.log(2) / table.sum().item()
    assert result["val_bpb"] == pytest.approx(expected_bpb, rel=1e-6)


# --- lm-evaluation-harness (eval.py --lm_eval)

MULTIPLE_CHOICE = REPO / "tests" / "fixtures" / "multiple_choice.jsonl"  # 20 hand-written items, HellaSwag's format
LM_EVAL_TASK = "tests/fixtures/lm_eval_multiple_choice.yaml"  # a local task over them (run from the repo root)


def test_lm_eval_mistakes_are_one_line(tmp_path, monkeypatch):
    from smallgpt.errors import ConfigError
    (tmp_path / "best.pt").touch()
    with pytest.raises(ConfigError, match="is a checkpoint: export it first"):
        eval_script.main([f"--model={tmp_path}", "--lm_eval=hellaswag"])
    with pytest.raises(DataError, match="no lm-eval task file .*missing.yaml"):
        eval_script.main(["--model=gpt2", f"--lm_eval={tmp_path / 'missing.yaml'}"])
    monkeypatch.setitem(__import__("sys").modules, "lm_eval.tasks", None)  # lm-evaluation-harness not installed
    with pytest.raises(DataError, match=r'pip install "lm_eval\[hf\]"'):
        eval_script.main(["--model=gpt2", "--lm_eval=hellaswag"])


@pytest.mark.slow
def test_an_unknown_lm_eval_task_or_one_whose_data_is_out_of_reach_is_one_line(lm_eval_export):
    pytest.importorskip("lm_eval")
    result = run_script("eval.py", "--model=gpt2", "--lm_eval=hellaswagg", check=False)
    one_line_error(result, "unknown lm-eval task 'hellaswagg' (did you mean hellaswag?)")
    result = run_with_fault("", "eval.py", f"--model={lm_eval_export}", "--lm_eval=arc_easy", "--hellaswag_items=0",
                            env={"HF_HUB_OFFLINE": "1"})  # the harness's own task: its data is on the Hub
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("eval.py: error: lm-eval cannot fetch a task's data from the "
                                                     "Hugging Face Hub")


@pytest.fixture(scope="module")
def lm_eval_export(tmp_path_factory):
    """A randomised tiny GPT exported for transformers, with a context longer than every item (no truncation)."""
    pytest.importorskip("transformers")
    import export
    from conftest import randomized_tiny_gpt
    out = tmp_path_factory.mktemp("lm_eval") / "hf"
    export.export(randomized_tiny_gpt(block_size=256).merge_multipliers(untie=True), str(out))
    return out


def test_the_table_keeps_its_columns_without_hellaswag_and_widens_for_lm_eval_names(capsys):
    """A val-only table has the columns of one with HellaSwag (scripts read it); a longer lm-eval name widens them."""
    val = {"val_loss": 3.0, "val_bpb": 1.0, "val_tokens": 10, "val_windows": 1, "val_windows_total": 1}
    eval_script.print_table("m", {"val": val})
    assert "| task      | metric   |  value | on |" in capsys.readouterr().out
    eval_script.print_table("m", {"val": val, "lm_eval": {"multiple_choice": {"acc": 0.5, "items": 20}}})
    out = capsys.readouterr().out
    assert "| val             | loss     | 3.0000 |" in out and "| multiple_choice | acc      | 0.5000 | 20 items |" in out


def table(stdout):
    """{(task, metric): value} of eval.py's table."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines() if line.startswith("| ")]
    return {(task, metric): float(value) for task, metric, value, _ in cells[1:]}


@pytest.mark.slow
def test_lm_eval_scores_a_local_task_as_eval_py_does(lm_eval_export):
    """The same 20 items through eval.py's own scoring (--hellaswag) and through lm-eval's (--lm_eval), offline,
    from one model load: the same accuracy."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    result = run_with_fault("", "eval.py", f"--model={lm_eval_export}", f"--lm_eval={LM_EVAL_TASK}",
                            f"--hellaswag={MULTIPLE_CHOICE}", "--device=cpu", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    values = table(result.stdout)
    assert values[("multiple_choice", "acc")] == values[("hellaswag", "acc")]
    assert "| multiple_choice | acc_norm |" in result.stdout and "20 items, ± " in result.stdout


@pytest.mark.slow
def test_lm_eval_and_eval_py_agree_item_by_item(lm_eval_export, enc, monkeypatch):
    """Per item and ending, lm-eval's log-likelihood is eval.py's summed loss negated, except where the context ends
    in whitespace: the harness moves it into every ending, a shift equal for the 4 (acc unchanged). acc agrees on
    every item; the harness's acc_norm divides by the ending's characters (eval.py's by its tokens), and that rule
    on eval.py's losses gives the harness's acc_norm on every item."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the working directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(lm_eval_export)).eval()
    lm = HFLM(pretrained=hf, tokenizer=transformers.AutoTokenizer.from_pretrained(str(lm_eval_export)), batch_size=16)
    out = lm_eval.simple_evaluate(model=lm, tasks=[LM_EVAL_TASK], task_manager=TaskManager(include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["multiple_choice"], key=lambda s: s["doc_id"])
    items = load_hellaswag(MULTIPLE_CHOICE)
    with torch.no_grad():
        sums, _ = score_rendered(lambda idx: hf(idx).logits, [render(it, enc.encode_ordinary, 256) for it in items], "cpu")
    shifted = 0
    for sample, item, ours in zip(samples, items, -sums.double()):
        theirs = torch.tensor([ll for ll, _ in sample["filtered_resps"]], dtype=torch.float64)
        shift = theirs - ours
        if item["ctx"] != item["ctx"].rstrip():
            shifted += 1
            assert shift.mean() < -0.1 and (shift - shift.mean()).abs().max() < 1e-3  # log P(whitespace), 4 times
        else:
            assert shift.abs().max() < 1e-3, (sample["doc_id"], shift)
        assert sample["acc"] == float(ours.argmax() == item["label"])
        chars = torch.tensor([len(e) for e in item["endings"]], dtype=torch.float64)
        assert sample["acc_norm"] == float((ours / chars).argmax() == item["label"])
    assert shifted == 2 and len(samples) == 20  # the fixture's contexts ending in " " and "\n"
