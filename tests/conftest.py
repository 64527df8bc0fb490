"""
Shared test set-up. Everything runs on CPU with tiny models and the real data in ../shared:
- tiktoken cannot download here, so its cache is seeded from ../shared/data (the same files tiktoken
  would fetch, under the names it looks for) and TIKTOKEN_CACHE_DIR points there for this process and
  every subprocess the tests start.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_PARQUET = SHARED_DATA / "english-sample.parquet"
sys.path.insert(0, str(REPO))

# file name in tiktoken's cache = sha1 of the download URL (see ../shared/README.md)
_TIKTOKEN_FILES = {
    "vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
    "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
    "gpt2.tiktoken": "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4",
}


def pytest_configure(config):
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / f"tiktoken-cache-{os.getuid()}"
    cache.mkdir(parents=True, exist_ok=True)
    for name, cached_name in _TIKTOKEN_FILES.items():
        target = cache / cached_name
        if not target.exists() and (SHARED_DATA / name).exists():
            shutil.copyfile(SHARED_DATA / name, target)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


@pytest.fixture(scope="session")
def sample_parquet():
    if not SAMPLE_PARQUET.exists():
        pytest.skip(f"{SAMPLE_PARQUET} not found")
    return SAMPLE_PARQUET


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory, sample_parquet):
    """Token files of the first 4,000 documents of the shared sample (~1.6M tokens), made once per session by
    the real prepare.py; treat as read-only."""
    import subprocess
    out = tmp_path_factory.mktemp("tokens")
    subprocess.run([sys.executable, str(REPO / "data/fineweb/prepare.py"), str(sample_parquet), f"--out_dir={out}",
                    "--max_docs=4000", "--val_docs=200", "--num_proc=2"], check=True, capture_output=True)
    return out


def run_script(script, *args, timeout=600, check=True):
    """Run one of the repo's scripts as a user would (python <script> args...) from the repo root."""
    import subprocess
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result
