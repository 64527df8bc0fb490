"""
The test suite in a plain clone, as a newcomer has it: no ../shared beside it (no sample data, nothing to seed
tiktoken's cache from), no GPT-2 files in tiktoken's cache and no network but loopback; with no
GPT2_TIKTOKEN_FILE, or with it naming a gpt2.tiktoken downloaded by hand (the README's offline route). Every test
of the fast lane must pass or skip with a reason there, not fail (the README promises it).
"""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_DATA

DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens on port 9: every download fails at once, as offline


def plain_clone(target):
    """The checkout's files (tracked, and new ones git does not ignore) copied to target: what a clone holds,
    without ../shared, outputs or caches."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which files a clone holds")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the work tree is not copied
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, target / name)


def offline_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GPT2_TIKTOKEN_FILE", "DATA_GYM_CACHE_DIR")}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken-cache"),  # empty: tiktoken's default one may hold GPT-2
               HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1",
               **{name: DEAD_PROXY for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
               **{name: "127.0.0.1,localhost" for name in ("NO_PROXY", "no_proxy")})  # the tests' own servers
    return env


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_file", [False, True], ids=["no-tokenizer", "gpt2.tiktoken-only"])
def test_fast_lane_in_a_plain_clone_offline(tmp_path, tokenizer_file):
    clone = tmp_path / "clone"  # tmp_path holds no shared/: the clone has no ../shared
    plain_clone(clone)
    env = offline_environment(tmp_path)
    if tokenizer_file:
        if not (SHARED_DATA / "gpt2.tiktoken").exists():
            pytest.skip(f"no gpt2.tiktoken in {SHARED_DATA} to hand to the clone")
        shutil.copyfile(SHARED_DATA / "gpt2.tiktoken", tmp_path / "gpt2.tiktoken")  # as a user downloads it
        env["GPT2_TIKTOKEN_FILE"] = str(tmp_path / "gpt2.tiktoken")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-rs", "-p", "no:cacheprovider",
                             f"--basetemp={tmp_path / 'basetemp'}"], cwd=clone, env=env, capture_output=True,
                            text=True, timeout=1800)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and " failed" not in summary and " error" not in summary, result.stdout[-6000:]
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    # the conditions held: what needs the sample data skipped, and what needs the tokenizer unless it was given,
    # each saying why
    assert any("english-sample.parquet not found" in line for line in skips), result.stdout[-3000:]
    assert any("no GPT-2 tokenizer" in line for line in skips) != tokenizer_file, result.stdout[-3000:]
