"""
prepare.py's inputs besides parquet (smallgpt/sources.py): .jsonl, .jsonl.gz, .txt (a document per file or per
line) and folders of them give the tokens of the same documents in a parquet file; a malformed line or an
unreadable file is one line naming the file and the line.
"""
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import needs_tokenizer
from test_prepare import decode_split, out_files, run_main, write_parquet
from smallgpt.shards import read_meta

pytestmark = needs_tokenizer  # every test runs prepare.py, which tokenizes


@pytest.fixture(scope="module")
def texts(sample_parquet):
    """300 real documents of the shared sample (multi-line English; a few with non-ASCII characters)."""
    return pq.ParquetFile(sample_parquet).read_row_group(0, columns=["text"]).column(0).to_pylist()[:300]


def prepare_train(tmp_path, name, *args):
    out = tmp_path / name
    assert run_main(*args, f"--out_dir={out}", "--val_fraction=0", "--num_proc=1") is None
    return decode_split(out, "train")


def test_jsonl_and_gz_equal_parquet(tmp_path, texts):
    records = [{"id": i, "content": t} for i, t in enumerate(texts)]
    lines = [json.dumps(r) for r in records[:100]] + [""] + [json.dumps(r, ensure_ascii=False) for r in records[100:]]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")  # a blank line inside: skipped
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(lines))  # no final newline
    reference = prepare_train(tmp_path, "parquet", write_parquet(tmp_path / "a.parquet", texts))
    assert reference == texts
    for name in ("a.jsonl", "a.jsonl.gz"):
        assert prepare_train(tmp_path, f"out_{name}", tmp_path / name, "--text_column=content") == texts, name
        meta = read_meta(tmp_path / f"out_{name}")
        assert meta["inputs"][0]["rows"] == 301 and meta["skipped"]["null_or_empty"] == 1
    train = [(tmp_path / d / "train_000000.bin").read_bytes() for d in ("parquet", "out_a.jsonl", "out_a.jsonl.gz")]
    assert train[0] == train[1] == train[2]


def test_txt_per_file_and_per_line(tmp_path, texts):
    folder = tmp_path / "books"
    folder.mkdir()
    for i, text in enumerate(texts[:40]):
        (folder / f"{i:03d}.txt").write_text(text)
    (folder / "README.md").write_text("not an input: ignored in a folder")
    assert prepare_train(tmp_path, "files", folder) == texts[:40]
    assert len(read_meta(tmp_path / "files")["inputs"]) == 40
    lines = [line for text in texts for line in text.split("\n")]
    (tmp_path / "lines.txt").write_bytes("\r\n".join(lines).encode())  # Windows line ends are not part of a line
    assert prepare_train(tmp_path, "lines", tmp_path / "lines.txt", "--txt_document=line") == [x for x in lines if x]
    assert read_meta(tmp_path / "lines")["skipped"]["null_or_empty"] == lines.count("")


def test_folder_of_mixed_inputs_in_sorted_order(tmp_path, texts):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    write_parquet(folder / "d.parquet", texts[30:40])
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[10:20]))
    with gzip.open(folder / "sub" / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[20:30]))
    (folder / "a.txt").write_text(texts[0])
    expected = [texts[0]] + texts[10:40]  # a.txt, b.jsonl, d.parquet, sub/c.jsonl.gz: sorted paths
    expected = expected[:11] + expected[21:] + expected[11:21]
    assert prepare_train(tmp_path, "out", folder) == expected
    glob_run = prepare_train(tmp_path, "glob", folder / "*.jsonl")
    assert glob_run == texts[10:20]


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": "cut off\n', "bad.jsonl line 2: not a JSON object (Invalid control character"),
    (b'{"text": "fine"}\n["a list"]\n', "bad.jsonl line 2: not a JSON object but list"),
    (b'{"text": "fine"}\n\n{"body": "x"}\n', "bad.jsonl line 3: no field 'text' (fields: body); see --text_column"),
    (b'{"text": 5}\n', "bad.jsonl line 1: field 'text' holds int, not text; see --text_column"),
    (b'{"text": "caf\xe9"}\n', "bad.jsonl line 1: not a JSON object ("),
])
def test_malformed_jsonl_is_one_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    code = run_main(tmp_path / "bad.jsonl", f"--out_dir={tmp_path / 'out'}", "--num_proc=1")
    assert code.startswith("prepare.py: error: ") and str(tmp_path / message) in code and "\n" not in code, code
    assert out_files(tmp_path / "out") == []


def test_unreadable_inputs_are_one_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("first line\nsecond caf\xe9 line\n".encode("latin-1"))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    good = gzip.compress(b'{"text": "one"}\n' * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(good[:len(good) // 2])
    cases = [([tmp_path / "latin1.txt"], "latin1.txt line 2: not UTF-8 text (byte 0xe9 at offset 21)"),
             ([tmp_path / "latin1.txt", "--txt_document=line"], "latin1.txt line 2: not UTF-8 text (byte 0xe9 at column 11)"),
             ([tmp_path / "broken.jsonl.gz"], "broken.jsonl.gz: cannot read (BadGzipFile"),
             ([tmp_path / "cut.jsonl.gz"], "cut.jsonl.gz: cannot read (EOFError"),
             ([tmp_path / "latin1.txt", "--min_language_score=0.5"], "a .txt file has no language_score")]
    if os.geteuid() != 0:  # root reads anything
        (tmp_path / "secret.jsonl").write_text("{}")
        (tmp_path / "secret.jsonl").chmod(0)
        cases.append(([tmp_path / "secret.jsonl"], "secret.jsonl: Permission denied"))
    for args, message in cases:
        code = run_main(*args, f"--out_dir={tmp_path / 'out'}", "--num_proc=1")
        assert code.startswith("prepare.py: error: ") and message in code and "\n" not in code, (message, code)
        assert out_files(tmp_path / "out") == []


def test_language_score_from_jsonl(tmp_path):
    rows = [{"text": "kept", "language_score": 0.9}, {"text": "low", "language_score": 0.1}, {"text": "no score"}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prepare_train(tmp_path, "out", tmp_path / "s.jsonl", "--min_language_score=0.5") == ["kept"]
    assert read_meta(tmp_path / "out")["skipped"] == {"null_or_empty": 0, "below_language_score": 2}
    pq.write_table(pa.table({"text": ["a"], "language_score": pa.array([None], pa.float64())}), tmp_path / "n.parquet")
    code = run_main(tmp_path / "n.parquet", f"--out_dir={tmp_path / 'none'}", "--min_language_score=0.5")
    assert code.startswith("prepare.py: error: no documents in the input (0 null/empty rows, 1 below")
